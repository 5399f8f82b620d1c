package devicelist_test

import (
	"crypto/sha256"
	"errors"
	"fmt"
	"strings"
	"testing"

	"github.com/ferryhq/ferry/device/devicelist"
	"github.com/ferryhq/ferry/wire"
	"github.com/ferryhq/ferry/wire/wirepb"
	"go.mau.fi/libsignal/ecc"
	"google.golang.org/protobuf/proto"
)

// key returns a fixed key pair for name.
func key(name string) *ecc.ECKeyPair {
	seed := sha256.Sum256([]byte("devicelist-test-" + name))
	return ecc.CreateKeyPair(seed[:])
}

func pub(name string) []byte { return key(name).PublicKey().Serialize() }

// list builds a DeviceList; devs are pairs of device id (int) and identity key.
func list(username string, version uint64, devs ...any) *wirepb.DeviceList {
	l := &wirepb.DeviceList{Username: username, Version: version, CreatedMs: 1700000000000}
	for i := 0; i < len(devs); i += 2 {
		l.Devices = append(l.Devices, &wirepb.DeviceListEntry{DeviceId: uint32(devs[i].(int)), IdentityKey: devs[i+1].([]byte)})
	}
	return l
}

// signRaw signs any list bytes, valid or not (Sign refuses invalid ones).
func signRaw(t testing.TB, signer string, l *wirepb.DeviceList) *wirepb.SignedDeviceList {
	t.Helper()
	b, err := devicelist.Encode(l)
	if err != nil {
		t.Fatal(err)
	}
	sig := ecc.CalculateSignature(key(signer).PrivateKey(), devicelist.SignedBytes(b))
	return &wirepb.SignedDeviceList{List: b, Signature: sig[:]}
}

func TestSignVerifyRoundTrip(t *testing.T) {
	l := list("bob", 3, 1, pub("bob1"), 2, pub("bob2"), 5, pub("bob5"))
	s, err := devicelist.Sign(key("bob1").PrivateKey(), l)
	if err != nil {
		t.Fatal(err)
	}
	got, err := devicelist.Verify(s, pub("bob1"))
	if err != nil {
		t.Fatal(err)
	}
	if !proto.Equal(got, l) {
		t.Fatalf("got %v, want %v", got, l)
	}
	if k := devicelist.Device(got, 5); string(k) != string(pub("bob5")) {
		t.Fatal("Device(5) is not bob5's key")
	}
	if devicelist.Device(got, 3) != nil {
		t.Fatal("Device(3) is not nil")
	}
	// Deterministic encoding: signing again gives the same list bytes.
	s2, err := devicelist.Sign(key("bob1").PrivateKey(), l)
	if err != nil || string(s2.List) != string(s.List) {
		t.Fatalf("list bytes differ between two signatures: %v", err)
	}
	if !strings.HasPrefix(string(devicelist.SignedBytes([]byte("x"))), wire.DeviceListContext+"\x00") {
		t.Fatal("SignedBytes prefix")
	}
}

func TestSignRefusesBadLists(t *testing.T) {
	if _, err := devicelist.Sign(key("bob1").PrivateKey(), list("bob", 1, 2, pub("bob2"))); !errors.Is(err, devicelist.ErrInvalid) {
		t.Fatalf("list without device 1: %v", err)
	}
	// Device 1 is someone else's key: the signature is not by device 1.
	if _, err := devicelist.Sign(key("eve").PrivateKey(), list("bob", 1, 1, pub("bob1"))); !errors.Is(err, devicelist.ErrBadSignature) {
		t.Fatalf("signed by a key other than device 1's: %v", err)
	}
	if _, err := devicelist.Sign(nil, list("bob", 1, 1, pub("bob1"))); !errors.Is(err, devicelist.ErrInvalid) {
		t.Fatalf("nil key: %v", err)
	}
}

