// Package devicelist signs, parses and verifies signed device lists: the
// statement, signed by an account's primary device (id 1) with its Signal
// identity key, of which devices the account has (design invariant 7). The
// server checks a list before storing it; clients check every list before
// encrypting to any device on it. The package is pure: no storage, no
// network, so the client, the server and the test-vector verifier share it.
//
// Signed bytes (docs/protocol.md, "Device lists"):
//
//	signature = XEdDSA(primary identity key, "ferry-device-list-v1" || 0x00 || list)
//
// where list is the encoded wirepb.DeviceList exactly as carried in
// SignedDeviceList.list. Verification never re-encodes: it checks the bytes
// it was given, then decodes them.
//
// Structural rules (Parse):
//   - list is 1..MaxListBytes bytes and decodes as a DeviceList; unknown
//     fields are allowed (they are signed, so a later version may add some);
//   - username follows the account name rules (ValidUsername);
//   - version >= 1;
//   - 1..MaxDevices entries, device ids strictly ascending, the first one 1
//     (so device 1, the primary, is always present and no id is 0);
//   - every identity key is 33 bytes, 0x05 then a canonical Curve25519 key
//     (the top bit of the last byte clear, as every generated key has: the
//     signature check ignores that bit, so allowing it would let two byte
//     strings name one key), and no two devices share one;
//   - the signature is 64 bytes.
//
// Signature rules (Verify): the signer is the identity key the list names for
// device 1, and the XEdDSA signature by it over SignedBytes(list) verifies.
// go.mau.fi/libsignal only sees checked lengths and runs under recover.
//
// Errors are *Error values. Each matches exactly one of the kind sentinels
// below with errors.Is, and converts with errors.As to a *wire.Error whose
// code is the kind's (DEVICE_LIST_INVALID or DEVICE_LIST_STALE); errors.Is
// against a wire sentinel (wire.ErrDeviceListInvalid) matches by code.
package devicelist

import (
	"bytes"
	"crypto/subtle"
	"errors"
	"fmt"
	"github.com/ferryhq/ferry/internal/signalsafe"

	"github.com/ferryhq/ferry/wire"
	"github.com/ferryhq/ferry/wire/wirepb"
	"go.mau.fi/libsignal/ecc"
	"google.golang.org/protobuf/proto"
)

// Limits of the format. MaxDevices bounds what a list may name; the server's
// own device cap (device.Options.MaxDevices, default 6) is at most this.
const (
	MaxDevices     = 64
	MaxListBytes   = 4096
	PublicKeySize  = 33 // 0x05 and a 32-byte Curve25519 key
	SignatureSize  = 64 // XEdDSA
	PrimaryID      = 1
	minUsernameLen = 3
	maxUsernameLen = 32
)

// Error kinds. Each is a *wire.Error carrying the code clients see; the
// errors this package returns match exactly one of them with errors.Is.
var (
	// ErrInvalid: the list breaks a structural rule (see the package doc).
	ErrInvalid = &wire.Error{Code: wirepb.ErrorCode_DEVICE_LIST_INVALID, Message: "devicelist: invalid list"}
	// ErrBadSignature: the signature does not verify.
	ErrBadSignature = &wire.Error{Code: wirepb.ErrorCode_DEVICE_LIST_INVALID, Message: "devicelist: signature does not verify"}
	// ErrWrongSigner: the list's device-1 key is not the expected signer
	// (the pinned primary identity key, or the server's record of it).
	ErrWrongSigner = &wire.Error{Code: wirepb.ErrorCode_DEVICE_LIST_INVALID, Message: "devicelist: not signed by the account's primary identity key"}
	// ErrWrongAccount: the list is another account's.
	ErrWrongAccount = &wire.Error{Code: wirepb.ErrorCode_DEVICE_LIST_INVALID, Message: "devicelist: list of another account"}
	// ErrRollback: the list is older than one seen before, or has the same
	// version with different bytes.
	ErrRollback = &wire.Error{Code: wirepb.ErrorCode_DEVICE_LIST_STALE, Message: "devicelist: older than a list seen before"}
)

// kinds names the sentinels (test vectors use these names).
var kinds = []struct {
	name string
	err  *wire.Error
}{
	{"ErrInvalid", ErrInvalid},
	{"ErrBadSignature", ErrBadSignature},
	{"ErrWrongSigner", ErrWrongSigner},
	{"ErrWrongAccount", ErrWrongAccount},
	{"ErrRollback", ErrRollback},
}

// Error is an error of this package: one kind and a specific message.
type Error struct {
	kind *wire.Error
	msg  string
}

func (e *Error) Error() string { return e.msg }

