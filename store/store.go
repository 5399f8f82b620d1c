// Package store opens the one Pebble database a ferryd node keeps, and
// documents who owns which part of its key space. Each store package (inbox,
// keys, device, group, push) reads and writes only under its own prefixes.
//
// Key space (all integers big-endian; usernames are [a-z0-9_] so 0x00 is a
// safe separator):
//
//	'a' username                                    device:  Account record (storepb.Account)
//	'l' username                                    device:  newest signed device list (wirepb.SignedDeviceList)
//	'k' 's' username 0x00 device(4)                 keys:    DeviceKeys (identity + signed prekey)
//	'k' 'o' username 0x00 device(4) prekey_id(4)    keys:    one-time prekey public key (33 bytes)
//	'i' username 0x00 device(4) envelope_id(8)      inbox:   wirepb.Envelope bytes (+ EntryBodyRef, see below)
//	'm' username 0x00 device(4)                     inbox:   InboxMeta (last id, count, bytes)
//	'q' conversation                                inbox:   per-conversation sequence (8 bytes)
//	'd' username 0x00 device(4) client_msg_id       inbox:   SendRecord (dedup of retries)
//	'c'                                             inbox:   last group body id (8 bytes)
//	'c' body_id(8) 'b'                              inbox:   shared group envelope (wirepb.Envelope without id, seq, time)
//	'c' body_id(8) 'r'                              inbox:   BodyRefs (entries still referring to the body)
//	'x' username 0x00 device(4) coalesce_key        inbox:   marker index: entry id(8) and receipt seq(8)
//	'f'                                             inbox:   last fan-out job id (8 bytes)
//	'f' job_id(8) 'j'                               inbox:   FanoutJob (a large group append not yet expanded)
//	'f' job_id(8) 'n'                               inbox:   recipients expanded so far (8 bytes)
//	'g' 'r' group_id(16)                            group:   Group record (storepb.Group)
//	'g' 'u' username 0x00 group_id(16)              group:   empty: index of a member's groups
//	'p' username 0x00 device(4)                     push:    wirepb.PushRegistration (the device's push target)
//	'o' 's' username                                presence: last seen, Unix ms (8 bytes), written NoSync
//	'o' 'v' username                                presence: privacy setting (wirepb.PresencePrivacy)
//	'e' 'c' | 'n' | 's' shard(4)                    cluster: cluster id + shard count, node id, per-shard epochs (see cluster/store.go)
//
// An inbox entry ('i') of a group message or GROUP_UPDATE holds only its
// id, seq and time, followed by a storepb.EntryBodyRef naming the shared
// envelope; that is stored once per message, not per device.
//
// A marker index key ('x') names the one pending coalesced receipt of a
// device for a coalescing key (receipt kind, conversation, reader): a newer
// marker with a higher seq replaces that entry instead of adding one. It
// may point to an entry that was acked or expired; the next marker
// overwrites it.
//
// A fan-out job ('f') is a group append with more recipient devices than
// the inline threshold: it is committed with the body, before the sender's
// ✓, and expanded into 'i' entries afterwards, a chunk per commit; its keys
// go with its last chunk.
// Presence is kept only as a last-seen time and the privacy setting that
// governs it; online state, subscriptions and typing live in memory.
//
// Nothing else is stored: no plaintext, no history, no contact lists.
package store

import (
	"errors"
	"fmt"
	"log/slog"
	"os"
	"slices"
	"strings"

	"github.com/cockroachdb/pebble/v2"
	"github.com/cockroachdb/pebble/v2/vfs"
)

// Key prefixes, one byte each.
const (
	PrefixAccount    = 'a'
	PrefixDeviceList = 'l'
	PrefixKeys       = 'k'
	PrefixInbox      = 'i'
	PrefixInboxMeta  = 'm'
	PrefixConvSeq    = 'q'
	PrefixDedup      = 'd'
	PrefixGroupBody  = 'c'
	PrefixGroup      = 'g'
	PrefixMarker     = 'x'
	PrefixFanout     = 'f'
	PrefixPush       = 'p'
	PrefixPresence   = 'o'
	PrefixCluster    = 'e'
)

// ErrOpen wraps every failure to open the database.
var ErrOpen = errors.New("store: open")

// ErrDamaged wraps an open failure that means the files are damaged or
// missing (Pebble's corruption errors, a table file the MANIFEST names but
// the directory lacks), as opposed to a permission or lock problem.
var ErrDamaged = errors.New("store: damaged (restore the data directory from a backup; do not start on it again as is)")

// Options for Open. The zero value opens dir on the real disk.
type Options struct {
	// FS is the file system; nil means the OS disk. Tests pass vfs.NewMem().
	FS vfs.FS
	// ReadOnly opens without writing (tools, audits).
	ReadOnly bool
}

