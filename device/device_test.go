package device_test

import (
	"bytes"
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"errors"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/cockroachdb/pebble/v2"
	"github.com/ferryhq/ferry/device"
	"github.com/ferryhq/ferry/store"
	"github.com/ferryhq/ferry/store/storepb"
	"github.com/ferryhq/ferry/wire"
	"github.com/ferryhq/ferry/wire/wirepb"
)

var fixedNow = time.Date(2025, 3, 1, 12, 0, 0, 0, time.UTC)

func newStore(t *testing.T, o device.Options) (*device.Store, *pebble.DB) {
	t.Helper()
	db, err := store.OpenMem()
	if err != nil {
		t.Fatalf("open: %v", err)
	}
	t.Cleanup(func() { db.Close() })
	if o.Now == nil {
		o.Now = func() time.Time { return fixedNow }
	}
	return device.New(db, o), db
}

func newKey(t testing.TB) (ed25519.PublicKey, ed25519.PrivateKey) {
	t.Helper()
	pub, priv, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatalf("ed25519: %v", err)
	}
	return pub, priv
}

func challenge(t testing.TB) []byte {
	t.Helper()
	c := make([]byte, wire.ChallengeSize)
	if _, err := rand.Read(c); err != nil {
		t.Fatal(err)
	}
	return c
}

func register(t *testing.T, s *device.Store, name string) (*storepb.Device, ed25519.PrivateKey) {
	t.Helper()
	pub, priv := newKey(t)
	dev, err := s.Register(context.Background(), name, pub, 42)
	if err != nil {
		t.Fatalf("register %q: %v", name, err)
	}
	return dev, priv
}

// wantCode fails unless err carries a *wire.Error with code want (and, for
// want == 0, unless err is nil).
func wantCode(t *testing.T, err error, want wirepb.ErrorCode) {
	t.Helper()
	if want == wirepb.ErrorCode_ERROR_CODE_UNSPECIFIED {
		if err != nil {
			t.Fatalf("unexpected error: %v", err)
		}
		return
	}
	var we *wire.Error
	if !errors.As(err, &we) {
		t.Fatalf("error %v is not a *wire.Error (want %v)", err, want)
	}
	if we.Code != want {
		t.Fatalf("error %v has code %v, want %v", err, we.Code, want)
	}
	if !strings.HasPrefix(we.Message, "device: ") {
		t.Fatalf("wire message %q lacks the package prefix", we.Message)
	}
}

func TestValidateUsername(t *testing.T) {
	tests := []struct {
		name string
		ok   bool
		rule string // substring of the message
	}{
		{"abc", true, ""},
		{"alice", true, ""},
		{"a_b", true, ""},
		{"bob_2", true, ""},
		{"a12", true, ""},
		{"a__b", true, ""},
		{strings.Repeat("a", 32), true, ""},
		{"", false, "3 to 32"},
		{"ab", false, "3 to 32"},
		{strings.Repeat("a", 33), false, "3 to 32"},
		{"1abc", false, "start with a letter"},
		{"_abc", false, "start with a letter"},
		{"Alice", false, "start with a letter"},
		{"aLice", false, "only a-z"},
		{"al-ice", false, "only a-z"},
		{"al ice", false, "only a-z"},
		{"al.ice", false, "only a-z"},
		{"ali\x00ce", false, "only a-z"},
		{"alicé", false, "only a-z"},
		{"alice_", false, "end with"},
		{"ab_", false, "end with"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := device.ValidateUsername(tt.name)
			if tt.ok {
				if err != nil {
					t.Fatalf("ValidateUsername(%q) = %v, want nil", tt.name, err)
				}
				return
			}
			if !errors.Is(err, device.ErrInvalidUsername) {
				t.Fatalf("ValidateUsername(%q) = %v, want ErrInvalidUsername", tt.name, err)
			}
			if !strings.Contains(err.Error(), tt.rule) {
				t.Fatalf("ValidateUsername(%q) = %q, want message naming %q", tt.name, err, tt.rule)
			}
		})
	}
}

