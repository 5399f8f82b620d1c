package keys

import (
	"fmt"
	"log"

	"github.com/ferryhq/ferry/wire/wirepb"
	"go.mau.fi/libsignal/ecc"
	"go.mau.fi/libsignal/logger"
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
	if perr := protect(func() { key, err = ecc.DecodePoint(b, 0) }); perr != nil || err != nil || key == nil {
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
	if perr := protect(func() { ok = ecc.VerifySignature(ik, spk.PublicKey, sig) }); perr != nil || !ok {
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

// protect runs f and turns a panic into an error. libsignal panics on some
// malformed input; a panic there is a bug of ours, never a crash of the node.
func protect(f func()) (err error) {
	defer func() {
		if r := recover(); r != nil {
			err = fmt.Errorf("keys: libsignal panicked: %v", r)
		}
	}()
	f()
	return nil
}

// quietSignalLogger drops libsignal's Debug output (which formats key
// material) and sends its rarer Info/Warning/Error lines to the standard
// logger instead of stdout.
type quietSignalLogger struct{}

func (quietSignalLogger) Debug(string, string) {}
func (quietSignalLogger) Info(caller, msg string) {
	log.Printf("libsignal: info: %s: %s", caller, msg)
}
func (quietSignalLogger) Warning(caller, msg string) {
	log.Printf("libsignal: warning: %s: %s", caller, msg)
}
func (quietSignalLogger) Error(caller, msg string) {
	log.Printf("libsignal: error: %s: %s", caller, msg)
}
func (quietSignalLogger) Configure(string) {}

// init installs quietSignalLogger unless a logger was set up already.
// libsignal installs its default logger lazily, on its first log call,
// without synchronization: concurrent first calls (two signature checks at
// once) race on logger.Logger. Setting it here, before any goroutine runs,
// removes that race.
func init() {
	if logger.Logger == nil {
		var l logger.Loggable = quietSignalLogger{}
		logger.Setup(&l)
	}
}