// Is matches the error's own kind sentinel exactly, and any other
// *wire.Error by code.
func (e *Error) Is(target error) bool {
	t, ok := target.(*wire.Error)
	if !ok {
		return false
	}
	for _, k := range kinds {
		if t == k.err {
			return t == e.kind
		}
	}
	return t.Code == e.kind.Code
}

// As fills a **wire.Error with a fresh *wire.Error of the kind's code and
// this error's message, so callers that map errors to the wire with
// errors.As get the right code.
func (e *Error) As(target any) bool {
	p, ok := target.(**wire.Error)
	if !ok {
		return false
	}
	*p = &wire.Error{Code: e.kind.Code, Message: e.msg, Retryable: e.kind.Retryable}
	return true
}

// Kind returns the kind sentinel of err (one of ErrInvalid ... ErrRollback),
// or nil if err is not an error of this package.
func Kind(err error) *wire.Error {
	var e *Error
	if errors.As(err, &e) {
		return e.kind
	}
	return nil
}

// KindName returns "ErrInvalid", ..., "ErrRollback" for an error of this
// package, "" for nil and "other" for anything else.
func KindName(err error) string {
	if err == nil {
		return ""
	}
	k := Kind(err)
	for _, n := range kinds {
		if n.err == k {
			return n.name
		}
	}
	return "other"
}

// KindNames lists every kind name KindName returns for an error of this package.
func KindNames() []string {
	out := make([]string, len(kinds))
	for i, k := range kinds {
		out[i] = k.name
	}
	return out
}

func errf(kind *wire.Error, format string, args ...any) *Error {
	return &Error{kind: kind, msg: "devicelist: " + fmt.Sprintf(format, args...)}
}

// SignedBytes is what the primary signs: wire.DeviceListContext || 0x00 || list.
func SignedBytes(list []byte) []byte {
	b := make([]byte, 0, len(wire.DeviceListContext)+1+len(list))
	b = append(b, wire.DeviceListContext...)
	b = append(b, 0)
	return append(b, list...)
}

// Encode encodes l deterministically (the bytes Sign signs).
func Encode(l *wirepb.DeviceList) ([]byte, error) {
	return proto.MarshalOptions{Deterministic: true}.Marshal(l)
}

// Sign encodes l deterministically and signs it with the identity private
// key priv (XEdDSA; randomness from crypto/rand). It refuses a list that
// Parse would refuse, or whose device 1 is not priv's public key.
func Sign(priv ecc.ECPrivateKeyable, l *wirepb.DeviceList) (*wirepb.SignedDeviceList, error) {
	if priv == nil {
		return nil, errf(ErrInvalid, "no signing key")
	}
	b, err := Encode(l)
	if err != nil {
		return nil, errf(ErrInvalid, "list does not encode: %v", err)
	}
	var sig [SignatureSize]byte
	if perr := signalsafe.Protect(func() { sig = ecc.CalculateSignature(priv, SignedBytes(b)) }); perr != nil {
		return nil, errf(ErrInvalid, "signing failed: %v", perr)
	}
	s := &wirepb.SignedDeviceList{List: b, Signature: sig[:]}
	if _, err := Verify(s, nil); err != nil {
		return nil, err
	}
	return s, nil
}

// Parse decodes s.List and checks the structural rules of the package doc
// (not the signature). The error is ErrInvalid.
func Parse(s *wirepb.SignedDeviceList) (*wirepb.DeviceList, error) {
	if s == nil {
		return nil, errf(ErrInvalid, "no list")
	}
	if len(s.List) == 0 || len(s.List) > MaxListBytes {
		return nil, errf(ErrInvalid, "list must be 1..%d bytes, not %d", MaxListBytes, len(s.List))
	}
	if len(s.Signature) != SignatureSize {
		return nil, errf(ErrInvalid, "signature must be %d bytes, not %d", SignatureSize, len(s.Signature))
	}
	l := &wirepb.DeviceList{}
	if err := proto.Unmarshal(s.List, l); err != nil {
		return nil, errf(ErrInvalid, "list does not decode")
	}
	if !ValidUsername(l.Username) {
		return nil, errf(ErrInvalid, "invalid username")
	}
	if l.Version < 1 {
		return nil, errf(ErrInvalid, "version must be at least 1")
	}
	if n := len(l.Devices); n < 1 || n > MaxDevices {
		return nil, errf(ErrInvalid, "list must name 1..%d devices, not %d", MaxDevices, n)
	}
	if l.Devices[0].GetDeviceId() != PrimaryID {
		return nil, errf(ErrInvalid, "list must name device %d (the primary) first", PrimaryID)
	}
	for i, d := range l.Devices {
		if i > 0 && d.GetDeviceId() <= l.Devices[i-1].GetDeviceId() {
			return nil, errf(ErrInvalid, "device ids must be strictly ascending (device %d after %d)",
				d.GetDeviceId(), l.Devices[i-1].GetDeviceId())
		}
		if err := checkKey(d.GetIdentityKey()); err != nil {
			return nil, errf(ErrInvalid, "device %d: identity key %s", d.GetDeviceId(), err)
		}
		for _, o := range l.Devices[:i] {
			if bytes.Equal(o.IdentityKey, d.IdentityKey) {
				return nil, errf(ErrInvalid, "devices %d and %d have the same identity key", o.DeviceId, d.DeviceId)
			}
		}
	}
	return l, nil
}

