package device

import (
	"crypto/ed25519"

	"github.com/ferryhq/ferry/store/storepb"
	"github.com/ferryhq/ferry/wire"
)

// Username rules (see docs/protocol.md): 3..32 bytes, [a-z][a-z0-9_]*, not
// ending in '_'.
const (
	MinUsernameLen = 3
	MaxUsernameLen = 32
)

// MaxRegistrationID is the largest Signal registration id a device may use
// (ids are 1..16380, as in Signal).
const MaxRegistrationID = 16380

// ValidateUsername reports whether name is a valid account name: 3 to 32
// bytes, starting with a letter a-z, then letters a-z, digits and '_', and
// not ending in '_'. The error is an ErrInvalidUsername-coded *wire.Error
// whose message says which rule failed.
func ValidateUsername(name string) error {
	if len(name) < MinUsernameLen || len(name) > MaxUsernameLen {
		return errf(ErrInvalidUsername, "username must be %d to %d bytes long, not %d", MinUsernameLen, MaxUsernameLen, len(name))
	}
	if c := name[0]; c < 'a' || c > 'z' {
		return errf(ErrInvalidUsername, "username must start with a letter a-z")
	}
	for i := 1; i < len(name); i++ {
		c := name[i]
		if (c < 'a' || c > 'z') && (c < '0' || c > '9') && c != '_' {
			return errf(ErrInvalidUsername, "username may contain only a-z, 0-9 and '_' (byte %d is not one of them)", i)
		}
	}
	if name[len(name)-1] == '_' {
		return errf(ErrInvalidUsername, "username must not end with '_'")
	}
	return nil
}

// VerifyRegister checks sig, the Ed25519 signature by signingKey over
// wire.RegisterMessage(challenge, username), as sent in a Register frame.
// A signing key that is not 32 bytes is ErrInvalidKey; a signature that is
// not 64 bytes, a challenge that is not wire.ChallengeSize bytes or a
// signature that does not verify is ErrBadSignature. It never panics.
func VerifyRegister(challenge []byte, username string, signingKey, sig []byte) error {
	if len(signingKey) != ed25519.PublicKeySize {
		return errf(ErrInvalidKey, "signing key must be %d bytes, not %d", ed25519.PublicKeySize, len(signingKey))
	}
	if len(sig) != ed25519.SignatureSize {
		return errf(ErrBadSignature, "signature must be %d bytes, not %d", ed25519.SignatureSize, len(sig))
	}
	if len(challenge) != wire.ChallengeSize {
		return errf(ErrBadSignature, "challenge must be %d bytes", wire.ChallengeSize)
	}
	if !ed25519.Verify(ed25519.PublicKey(signingKey), wire.RegisterMessage(challenge, username), sig) {
		return fresh(ErrBadSignature)
	}
	return nil
}

// VerifyAuth checks sig, the Ed25519 signature by dev.SigningKey over
// wire.AuthMessage(challenge, addr.Account, addr.Device), as sent in an Auth
// frame. dev is the stored record of addr (from Store.Device). Any mismatch
// (nil device, device id other than addr.Device, wrong lengths, bad
// signature) is ErrAuthFailed, with one message that does not say which
// check failed. It never panics.
func VerifyAuth(dev *storepb.Device, challenge []byte, addr wire.DeviceAddr, sig []byte) error {
	if dev == nil || dev.GetId() != addr.Device ||
		len(dev.GetSigningKey()) != ed25519.PublicKeySize ||
		len(challenge) != wire.ChallengeSize ||
		len(sig) != ed25519.SignatureSize ||
		!ed25519.Verify(ed25519.PublicKey(dev.GetSigningKey()), wire.AuthMessage(challenge, addr.Account, addr.Device), sig) {
		return fresh(ErrAuthFailed)
	}
	return nil
}
