package device

import (
	"github.com/ferryhq/ferry/wire"
	"github.com/ferryhq/ferry/wire/wirepb"
)

// Errors returned by this package. Each is a *wire.Error, so the relay maps
// it to a client error code with errors.As; errors.Is matches by code
// (wire.Error.Is), so errors.Is(err, ErrUsernameTaken) holds for every error
// this package returns with that code, whatever its message.
//
// Most functions return a fresh *wire.Error with the sentinel's code and a
// more specific message (never containing key bytes or signatures), wrapped
// with %w in a sentence naming the operation. The sentinels themselves are
// never handed out, so no caller can mutate them.
var (
	ErrInvalidUsername = &wire.Error{Code: wirepb.ErrorCode_INVALID_USERNAME, Message: "device: invalid username"}
	ErrUsernameTaken   = &wire.Error{Code: wirepb.ErrorCode_USERNAME_TAKEN, Message: "device: username taken"}
	ErrUnknownAccount  = &wire.Error{Code: wirepb.ErrorCode_UNKNOWN_ACCOUNT, Message: "device: no such account"}
	ErrUnknownDevice   = &wire.Error{Code: wirepb.ErrorCode_UNKNOWN_DEVICE, Message: "device: no such device"}
	ErrInvalidKey      = &wire.Error{Code: wirepb.ErrorCode_INVALID_KEY, Message: "device: signing key must be a 32-byte Ed25519 public key"}
	ErrBadSignature    = &wire.Error{Code: wirepb.ErrorCode_BAD_SIGNATURE, Message: "device: signature does not verify"}
	ErrAuthFailed      = &wire.Error{Code: wirepb.ErrorCode_AUTH_FAILED, Message: "device: authentication failed"}

	// ErrInvalidRegistrationID: a Signal registration id outside 1..MaxRegistrationID.
	ErrInvalidRegistrationID = &wire.Error{Code: wirepb.ErrorCode_BAD_REQUEST, Message: "device: registration id must be 1..16380"}
	// ErrTooManyDevices: AddDevice on an account that has Options.MaxDevices devices.
	ErrTooManyDevices = &wire.Error{Code: wirepb.ErrorCode_TOO_MANY_DEVICES, Message: "device: account has the maximum number of devices"}
	// ErrPrimaryDevice: RemoveDevice of device 1, the primary device.
	ErrPrimaryDevice = &wire.Error{Code: wirepb.ErrorCode_BAD_REQUEST, Message: "device: the primary device cannot be removed"}
	// ErrDeviceListInvalid: a published device list does not verify, is
	// another account's, or names a device the account does not have.
	// (Errors of package devicelist pass through unchanged and match it by code.)
	ErrDeviceListInvalid = &wire.Error{Code: wirepb.ErrorCode_DEVICE_LIST_INVALID, Message: "device: invalid device list"}
	// ErrDeviceListStale: a published list's version is not greater than the stored one's.
	ErrDeviceListStale = &wire.Error{Code: wirepb.ErrorCode_DEVICE_LIST_STALE, Message: "device: device list version is not newer than the stored one"}
	// ErrInternal: a stored record does not decode, or storage failed.
	ErrInternal = &wire.Error{Code: wirepb.ErrorCode_INTERNAL, Message: "device: internal error", Retryable: true}
)

// errf returns a fresh *wire.Error with sentinel's code and retryability
// and a "device: "-prefixed formatted message.
func errf(sentinel *wire.Error, format string, args ...any) *wire.Error {
	return sentinel.Newf("device: "+format, args...)
}

// fresh returns a copy of sentinel that a caller may keep or change.
func fresh(sentinel *wire.Error) *wire.Error { return sentinel.Clone() }
