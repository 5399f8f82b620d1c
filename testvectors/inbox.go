package testvectors

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/ferryhq/ferry/inbox"
	"github.com/ferryhq/ferry/store"
	"github.com/ferryhq/ferry/store/storepb"
	"github.com/ferryhq/ferry/wire"
	"github.com/ferryhq/ferry/wire/wirepb"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
)

// KindInbox is the kind of inbox record vectors.
const KindInbox = "inbox"

// ErrRecordsMismatch: the store holds other keys or values than the vector lists.
const ErrRecordsMismatch = "ErrRecordsMismatch"

func init() {
	families = append(families, family{kind: KindInbox, verdict: []string{ErrRecordsMismatch},
		gen: inboxVectors, decode: func() vector { return &InboxVector{} }})
}

// InboxVector is what the server stores for a sequence of inbox
// operations. A verifier runs steps through a real inbox.Store on an
// in-memory Pebble (vfs.NewMem) whose clock starts at now_ms and moves only
// with "advance" steps, with the TTL ttl_ms and no background sweep, and
// then compares every key and value in the database, in key order, with
// records ("valid") or fails (ErrRecordsMismatch). key_fields and
// value_fields decode each record for humans (package store documents the
// key space) and must match the bytes.
//
// Steps: "send" is inbox.Store.Append of the envelopes the relay makes for
// a Send (Envelope{sender, sender_device, to, type, content,
// client_msg_id} per device; conversation "d:" + the two account names in
// ascending order); "group_send" is AppendGroup (one shared body);
// "ack" deletes ids of device; "advance" moves the clock by advance_ms;
// "expire" runs one expiry sweep.
type InboxVector struct {
	Header
	NowMs   int64       `json:"now_ms"`
	TTLMs   int64       `json:"ttl_ms"`
	Steps   []InboxStep `json:"steps"`
	Records []Record    `json:"records"`
}

// InboxStep is one operation.
type InboxStep struct {
	Op           string       `json:"op"`
	Sender       string       `json:"sender,omitempty"` // "account.device"
	ClientMsgID  string       `json:"client_msg_id,omitempty"`
	Conversation string       `json:"conversation,omitempty"`
	Entries      []InboxEntry `json:"entries,omitempty"`    // send
	Envelope     Hex          `json:"envelope,omitempty"`   // group_send: the shared envelope (wirepb.Envelope)
	Body         Hex          `json:"body,omitempty"`       // group_send: the sender-key ciphertext
	Recipients   []string     `json:"recipients,omitempty"` // group_send
	Device       string       `json:"device,omitempty"`     // ack
	IDs          []uint64     `json:"ids,omitempty"`        // ack
	AdvanceMs    int64        `json:"advance_ms,omitempty"` // advance
	Expired      int          `json:"expired,omitempty"`    // expire: how many entries it deleted
	Accepted     *AcceptedJS  `json:"accepted,omitempty"`   // send, group_send: the result
	Deleted      []uint64     `json:"deleted,omitempty"`    // ack: the ids deleted
	Note         string       `json:"note,omitempty"`       // for humans
}

// InboxEntry is one recipient device's envelope of a send.
type InboxEntry struct {
	To       string `json:"to"`
	Envelope Hex    `json:"envelope"` // wirepb.Envelope as the relay hands it to the inbox
}

// AcceptedJS is an inbox.Accepted.
type AcceptedJS struct {
	Seq          uint64 `json:"seq"`
	ServerTimeMs int64  `json:"server_time_ms"`
}

// Record is one stored key and value.
type Record struct {
	Key         Hex             `json:"key"`
	Value       Hex             `json:"value"`
	KeyFields   string          `json:"key_fields"`
	ValueFields json.RawMessage `json:"value_fields"`
}

func parseAddr(s string) (wire.DeviceAddr, error) {
	i := strings.LastIndexByte(s, '.')
	if i < 1 {
		return wire.DeviceAddr{}, fmt.Errorf("device %q is not account.device", s)
	}
	n, err := strconv.ParseUint(s[i+1:], 10, 32)
	if err != nil {
		return wire.DeviceAddr{}, fmt.Errorf("device %q: %w", s, err)
	}
	return wire.DeviceAddr{Account: s[:i], Device: uint32(n)}, nil
}