func TestRegister(t *testing.T) {
	s, _ := newStore(t, device.Options{})
	ctx := context.Background()
	pub, _ := newKey(t)

	dev, err := s.Register(ctx, "alice", pub, 7)
	if err != nil {
		t.Fatalf("register: %v", err)
	}
	if dev.Id != 1 || !bytes.Equal(dev.SigningKey, pub) || dev.RegistrationId != 7 || dev.CreatedMs != fixedNow.UnixMilli() {
		t.Fatalf("device = %v", dev)
	}

	acct, err := s.Account(ctx, "alice")
	if err != nil {
		t.Fatalf("account: %v", err)
	}
	if acct.Username != "alice" || acct.NextDeviceId != 2 || len(acct.Devices) != 1 || acct.CreatedMs != fixedNow.UnixMilli() {
		t.Fatalf("account = %v", acct)
	}
	// Fresh copies: changing what we got changes nothing stored.
	acct.Devices[0].SigningKey[0] ^= 0xff
	dev.SigningKey[1] ^= 0xff
	got, err := s.Device(ctx, wire.DeviceAddr{Account: "alice", Device: 1})
	if err != nil {
		t.Fatalf("device: %v", err)
	}
	if !bytes.Equal(got.SigningKey, pub) {
		t.Fatal("stored signing key changed through a returned copy")
	}

	tests := []struct {
		desc  string
		name  string
		key   []byte
		regID uint32
		want  wirepb.ErrorCode
	}{
		{"taken", "alice", pub, 7, wirepb.ErrorCode_USERNAME_TAKEN},
		{"taken other key", "alice", make([]byte, 32), 9, wirepb.ErrorCode_USERNAME_TAKEN},
		{"bad name", "Alice", pub, 7, wirepb.ErrorCode_INVALID_USERNAME},
		{"short key", "bob", pub[:31], 7, wirepb.ErrorCode_INVALID_KEY},
		{"long key", "bob", append(bytes.Clone(pub), 0), 7, wirepb.ErrorCode_INVALID_KEY},
		{"no key", "bob", nil, 7, wirepb.ErrorCode_INVALID_KEY},
		{"reg id 0", "bob", pub, 0, wirepb.ErrorCode_BAD_REQUEST},
		{"reg id too big", "bob", pub, 16381, wirepb.ErrorCode_BAD_REQUEST},
		{"reg id max", "bob", pub, 16380, 0},
		{"reg id min", "carol", pub, 1, 0},
	}
	for _, tt := range tests {
		t.Run(tt.desc, func(t *testing.T) {
			_, err := s.Register(ctx, tt.name, tt.key, tt.regID)
			wantCode(t, err, tt.want)
		})
	}
	if _, err := s.Register(ctx, "dave", pub, 0); !errors.Is(err, device.ErrInvalidRegistrationID) {
		t.Fatalf("reg id 0: %v, want ErrInvalidRegistrationID", err)
	}
	if _, err := s.Register(ctx, "alice", pub, 1); !errors.Is(err, device.ErrUsernameTaken) {
		t.Fatalf("taken: %v, want ErrUsernameTaken", err)
	}
	// A failed registration stored nothing.
	if _, err := s.Account(ctx, "dave"); !errors.Is(err, device.ErrUnknownAccount) {
		t.Fatalf("account after failed register: %v", err)
	}
}