func TestParseAndVerify(t *testing.T) {
	good := signRaw(t, "bob1", list("bob", 1, 1, pub("bob1"), 2, pub("bob2")))
	mut := func(f func(s *wirepb.SignedDeviceList)) *wirepb.SignedDeviceList {
		c := proto.CloneOf(good)
		f(c)
		return c
	}
	short := pub("bob2")[:32]
	badType := append([]byte{0x06}, pub("bob2")[1:]...)
	topBit := append([]byte(nil), pub("bob2")...)
	topBit[32] |= 0x80
	many := []any{}
	for i := 1; i <= devicelist.MaxDevices+1; i++ {
		many = append(many, i, pub(fmt.Sprint("k", i)))
	}
	many[1] = pub("bob1")
	tests := []struct {
		name   string
		s      *wirepb.SignedDeviceList
		signer []byte
		kind   *wire.Error
	}{
		{"valid", good, pub("bob1"), nil},
		{"valid, any signer", good, nil, nil},
		{"nil", nil, nil, devicelist.ErrInvalid},
		{"empty list", mut(func(s *wirepb.SignedDeviceList) { s.List = nil }), nil, devicelist.ErrInvalid},
		{"huge list", mut(func(s *wirepb.SignedDeviceList) { s.List = make([]byte, devicelist.MaxListBytes+1) }), nil, devicelist.ErrInvalid},
		{"garbage list", mut(func(s *wirepb.SignedDeviceList) { s.List = []byte{0xff, 0xff, 0xff} }), nil, devicelist.ErrInvalid},
		{"short signature", mut(func(s *wirepb.SignedDeviceList) { s.Signature = s.Signature[:63] }), nil, devicelist.ErrInvalid},
		{"no signature", mut(func(s *wirepb.SignedDeviceList) { s.Signature = nil }), nil, devicelist.ErrInvalid},
		{"tampered list", mut(func(s *wirepb.SignedDeviceList) { s.List[len(s.List)-1] ^= 1 }), nil, devicelist.ErrBadSignature},
		{"tampered signature", mut(func(s *wirepb.SignedDeviceList) { s.Signature[10] ^= 1 }), nil, devicelist.ErrBadSignature},
		{"zero signature", mut(func(s *wirepb.SignedDeviceList) { s.Signature = make([]byte, 64) }), nil, devicelist.ErrBadSignature},
		{"wrong signer", good, pub("eve"), devicelist.ErrWrongSigner},
		{"signer key too short", good, pub("bob1")[:32], devicelist.ErrWrongSigner},
		{"signed by another key", signRaw(t, "eve", list("bob", 1, 1, pub("bob1"))), nil, devicelist.ErrBadSignature},
		{"bad username", signRaw(t, "bob1", list("Bob", 1, 1, pub("bob1"))), nil, devicelist.ErrInvalid},
		{"version 0", signRaw(t, "bob1", list("bob", 0, 1, pub("bob1"))), nil, devicelist.ErrInvalid},
		{"no devices", signRaw(t, "bob1", list("bob", 1)), nil, devicelist.ErrInvalid},
		{"no device 1", signRaw(t, "bob2", list("bob", 1, 2, pub("bob2"))), nil, devicelist.ErrInvalid},
		{"device 0", signRaw(t, "bob1", list("bob", 1, 0, pub("bob0"), 1, pub("bob1"))), nil, devicelist.ErrInvalid},
		{"unsorted", signRaw(t, "bob1", list("bob", 1, 1, pub("bob1"), 3, pub("bob3"), 2, pub("bob2"))), nil, devicelist.ErrInvalid},
		{"duplicate id", signRaw(t, "bob1", list("bob", 1, 1, pub("bob1"), 2, pub("bob2"), 2, pub("bob3"))), nil, devicelist.ErrInvalid},
		{"duplicate key", signRaw(t, "bob1", list("bob", 1, 1, pub("bob1"), 2, pub("bob1"))), nil, devicelist.ErrInvalid},
		{"short key", signRaw(t, "bob1", list("bob", 1, 1, pub("bob1"), 2, short)), nil, devicelist.ErrInvalid},
		{"key type", signRaw(t, "bob1", list("bob", 1, 1, pub("bob1"), 2, badType)), nil, devicelist.ErrInvalid},
		{"key top bit", signRaw(t, "bob1", list("bob", 1, 1, pub("bob1"), 2, topBit)), nil, devicelist.ErrInvalid},
		{"too many devices", signRaw(t, "bob1", list("bob", 1, many...)), nil, devicelist.ErrInvalid},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			l, err := devicelist.Verify(tc.s, tc.signer)
			checkKind(t, err, tc.kind)
			if tc.kind == nil && l == nil {
				t.Fatal("no list")
			}
			if tc.kind == devicelist.ErrInvalid {
				if _, err := devicelist.Parse(tc.s); !errors.Is(err, devicelist.ErrInvalid) {
					t.Fatalf("Parse: %v", err)
				}
			}
		})
	}
}

// checkKind checks that err is of exactly kind (nil: no error) and carries
// the kind's wire code.
func checkKind(t *testing.T, err error, kind *wire.Error) {
	t.Helper()
	if kind == nil {
		if err != nil {
			t.Fatalf("unexpected error %v", err)
		}
		return
	}
	if err == nil {
		t.Fatalf("no error, want %v", kind)
	}
	if devicelist.Kind(err) != kind {
		t.Fatalf("got %v (kind %s), want %v", err, devicelist.KindName(err), kind)
	}
	for _, k := range []*wire.Error{devicelist.ErrInvalid, devicelist.ErrBadSignature, devicelist.ErrWrongSigner, devicelist.ErrWrongAccount, devicelist.ErrRollback} {
		if errors.Is(err, k) != (k == kind) {
			t.Fatalf("errors.Is(%v, %v) = %v", err, k, !(k == kind))
		}
	}
	var we *wire.Error
	if !errors.As(fmt.Errorf("wrapped: %w", err), &we) || we.Code != kind.Code {
		t.Fatalf("errors.As gives %v, want code %v", we, kind.Code)
	}
	if !errors.Is(err, &wire.Error{Code: kind.Code}) {
		t.Fatalf("errors.Is by code fails")
	}
	if !strings.HasPrefix(err.Error(), "devicelist: ") {
		t.Fatalf("message %q lacks the package prefix", err)
	}
}