// checkKey checks a Signal public key's encoding; the error text completes
// "identity key ...".
func checkKey(k []byte) error {
	switch {
	case len(k) != PublicKeySize:
		return fmt.Errorf("must be %d bytes, not %d", PublicKeySize, len(k))
	case k[0] != ecc.DjbType:
		return fmt.Errorf("must start with 0x%02x", ecc.DjbType)
	case k[PublicKeySize-1]&0x80 != 0:
		return errors.New("is not canonical (top bit set)")
	}
	return nil
}

// Verify is Parse plus the signature: the list's device-1 identity key must
// be signer (33 bytes; ErrWrongSigner otherwise) and the signature by it must
// verify (ErrBadSignature). A nil signer means "whoever device 1 is": the
// signature is checked against the list's own device-1 key. It never panics.
func Verify(s *wirepb.SignedDeviceList, signer []byte) (*wirepb.DeviceList, error) {
	l, err := Parse(s)
	if err != nil {
		return nil, err
	}
	primary := l.Devices[0].IdentityKey
	if signer != nil {
		if err := checkKey(signer); err != nil {
			return nil, errf(ErrWrongSigner, "signer key %s", err)
		}
		if subtle.ConstantTimeCompare(signer, primary) != 1 {
			return nil, errf(ErrWrongSigner, "device %d of the list is not the expected primary identity key", PrimaryID)
		}
	}
	var (
		pub ecc.ECPublicKeyable
		ok  bool
	)
	var sig [SignatureSize]byte
	copy(sig[:], s.Signature)
	perr := signalsafe.Protect(func() {
		var derr error
		if pub, derr = ecc.DecodePoint(primary, 0); derr != nil || pub == nil {
			return
		}
		ok = ecc.VerifySignature(pub, SignedBytes(s.List), sig)
	})
	if perr != nil || !ok {
		return nil, errf(ErrBadSignature, "signature of version %d does not verify", l.Version)
	}
	return l, nil
}

// VerifyNext is the client's rule for accepting a list of account username.
// The list must be signed by pinned, the primary identity key learned when
// linking or at first contact; with pinned nil the list's own device-1 key
// is trusted (trust on first use) and the caller should pin it. Then the list
// must be username's (ErrWrongAccount) and must not roll back: its version is
// greater than seenVersion, or equal to it with bytes identical to seenList
// (ErrRollback). seenVersion 0 means no list was seen. Errors come in this
// order: ErrInvalid, ErrWrongAccount, ErrWrongSigner, ErrBadSignature,
// ErrRollback.
func VerifyNext(s *wirepb.SignedDeviceList, username string, pinned []byte, seenVersion uint64, seenList []byte) (*wirepb.DeviceList, error) {
	l, err := Parse(s)
	if err != nil {
		return nil, err
	}
	if l.Username != username {
		return nil, errf(ErrWrongAccount, "list is for another account than %q", username)
	}
	if _, err := Verify(s, pinned); err != nil {
		return nil, err
	}
	switch {
	case l.Version > seenVersion:
	case l.Version == seenVersion && bytes.Equal(s.List, seenList):
	case l.Version == seenVersion:
		return nil, errf(ErrRollback, "version %d was seen before with other contents", l.Version)
	default:
		return nil, errf(ErrRollback, "version %d is older than version %d seen before", l.Version, seenVersion)
	}
	return l, nil
}

// Device returns the identity key the list names for device id, or nil.
func Device(l *wirepb.DeviceList, id uint32) []byte {
	for _, d := range l.GetDevices() {
		if d.GetDeviceId() == id {
			return d.GetIdentityKey()
		}
	}
	return nil
}

// ValidUsername reports whether name follows the account name rules: 3 to 32
// bytes, [a-z] then [a-z0-9_], not ending in '_'. It is
// device.ValidateUsername's rule, repeated here so this package needs no
// storage code (a test in package device keeps them equal).
func ValidUsername(name string) bool {
	if len(name) < minUsernameLen || len(name) > maxUsernameLen {
		return false
	}
	if c := name[0]; c < 'a' || c > 'z' {
		return false
	}
	for i := 1; i < len(name); i++ {
		c := name[i]
		if (c < 'a' || c > 'z') && (c < '0' || c > '9') && c != '_' {
			return false
		}
	}
	return name[len(name)-1] != '_'
}