func TestRegisterConcurrent(t *testing.T) {
	s, _ := newStore(t, device.Options{})
	ctx := context.Background()
	const n = 32
	keys := make([]ed25519.PublicKey, n)
	for i := range keys {
		keys[i], _ = newKey(t)
	}
	var (
		wg      sync.WaitGroup
		start   = make(chan struct{})
		errs    = make([]error, n)
		winners = make([]*storepb.Device, n)
	)
	for i := range n {
		wg.Go(func() {
			<-start
			winners[i], errs[i] = s.Register(ctx, "contested", keys[i], uint32(i+1))
		})
	}
	close(start)
	wg.Wait()

	won := -1
	for i, err := range errs {
		switch {
		case err == nil:
			if won >= 0 {
				t.Fatalf("registrations %d and %d both won", won, i)
			}
			won = i
		case errors.Is(err, device.ErrUsernameTaken):
		default:
			t.Fatalf("registration %d: %v", i, err)
		}
	}
	if won < 0 {
		t.Fatal("no registration won")
	}
	dev, err := s.Device(ctx, wire.DeviceAddr{Account: "contested", Device: 1})
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(dev.SigningKey, keys[won]) || dev.RegistrationId != uint32(won+1) {
		t.Fatal("stored device is not the winner's")
	}
}

func TestLookups(t *testing.T) {
	s, _ := newStore(t, device.Options{})
	ctx := context.Background()
	register(t, s, "alice")
	tests := []struct {
		desc string
		addr wire.DeviceAddr
		want wirepb.ErrorCode
	}{
		{"ok", wire.DeviceAddr{Account: "alice", Device: 1}, 0},
		{"unknown device", wire.DeviceAddr{Account: "alice", Device: 2}, wirepb.ErrorCode_UNKNOWN_DEVICE},
		{"device 0", wire.DeviceAddr{Account: "alice", Device: 0}, wirepb.ErrorCode_UNKNOWN_DEVICE},
		{"unknown account", wire.DeviceAddr{Account: "bob", Device: 1}, wirepb.ErrorCode_UNKNOWN_ACCOUNT},
		{"invalid name", wire.DeviceAddr{Account: "al\x00ice", Device: 1}, wirepb.ErrorCode_UNKNOWN_ACCOUNT},
		{"empty name", wire.DeviceAddr{Account: "", Device: 1}, wirepb.ErrorCode_UNKNOWN_ACCOUNT},
	}
	for _, tt := range tests {
		t.Run(tt.desc, func(t *testing.T) {
			_, err := s.Device(ctx, tt.addr)
			wantCode(t, err, tt.want)
		})
	}
	if _, err := s.Account(ctx, "bob"); !errors.Is(err, device.ErrUnknownAccount) {
		t.Fatalf("Account(bob) = %v", err)
	}
	cctx, cancel := context.WithCancel(ctx)
	cancel()
	if _, err := s.Account(cctx, "alice"); !errors.Is(err, context.Canceled) {
		t.Fatalf("canceled context: %v", err)
	}
}

