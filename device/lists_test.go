package device_test

import (
	"context"
	"crypto/sha256"
	"errors"
	"slices"
	"sync"
	"testing"

	"github.com/ferryhq/ferry/device"
	"github.com/ferryhq/ferry/device/devicelist"
	"github.com/ferryhq/ferry/store"
	"github.com/ferryhq/ferry/wire"
	"github.com/ferryhq/ferry/wire/wirepb"
	"go.mau.fi/libsignal/ecc"
	"google.golang.org/protobuf/proto"
)

func identity(name string) *ecc.ECKeyPair {
	seed := sha256.Sum256([]byte("device-test-identity-" + name))
	return ecc.CreateKeyPair(seed[:])
}

func ipub(name string) []byte { return identity(name).PublicKey().Serialize() }

// signedList signs a list of username naming ids; device i's identity key
// is ipub(username + i), device 1 signs.
func signedList(t *testing.T, username string, version uint64, ids ...uint32) *wirepb.SignedDeviceList {
	t.Helper()
	l := &wirepb.DeviceList{Username: username, Version: version}
	for _, id := range ids {
		l.Devices = append(l.Devices, &wirepb.DeviceListEntry{DeviceId: id, IdentityKey: ipub(username + string(rune('0'+id)))})
	}
	s, err := devicelist.Sign(identity(username+"1").PrivateKey(), l)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func addDevices(t *testing.T, s *device.Store, name string, n int) {
	t.Helper()
	for range n {
		pub, _ := newKey(t)
		if _, err := s.AddDevice(context.Background(), name, pub, 7); err != nil {
			t.Fatal(err)
		}
	}
}

func deviceIDs(t *testing.T, s *device.Store, name string) []uint32 {
	t.Helper()
	acct, err := s.Account(context.Background(), name)
	if err != nil {
		t.Fatal(err)
	}
	var ids []uint32
	for _, d := range acct.Devices {
		ids = append(ids, d.Id)
	}
	return ids
}

func TestPublishDeviceList(t *testing.T) {
	ctx := context.Background()
	s, _ := newStore(t, device.Options{})
	register(t, s, "bob")
	addDevices(t, s, "bob", 2) // devices 2, 3
	primary := ipub("bob1")

	if l, v, err := s.DeviceList(ctx, "bob"); l != nil || v != 0 || err != nil {
		t.Fatalf("before publishing: %v %d %v", l, v, err)
	}
	v1 := signedList(t, "bob", 1, 1, 2, 3)
	removed, err := s.PublishDeviceList(ctx, "bob", v1, primary)
	if err != nil || len(removed) != 0 {
		t.Fatalf("publish v1: %v %v", removed, err)
	}
	got, v, err := s.DeviceList(ctx, "bob")
	if err != nil || v != 1 || !proto.Equal(got, v1) {
		t.Fatalf("stored v1: %v %d %v", got, v, err)
	}

	// The same version again, or an older one: stale.
	_, err = s.PublishDeviceList(ctx, "bob", signedList(t, "bob", 1, 1, 2), primary)
	wantCode(t, err, wirepb.ErrorCode_DEVICE_LIST_STALE)

	// Unlisting device 2 removes it from the account.
	removed, err = s.PublishDeviceList(ctx, "bob", signedList(t, "bob", 5, 1, 3), primary)
	if err != nil || !slices.Equal(removed, []uint32{2}) {
		t.Fatalf("publish v5: %v %v", removed, err)
	}
	if ids := deviceIDs(t, s, "bob"); !slices.Equal(ids, []uint32{1, 3}) {
		t.Fatalf("devices after v5: %v", ids)
	}
	_, err = s.PublishDeviceList(ctx, "bob", signedList(t, "bob", 4, 1), primary)
	wantCode(t, err, wirepb.ErrorCode_DEVICE_LIST_STALE)

	// Nothing changed by the failures.
	if _, v, _ := s.DeviceList(ctx, "bob"); v != 5 {
		t.Fatalf("stored version %d, want 5", v)
	}
	// Ids are never reused: the next device is 4, and it can be listed.
	addDevices(t, s, "bob", 1)
	if removed, err := s.PublishDeviceList(ctx, "bob", signedList(t, "bob", 6, 1, 3, 4), primary); err != nil || len(removed) != 0 {
		t.Fatalf("publish v6: %v %v", removed, err)
	}
}

func TestPublishDeviceListRefusals(t *testing.T) {
	ctx := context.Background()
	s, _ := newStore(t, device.Options{})
	register(t, s, "bob")
	register(t, s, "carol")
	addDevices(t, s, "bob", 1)
	primary := ipub("bob1")
	tampered := signedList(t, "bob", 1, 1, 2)
	tampered.List[len(tampered.List)-1] ^= 1
	tests := []struct {
		name    string
		user    string
		s       *wirepb.SignedDeviceList
		primary []byte
		code    wirepb.ErrorCode
		kind    *wire.Error
	}{
		{"tampered", "bob", tampered, primary, wirepb.ErrorCode_DEVICE_LIST_INVALID, devicelist.ErrBadSignature},
		{"wrong signer", "bob", signedList(t, "bob", 1, 1, 2), ipub("eve"), wirepb.ErrorCode_DEVICE_LIST_INVALID, devicelist.ErrWrongSigner},
		{"other account's list", "bob", signedList(t, "carol", 1, 1), ipub("carol1"), wirepb.ErrorCode_DEVICE_LIST_INVALID, nil},
		{"device it does not have", "bob", signedList(t, "bob", 1, 1, 2, 3), primary, wirepb.ErrorCode_DEVICE_LIST_INVALID, nil},
		{"no primary key", "bob", signedList(t, "bob", 1, 1, 2), nil, wirepb.ErrorCode_INVALID_KEY, nil},
		{"nil list", "bob", nil, primary, wirepb.ErrorCode_DEVICE_LIST_INVALID, devicelist.ErrInvalid},
		{"unknown account", "dave", signedList(t, "dave", 1, 1), ipub("dave1"), wirepb.ErrorCode_UNKNOWN_ACCOUNT, nil},
		{"invalid account name", "Dave", signedList(t, "dave", 1, 1), ipub("dave1"), wirepb.ErrorCode_UNKNOWN_ACCOUNT, nil},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			_, err := s.PublishDeviceList(ctx, tc.user, tc.s, tc.primary)
			if tc.kind == nil {
				wantCode(t, err, tc.code)
			} else if wire.CodeOf(err) != tc.code || !errors.Is(err, tc.kind) {
				t.Fatalf("%v is not %v", err, tc.kind)
			}
		})
	}
	if l, _, _ := s.DeviceList(ctx, "bob"); l != nil {
		t.Fatal("a refused list was stored")
	}
	if ids := deviceIDs(t, s, "bob"); !slices.Equal(ids, []uint32{1, 2}) {
		t.Fatalf("devices changed: %v", ids)
	}
}