// run executes the steps and returns the database's records; gen fills
// the steps' results instead of checking them.
func (v *InboxVector) run(gen bool) ([]store.KV, error) {
	ctx := context.Background()
	db, err := store.OpenMem()
	if err != nil {
		return nil, err
	}
	defer db.Close()
	now := time.UnixMilli(v.NowMs)
	ib, err := inbox.New(db, inbox.Options{TTL: time.Duration(v.TTLMs) * time.Millisecond, SweepInterval: -1,
		Now: func() time.Time { return now }})
	if err != nil {
		return nil, err
	}
	defer ib.Close()
	for i := range v.Steps {
		s := &v.Steps[i]
		fail := func(err error) ([]store.KV, error) { return nil, fmt.Errorf("step %d (%s): %w", i, s.Op, err) }
		check := func(ok bool, what string) error {
			if !ok && !gen {
				return fmt.Errorf("%s differs", what)
			}
			return nil
		}
		switch s.Op {
		case "send", "group_send":
			sender, err := parseAddr(s.Sender)
			if err != nil {
				return fail(err)
			}
			var acc inbox.Accepted
			if s.Op == "send" {
				m := inbox.Send{Sender: sender, ClientMsgID: s.ClientMsgID, Conversation: s.Conversation}
				for _, e := range s.Entries {
					to, err := parseAddr(e.To)
					if err != nil {
						return fail(err)
					}
					env := &wirepb.Envelope{}
					if err := proto.Unmarshal(e.Envelope, env); err != nil {
						return fail(err)
					}
					m.Entries = append(m.Entries, inbox.Entry{To: to, Env: env})
				}
				acc, err = ib.Append(ctx, m)
			} else {
				env := &wirepb.Envelope{}
				if err := proto.Unmarshal(s.Envelope, env); err != nil {
					return fail(err)
				}
				m := inbox.GroupAppend{Sender: sender, ClientMsgID: s.ClientMsgID, Conversation: s.Conversation, Env: env, Body: s.Body}
				for _, r := range s.Recipients {
					to, err := parseAddr(r)
					if err != nil {
						return fail(err)
					}
					m.Recipients = append(m.Recipients, to)
				}
				acc, err = ib.AppendGroup(ctx, m)
			}
			if err != nil {
				return fail(err)
			}
			got := &AcceptedJS{Seq: acc.Seq, ServerTimeMs: acc.ServerTime.UnixMilli()}
			if err := check(s.Accepted != nil && *s.Accepted == *got, "accepted"); err != nil {
				return fail(err)
			}
			s.Accepted = got
		case "ack":
			dev, err := parseAddr(s.Device)
			if err != nil {
				return fail(err)
			}
			del, err := ib.Ack(ctx, dev, s.IDs, nil)
			if err != nil {
				return fail(err)
			}
			if err := check(fmt.Sprint(del) == fmt.Sprint(s.Deleted), "deleted"); err != nil {
				return fail(err)
			}
			s.Deleted = del
		case "advance":
			now = now.Add(time.Duration(s.AdvanceMs) * time.Millisecond)
		case "expire":
			n, err := ib.ExpireNow(ctx)
			if err != nil {
				return fail(err)
			}
			if err := check(n == s.Expired, "expired"); err != nil {
				return fail(err)
			}
			s.Expired = n
		default:
			return fail(errors.New("unknown op"))
		}
	}
	return store.Dump(db)
}

func (v *InboxVector) Check() (string, error) {
	kvs, err := v.run(false)
	if err != nil {
		return ErrRecordsMismatch, err
	}
	if len(kvs) != len(v.Records) {
		return ErrRecordsMismatch, fmt.Errorf("the store holds %d records, the vector lists %d", len(kvs), len(v.Records))
	}
	for i, kv := range kvs {
		if !bytes.Equal(kv.Key, v.Records[i].Key) || !bytes.Equal(kv.Value, v.Records[i].Value) {
			return ErrRecordsMismatch, fmt.Errorf("record %d (%s) differs", i, describeKey(kv.Key))
		}
	}
	return ExpectValid, nil
}

func (v *InboxVector) Consistent() error {
	for i, r := range v.Records {
		k, val := describeKey(r.Key), describeValue(r.Key, r.Value)
		if k != r.KeyFields || !bytes.Equal(val, compactJSON(r.ValueFields)) {
			return fmt.Errorf("record %d: key_fields or value_fields do not match the bytes", i)
		}
	}
	return nil
}

func compactJSON(b []byte) []byte {
	var c bytes.Buffer
	if json.Compact(&c, b) != nil {
		return nil
	}
	return c.Bytes()
}