func TestAddRemoveDevice(t *testing.T) {
	s, _ := newStore(t, device.Options{MaxDevices: 3})
	ctx := context.Background()
	register(t, s, "alice")
	pub2, _ := newKey(t)
	pub3, _ := newKey(t)

	d2, err := s.AddDevice(ctx, "alice", pub2, 100)
	if err != nil || d2.Id != 2 {
		t.Fatalf("add: %v, %v", d2, err)
	}
	d3, err := s.AddDevice(ctx, "alice", pub3, 101)
	if err != nil || d3.Id != 3 {
		t.Fatalf("add: %v, %v", d3, err)
	}
	if _, err := s.AddDevice(ctx, "alice", pub3, 101); !errors.Is(err, device.ErrTooManyDevices) {
		t.Fatalf("add over max: %v", err)
	}

	for _, tt := range []struct {
		desc  string
		name  string
		key   []byte
		regID uint32
		want  wirepb.ErrorCode
	}{
		{"unknown account", "bob", pub2, 1, wirepb.ErrorCode_UNKNOWN_ACCOUNT},
		{"invalid name", "B", pub2, 1, wirepb.ErrorCode_UNKNOWN_ACCOUNT},
		{"bad key", "alice", pub2[:16], 1, wirepb.ErrorCode_INVALID_KEY},
		{"bad reg id", "alice", pub2, 20000, wirepb.ErrorCode_BAD_REQUEST},
	} {
		t.Run(tt.desc, func(t *testing.T) {
			_, err := s.AddDevice(ctx, tt.name, tt.key, tt.regID)
			wantCode(t, err, tt.want)
		})
	}

	// Remove device 2; its id is never reused.
	if err := s.RemoveDevice(ctx, wire.DeviceAddr{Account: "alice", Device: 2}); err != nil {
		t.Fatalf("remove: %v", err)
	}
	if _, err := s.Device(ctx, wire.DeviceAddr{Account: "alice", Device: 2}); !errors.Is(err, device.ErrUnknownDevice) {
		t.Fatalf("removed device: %v", err)
	}
	d4, err := s.AddDevice(ctx, "alice", pub2, 102)
	if err != nil || d4.Id != 4 {
		t.Fatalf("add after remove: %v, %v", d4, err)
	}
	acct, err := s.Account(ctx, "alice")
	if err != nil {
		t.Fatal(err)
	}
	var ids []uint32
	for _, d := range acct.Devices {
		ids = append(ids, d.Id)
	}
	if len(ids) != 3 || ids[0] != 1 || ids[1] != 3 || ids[2] != 4 || acct.NextDeviceId != 5 {
		t.Fatalf("devices %v, next %d", ids, acct.NextDeviceId)
	}

	for _, tt := range []struct {
		desc string
		addr wire.DeviceAddr
		want wirepb.ErrorCode
	}{
		{"primary", wire.DeviceAddr{Account: "alice", Device: 1}, wirepb.ErrorCode_BAD_REQUEST},
		{"already removed", wire.DeviceAddr{Account: "alice", Device: 2}, wirepb.ErrorCode_UNKNOWN_DEVICE},
		{"never existed", wire.DeviceAddr{Account: "alice", Device: 9}, wirepb.ErrorCode_UNKNOWN_DEVICE},
		{"unknown account", wire.DeviceAddr{Account: "bob", Device: 2}, wirepb.ErrorCode_UNKNOWN_ACCOUNT},
	} {
		t.Run(tt.desc, func(t *testing.T) {
			wantCode(t, s.RemoveDevice(ctx, tt.addr), tt.want)
		})
	}
	if err := s.RemoveDevice(ctx, wire.DeviceAddr{Account: "alice", Device: 1}); !errors.Is(err, device.ErrPrimaryDevice) {
		t.Fatalf("remove primary: %v", err)
	}
}

func TestAddDeviceConcurrent(t *testing.T) {
	s, _ := newStore(t, device.Options{MaxDevices: 64})
	ctx := context.Background()
	register(t, s, "alice")
	pub, _ := newKey(t)
	const n = 20
	var wg sync.WaitGroup
	ids := make([]uint32, n)
	for i := range n {
		wg.Go(func() {
			d, err := s.AddDevice(ctx, "alice", pub, 5)
			if err != nil {
				t.Errorf("add: %v", err)
				return
			}
			ids[i] = d.Id
		})
	}
	wg.Wait()
	seen := map[uint32]bool{}
	for _, id := range ids {
		if id < 2 || id > n+1 || seen[id] {
			t.Fatalf("ids %v: not a permutation of 2..%d", ids, n+1)
		}
		seen[id] = true
	}
	acct, err := s.Account(ctx, "alice")
	if err != nil || len(acct.Devices) != n+1 {
		t.Fatalf("account after concurrent adds: %v, %v", acct, err)
	}
}