// Concurrent publishes of different versions: every one that succeeds is
// newer than the one stored before it, and the stored one is the newest.
func TestPublishDeviceListConcurrent(t *testing.T) {
	ctx := context.Background()
	s, _ := newStore(t, device.Options{})
	register(t, s, "bob")
	primary := ipub("bob1")
	lists := make([]*wirepb.SignedDeviceList, 8)
	for i := range lists {
		lists[i] = signedList(t, "bob", uint64(i+1), 1)
	}
	var wg sync.WaitGroup
	for i := range lists {
		wg.Go(func() {
			_, err := s.PublishDeviceList(ctx, "bob", lists[len(lists)-1-i], primary)
			if err != nil && !errors.Is(err, device.ErrDeviceListStale) {
				t.Error(err)
			}
		})
	}
	wg.Wait()
	if _, v, err := s.DeviceList(ctx, "bob"); err != nil || v != uint64(len(lists)) {
		t.Fatalf("stored version %d (%v), want %d", v, err, len(lists))
	}
}

// A stored list that was tampered with is still served as stored (clients
// refuse it), with version 0.
func TestDeviceListServedAsStored(t *testing.T) {
	ctx := context.Background()
	s, db := newStore(t, device.Options{})
	register(t, s, "bob")
	v1 := signedList(t, "bob", 1, 1)
	if _, err := s.PublishDeviceList(ctx, "bob", v1, ipub("bob1")); err != nil {
		t.Fatal(err)
	}
	bad := &wirepb.SignedDeviceList{List: []byte("not a list"), Signature: v1.Signature}
	b, _ := proto.Marshal(bad)
	if err := db.Set(append([]byte{store.PrefixDeviceList}, "bob"...), b, nil); err != nil {
		t.Fatal(err)
	}
	got, v, err := s.DeviceList(ctx, "bob")
	if err != nil || v != 0 || !proto.Equal(got, bad) {
		t.Fatalf("got %v %d %v", got, v, err)
	}
}

func TestMaxDevicesCappedByListFormat(t *testing.T) {
	s, _ := newStore(t, device.Options{MaxDevices: 100})
	register(t, s, "bob")
	addDevices(t, s, "bob", devicelist.MaxDevices-1)
	pub, _ := newKey(t)
	_, err := s.AddDevice(context.Background(), "bob", pub, 7)
	wantCode(t, err, wirepb.ErrorCode_TOO_MANY_DEVICES)
}
