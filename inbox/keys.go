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
	entryIDBytes = 8
)

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

// envTime returns ServerTimeMs of a marshaled envelope without decoding the
// rest (0 if it is malformed or unset).
func envTime(v []byte) int64 {
	var t int64
	for len(v) > 0 {
		num, typ, n := protowire.ConsumeTag(v)
		if n < 0 {
			return 0
		}
		v = v[n:]
		if num == 6 && typ == protowire.VarintType {
			x, m := protowire.ConsumeVarint(v)
			if m < 0 {
				return 0
			}
			t = int64(x)
		}
		m := protowire.ConsumeFieldValue(num, typ, v)
		if m < 0 {
			return 0
		}
		v = v[m:]
	}
	return t
}
