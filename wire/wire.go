// Package wire is Ferry's protocol: the protobuf frames (package wirepb,
// generated from ferry.proto), the protocol version, error codes as Go
// errors, WebSocket close codes, and the frame codec with its limits.
//
// Protocol flow (details in docs/protocol.md):
//
//	client                                   server
//	  | -- WebSocket upgrade /v1/ws ----------> |
//	  | -- ClientFrame{Hello} ----------------> |  within the handshake deadline
//	  | <-------------- Response{Welcome} ----- |  version, 32-byte challenge, limits
//	  | -- ClientFrame{Register | Auth} ------> |  Ed25519 signature over the challenge
//	  | <------- Response{RegisterResult|...} - |
//	  | <==== requests / responses, events ===> |  Envelope events are acked by id
package wire

import (
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"sort"

	"github.com/ferryhq/ferry/wire/wirepb"
	"google.golang.org/protobuf/proto"
)

// Version is the protocol version this code speaks. Hello carries a range.
const Version = 1

// Path is the WebSocket endpoint.
const Path = "/v1/ws"

// ChallengeSize is the length of Welcome.challenge.
const ChallengeSize = 32

// Signature context strings (see Register and Auth in ferry.proto).
const (
	RegisterContext = "ferry-register-v1"
	AuthContext     = "ferry-auth-v1"
)

// RegisterMessage is the byte string a new device signs to register.
func RegisterMessage(challenge []byte, username string) []byte {
	b := make([]byte, 0, len(RegisterContext)+1+len(challenge)+len(username))
	b = append(b, RegisterContext...)
	b = append(b, 0)
	b = append(b, challenge...)
	return append(b, username...)
}

// AuthMessage is the byte string an existing device signs to authenticate.
func AuthMessage(challenge []byte, username string, deviceID uint32) []byte {
	b := make([]byte, 0, len(AuthContext)+1+len(challenge)+len(username)+5)
	b = append(b, AuthContext...)
	b = append(b, 0)
	b = append(b, challenge...)
	b = append(b, username...)
	b = append(b, 0)
	return append(b, byte(deviceID>>24), byte(deviceID>>16), byte(deviceID>>8), byte(deviceID))
}

// DeviceAddr names one device of one account.
type DeviceAddr struct {
	Account string
	Device  uint32
}

func (a DeviceAddr) String() string { return fmt.Sprintf("%s.%d", a.Account, a.Device) }

// Ref converts to the wire form.
func (a DeviceAddr) Ref() *wirepb.DeviceRef {
	return &wirepb.DeviceRef{Username: a.Account, DeviceId: a.Device}
}

// Close codes (WebSocket close frames). 4000-4099: do not reconnect
// automatically (something must change first). 4100-4199: reconnect with
// jittered exponential backoff.
const (
	CloseProtocolError      = 4000 // a frame broke the protocol
	CloseUnsupportedVersion = 4001
	CloseAuthFailed         = 4002
	CloseReplaced           = 4003 // a newer connection of the same device took over
	CloseDeviceRemoved      = 4004
	CloseFrameTooLarge      = 4005

	CloseServerShutdown   = 4100 // server is restarting; reconnect after a jittered delay
	CloseSlowConsumer     = 4101 // the client did not read fast enough
	CloseHandshakeTimeout = 4102
	CloseInternal         = 4103
	ClosePingTimeout      = 4104
	CloseWrongNode        = 4105 // cluster mode: this node does not (any more) serve the account; reconnect (the server's address may redirect)
)

// CloseReconnects reports whether a client should reconnect after code.
// Codes outside Ferry's range (1000-3999) reconnect, except 1008/1009 which
// mean the client sent something wrong.
func CloseReconnects(code int) bool {
	switch {
	case code >= 4000 && code < 4100:
		return false
	case code == 1008 || code == 1009:
		return false
	default:
		return true
	}
}

// Error is a protocol error as a Go error. Servers return it to clients;
// clients get it back from requests. Compare codes with errors.Is against
// the sentinels below or with CodeOf.
type Error struct {
	Code         wirepb.ErrorCode
	Message      string
	Retryable    bool
	RetryAfterMs uint32
	Mismatch     *wirepb.DeviceMismatch
	Group        *wirepb.GroupInfo // with GROUP_STALE: the current membership
	Redirect     string            // with WRONG_NODE: the node to connect to
}

// Error returns the message, or the code's name when there is none.
func (e *Error) Error() string {
	if e.Message == "" {
		return "wire: " + e.Code.String()
	}
	return e.Message
}

