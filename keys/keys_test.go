package keys_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/cockroachdb/pebble/v2"
	"github.com/ferryhq/ferry/keys"
	"github.com/ferryhq/ferry/store"
	"github.com/ferryhq/ferry/wire"
	"github.com/ferryhq/ferry/wire/wirepb"
	"go.mau.fi/libsignal/ecc"
	"go.mau.fi/libsignal/keys/identity"
	"go.mau.fi/libsignal/util/keyhelper"
	"google.golang.org/protobuf/proto"
)

var (
	alice1 = wire.DeviceAddr{Account: "alice", Device: 1}
	alice2 = wire.DeviceAddr{Account: "alice", Device: 2}
	bob1   = wire.DeviceAddr{Account: "bob", Device: 1}
)

// clock is a settable time source.
type clock struct {
	mu sync.Mutex
	t  time.Time
}

func (c *clock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

func (c *clock) Advance(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.t = c.t.Add(d)
}

func newStore(t *testing.T, o keys.Options) (*keys.Store, *pebble.DB) {
	t.Helper()
	db, err := store.OpenMem()
	if err != nil {
		t.Fatalf("open: %v", err)
	}
	t.Cleanup(func() { db.Close() })
	return keys.New(db, o), db
}

func newIdentity(t testing.TB) *identity.KeyPair {
	t.Helper()
	ik, err := keyhelper.GenerateIdentityKeyPair()
	if err != nil {
		t.Fatalf("identity: %v", err)
	}
	return ik
}

func newPublicKey(t testing.TB) []byte {
	t.Helper()
	kp, err := ecc.GenerateKeyPair()
	if err != nil {
		t.Fatalf("key pair: %v", err)
	}
	return kp.PublicKey().Serialize()
}

func signedPreKey(t testing.TB, ik *identity.KeyPair, id uint32) *wirepb.SignedPreKey {
	t.Helper()
	pub := newPublicKey(t)
	sig := ecc.CalculateSignature(ik.PrivateKey(), pub)
	return &wirepb.SignedPreKey{Id: id, PublicKey: pub, Signature: sig[:]}
}

// preKeys makes n one-time prekeys with ids start, start+1, ...
func preKeys(t testing.TB, start uint32, n int) []*wirepb.PreKey {
	t.Helper()
	out := make([]*wirepb.PreKey, n)
	for i := range out {
		out[i] = &wirepb.PreKey{Id: start + uint32(i), PublicKey: newPublicKey(t)}
	}
	return out
}

// firstUpload uploads an identity key, a signed prekey and n one-time
// prekeys (ids 1..n) for dev.
func firstUpload(t *testing.T, s *keys.Store, dev wire.DeviceAddr, n int) (*identity.KeyPair, *wirepb.UploadKeys) {
	t.Helper()
	ik := newIdentity(t)
	up := &wirepb.UploadKeys{
		IdentityKey:    ik.PublicKey().Serialize(),
		SignedPrekey:   signedPreKey(t, ik, 1),
		OneTimePrekeys: preKeys(t, 1, n),
	}
	got, err := s.Upload(context.Background(), dev, up)
	if err != nil {
		t.Fatalf("upload for %s: %v", dev, err)
	}
	if got != n {
		t.Fatalf("upload for %s holds %d, want %d", dev, got, n)
	}
	return ik, up
}

func count(t *testing.T, s *keys.Store, dev wire.DeviceAddr) (int, bool) {
	t.Helper()
	n, has, err := s.Count(context.Background(), dev)
	if err != nil {
		t.Fatalf("count %s: %v", dev, err)
	}
	return n, has
}

// wantCode fails unless err carries a *wire.Error with code want (want 0:
// err is nil) whose message has the package prefix.
func wantCode(t *testing.T, err error, want wirepb.ErrorCode) *wire.Error {
	t.Helper()
	if want == wirepb.ErrorCode_ERROR_CODE_UNSPECIFIED {
		if err != nil {
			t.Fatalf("unexpected error: %v", err)
		}
		return nil
	}
	var we *wire.Error
	if !errors.As(err, &we) {
		t.Fatalf("error %v is not a *wire.Error (want %v)", err, want)
	}
	if we.Code != want {
		t.Fatalf("error %v has code %v, want %v", err, we.Code, want)
	}
	if !strings.HasPrefix(we.Message, "keys: ") {
		t.Fatalf("wire message %q lacks the package prefix", we.Message)
	}
	return we
}

func randomBytes(t testing.TB, n int) []byte {
	t.Helper()
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return b
}

func TestParsePublicKey(t *testing.T) {
	valid := newPublicKey(t)
	tests := []struct {
		desc string
		b    []byte
		ok   bool
	}{
		{"valid", valid, true},
		{"0x05 + random", append([]byte{0x05}, randomBytes(t, 32)...), true},
		{"nil", nil, false},
		{"empty", []byte{}, false},
		{"type byte only", []byte{0x05}, false},
		{"32 bytes", valid[1:], false},
		{"32 bytes with type", valid[:32], false},
		{"34 bytes", append(bytes.Clone(valid), 0), false},
		{"33 zeros", make([]byte, 33), false},
		{"type 0x06", append([]byte{0x06}, valid[1:]...), false},
		{"type 0x00", append([]byte{0x00}, valid[1:]...), false},
	}
	for _, tt := range tests {
		t.Run(tt.desc, func(t *testing.T) {
			k, err := keys.ParsePublicKey(tt.b)
			if !tt.ok {
				wantCode(t, err, wirepb.ErrorCode_INVALID_KEY)
				if !errors.Is(err, keys.ErrInvalidKey) {
					t.Fatalf("not ErrInvalidKey: %v", err)
				}
				return
			}
			if err != nil {
				t.Fatalf("ParsePublicKey: %v", err)
			}
			if !bytes.Equal(k.Serialize(), tt.b) {
				t.Fatal("decoded key does not serialize back to the input")
			}
		})
	}
}

func TestVerifySignedPreKey(t *testing.T) {
	ik := newIdentity(t)
	ikPub := ik.PublicKey().Serialize()
	spk := signedPreKey(t, ik, 7)
	other := newIdentity(t)
	with := func(f func(*wirepb.SignedPreKey)) *wirepb.SignedPreKey {
		c := proto.CloneOf(spk)
		f(c)
		return c
	}
	tests := []struct {
		desc     string
		identity []byte
		spk      *wirepb.SignedPreKey
		want     wirepb.ErrorCode
	}{
		{"ok", ikPub, spk, 0},
		{"nil spk", ikPub, nil, wirepb.ErrorCode_INVALID_KEY},
		{"no identity", nil, spk, wirepb.ErrorCode_INVALID_KEY},
		{"identity 32 bytes", ikPub[1:], spk, wirepb.ErrorCode_INVALID_KEY},
		{"identity 34 bytes", append(bytes.Clone(ikPub), 1), spk, wirepb.ErrorCode_INVALID_KEY},
		{"identity type byte", append([]byte{0x08}, ikPub[1:]...), spk, wirepb.ErrorCode_INVALID_KEY},
		{"identity zeros", make([]byte, 33), spk, wirepb.ErrorCode_INVALID_KEY},
		{"id 0", ikPub, with(func(s *wirepb.SignedPreKey) { s.Id = 0 }), wirepb.ErrorCode_INVALID_KEY},
		{"key empty", ikPub, with(func(s *wirepb.SignedPreKey) { s.PublicKey = nil }), wirepb.ErrorCode_INVALID_KEY},
		{"key 32 bytes", ikPub, with(func(s *wirepb.SignedPreKey) { s.PublicKey = s.PublicKey[1:] }), wirepb.ErrorCode_INVALID_KEY},
		{"key 34 bytes", ikPub, with(func(s *wirepb.SignedPreKey) { s.PublicKey = append(s.PublicKey, 0) }), wirepb.ErrorCode_INVALID_KEY},
		{"key type byte", ikPub, with(func(s *wirepb.SignedPreKey) { s.PublicKey[0] = 0x04 }), wirepb.ErrorCode_INVALID_KEY},
		{"sig empty", ikPub, with(func(s *wirepb.SignedPreKey) { s.Signature = nil }), wirepb.ErrorCode_BAD_SIGNATURE},
		{"sig 63 bytes", ikPub, with(func(s *wirepb.SignedPreKey) { s.Signature = s.Signature[:63] }), wirepb.ErrorCode_BAD_SIGNATURE},
		{"sig 65 bytes", ikPub, with(func(s *wirepb.SignedPreKey) { s.Signature = append(s.Signature, 0) }), wirepb.ErrorCode_BAD_SIGNATURE},
		{"sig flipped bit", ikPub, with(func(s *wirepb.SignedPreKey) { s.Signature[5] ^= 1 }), wirepb.ErrorCode_BAD_SIGNATURE},
		{"sig zeros", ikPub, with(func(s *wirepb.SignedPreKey) { s.Signature = make([]byte, 64) }), wirepb.ErrorCode_BAD_SIGNATURE},
		{"key changed", ikPub, with(func(s *wirepb.SignedPreKey) { s.PublicKey = newPublicKey(t) }), wirepb.ErrorCode_BAD_SIGNATURE},
		{"other identity", other.PublicKey().Serialize(), spk, wirepb.ErrorCode_BAD_SIGNATURE},
	}
	for _, tt := range tests {
		t.Run(tt.desc, func(t *testing.T) {
			wantCode(t, keys.VerifySignedPreKey(tt.identity, tt.spk), tt.want)
		})
	}
}

func TestUploadFirst(t *testing.T) {
	ctx := context.Background()
	ik := newIdentity(t)
	ikPub := ik.PublicKey().Serialize()
	good := func() *wirepb.UploadKeys {
		return &wirepb.UploadKeys{
			IdentityKey:    bytes.Clone(ikPub),
			SignedPrekey:   signedPreKey(t, ik, 1),
			OneTimePrekeys: preKeys(t, 1, 5),
		}
	}
	with := func(f func(*wirepb.UploadKeys)) *wirepb.UploadKeys {
		up := good()
		f(up)
		return up
	}
	tests := []struct {
		desc string
		up   *wirepb.UploadKeys
		want wirepb.ErrorCode
		n    int
	}{
		{"ok", good(), 0, 5},
		{"ok without one-time prekeys", with(func(u *wirepb.UploadKeys) { u.OneTimePrekeys = nil }), 0, 0},
		{"ok max id", with(func(u *wirepb.UploadKeys) { u.OneTimePrekeys[0].Id = keys.MaxPrekeyID }), 0, 5},
		{"ok exactly max per upload", with(func(u *wirepb.UploadKeys) { u.OneTimePrekeys = preKeys(t, 1, 10) }), 0, 10},
		{"nil", nil, wirepb.ErrorCode_BAD_REQUEST, 0},
		{"no identity", with(func(u *wirepb.UploadKeys) { u.IdentityKey = nil }), wirepb.ErrorCode_BAD_REQUEST, 0},
		{"no signed prekey", with(func(u *wirepb.UploadKeys) { u.SignedPrekey = nil }), wirepb.ErrorCode_BAD_REQUEST, 0},
		{"identity 32 bytes", with(func(u *wirepb.UploadKeys) { u.IdentityKey = u.IdentityKey[1:] }), wirepb.ErrorCode_INVALID_KEY, 0},
		{"identity 34 bytes", with(func(u *wirepb.UploadKeys) { u.IdentityKey = append(u.IdentityKey, 9) }), wirepb.ErrorCode_INVALID_KEY, 0},
		{"identity type byte", with(func(u *wirepb.UploadKeys) { u.IdentityKey[0] = 0 }), wirepb.ErrorCode_INVALID_KEY, 0},
		{"identity zeros", with(func(u *wirepb.UploadKeys) { u.IdentityKey = make([]byte, 33) }), wirepb.ErrorCode_INVALID_KEY, 0},
		{"spk id 0", with(func(u *wirepb.UploadKeys) { u.SignedPrekey.Id = 0 }), wirepb.ErrorCode_INVALID_KEY, 0},
		{"spk key empty", with(func(u *wirepb.UploadKeys) { u.SignedPrekey.PublicKey = nil }), wirepb.ErrorCode_INVALID_KEY, 0},
		{"spk key 32 bytes", with(func(u *wirepb.UploadKeys) { u.SignedPrekey.PublicKey = u.SignedPrekey.PublicKey[:32] }), wirepb.ErrorCode_INVALID_KEY, 0},
		{"spk key 34 bytes", with(func(u *wirepb.UploadKeys) { u.SignedPrekey.PublicKey = append(u.SignedPrekey.PublicKey, 0) }), wirepb.ErrorCode_INVALID_KEY, 0},
		{"spk key type byte", with(func(u *wirepb.UploadKeys) { u.SignedPrekey.PublicKey[0] = 0x85 }), wirepb.ErrorCode_INVALID_KEY, 0},
		{"spk sig empty", with(func(u *wirepb.UploadKeys) { u.SignedPrekey.Signature = nil }), wirepb.ErrorCode_BAD_SIGNATURE, 0},
		{"spk sig 63 bytes", with(func(u *wirepb.UploadKeys) { u.SignedPrekey.Signature = u.SignedPrekey.Signature[:63] }), wirepb.ErrorCode_BAD_SIGNATURE, 0},
		{"spk sig 65 bytes", with(func(u *wirepb.UploadKeys) { u.SignedPrekey.Signature = append(u.SignedPrekey.Signature, 0) }), wirepb.ErrorCode_BAD_SIGNATURE, 0},
		{"spk bad sig", with(func(u *wirepb.UploadKeys) { u.SignedPrekey.Signature[40] ^= 0x10 }), wirepb.ErrorCode_BAD_SIGNATURE, 0},
		{"spk signed by another identity", with(func(u *wirepb.UploadKeys) { u.SignedPrekey = signedPreKey(t, newIdentity(t), 1) }), wirepb.ErrorCode_BAD_SIGNATURE, 0},
		{"one-time id 0", with(func(u *wirepb.UploadKeys) { u.OneTimePrekeys[2].Id = 0 }), wirepb.ErrorCode_BAD_REQUEST, 0},
		{"one-time id too big", with(func(u *wirepb.UploadKeys) { u.OneTimePrekeys[2].Id = keys.MaxPrekeyID + 1 }), wirepb.ErrorCode_BAD_REQUEST, 0},
		{"one-time id max uint32", with(func(u *wirepb.UploadKeys) { u.OneTimePrekeys[2].Id = ^uint32(0) }), wirepb.ErrorCode_BAD_REQUEST, 0},
		{"one-time duplicate id", with(func(u *wirepb.UploadKeys) { u.OneTimePrekeys[4].Id = u.OneTimePrekeys[1].Id }), wirepb.ErrorCode_BAD_REQUEST, 0},
		{"one-time nil entry", with(func(u *wirepb.UploadKeys) { u.OneTimePrekeys[3] = nil }), wirepb.ErrorCode_BAD_REQUEST, 0},
		{"one-time key empty", with(func(u *wirepb.UploadKeys) { u.OneTimePrekeys[3].PublicKey = nil }), wirepb.ErrorCode_INVALID_KEY, 0},
		{"one-time key 32 bytes", with(func(u *wirepb.UploadKeys) { u.OneTimePrekeys[3].PublicKey = u.OneTimePrekeys[3].PublicKey[1:] }), wirepb.ErrorCode_INVALID_KEY, 0},
		{"one-time key 34 bytes", with(func(u *wirepb.UploadKeys) { u.OneTimePrekeys[3].PublicKey = append(u.OneTimePrekeys[3].PublicKey, 1) }), wirepb.ErrorCode_INVALID_KEY, 0},
		{"one-time key type byte", with(func(u *wirepb.UploadKeys) { u.OneTimePrekeys[3].PublicKey[0] = 0x06 }), wirepb.ErrorCode_INVALID_KEY, 0},
		{"one-time key zeros", with(func(u *wirepb.UploadKeys) { u.OneTimePrekeys[3].PublicKey = make([]byte, 33) }), wirepb.ErrorCode_INVALID_KEY, 0},
		{"over max per upload", with(func(u *wirepb.UploadKeys) { u.OneTimePrekeys = preKeys(t, 1, 11) }), wirepb.ErrorCode_TOO_MANY_PREKEYS, 0},
	}
	for i, tt := range tests {
		t.Run(tt.desc, func(t *testing.T) {
			s, _ := newStore(t, keys.Options{MaxPerUpload: 10, MaxStored: 20})
			dev := wire.DeviceAddr{Account: "alice", Device: uint32(i + 1)}
			n, err := s.Upload(ctx, dev, tt.up)
			wantCode(t, err, tt.want)
			gotN, has := count(t, s, dev)
			if tt.want != 0 {
				if gotN != 0 || has {
					t.Fatalf("failed upload stored something: %d one-time, signed=%v", gotN, has)
				}
				return
			}
			if n != tt.n || gotN != tt.n || !has {
				t.Fatalf("upload returned %d, count %d signed=%v; want %d", n, gotN, has, tt.n)
			}
		})
	}
}

func TestUploadLater(t *testing.T) {
	ctx := context.Background()
	s, db := newStore(t, keys.Options{MaxPerUpload: 10, MaxStored: 15})
	ik, first := firstUpload(t, s, alice1, 10)
	ikPub := ik.PublicKey().Serialize()

	// checkUnchanged: the signed prekey and count are what they were.
	stored := func() []byte {
		t.Helper()
		v, closer, err := db.Get(append([]byte{'k', 's'}, store.DeviceKey(nil, "alice", 1)...))
		if err != nil {
			t.Fatal(err)
		}
		defer closer.Close()
		return bytes.Clone(v)
	}
	before := stored()

	failures := []struct {
		desc string
		up   *wirepb.UploadKeys
		want wirepb.ErrorCode
	}{
		{"identity changed", &wirepb.UploadKeys{IdentityKey: newIdentity(t).PublicKey().Serialize()}, wirepb.ErrorCode_IDENTITY_KEY_CHANGED},
		{"identity changed with its own signed prekey", func() *wirepb.UploadKeys {
			other := newIdentity(t)
			return &wirepb.UploadKeys{IdentityKey: other.PublicKey().Serialize(), SignedPrekey: signedPreKey(t, other, 2)}
		}(), wirepb.ErrorCode_IDENTITY_KEY_CHANGED},
		{"identity changed with prekeys", &wirepb.UploadKeys{IdentityKey: newIdentity(t).PublicKey().Serialize(), OneTimePrekeys: preKeys(t, 100, 2)}, wirepb.ErrorCode_IDENTITY_KEY_CHANGED},
		{"new spk by another identity", &wirepb.UploadKeys{SignedPrekey: signedPreKey(t, newIdentity(t), 2)}, wirepb.ErrorCode_BAD_SIGNATURE},
		{"over max stored", &wirepb.UploadKeys{SignedPrekey: signedPreKey(t, ik, 3), OneTimePrekeys: preKeys(t, 100, 6)}, wirepb.ErrorCode_TOO_MANY_PREKEYS},
		{"over max per upload", &wirepb.UploadKeys{OneTimePrekeys: preKeys(t, 100, 11)}, wirepb.ErrorCode_TOO_MANY_PREKEYS},
		{"bad one-time key among good", &wirepb.UploadKeys{OneTimePrekeys: append(preKeys(t, 100, 3), &wirepb.PreKey{Id: 200, PublicKey: []byte{5}})}, wirepb.ErrorCode_INVALID_KEY},
	}
	for _, tt := range failures {
		t.Run(tt.desc, func(t *testing.T) {
			_, err := s.Upload(ctx, alice1, tt.up)
			wantCode(t, err, tt.want)
			if n, has := count(t, s, alice1); n != 10 || !has {
				t.Fatalf("count %d signed=%v after failed upload", n, has)
			}
			if !bytes.Equal(stored(), before) {
				t.Fatal("failed upload changed the signed prekey")
			}
		})
	}
	if _, err := s.Upload(ctx, alice1, &wirepb.UploadKeys{IdentityKey: newIdentity(t).PublicKey().Serialize()}); !errors.Is(err, keys.ErrIdentityKeyChanged) {
		t.Fatalf("identity change: %v", err)
	}

	// The same identity again is fine, and adding 5 more fits (15 <= 15).
	n, err := s.Upload(ctx, alice1, &wirepb.UploadKeys{IdentityKey: ikPub, OneTimePrekeys: preKeys(t, 11, 5)})
	if err != nil || n != 15 {
		t.Fatalf("same identity: %d, %v", n, err)
	}
	// Re-uploading held ids replaces them and does not count twice: fine at the limit.
	replaced := preKeys(t, 1, 10)
	n, err = s.Upload(ctx, alice1, &wirepb.UploadKeys{OneTimePrekeys: replaced})
	if err != nil || n != 15 {
		t.Fatalf("re-upload: %d, %v", n, err)
	}
	// One new id on top is over.
	_, err = s.Upload(ctx, alice1, &wirepb.UploadKeys{OneTimePrekeys: append(preKeys(t, 1, 1), preKeys(t, 16, 1)...)})
	wantCode(t, err, wirepb.ErrorCode_TOO_MANY_PREKEYS)
	// A new signed prekey without the identity key is checked against the stored one.
	spk := signedPreKey(t, ik, 9)
	if n, err := s.Upload(ctx, alice1, &wirepb.UploadKeys{SignedPrekey: spk}); err != nil || n != 15 {
		t.Fatalf("new signed prekey: %d, %v", n, err)
	}
	// An empty upload changes nothing.
	if n, err := s.Upload(ctx, alice1, &wirepb.UploadKeys{}); err != nil || n != 15 {
		t.Fatalf("empty upload: %d, %v", n, err)
	}

	b, err := s.Claim(ctx, bob1, "alice", []uint32{1})
	if err != nil {
		t.Fatal(err)
	}
	got := b[0]
	if !bytes.Equal(got.IdentityKey, ikPub) || !proto.Equal(got.SignedPrekey, spk) {
		t.Fatal("bundle does not carry the identity key and the newest signed prekey")
	}
	if got.OneTimePrekey.GetId() != 1 || !bytes.Equal(got.OneTimePrekey.GetPublicKey(), replaced[0].PublicKey) {
		t.Fatal("re-uploaded prekey 1 was not replaced")
	}
	if bytes.Equal(got.OneTimePrekey.PublicKey, first.OneTimePrekeys[0].PublicKey) {
		t.Fatal("old prekey 1 handed out")
	}
}

func TestUploadRejectsBadAddress(t *testing.T) {
	s, _ := newStore(t, keys.Options{})
	ik := newIdentity(t)
	up := &wirepb.UploadKeys{IdentityKey: ik.PublicKey().Serialize(), SignedPrekey: signedPreKey(t, ik, 1)}
	for _, dev := range []wire.DeviceAddr{
		{Account: "", Device: 1},
		{Account: "alice", Device: 0},
		{Account: "al\x00ice", Device: 1},
		{Account: "Alice", Device: 1},
		{Account: strings.Repeat("a", 33), Device: 1},
	} {
		_, err := s.Upload(context.Background(), dev, up)
		wantCode(t, err, wirepb.ErrorCode_BAD_REQUEST)
	}
}

// TestStoredRaw checks the key layout: raw 33-byte keys under the documented
// keys, nothing outside the 'k' prefix.
func TestStoredRaw(t *testing.T) {
	s, db := newStore(t, keys.Options{})
	_, up := firstUpload(t, s, alice2, 3)
	it, err := db.NewIter(nil)
	if err != nil {
		t.Fatal(err)
	}
	defer it.Close()
	var got [][]byte
	for it.First(); it.Valid(); it.Next() {
		got = append(got, bytes.Clone(it.Key()))
		if it.Key()[0] != store.PrefixKeys {
			t.Fatalf("key %q outside the keys prefix", it.Key())
		}
	}
	dk := store.DeviceKey(nil, "alice", 2)
	want := [][]byte{
		append(append([]byte{'k', 'o'}, dk...), 0, 0, 0, 1),
		append(append([]byte{'k', 'o'}, dk...), 0, 0, 0, 2),
		append(append([]byte{'k', 'o'}, dk...), 0, 0, 0, 3),
		append([]byte{'k', 's'}, dk...),
	}
	if !slices.EqualFunc(got, want, bytes.Equal) {
		t.Fatalf("keys %q, want %q", got, want)
	}
	v, closer, err := db.Get(want[1])
	if err != nil {
		t.Fatal(err)
	}
	defer closer.Close()
	if !bytes.Equal(v, up.OneTimePrekeys[1].PublicKey) {
		t.Fatal("one-time prekey not stored as its raw 33 bytes")
	}
}

func TestClaim(t *testing.T) {
	ctx := context.Background()
	s, _ := newStore(t, keys.Options{})
	ik1, up1 := firstUpload(t, s, alice1, 2)
	ik2, up2 := firstUpload(t, s, alice2, 1)

	for round := range 3 {
		bundles, err := s.Claim(ctx, bob1, "alice", []uint32{2, 1})
		if err != nil {
			t.Fatalf("round %d: %v", round, err)
		}
		if len(bundles) != 2 || bundles[0].DeviceId != 2 || bundles[1].DeviceId != 1 {
			t.Fatalf("round %d: bundles %v", round, bundles)
		}
		for i, want := range []struct {
			ik *identity.KeyPair
			up *wirepb.UploadKeys
		}{{ik2, up2}, {ik1, up1}} {
			b := bundles[i]
			if b.RegistrationId != 0 {
				t.Fatal("registration id set")
			}
			if !bytes.Equal(b.IdentityKey, want.ik.PublicKey().Serialize()) || !proto.Equal(b.SignedPrekey, want.up.SignedPrekey) {
				t.Fatalf("round %d device %d: wrong identity or signed prekey", round, b.DeviceId)
			}
			if err := keys.VerifySignedPreKey(b.IdentityKey, b.SignedPrekey); err != nil {
				t.Fatalf("bundle signed prekey: %v", err)
			}
			// Lowest id first, until none is left.
			if round < len(want.up.OneTimePrekeys) {
				if !proto.Equal(b.OneTimePrekey, want.up.OneTimePrekeys[round]) {
					t.Fatalf("round %d device %d: one-time prekey %v", round, b.DeviceId, b.OneTimePrekey.GetId())
				}
			} else if b.OneTimePrekey != nil {
				t.Fatalf("round %d device %d: one-time prekey %d handed out twice", round, b.DeviceId, b.OneTimePrekey.Id)
			}
		}
	}
	if n, has := count(t, s, alice1); n != 0 || !has {
		t.Fatalf("count after claims: %d, %v", n, has)
	}
}

func TestClaimErrors(t *testing.T) {
	ctx := context.Background()
	s, _ := newStore(t, keys.Options{})
	firstUpload(t, s, alice1, 3)

	tests := []struct {
		desc    string
		account string
		ids     []uint32
		want    wirepb.ErrorCode
		names   string
	}{
		{"device without keys", "alice", []uint32{1, 2}, wirepb.ErrorCode_NO_KEYS, "alice.2"},
		{"device without keys first", "alice", []uint32{3, 1}, wirepb.ErrorCode_NO_KEYS, "alice.3"},
		{"account without keys", "carol", []uint32{1}, wirepb.ErrorCode_NO_KEYS, "carol.1"},
		{"no devices", "alice", nil, wirepb.ErrorCode_BAD_REQUEST, ""},
		{"device twice", "alice", []uint32{1, 1}, wirepb.ErrorCode_BAD_REQUEST, ""},
		{"too many devices", "alice", make([]uint32, keys.MaxClaimDevices+1), wirepb.ErrorCode_BAD_REQUEST, ""},
		{"invalid account", "al\x00ice", []uint32{1}, wirepb.ErrorCode_BAD_REQUEST, ""},
		{"empty account", "", []uint32{1}, wirepb.ErrorCode_BAD_REQUEST, ""},
	}
	for i, tt := range tests {
		t.Run(tt.desc, func(t *testing.T) {
			requester := wire.DeviceAddr{Account: "req", Device: uint32(i + 1)}
			_, err := s.Claim(ctx, requester, tt.account, tt.ids)
			we := wantCode(t, err, tt.want)
			if !strings.Contains(we.Message, tt.names) {
				t.Fatalf("message %q does not name %q", we.Message, tt.names)
			}
			// A failed claim consumes nothing.
			if n, _ := count(t, s, alice1); n != 3 {
				t.Fatalf("failed claim consumed a prekey: %d left", n)
			}
		})
	}
	if _, err := s.Claim(ctx, bob1, "alice", []uint32{2}); !errors.Is(err, keys.ErrNoKeys) || !errors.Is(err, wire.ErrNoKeys) {
		t.Fatalf("ErrNoKeys: %v", err)
	}
	cctx, cancel := context.WithCancel(ctx)
	cancel()
	if _, err := s.Claim(cctx, bob1, "alice", []uint32{1}); !errors.Is(err, context.Canceled) {
		t.Fatalf("canceled: %v", err)
	}
}

// TestClaimConcurrent: 50 claimers race for the one-time prekeys of two
// devices, naming them in both orders. Every prekey is handed out exactly
// once; the claims after that get bundles without one.
func TestClaimConcurrent(t *testing.T) {
	ctx := context.Background()
	s, _ := newStore(t, keys.Options{MaxPerUpload: 100})
	const (
		claimers  = 50
		perDevice = 60
		rounds    = 2 // claims per claimer: 100 per device
	)
	_, up1 := firstUpload(t, s, alice1, perDevice)
	_, up2 := firstUpload(t, s, alice2, perDevice)

	var (
		mu      sync.Mutex
		got     = map[uint32][]uint32{} // device -> ids handed out
		without = map[uint32]int{}
		wg      sync.WaitGroup
		start   = make(chan struct{})
	)
	for c := range claimers {
		wg.Go(func() {
			<-start
			requester := wire.DeviceAddr{Account: "claimer", Device: uint32(c + 1)}
			ids := []uint32{1, 2}
			if c%2 == 1 {
				ids = []uint32{2, 1}
			}
			for range rounds {
				bundles, err := s.Claim(ctx, requester, "alice", ids)
				if err != nil {
					t.Errorf("claim: %v", err)
					return
				}
				mu.Lock()
				for _, b := range bundles {
					if b.OneTimePrekey == nil {
						without[b.DeviceId]++
					} else {
						got[b.DeviceId] = append(got[b.DeviceId], b.OneTimePrekey.Id)
					}
				}
				mu.Unlock()
			}
		})
	}
	close(start)
	wg.Wait()

	for dev, up := range map[uint32]*wirepb.UploadKeys{1: up1, 2: up2} {
		ids := slices.Clone(got[dev])
		slices.Sort(ids)
		if len(slices.Compact(slices.Clone(ids))) != len(ids) {
			t.Fatalf("device %d: a one-time prekey was handed out twice: %v", dev, ids)
		}
		var want []uint32
		for _, pk := range up.OneTimePrekeys {
			want = append(want, pk.Id)
		}
		if !slices.Equal(ids, want) {
			t.Fatalf("device %d: handed out %d ids, want all %d uploaded", dev, len(ids), len(want))
		}
		if without[dev] != claimers*rounds-perDevice {
			t.Fatalf("device %d: %d bundles without a one-time prekey, want %d", dev, without[dev], claimers*rounds-perDevice)
		}
		if n, has := count(t, s, wire.DeviceAddr{Account: "alice", Device: dev}); n != 0 || !has {
			t.Fatalf("device %d: count %d, %v", dev, n, has)
		}
	}
}

func TestClaimRateLimit(t *testing.T) {
	ctx := context.Background()
	clk := &clock{t: time.Date(2025, 1, 1, 0, 0, 0, 0, time.UTC)}
	s, _ := newStore(t, keys.Options{ClaimRate: 1, ClaimBurst: 3, Now: clk.Now})
	firstUpload(t, s, alice1, 10)

	for i := range 3 {
		if _, err := s.Claim(ctx, bob1, "alice", []uint32{1}); err != nil {
			t.Fatalf("claim %d: %v", i, err)
		}
	}
	_, err := s.Claim(ctx, bob1, "alice", []uint32{1})
	we := wantCode(t, err, wirepb.ErrorCode_RATE_LIMITED)
	if !errors.Is(err, keys.ErrRateLimited) || !errors.Is(err, wire.ErrRateLimited) {
		t.Fatalf("not ErrRateLimited: %v", err)
	}
	if we.RetryAfterMs == 0 || we.RetryAfterMs > 1000 || !we.Retryable {
		t.Fatalf("retry after %d ms, retryable %v", we.RetryAfterMs, we.Retryable)
	}
	if we == keys.ErrRateLimited || keys.ErrRateLimited.RetryAfterMs != 0 {
		t.Fatal("the sentinel was handed out or changed")
	}
	// The refused claim consumed nothing; another requester is not limited.
	if n, _ := count(t, s, alice1); n != 7 {
		t.Fatalf("%d prekeys left, want 7", n)
	}
	if _, err := s.Claim(ctx, alice2, "alice", []uint32{1}); err != nil {
		t.Fatalf("other requester: %v", err)
	}
	// Waiting the advised time is enough.
	clk.Advance(time.Duration(we.RetryAfterMs) * time.Millisecond)
	if _, err := s.Claim(ctx, bob1, "alice", []uint32{1}); err != nil {
		t.Fatalf("after waiting: %v", err)
	}
	_, err = s.Claim(ctx, bob1, "alice", []uint32{1})
	wantCode(t, err, wirepb.ErrorCode_RATE_LIMITED)
	// A refused claim does not push the next allowed one further out.
	for range 5 {
		s.Claim(ctx, bob1, "alice", []uint32{1})
	}
	clk.Advance(time.Second)
	if _, err := s.Claim(ctx, bob1, "alice", []uint32{1}); err != nil {
		t.Fatalf("after refused claims and a second: %v", err)
	}
}

func TestCountAndDeleteDevice(t *testing.T) {
	ctx := context.Background()
	s, _ := newStore(t, keys.Options{})
	if n, has := count(t, s, alice1); n != 0 || has {
		t.Fatalf("count before upload: %d, %v", n, has)
	}
	firstUpload(t, s, alice1, 4)
	firstUpload(t, s, alice2, 5)
	// Neighbours in key order must survive the delete.
	neighbours := []wire.DeviceAddr{
		{Account: "alic", Device: 1},
		{Account: "alicea", Device: 1},
		{Account: "alice", Device: 256},
		{Account: "alice", Device: 1 << 24},
	}
	for _, d := range neighbours {
		firstUpload(t, s, d, 2)
	}
	if n, has := count(t, s, alice1); n != 4 || !has {
		t.Fatalf("count: %d, %v", n, has)
	}
	if _, err := s.Claim(ctx, bob1, "alice", []uint32{1}); err != nil {
		t.Fatal(err)
	}
	if n, _ := count(t, s, alice1); n != 3 {
		t.Fatalf("count after claim: %d", n)
	}

	if err := s.DeleteDevice(ctx, alice1); err != nil {
		t.Fatalf("delete: %v", err)
	}
	if n, has := count(t, s, alice1); n != 0 || has {
		t.Fatalf("count after delete: %d, %v", n, has)
	}
	if _, err := s.Claim(ctx, bob1, "alice", []uint32{1}); !errors.Is(err, keys.ErrNoKeys) {
		t.Fatalf("claim after delete: %v", err)
	}
	if err := s.DeleteDevice(ctx, alice1); err != nil {
		t.Fatalf("second delete: %v", err)
	}
	if n, has := count(t, s, alice2); n != 5 || !has {
		t.Fatalf("other device after delete: %d, %v", n, has)
	}
	for _, d := range neighbours {
		if n, has := count(t, s, d); n != 2 || !has {
			t.Fatalf("%s after delete: %d, %v", d, n, has)
		}
	}
	// The device can start over with a new identity (a new device would get
	// a new id anyway; this checks nothing of the old identity is left).
	firstUpload(t, s, alice1, 1)

	if _, _, err := s.Count(ctx, wire.DeviceAddr{Account: "x\x00", Device: 1}); err == nil {
		t.Fatal("count accepted an invalid account")
	}
	wantCode(t, s.DeleteDevice(ctx, wire.DeviceAddr{Account: "alice", Device: 0}), wirepb.ErrorCode_BAD_REQUEST)
}

func TestLowThreshold(t *testing.T) {
	s, _ := newStore(t, keys.Options{})
	if s.LowThreshold() != keys.DefaultLowThreshold || s.MaxPerUpload() != keys.DefaultMaxPerUpload {
		t.Fatal("defaults not applied")
	}
	s, _ = newStore(t, keys.Options{LowThreshold: 3, MaxPerUpload: 7})
	if s.LowThreshold() != 3 || s.MaxPerUpload() != 7 {
		t.Fatal("options not applied")
	}
}

func TestErrorTextHasNoKeyMaterial(t *testing.T) {
	ctx := context.Background()
	s, _ := newStore(t, keys.Options{})
	ik, _ := firstUpload(t, s, alice1, 1)
	other := newIdentity(t)
	spk := signedPreKey(t, other, 2)
	for _, up := range []*wirepb.UploadKeys{
		{IdentityKey: other.PublicKey().Serialize()},
		{SignedPrekey: spk},
		{OneTimePrekeys: []*wirepb.PreKey{{Id: 5, PublicKey: append([]byte{6}, spk.PublicKey[1:]...)}}},
	} {
		_, err := s.Upload(ctx, alice1, up)
		if err == nil {
			t.Fatal("bad upload accepted")
		}
		text := err.Error()
		for _, secret := range [][]byte{ik.PublicKey().Serialize(), other.PublicKey().Serialize(), spk.PublicKey, spk.Signature} {
			for _, enc := range []string{string(secret), fmt.Sprintf("%x", secret), fmt.Sprintf("%v", secret), fmt.Sprint(secret[1:9])} {
				if strings.Contains(text, enc) {
					t.Fatalf("error text %q contains key material", text)
				}
			}
		}
	}
}

// A signed prekey made with libsignal (fixed, so TestConcurrentVerify makes
// no libsignal call before its goroutines start).
const (
	vectorIdentity = "05ed852855965caca8dff4d5f27c81a59e46b6b096a490844b1425cecdf0c4005f"
	vectorSPK      = "053cceab1d84d2d95b34f968b90fd8541f2ad2f290fed1b1c3db83dcf257715d6a"
	vectorSig      = "9ac627976bd87f6a790568055456a0be38c11c94fbcb0a63b0a0454bbbf7676b" +
		"578a1b89376a1743c55ef485a215a6d0ba9bebd0b18aee6689c7b75566202b01"
)

// TestConcurrentVerify runs signature checks in parallel as the first
// libsignal calls of the process (when run alone: go test -race -run
// TestConcurrentVerify): libsignal installs its logger lazily, a data race
// on first use, unless this package's init installed one already.
func TestConcurrentVerify(t *testing.T) {
	unhex := func(s string) []byte {
		b, err := hex.DecodeString(s)
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	ik := unhex(vectorIdentity)
	spk := &wirepb.SignedPreKey{Id: 1, PublicKey: unhex(vectorSPK), Signature: unhex(vectorSig)}
	var wg sync.WaitGroup
	for range 8 {
		wg.Go(func() {
			if err := keys.VerifySignedPreKey(ik, spk); err != nil {
				t.Error(err)
			}
		})
	}
	wg.Wait()
	bad := proto.CloneOf(spk)
	bad.Signature[0] ^= 1
	if err := keys.VerifySignedPreKey(ik, bad); !errors.Is(err, keys.ErrBadSignature) {
		t.Fatalf("altered vector: %v", err)
	}
}

func TestIdentityKey(t *testing.T) {
	ctx := context.Background()
	s, _ := newStore(t, keys.Options{})
	if k, err := s.IdentityKey(ctx, alice1); k != nil || err != nil {
		t.Fatalf("before upload: %x %v", k, err)
	}
	_, up := firstUpload(t, s, alice1, 1)
	k, err := s.IdentityKey(ctx, alice1)
	if err != nil || !bytes.Equal(k, up.IdentityKey) {
		t.Fatalf("after upload: %x %v", k, err)
	}
	k[1] ^= 1 // a fresh copy: changing it changes nothing stored
	if k2, _ := s.IdentityKey(ctx, alice1); !bytes.Equal(k2, up.IdentityKey) {
		t.Fatal("IdentityKey returned stored memory")
	}
	if err := s.DeleteDevice(ctx, alice1); err != nil {
		t.Fatal(err)
	}
	if k, err := s.IdentityKey(ctx, alice1); k != nil || err != nil {
		t.Fatalf("after delete: %x %v", k, err)
	}
	if _, err := s.IdentityKey(ctx, wire.DeviceAddr{Account: "alice", Device: 0}); wire.CodeOf(err) != wirepb.ErrorCode_BAD_REQUEST {
		t.Fatalf("device 0: %v", err)
	}
}
