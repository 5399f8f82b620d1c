package keys

import (
	"github.com/ferryhq/ferry/wire"
	"github.com/ferryhq/ferry/wire/wirepb"
)

// Errors returned by this package. Each is a *wire.Error, so the relay maps
// it to a client error code with errors.As; errors.Is matches by code
// (wire.Error.Is), so errors.Is(err, ErrNoKeys) holds for every error this
// package returns with that code, whatever its message. (ErrBadRequest and
// ErrFirstUpload share BAD_REQUEST and so match each other.)
//
// Functions return a fresh *wire.Error with the sentinel's code and a more
// specific message (never containing key bytes or signatures), usually
// wrapped with %w in a sentence naming the operation and device. The
// sentinels themselves are never handed out, so no caller can change them.
var (
	ErrInvalidKey         = &wire.Error{Code: wirepb.ErrorCode_INVALID_KEY, Message: "keys: invalid key"}
	ErrBadSignature       = &wire.Error{Code: wirepb.ErrorCode_BAD_SIGNATURE, Message: "keys: signed prekey signature does not verify"}
	ErrIdentityKeyChanged = &wire.Error{Code: wirepb.ErrorCode_IDENTITY_KEY_CHANGED, Message: "keys: the identity key cannot change"}
	ErrTooManyPrekeys     = &wire.Error{Code: wirepb.ErrorCode_TOO_MANY_PREKEYS, Message: "keys: too many one-time prekeys"}
	ErrNoKeys             = &wire.Error{Code: wirepb.ErrorCode_NO_KEYS, Message: "keys: device has not uploaded its keys"}
	ErrRateLimited        = &wire.Error{Code: wirepb.ErrorCode_RATE_LIMITED, Message: "keys: too many bundle claims", Retryable: true}

	// ErrBadRequest: a malformed field (prekey id out of range, duplicate
	// ids, an invalid account name, no devices to claim).
	ErrBadRequest = &wire.Error{Code: wirepb.ErrorCode_BAD_REQUEST, Message: "keys: bad request"}
	// ErrFirstUpload: a device's first upload lacks the identity key or the
	// signed prekey.
	ErrFirstUpload = &wire.Error{Code: wirepb.ErrorCode_BAD_REQUEST, Message: "keys: the first upload must carry the identity key and a signed prekey"}
	// ErrInternal: a stored record does not decode, or storage failed.
	ErrInternal = &wire.Error{Code: wirepb.ErrorCode_INTERNAL, Message: "keys: internal error", Retryable: true}
)

// errf returns a fresh *wire.Error with sentinel's code and retryability
// and a "keys: "-prefixed formatted message.
func errf(sentinel *wire.Error, format string, args ...any) *wire.Error {
	return sentinel.Newf("keys: "+format, args...)
}

// fresh returns a copy of sentinel that a caller may keep or change.
func fresh(sentinel *wire.Error) *wire.Error { return sentinel.Clone() }
