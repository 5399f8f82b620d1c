package keys_test

import (
	"bytes"
	"errors"
	"testing"

	"github.com/ferryhq/ferry/keys"
	"github.com/ferryhq/ferry/wire/wirepb"
)

func FuzzParsePublicKey(f *testing.F) {
	f.Add([]byte{})
	f.Add([]byte{0x05})
	f.Add(make([]byte, 33))
	f.Add(append([]byte{0x05}, randomBytes(f, 32)...))
	f.Add(append([]byte{0x05}, randomBytes(f, 31)...))
	f.Add(append([]byte{0x05}, randomBytes(f, 33)...))
	f.Add(newPublicKey(f))
	f.Fuzz(func(t *testing.T, b []byte) {
		k, err := keys.ParsePublicKey(b)
		if err != nil {
			if !errors.Is(err, keys.ErrInvalidKey) {
				t.Fatalf("error %v is not ErrInvalidKey", err)
			}
			if len(b) == 33 && b[0] == 0x05 {
				t.Fatalf("rejected a well-formed key: %v", err)
			}
			return
		}
		if len(b) != 33 || b[0] != 0x05 || !bytes.Equal(k.Serialize(), b) {
			t.Fatalf("accepted %x", b)
		}
	})
}

func FuzzVerifySignedPreKey(f *testing.F) {
	ik := newIdentity(f)
	spk := signedPreKey(f, ik, 1)
	zeros := make([]byte, 33)
	rnd := append([]byte{0x05}, randomBytes(f, 32)...)
	f.Add(ik.PublicKey().Serialize(), uint32(1), spk.PublicKey, spk.Signature)
	f.Add([]byte{}, uint32(0), []byte{}, []byte{})
	f.Add(zeros, uint32(1), zeros, make([]byte, 64))
	f.Add(rnd, uint32(1), rnd, randomBytes(f, 64))
	f.Add(ik.PublicKey().Serialize(), uint32(1), rnd, spk.Signature)
	f.Add(rnd, uint32(1), spk.PublicKey, spk.Signature)
	f.Add(ik.PublicKey().Serialize(), uint32(0), spk.PublicKey, spk.Signature)
	f.Add(ik.PublicKey().Serialize(), uint32(1), spk.PublicKey, spk.Signature[:63])
	f.Fuzz(func(t *testing.T, identity []byte, id uint32, pub, sig []byte) {
		s := &wirepb.SignedPreKey{Id: id, PublicKey: pub, Signature: sig}
		err := keys.VerifySignedPreKey(identity, s)
		if err == nil {
			if len(identity) != 33 || identity[0] != 5 || len(pub) != 33 || pub[0] != 5 || len(sig) != 64 || id == 0 {
				t.Fatal("accepted malformed input")
			}
			return
		}
		if !errors.Is(err, keys.ErrInvalidKey) && !errors.Is(err, keys.ErrBadSignature) {
			t.Fatalf("unexpected error %v", err)
		}
	})
}