// Is matches another *Error with the same code, so errors.Is(err,
// wire.ErrAuthFailed) works for any message.
func (e *Error) Is(target error) bool {
	t, ok := target.(*Error)
	return ok && t.Code == e.Code
}

// Proto converts to the wire form.
func (e *Error) Proto() *wirepb.Error {
	return &wirepb.Error{Code: e.Code, Message: e.Message, Retryable: e.Retryable,
		RetryAfterMs: e.RetryAfterMs, Mismatch: e.Mismatch, Group: e.Group, Redirect: e.Redirect}
}

// FromProto converts a received error.
func FromProto(p *wirepb.Error) *Error {
	return &Error{Code: p.GetCode(), Message: p.GetMessage(), Retryable: p.GetRetryable(),
		RetryAfterMs: p.GetRetryAfterMs(), Mismatch: p.GetMismatch(), Group: p.GetGroup(), Redirect: p.GetRedirect()}
}

// Errorf makes an *Error with a formatted message. Retryable is set from the code.
func Errorf(code wirepb.ErrorCode, format string, args ...any) *Error {
	return &Error{Code: code, Message: fmt.Sprintf(format, args...), Retryable: retryableCode(code)}
}

func retryableCode(c wirepb.ErrorCode) bool {
	switch c {
	case wirepb.ErrorCode_RATE_LIMITED, wirepb.ErrorCode_INBOX_FULL,
		wirepb.ErrorCode_UNAVAILABLE, wirepb.ErrorCode_INTERNAL, wirepb.ErrorCode_WRONG_NODE:
		return true
	}
	return false
}

// CodeOf returns the wire code of err, or ERROR_CODE_UNSPECIFIED.
func CodeOf(err error) wirepb.ErrorCode {
	var e *Error
	if errors.As(err, &e) {
		return e.Code
	}
	return wirepb.ErrorCode_ERROR_CODE_UNSPECIFIED
}

// Sentinels for errors.Is.
var (
	ErrBadRequest         = &Error{Code: wirepb.ErrorCode_BAD_REQUEST}
	ErrUnsupportedVersion = &Error{Code: wirepb.ErrorCode_UNSUPPORTED_VERSION}
	ErrUnexpectedFrame    = &Error{Code: wirepb.ErrorCode_UNEXPECTED_FRAME}
	ErrAuthFailed         = &Error{Code: wirepb.ErrorCode_AUTH_FAILED}
	ErrInvalidUsername    = &Error{Code: wirepb.ErrorCode_INVALID_USERNAME}
	ErrUsernameTaken      = &Error{Code: wirepb.ErrorCode_USERNAME_TAKEN}
	ErrUnknownAccount     = &Error{Code: wirepb.ErrorCode_UNKNOWN_ACCOUNT}
	ErrUnknownDevice      = &Error{Code: wirepb.ErrorCode_UNKNOWN_DEVICE}
	ErrInvalidKey         = &Error{Code: wirepb.ErrorCode_INVALID_KEY}
	ErrBadSignature       = &Error{Code: wirepb.ErrorCode_BAD_SIGNATURE}
	ErrTooManyPrekeys     = &Error{Code: wirepb.ErrorCode_TOO_MANY_PREKEYS}
	ErrIdentityKeyChanged = &Error{Code: wirepb.ErrorCode_IDENTITY_KEY_CHANGED}
	ErrNoKeys             = &Error{Code: wirepb.ErrorCode_NO_KEYS}
	ErrDeviceMismatch     = &Error{Code: wirepb.ErrorCode_DEVICE_MISMATCH}
	ErrMessageTooLarge    = &Error{Code: wirepb.ErrorCode_MESSAGE_TOO_LARGE}
	ErrFrameTooLarge      = &Error{Code: wirepb.ErrorCode_FRAME_TOO_LARGE}
	ErrRateLimited        = &Error{Code: wirepb.ErrorCode_RATE_LIMITED}
	ErrInboxFull          = &Error{Code: wirepb.ErrorCode_INBOX_FULL}
	ErrUnavailable        = &Error{Code: wirepb.ErrorCode_UNAVAILABLE}
	ErrInternal           = &Error{Code: wirepb.ErrorCode_INTERNAL}
	ErrNotPrimary         = &Error{Code: wirepb.ErrorCode_NOT_PRIMARY}
	ErrTooManyDevices     = &Error{Code: wirepb.ErrorCode_TOO_MANY_DEVICES}
	ErrDeviceListInvalid  = &Error{Code: wirepb.ErrorCode_DEVICE_LIST_INVALID}
	ErrDeviceListStale    = &Error{Code: wirepb.ErrorCode_DEVICE_LIST_STALE}
	ErrLinkCodeInvalid    = &Error{Code: wirepb.ErrorCode_LINK_CODE_INVALID}
	ErrLinkCodeExpired    = &Error{Code: wirepb.ErrorCode_LINK_CODE_EXPIRED}
	ErrUnknownGroup       = &Error{Code: wirepb.ErrorCode_UNKNOWN_GROUP}
	ErrGroupStale         = &Error{Code: wirepb.ErrorCode_GROUP_STALE}
	ErrNotAdmin           = &Error{Code: wirepb.ErrorCode_NOT_ADMIN}
	ErrGroupFull          = &Error{Code: wirepb.ErrorCode_GROUP_FULL}
)