// splitDev splits username 0x00 device(4) rest.
func splitDev(b []byte) (string, []byte) {
	i := bytes.IndexByte(b, 0)
	if i < 0 || len(b) < i+5 {
		return fmt.Sprintf("malformed %x", b), nil
	}
	return fmt.Sprintf("%s.%d", b[:i], binary.BigEndian.Uint32(b[i+1:i+5])), b[i+5:]
}

// describeKey names a key's parts (package store's key space).
func describeKey(k []byte) string {
	if len(k) == 0 {
		return "empty"
	}
	rest := k[1:]
	switch k[0] {
	case store.PrefixInbox:
		dev, r := splitDev(rest)
		if len(r) != 8 {
			break
		}
		return fmt.Sprintf("'i' inbox entry: device %s, envelope id %d", dev, binary.BigEndian.Uint64(r))
	case store.PrefixInboxMeta:
		dev, _ := splitDev(rest)
		return "'m' inbox meta: device " + dev
	case store.PrefixConvSeq:
		return fmt.Sprintf("'q' conversation sequence: %q", rest)
	case store.PrefixDedup:
		dev, r := splitDev(rest)
		return fmt.Sprintf("'d' dedup record: sender %s, client_msg_id %q", dev, r)
	case store.PrefixGroupBody:
		switch {
		case len(rest) == 0:
			return "'c' last group body id"
		case len(rest) == 9 && rest[8] == 'b':
			return fmt.Sprintf("'c' group body %d", binary.BigEndian.Uint64(rest))
		case len(rest) == 9 && rest[8] == 'r':
			return fmt.Sprintf("'c' group body %d references", binary.BigEndian.Uint64(rest))
		}
	case store.PrefixMarker:
		dev, r := splitDev(rest)
		return fmt.Sprintf("'x' marker index: device %s, key %q", dev, r)
	}
	return fmt.Sprintf("other (prefix %q)", k[0])
}

var pj = protojson.MarshalOptions{UseProtoNames: true}

func pjson(m proto.Message) []byte {
	b, err := pj.Marshal(m)
	if err != nil {
		return nil
	}
	return compactJSON(b)
}

// describeValue decodes a value by its key's prefix, as compact JSON.
func describeValue(k, v []byte) []byte {
	dec := func(m proto.Message) []byte {
		if err := proto.Unmarshal(v, m); err != nil {
			return []byte(`"does not decode"`)
		}
		return pjson(m)
	}
	u64 := func(name string) []byte {
		if len(v) != 8 {
			return []byte(`"not 8 bytes"`)
		}
		return []byte(fmt.Sprintf(`{%q:%d}`, name, binary.BigEndian.Uint64(v)))
	}
	if len(k) == 0 {
		return nil
	}
	switch k[0] {
	case store.PrefixInbox:
		env, ref := &wirepb.Envelope{}, &storepb.EntryBodyRef{}
		if proto.Unmarshal(v, env) != nil || proto.Unmarshal(v, ref) != nil {
			return []byte(`"does not decode"`)
		}
		env.ProtoReflect().SetUnknown(nil)
		out := fmt.Sprintf(`{"envelope":%s`, pjson(env))
		if ref.BodyId != 0 {
			out += fmt.Sprintf(`,"body_ref":%s`, pjson(ref))
		}
		return []byte(out + "}")
	case store.PrefixInboxMeta:
		return dec(&storepb.InboxMeta{})
	case store.PrefixConvSeq:
		return u64("seq")
	case store.PrefixDedup:
		return dec(&storepb.SendRecord{})
	case store.PrefixGroupBody:
		switch {
		case len(k) == 1:
			return u64("last_body_id")
		case k[len(k)-1] == 'b':
			return dec(&wirepb.Envelope{})
		default:
			return dec(&storepb.BodyRefs{})
		}
	}
	return []byte(fmt.Sprintf("%q", fmt.Sprintf("%x", v)))
}

