package group

import (
	"github.com/ferryhq/ferry/wire"
	"github.com/ferryhq/ferry/wire/wirepb"
)

// Errors returned by this package. Each is a *wire.Error, so the relay maps
// it to a client error code with errors.As; errors.Is matches by code
// (wire.Error.Is). As in package device, functions return fresh copies with
// a more specific "group: "-prefixed message; the sentinels are never
// handed out.
var (
	// ErrBadRequest: a malformed group id or name, an unknown op, or a
	// change that makes no sense (making a non-member an admin, leaving a
	// group without an admin by UNADMIN).
	ErrBadRequest = &wire.Error{Code: wirepb.ErrorCode_BAD_REQUEST, Message: "group: bad request"}
	// ErrUnknownGroup: no such group, or the requester is not a member
	// (groups are not revealed to non-members).
	ErrUnknownGroup = &wire.Error{Code: wirepb.ErrorCode_UNKNOWN_GROUP, Message: "group: no such group"}
	// ErrNotAdmin: the group lets only admins change its membership.
	ErrNotAdmin = &wire.Error{Code: wirepb.ErrorCode_NOT_ADMIN, Message: "group: only admins may change the membership"}
	// ErrGroupFull: the change would put the group over Options.MaxMembers.
	ErrGroupFull = &wire.Error{Code: wirepb.ErrorCode_GROUP_FULL, Message: "group: group is full"}
	// ErrUnknownAccount: a member to add has no account.
	ErrUnknownAccount = &wire.Error{Code: wirepb.ErrorCode_UNKNOWN_ACCOUNT, Message: "group: no such account"}
	// ErrInternal: a stored record does not decode, or storage failed.
	ErrInternal = &wire.Error{Code: wirepb.ErrorCode_INTERNAL, Message: "group: internal error", Retryable: true}
)

// errf returns a fresh *wire.Error with sentinel's code and retryability
// and a "group: "-prefixed formatted message.
func errf(sentinel *wire.Error, format string, args ...any) *wire.Error {
	return sentinel.Newf("group: "+format, args...)
}

// fresh returns a copy of sentinel that a caller may keep or change.
func fresh(sentinel *wire.Error) *wire.Error { return sentinel.Clone() }
