package device_test

import (
	"bytes"
	"crypto/ed25519"
	"errors"
	"regexp"
	"testing"

	"github.com/ferryhq/ferry/device"
	"github.com/ferryhq/ferry/device/devicelist"
	"github.com/ferryhq/ferry/store/storepb"
	"github.com/ferryhq/ferry/wire"
)

// usernameRE is the documented rule, written independently of the code.
var usernameRE = regexp.MustCompile(`^[a-z][a-z0-9_]{1,30}[a-z0-9]$`)

func FuzzValidateUsername(f *testing.F) {
	for _, s := range []string{"", "a", "ab", "abc", "alice", "alice_", "_alice", "Alice", "al\x00ice",
		"alicé", "a_1", "zzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzz", "zzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzz", "\xff\xfe\xfd"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, name string) {
		err := device.ValidateUsername(name)
		if ok := usernameRE.MatchString(name); ok != (err == nil) {
			t.Fatalf("ValidateUsername(%q) = %v, rule says valid=%v", name, err, ok)
		}
		if devicelist.ValidUsername(name) != (err == nil) {
			t.Fatalf("devicelist.ValidUsername(%q) disagrees with ValidateUsername (%v)", name, err)
		}
		if err != nil && !errors.Is(err, device.ErrInvalidUsername) {
			t.Fatalf("ValidateUsername(%q) = %v, not ErrInvalidUsername", name, err)
		}
	})
}

func FuzzVerifyAuth(f *testing.F) {
	pub, priv := newKey(f)
	c := challenge(f)
	good := ed25519.Sign(priv, wire.AuthMessage(c, "alice", 1))
	zeros33 := make([]byte, 33)
	rnd := append([]byte{0x05}, challenge(f)...)
	f.Add([]byte(pub), c, "alice", uint32(1), uint32(1), good)
	f.Add([]byte{}, []byte{}, "", uint32(0), uint32(0), []byte{})
	f.Add(zeros33, zeros33, "alice", uint32(1), uint32(1), zeros33)
	f.Add(rnd, rnd, "alice", uint32(1), uint32(1), rnd)
	f.Add([]byte(pub), c, "alice", uint32(1), uint32(2), good)
	f.Add([]byte(pub), c[:31], "alice", uint32(1), uint32(1), good)
	f.Add(make([]byte, 32), make([]byte, 32), "alice", uint32(1), uint32(1), make([]byte, 64))
	f.Fuzz(func(t *testing.T, key, ch []byte, account string, devID, addrID uint32, sig []byte) {
		dev := &storepb.Device{Id: devID, SigningKey: key}
		addr := wire.DeviceAddr{Account: account, Device: addrID}
		err := device.VerifyAuth(dev, ch, addr, sig)
		if err == nil {
			// Only a real signature by key over these exact fields passes.
			if devID != addrID || len(key) != 32 || len(ch) != wire.ChallengeSize ||
				!ed25519.Verify(key, wire.AuthMessage(ch, account, addrID), sig) {
				t.Fatal("VerifyAuth accepted an invalid signature")
			}
			if bytes.Equal(key, pub) && !(bytes.Equal(ch, c) && account == "alice" && addrID == 1) {
				t.Fatal("signature accepted for fields it was not made over")
			}
		} else if !errors.Is(err, device.ErrAuthFailed) {
			t.Fatalf("VerifyAuth = %v, not ErrAuthFailed", err)
		}
		// VerifyRegister shares the input handling; it must not panic either.
		_ = device.VerifyRegister(ch, account, key, sig)
	})
}