func inboxVectors() (map[string]vector, error) {
	const ttl = 30 * 24 * 3600 * 1000
	env := func(typ wirepb.EnvelopeType, content string) Hex {
		b, _ := proto.MarshalOptions{Deterministic: true}.Marshal(&wirepb.Envelope{Sender: "alice", SenderDevice: 1, To: "bob",
			Type: typ, Content: []byte(content), ClientMsgId: "m1"})
		return b
	}
	// Ciphertext stand-ins: the server never looks inside.
	send := InboxStep{Op: "send", Sender: "alice.1", ClientMsgID: "m1", Conversation: "d:alice:bob",
		Note: "the content bytes stand for Signal ciphertexts: the server stores them as given",
		Entries: []InboxEntry{
			{To: "bob.1", Envelope: env(wirepb.EnvelopeType_PREKEY_SIGNAL_MESSAGE, "ciphertext for bob.1")},
			{To: "bob.2", Envelope: env(wirepb.EnvelopeType_SIGNAL_MESSAGE, "ciphertext for bob.2")},
			{To: "alice.2", Envelope: env(wirepb.EnvelopeType_SIGNAL_MESSAGE, "ciphertext for alice.2 (sync copy)")},
		}}
	const gid = "0123456789abcdef0123456789abcdef"
	genv, _ := proto.MarshalOptions{Deterministic: true}.Marshal(&wirepb.Envelope{Sender: "alice", SenderDevice: 1,
		GroupId: gid, Type: wirepb.EnvelopeType_SENDER_KEY_MESSAGE, ClientMsgId: "g1"})
	gsend := InboxStep{Op: "group_send", Sender: "alice.1", ClientMsgID: "g1", Conversation: "g:" + gid, Envelope: genv,
		Body: []byte("one sender-key ciphertext for the whole group"), Recipients: []string{"bob.1", "bob.2", "carol.1"}}
	ack := func(dev string, ids ...uint64) InboxStep { return InboxStep{Op: "ack", Device: dev, IDs: ids} }
	cases := map[string]struct {
		desc  string
		steps []InboxStep
		lie   bool
	}{
		"send": {"alice.1 sends bob one message: an entry per recipient device and for her other device, their metas, the conversation sequence, her dedup record",
			[]InboxStep{send}, false},
		"send-acked": {"the same send, acked by every device: the entries are gone, only counters and the dedup record (no content) remain",
			[]InboxStep{send, ack("bob.1", 1), ack("bob.2", 1), ack("alice.2", 1)}, false},
		"send-expired": {"the same send, never delivered, past the TTL: one sweep deletes the entries and the dedup record",
			[]InboxStep{send, {Op: "advance", AdvanceMs: ttl}, {Op: "expire"}}, false},
		"group-send": {"a group message to three devices: the body is stored once, each entry holds only its id, seq, time and a reference",
			[]InboxStep{gsend}, false},
		"group-send-acked": {"the group message acked by every device: the body and its references are gone with the last ack",
			[]InboxStep{gsend, ack("bob.1", 1), ack("bob.2", 1), ack("carol.1", 1)}, false},
		"acked-entry-kept": {"a server that keeps an acked entry: the records claim bob.1's entry survives the ack, which the real store does not do",
			[]InboxStep{send, ack("bob.1", 1)}, true},
	}
	out := map[string]vector{}
	for name, c := range cases {
		v := &InboxVector{Header: Header{Description: c.desc, Expect: ExpectValid}, NowMs: createdMs, TTLMs: ttl}
		for _, s := range c.steps {
			s.Entries = append([]InboxEntry(nil), s.Entries...)
			v.Steps = append(v.Steps, s)
		}
		kvs, err := v.run(true)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", name, err)
		}
		if c.lie {
			// What the store holds before the ack, bob.1's entry included.
			before := &InboxVector{NowMs: v.NowMs, TTLMs: v.TTLMs, Steps: v.Steps[:1]}
			all, err := before.run(true)
			if err != nil {
				return nil, err
			}
			for _, kv := range all {
				if describeKey(kv.Key) == "'i' inbox entry: device bob.1, envelope id 1" {
					kvs = append(kvs, kv)
				}
			}
			sortKVs(kvs)
			v.Expect = ErrRecordsMismatch
		}
		for _, kv := range kvs {
			v.Records = append(v.Records, Record{Key: kv.Key, Value: kv.Value, KeyFields: describeKey(kv.Key),
				ValueFields: describeValue(kv.Key, kv.Value)})
		}
		out[name] = v
	}
	return out, nil
}

func sortKVs(kvs []store.KV) {
	for i := 1; i < len(kvs); i++ {
		for j := i; j > 0 && bytes.Compare(kvs[j-1].Key, kvs[j].Key) > 0; j-- {
			kvs[j-1], kvs[j] = kvs[j], kvs[j-1]
		}
	}
}