func TestVerifyNext(t *testing.T) {
	v1 := signRaw(t, "bob1", list("bob", 1, 1, pub("bob1")))
	v2 := signRaw(t, "bob1", list("bob", 2, 1, pub("bob1"), 2, pub("bob2")))
	v2b := signRaw(t, "bob1", list("bob", 2, 1, pub("bob1"), 3, pub("bob3")))
	eve := signRaw(t, "eve", list("bob", 3, 1, pub("eve")))
	carol := signRaw(t, "carol1", list("carol", 1, 1, pub("carol1")))
	tests := []struct {
		name     string
		s        *wirepb.SignedDeviceList
		pinned   []byte
		seen     uint64
		seenList []byte
		kind     *wire.Error
	}{
		{"first use", v1, nil, 0, nil, nil},
		{"pinned", v2, pub("bob1"), 1, v1.List, nil},
		{"same version same bytes", v2, pub("bob1"), 2, v2.List, nil},
		{"same version other bytes", v2b, pub("bob1"), 2, v2.List, devicelist.ErrRollback},
		{"same version, bytes unknown", v2, pub("bob1"), 2, nil, devicelist.ErrRollback},
		{"older", v1, pub("bob1"), 2, v2.List, devicelist.ErrRollback},
		{"other signer", eve, pub("bob1"), 2, v2.List, devicelist.ErrWrongSigner},
		{"other signer, first use", eve, nil, 0, nil, nil}, // TOFU accepts what it is shown
		{"other account", carol, nil, 0, nil, devicelist.ErrWrongAccount},
		{"other account, pinned", carol, pub("carol1"), 0, nil, devicelist.ErrWrongAccount},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			_, err := devicelist.VerifyNext(tc.s, "bob", tc.pinned, tc.seen, tc.seenList)
			checkKind(t, err, tc.kind)
		})
	}
}

func TestKindName(t *testing.T) {
	if devicelist.KindName(nil) != "" || devicelist.KindName(errors.New("x")) != "other" {
		t.Fatal("KindName of non-package errors")
	}
	for _, n := range devicelist.KindNames() {
		if !strings.HasPrefix(n, "Err") {
			t.Fatal(n)
		}
	}
}

func TestValidUsername(t *testing.T) {
	for name, ok := range map[string]bool{"bob": true, "bo": false, "b_1": true, "b_": false, "_bo": false,
		"Bob": false, strings.Repeat("a", 32): true, strings.Repeat("a", 33): false, "a-b": false} {
		if devicelist.ValidUsername(name) != ok {
			t.Errorf("ValidUsername(%q) != %v", name, ok)
		}
	}
}

func FuzzParse(f *testing.F) {
	good := signRaw(f, "bob1", list("bob", 1, 1, pub("bob1"), 2, pub("bob2")))
	f.Add(good.List, good.Signature)
	f.Add([]byte{}, []byte{})
	f.Add([]byte{0x1a, 0x02, 0x08, 0x01}, make([]byte, 64))
	f.Fuzz(func(t *testing.T, l, sig []byte) {
		s := &wirepb.SignedDeviceList{List: l, Signature: sig}
		got, err := devicelist.Parse(s)
		if err == nil {
			if got.Version < 1 || got.Devices[0].DeviceId != 1 || !devicelist.ValidUsername(got.Username) {
				t.Fatalf("accepted %v", got)
			}
		} else if devicelist.Kind(err) != devicelist.ErrInvalid {
			t.Fatalf("Parse error of kind %s", devicelist.KindName(err))
		}
	})
}

func FuzzVerify(f *testing.F) {
	good := signRaw(f, "bob1", list("bob", 1, 1, pub("bob1"), 2, pub("bob2")))
	f.Add(good.List, good.Signature, pub("bob1"))
	f.Add(good.List, good.Signature, []byte{})
	f.Add(good.List, make([]byte, 64), []byte{5})
	f.Fuzz(func(t *testing.T, l, sig, signer []byte) {
		s := &wirepb.SignedDeviceList{List: l, Signature: sig}
		got, err := devicelist.Verify(s, signer)
		if err == nil {
			if _, perr := devicelist.Parse(s); perr != nil {
				t.Fatalf("Verify accepted what Parse refuses: %v", perr)
			}
			if signer != nil && string(got.Devices[0].IdentityKey) != string(signer) {
				t.Fatal("Verify accepted a list whose device 1 is not the signer")
			}
		} else if devicelist.Kind(err) == nil {
			t.Fatalf("error of another package: %v", err)
		}
		_, _ = devicelist.VerifyNext(s, "bob", signer, 1, good.List)
	})
}
