package keys

import (
	"fmt"
	"github.com/ferryhq/ferry/internal/signalsafe"

	"github.com/ferryhq/ferry/wire/wirepb"
	"go.mau.fi/libsignal/ecc"
)

// Sizes of Signal key material on the wire.
const (
	// PublicKeySize is a Signal Curve25519 public key: the type byte
	// ecc.DjbType (0x05) and 32 key bytes.
	PublicKeySize = 33
	// SignatureSize is an XEdDSA signature.
	SignatureSize = 64
	// MaxPrekeyID is the largest one-time prekey id (ids are 24-bit; 0 means
	// "no prekey" to libsignal and is never valid).
	MaxPrekeyID = 0xFFFFFF
)

// ParsePublicKey validates a Signal Curve25519 public key (33 bytes, the
// first one 0x05) and decodes it. Anything else is ErrInvalidKey. It never
// panics: the bytes are checked before libsignal sees them and the call
// runs under recover.
func ParsePublicKey(b []byte) (ecc.ECPublicKeyable, error) {
	return parseKey("public key", b)
}

// parseKey is ParsePublicKey with what naming the key in the error.
func parseKey(what string, b []byte) (ecc.ECPublicKeyable, error) {
	if len(b) != PublicKeySize {
		return nil, errf(ErrInvalidKey, "%s must be %d bytes, not %d", what, PublicKeySize, len(b))
	}
	if b[0] != ecc.DjbType {
		return nil, errf(ErrInvalidKey, "%s must start with the type byte 0x%02x", what, ecc.DjbType)
	}
	var (
		key ecc.ECPublicKeyable
		err error
	)
	if perr := signalsafe.Protect(func() { key, err = ecc.DecodePoint(b, 0) }); perr != nil || err != nil || key == nil {
		return nil, errf(ErrInvalidKey, "%s does not decode", what)
	}
	return key, nil
}

// VerifySignedPreKey checks a signed prekey: identityKey and
// spk.PublicKey are valid public keys (ParsePublicKey; else ErrInvalidKey),
// spk.Id is not 0 (ErrInvalidKey), and spk.Signature is a 64-byte XEdDSA
// signature by identityKey over spk.PublicKey (else ErrBadSignature). It
// never panics.
func VerifySignedPreKey(identityKey []byte, spk *wirepb.SignedPreKey) error {
	ik, err := parseKey("identity key", identityKey)
	if err != nil {
		return err
	}
	if err := checkSignedPreKey(spk); err != nil {
		return err
	}
	var sig [SignatureSize]byte
	copy(sig[:], spk.Signature)
	var ok bool
	if perr := signalsafe.Protect(func() { ok = ecc.VerifySignature(ik, spk.PublicKey, sig) }); perr != nil || !ok {
		return errf(ErrBadSignature, "signed prekey %d: signature does not verify", spk.Id)
	}
	return nil
}

// checkSignedPreKey checks everything about spk but its signature.
func checkSignedPreKey(spk *wirepb.SignedPreKey) error {
	if spk == nil {
		return errf(ErrInvalidKey, "no signed prekey")
	}
	if spk.Id == 0 {
		return errf(ErrInvalidKey, "signed prekey id 0 is reserved")
	}
	if _, err := parseKey(fmt.Sprintf("signed prekey %d", spk.Id), spk.PublicKey); err != nil {
		return err
	}
	if len(spk.Signature) != SignatureSize {
		return errf(ErrBadSignature, "signed prekey %d: signature must be %d bytes, not %d",
			spk.Id, SignatureSize, len(spk.Signature))
	}
	return nil
}