// DeviceListContext prefixes the bytes a primary signs for a device list.
const DeviceListContext = "ferry-device-list-v1"

// DecodeClientFrame decodes one client frame, rejecting frames over max
// bytes (0: no limit), unknown bodies and requests without an id.
func DecodeClientFrame(b []byte, max int) (*wirepb.ClientFrame, error) {
	if max > 0 && len(b) > max {
		return nil, Errorf(wirepb.ErrorCode_FRAME_TOO_LARGE, "frame of %d bytes is over the limit of %d", len(b), max)
	}
	f := &wirepb.ClientFrame{}
	if err := proto.Unmarshal(b, f); err != nil {
		return nil, Errorf(wirepb.ErrorCode_BAD_REQUEST, "frame does not decode")
	}
	if f.Body == nil {
		return f, Errorf(wirepb.ErrorCode_BAD_REQUEST, "frame has no known body")
	}
	if f.Id == 0 {
		return f, Errorf(wirepb.ErrorCode_BAD_REQUEST, "request id 0 is reserved")
	}
	return f, nil
}

// DecodeServerFrame decodes one server frame (client side).
func DecodeServerFrame(b []byte, max int) (*wirepb.ServerFrame, error) {
	if max > 0 && len(b) > max {
		return nil, Errorf(wirepb.ErrorCode_FRAME_TOO_LARGE, "frame of %d bytes is over the limit of %d", len(b), max)
	}
	f := &wirepb.ServerFrame{}
	if err := proto.Unmarshal(b, f); err != nil {
		return nil, Errorf(wirepb.ErrorCode_BAD_REQUEST, "frame does not decode")
	}
	if f.Body == nil {
		return nil, Errorf(wirepb.ErrorCode_BAD_REQUEST, "frame has no known body")
	}
	return f, nil
}

// Encode marshals a frame.
func Encode(m proto.Message) ([]byte, error) { return proto.Marshal(m) }

// ValidClientMsgID reports whether id is 1..64 printable ASCII bytes.
func ValidClientMsgID(id string) bool {
	if len(id) == 0 || len(id) > 64 {
		return false
	}
	for i := 0; i < len(id); i++ {
		if id[i] < 0x21 || id[i] > 0x7e {
			return false
		}
	}
	return true
}

// GroupViewHash is GroupSend.view_hash for a membership, seen from the
// sending device: SHA-256 over every member device except sender, in
// ascending (username, device_id) order, each as username 0x00
// device_id(4 BE) registration_id(4 BE).
func GroupViewHash(g *wirepb.GroupInfo, sender DeviceAddr) []byte {
	type dev struct {
		user    string
		id, reg uint32
	}
	var all []dev
	for _, m := range g.GetMembers() {
		for _, d := range m.GetDevices() {
			if m.Username == sender.Account && d.DeviceId == sender.Device {
				continue
			}
			all = append(all, dev{m.Username, d.DeviceId, d.RegistrationId})
		}
	}
	sort.Slice(all, func(i, j int) bool {
		if all[i].user != all[j].user {
			return all[i].user < all[j].user
		}
		return all[i].id < all[j].id
	})
	h := sha256.New()
	var b [8]byte
	for _, d := range all {
		h.Write([]byte(d.user))
		h.Write([]byte{0})
		binary.BigEndian.PutUint32(b[:4], d.id)
		binary.BigEndian.PutUint32(b[4:], d.reg)
		h.Write(b[:])
	}
	return h.Sum(nil)
}

// Newf returns a new *Error with e's code and retryability and a formatted
// message: packages define sentinels and hand out fresh, specific copies.
func (e *Error) Newf(format string, args ...any) *Error {
	return &Error{Code: e.Code, Retryable: e.Retryable, Message: fmt.Sprintf(format, args...)}
}

// Clone returns a copy of e that the caller may keep or change.
func (e *Error) Clone() *Error {
	c := *e
	return &c
}