func TestVerifyRegister(t *testing.T) {
	pub, priv := newKey(t)
	otherPub, _ := newKey(t)
	c := challenge(t)
	sig := ed25519.Sign(priv, wire.RegisterMessage(c, "alice"))
	bad := bytes.Clone(sig)
	bad[10] ^= 1

	tests := []struct {
		desc      string
		challenge []byte
		name      string
		key, sig  []byte
		want      wirepb.ErrorCode
	}{
		{"ok", c, "alice", pub, sig, 0},
		{"other name", c, "alicf", pub, sig, wirepb.ErrorCode_BAD_SIGNATURE},
		{"other challenge", challenge(t), "alice", pub, sig, wirepb.ErrorCode_BAD_SIGNATURE},
		{"other key", c, "alice", otherPub, sig, wirepb.ErrorCode_BAD_SIGNATURE},
		{"flipped bit", c, "alice", pub, bad, wirepb.ErrorCode_BAD_SIGNATURE},
		{"short sig", c, "alice", pub, sig[:63], wirepb.ErrorCode_BAD_SIGNATURE},
		{"no sig", c, "alice", pub, nil, wirepb.ErrorCode_BAD_SIGNATURE},
		{"short challenge", c[:31], "alice", pub, sig, wirepb.ErrorCode_BAD_SIGNATURE},
		{"no challenge", nil, "alice", pub, sig, wirepb.ErrorCode_BAD_SIGNATURE},
		{"short key", c, "alice", pub[:31], sig, wirepb.ErrorCode_INVALID_KEY},
		{"no key", c, "alice", nil, sig, wirepb.ErrorCode_INVALID_KEY},
		{"auth signature", c, "alice", pub, ed25519.Sign(priv, wire.AuthMessage(c, "alice", 1)), wirepb.ErrorCode_BAD_SIGNATURE},
	}
	for _, tt := range tests {
		t.Run(tt.desc, func(t *testing.T) {
			wantCode(t, device.VerifyRegister(tt.challenge, tt.name, tt.key, tt.sig), tt.want)
		})
	}
}

func TestVerifyAuth(t *testing.T) {
	s, _ := newStore(t, device.Options{})
	ctx := context.Background()
	_, priv1 := register(t, s, "alice")
	pub2, priv2 := newKey(t)
	if _, err := s.AddDevice(ctx, "alice", pub2, 9); err != nil {
		t.Fatal(err)
	}
	_, privBob := register(t, s, "bob")

	addr1 := wire.DeviceAddr{Account: "alice", Device: 1}
	addr2 := wire.DeviceAddr{Account: "alice", Device: 2}
	dev1, err := s.Device(ctx, addr1)
	if err != nil {
		t.Fatal(err)
	}
	dev2, err := s.Device(ctx, addr2)
	if err != nil {
		t.Fatal(err)
	}
	old := challenge(t)
	c := challenge(t)
	sign := func(priv ed25519.PrivateKey, ch []byte, addr wire.DeviceAddr) []byte {
		return ed25519.Sign(priv, wire.AuthMessage(ch, addr.Account, addr.Device))
	}
	good := sign(priv1, c, addr1)
	flipped := bytes.Clone(good)
	flipped[0] ^= 0x80
	noKey := &storepb.Device{Id: 1}

	tests := []struct {
		desc      string
		dev       *storepb.Device
		challenge []byte
		addr      wire.DeviceAddr
		sig       []byte
		ok        bool
	}{
		{"ok", dev1, c, addr1, good, true},
		{"ok device 2", dev2, c, addr2, sign(priv2, c, addr2), true},
		{"wrong challenge", dev1, challenge(t), addr1, good, false},
		{"replayed old signature", dev1, c, addr1, sign(priv1, old, addr1), false},
		{"signed for another device", dev1, c, addr1, sign(priv1, c, addr2), false},
		{"record of another device", dev2, c, addr1, good, false},
		{"claims device 2 with device 1 record", dev1, c, addr2, sign(priv1, c, addr2), false},
		{"wrong key", dev1, c, addr1, sign(priv2, c, addr1), false},
		{"other account's key", dev1, c, addr1, sign(privBob, c, addr1), false},
		{"signed for another account", dev1, c, addr1, sign(priv1, c, wire.DeviceAddr{Account: "bob", Device: 1}), false},
		{"register signature", dev1, c, addr1, ed25519.Sign(priv1, wire.RegisterMessage(c, "alice")), false},
		{"flipped bit", dev1, c, addr1, flipped, false},
		{"short sig", dev1, c, addr1, good[:63], false},
		{"long sig", dev1, c, addr1, append(bytes.Clone(good), 0), false},
		{"no sig", dev1, c, addr1, nil, false},
		{"short challenge", dev1, c[:16], addr1, good, false},
		{"nil device", nil, c, addr1, good, false},
		{"device without key", noKey, c, addr1, good, false},
	}
	for _, tt := range tests {
		t.Run(tt.desc, func(t *testing.T) {
			err := device.VerifyAuth(tt.dev, tt.challenge, tt.addr, tt.sig)
			if tt.ok {
				if err != nil {
					t.Fatalf("VerifyAuth = %v, want nil", err)
				}
				return
			}
			wantCode(t, err, wirepb.ErrorCode_AUTH_FAILED)
			if !errors.Is(err, device.ErrAuthFailed) {
				t.Fatalf("not ErrAuthFailed: %v", err)
			}
		})
	}
}

