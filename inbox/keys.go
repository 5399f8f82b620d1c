package inbox

import (
	"bytes"
	"encoding/binary"

	"github.com/ferryhq/ferry/store"
	"github.com/ferryhq/ferry/wire"
	"google.golang.org/protobuf/encoding/protowire"
)

// Key prefixes this package owns (see package store).
const (
	prefixInbox  = store.PrefixInbox
	prefixMeta   = store.PrefixInboxMeta
	prefixSeq    = store.PrefixConvSeq
	prefixDedup  = store.PrefixDedup
	prefixBody   = store.PrefixGroupBody
	prefixMarker = store.PrefixMarker
	entryIDBytes = 8
)

// Field numbers of storepb.EntryBodyRef, appended to an entry's envelope
// when it refers to a shared body (reserved in wirepb.Envelope).
const (
	fieldBodyID   = 1000
	fieldBodySize = 1001
)

// bodyCounterKey holds the last body id assigned.
var bodyCounterKey = []byte{prefixBody}

func bodyKey(id uint64) []byte {
	return append(binary.BigEndian.AppendUint64([]byte{prefixBody}, id), 'b')
}

func bodyRefsKey(id uint64) []byte {
	return append(binary.BigEndian.AppendUint64([]byte{prefixBody}, id), 'r')
}

// devPrefix returns prefix username 0x00 device(4).
func devPrefix(prefix byte, dev wire.DeviceAddr) []byte {
	k := make([]byte, 0, 1+len(dev.Account)+5+entryIDBytes)
	k = append(k, prefix)
	return store.DeviceKey(k, dev.Account, dev.Device)
}

func entryKey(dev wire.DeviceAddr, id uint64) []byte {
	return binary.BigEndian.AppendUint64(devPrefix(prefixInbox, dev), id)
}

// entryID returns the id at the end of an entry key.
func entryID(key []byte) uint64 { return binary.BigEndian.Uint64(key[len(key)-entryIDBytes:]) }

func metaKey(dev wire.DeviceAddr) []byte { return devPrefix(prefixMeta, dev) }

func dedupKey(sender wire.DeviceAddr, clientMsgID string) []byte {
	return append(devPrefix(prefixDedup, sender), clientMsgID...)
}

// markerKey is the index of a device's pending marker for a coalescing key.
func markerKey(dev wire.DeviceAddr, key string) []byte {
	return append(devPrefix(prefixMarker, dev), key...)
}

func seqKey(conversation string) []byte {
	return append([]byte{prefixSeq}, conversation...)
}

// parseDevKey splits key (prefix username 0x00 device(4) rest) into the
// device and rest. Usernames never contain 0x00.
func parseDevKey(key []byte) (dev wire.DeviceAddr, rest []byte, ok bool) {
	i := bytes.IndexByte(key, 0)
	if i < 1 || len(key) < i+5 {
		return wire.DeviceAddr{}, nil, false
	}
	dev = wire.DeviceAddr{Account: string(key[1:i]), Device: binary.BigEndian.Uint32(key[i+1 : i+5])}
	return dev, key[i+5:], true
}

// prefixEnd returns the smallest key greater than every key starting with p.
func prefixEnd(p []byte) []byte {
	end := bytes.Clone(p)
	for i := len(end) - 1; i >= 0; i-- {
		end[i]++
		if end[i] != 0 {
			return end[:i+1]
		}
	}
	return nil // p is all 0xff: no upper bound
}

// withServerFields appends Id, Seq (if non-zero) and ServerTimeMs to a
// marshaled envelope. Protobuf decoders keep the last value of a repeated
// scalar field, so these override anything the caller set.
func withServerFields(base []byte, id, seq uint64, timeMs int64) []byte {
	v := make([]byte, 0, len(base)+3*(1+binary.MaxVarintLen64))
	v = append(v, base...)
	v = protowire.AppendTag(v, 1, protowire.VarintType)
	v = protowire.AppendVarint(v, id)
	if seq != 0 {
		v = protowire.AppendTag(v, 5, protowire.VarintType)
		v = protowire.AppendVarint(v, seq)
	}
	v = protowire.AppendTag(v, 6, protowire.VarintType)
	return protowire.AppendVarint(v, uint64(timeMs))
}

// withBodyRef appends a storepb.EntryBodyRef to a marshaled envelope.
func withBodyRef(v []byte, id uint64, size uint32) []byte {
	v = protowire.AppendTag(v, fieldBodyID, protowire.VarintType)
	v = protowire.AppendVarint(v, id)
	v = protowire.AppendTag(v, fieldBodySize, protowire.VarintType)
	return protowire.AppendVarint(v, uint64(size))
}

// entryMeta is what the store reads of a stored entry without decoding it.
type entryMeta struct {
	timeMs   int64  // ServerTimeMs
	bodyID   uint64 // 0: no shared body
	bodySize uint32
	refAt    int // offset of the EntryBodyRef fields (the end if none)
}

// parseEntry reads ServerTimeMs and the body reference of a stored entry
// without decoding the rest (zero values if it is malformed or unset).
func parseEntry(v []byte) entryMeta {
	e := entryMeta{refAt: len(v)}
	all := len(v)
	for len(v) > 0 {
		num, typ, n := protowire.ConsumeTag(v)
		if n < 0 {
			return entryMeta{}
		}
		if num == fieldBodyID && e.refAt == all {
			e.refAt = all - len(v)
		}
		v = v[n:]
		if typ == protowire.VarintType && (num == 6 || num == fieldBodyID || num == fieldBodySize) {
			x, m := protowire.ConsumeVarint(v)
			if m < 0 {
				return entryMeta{}
			}
			switch num {
			case 6:
				e.timeMs = int64(x)
			case fieldBodyID:
				e.bodyID = x
			case fieldBodySize:
				e.bodySize = uint32(x)
			}
		}
		m := protowire.ConsumeFieldValue(num, typ, v)
		if m < 0 {
			return entryMeta{}
		}
		v = v[m:]
	}
	return e
}

// envTime returns ServerTimeMs of a marshaled envelope without decoding the
// rest (0 if it is malformed or unset).
func envTime(v []byte) int64 { return parseEntry(v).timeMs }

// size is the entry's size as quotas count it: its stored bytes plus the
// size of the body it refers to.
func (e entryMeta) size(v []byte) int { return len(v) + int(e.bodySize) }