// Open opens (creating if needed) the Pebble database in dir. Corruption or
// an unreadable directory is an error: a node refuses to serve rather than
// serve wrong data.
func Open(dir string, o Options) (*pebble.DB, error) {
	if o.FS == nil && !o.ReadOnly {
		if err := finishCompact(dir); err != nil {
			return nil, fmt.Errorf("%w %s: %w", ErrOpen, dir, err)
		}
	}
	if o.FS == nil {
		o.FS = faultFS(dir)
	}
	opts := &pebble.Options{
		FS:       o.FS,
		ReadOnly: o.ReadOnly,
		Logger:   quietLogger{},
	}
	db, err := pebble.Open(dir, opts)
	if err != nil {
		if pebble.IsCorruptionError(err) || errors.Is(err, os.ErrNotExist) && !missingDir(o.FS, dir) {
			return nil, fmt.Errorf("%w %s: %w: %w", ErrOpen, dir, ErrDamaged, err)
		}
		return nil, fmt.Errorf("%w %s: %w", ErrOpen, dir, err)
	}
	return db, nil
}

// missingDir reports whether dir itself does not exist (not damage).
func missingDir(fs vfs.FS, dir string) bool {
	if fs == nil {
		fs = vfs.Default
	}
	_, err := fs.Stat(dir)
	return errors.Is(err, os.ErrNotExist)
}

// OpenMem opens an in-memory database for tests.
func OpenMem() (*pebble.DB, error) { return Open("", Options{FS: vfs.NewMem()}) }

// Write is one key change a store hands to another store's batch, so that
// changes of two stores commit atomically (group membership with its
// GROUP_UPDATE envelopes). The key stays under its owner's prefix.
type Write struct {
	Key, Value []byte
	Delete     bool
}

// DeviceKey returns username 0x00 device(4), the device part of many keys.
func DeviceKey(dst []byte, username string, device uint32) []byte {
	dst = append(dst, username...)
	dst = append(dst, 0)
	return append(dst, byte(device>>24), byte(device>>16), byte(device>>8), byte(device))
}

// FatalError is what Pebble reports through its logger's Fatalf: a state it
// cannot go on from. The one a server meets is "fatal commit error", a WAL
// write or fsync that failed (a failing disk, a full disk): the batch is
// then in the memtable but not durable, and Pebble's commit pipeline may be
// wedged. The quiet logger panics with a *FatalError; the inbox committer
// recovers it into a retryable error for the ops of that commit (none of
// them is acked) and stops accepting writes; ferryd then exits so a
// supervisor restarts it and Pebble replays only what reached the WAL.
// See docs/operations.md, "Storage faults".
type FatalError struct{ Msg string }

func (e *FatalError) Error() string { return e.Msg }

// ErrFatal matches every *FatalError with errors.Is.
var ErrFatal = errors.New("store: fatal storage error")

// Is makes errors.Is(err, ErrFatal) true for a *FatalError.
func (e *FatalError) Is(target error) bool { return target == ErrFatal }

// RecoverFatal turns a recovered *FatalError panic into an error stored in
// *err, and re-panics anything else. Use it as
//
//	defer store.RecoverFatal(&err)
//
// around a Pebble call that may fail fatally (a synced commit).
func RecoverFatal(err *error) {
	r := recover()
	if r == nil {
		return
	}
	if fe, ok := r.(*FatalError); ok {
		*err = fe
		return
	}
	panic(r)
}

// quietLogger keeps Pebble's informational chatter out of ferryd's logs
// while still surfacing errors.
type quietLogger struct{}

func (quietLogger) Infof(string, ...any) {}
func (quietLogger) Errorf(format string, args ...any) {
	slog.Error("pebble: " + fmt.Sprintf(format, args...))
}
func (quietLogger) Fatalf(format string, args ...any) {
	msg := fmt.Sprintf(format, args...)
	if !strings.HasPrefix(msg, "pebble: ") {
		msg = "pebble: " + msg
	}
	slog.Error(msg)
	panic(&FatalError{Msg: msg})
}

// KV is one stored key and value.
type KV struct{ Key, Value []byte }

// Dump returns every key and value in db, in key order (copies). It is
// for audits, tests and the inbox test vectors, not for serving.
func Dump(db *pebble.DB) ([]KV, error) {
	it, err := db.NewIter(nil)
	if err != nil {
		return nil, fmt.Errorf("store: dump: %w", err)
	}
	var out []KV
	for it.First(); it.Valid(); it.Next() {
		out = append(out, KV{Key: slices.Clone(it.Key()), Value: slices.Clone(it.Value())})
	}
	if err := errors.Join(it.Error(), it.Close()); err != nil {
		return nil, fmt.Errorf("store: dump: %w", err)
	}
	return out, nil
}