// TestNoSecretsStored checks that the database holds the public signing key
// and nothing derived from the private one.
func TestNoSecretsStored(t *testing.T) {
	s, db := newStore(t, device.Options{})
	pub, priv := newKey(t)
	if _, err := s.Register(context.Background(), "alice", pub, 3); err != nil {
		t.Fatal(err)
	}
	it, err := db.NewIter(nil)
	if err != nil {
		t.Fatal(err)
	}
	defer it.Close()
	n := 0
	for it.First(); it.Valid(); it.Next() {
		n++
		if it.Key()[0] != store.PrefixAccount {
			t.Fatalf("key %q outside the device prefix", it.Key())
		}
		if bytes.Contains(it.Value(), priv.Seed()) {
			t.Fatal("private key stored")
		}
	}
	if n != 1 {
		t.Fatalf("%d records, want 1", n)
	}
}

func TestSentinelsNotHandedOut(t *testing.T) {
	s, _ := newStore(t, device.Options{})
	register(t, s, "alice")
	pub, _ := newKey(t)
	_, err := s.Register(context.Background(), "alice", pub, 1)
	var we *wire.Error
	if !errors.As(err, &we) {
		t.Fatal(err)
	}
	if we == device.ErrUsernameTaken {
		t.Fatal("the sentinel itself was returned; a caller could change it")
	}
}

// Reads racing writes never see an account older than the last write they
// could have observed, with the cache on, off, or too small to hold them.
func TestAccountCacheStaysCurrent(t *testing.T) {
	for _, size := range []int{0, -1, 1} {
		t.Run(fmt.Sprint("cache ", size), func(t *testing.T) {
			s, _ := newStore(t, device.Options{MaxDevices: 64, CacheSize: size})
			ctx := context.Background()
			register(t, s, "alice")
			register(t, s, "bob")
			pub, _ := newKey(t)
			var wg sync.WaitGroup
			stop := make(chan struct{})
			for range 4 { // readers: the device count never goes down
				wg.Go(func() {
					last := 0
					for {
						select {
						case <-stop:
							return
						default:
						}
						for _, name := range []string{"alice", "bob"} {
							acct, err := s.Account(ctx, name)
							if err != nil {
								t.Error(err)
								return
							}
							if name == "alice" {
								if len(acct.Devices) < last {
									t.Errorf("alice went from %d to %d devices", last, len(acct.Devices))
									return
								}
								last = len(acct.Devices)
							}
						}
					}
				})
			}
			for range 30 {
				if _, err := s.AddDevice(ctx, "alice", pub, 5); err != nil {
					t.Fatal(err)
				}
			}
			close(stop)
			wg.Wait()
			if acct, err := s.Account(ctx, "alice"); err != nil || len(acct.Devices) != 31 {
				t.Fatalf("alice after the adds: %d devices, %v", len(acct.GetDevices()), err)
			}
			if err := s.RemoveDevice(ctx, wire.DeviceAddr{Account: "alice", Device: 2}); err != nil {
				t.Fatal(err)
			}
			if _, err := s.Device(ctx, wire.DeviceAddr{Account: "alice", Device: 2}); !errors.Is(err, device.ErrUnknownDevice) {
				t.Fatalf("a removed device is still served: %v", err)
			}
		})
	}
}
