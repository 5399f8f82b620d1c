package push

import (
	"crypto/ecdh"
	"encoding/hex"
	"fmt"
	"net"
	"net/url"
	"strings"
	"syscall"

	"github.com/ferryhq/ferry/wire"
	"github.com/ferryhq/ferry/wire/wirepb"
)

// Limits on what a device may register.
const (
	MaxTokenLen    = 4096 // FCM tokens are ~160 bytes today; APNs 64 hex digits
	MaxEndpointLen = 2048
)

// ErrInvalid is the wire error of a malformed registration.
var ErrInvalid = &wire.Error{Code: wirepb.ErrorCode_PUSH_INVALID, Message: "push: invalid registration"}

// ErrUnsupported is the wire error of a kind the server has no provider for.
var ErrUnsupported = &wire.Error{Code: wirepb.ErrorCode_PUSH_UNSUPPORTED, Message: "push: this server does not send that kind of push"}

// Normalize checks reg and returns a copy holding only the fields its kind
// uses. allowLocal permits http:// endpoints and loopback/private hosts
// (tests and self-hosted setups on one network).
func Normalize(reg *wirepb.PushRegistration, allowLocal bool) (*wirepb.PushRegistration, error) {
	if reg == nil {
		return nil, ErrInvalid.Newf("push: no registration")
	}
	out := &wirepb.PushRegistration{Kind: reg.Kind}
	switch reg.Kind {
	case wirepb.PushKind_APNS:
		t := strings.ToLower(reg.Token)
		if b, err := hex.DecodeString(t); err != nil || len(b) < 32 || len(b) > 100 {
			return nil, ErrInvalid.Newf("push: an APNs token is 32 to 100 bytes in hex")
		}
		out.Token = t
	case wirepb.PushKind_FCM:
		if len(reg.Token) == 0 || len(reg.Token) > MaxTokenLen || !tokenChars(reg.Token) {
			return nil, ErrInvalid.Newf("push: an FCM token is 1 to %d bytes of [A-Za-z0-9:_.-]", MaxTokenLen)
		}
		out.Token = reg.Token
	case wirepb.PushKind_WEBPUSH:
		if err := checkEndpoint(reg.Endpoint, allowLocal); err != nil {
			return nil, err
		}
		if _, err := ecdh.P256().NewPublicKey(reg.P256Dh); err != nil {
			return nil, ErrInvalid.Newf("push: p256dh is not an uncompressed P-256 public key")
		}
		if len(reg.Auth) != 16 {
			return nil, ErrInvalid.Newf("push: auth is 16 bytes")
		}
		out.Endpoint, out.P256Dh, out.Auth = reg.Endpoint, reg.P256Dh, reg.Auth
	case wirepb.PushKind_UNIFIEDPUSH:
		if err := checkEndpoint(reg.Endpoint, allowLocal); err != nil {
			return nil, err
		}
		out.Endpoint = reg.Endpoint
	default:
		return nil, ErrInvalid.Newf("push: unknown kind %d", reg.Kind)
	}
	return out, nil
}

func tokenChars(s string) bool {
	for i := 0; i < len(s); i++ {
		c := s[i]
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == ':' || c == '_' || c == '-' || c == '.') {
			return false
		}
	}
	return true
}

func checkEndpoint(s string, allowLocal bool) error {
	if len(s) == 0 || len(s) > MaxEndpointLen {
		return ErrInvalid.Newf("push: an endpoint is 1 to %d bytes", MaxEndpointLen)
	}
	u, err := url.Parse(s)
	if err != nil || u.Host == "" || u.User != nil || u.Fragment != "" {
		return ErrInvalid.Newf("push: the endpoint is not an absolute URL without credentials")
	}
	switch {
	case u.Scheme == "https":
	case u.Scheme == "http" && allowLocal:
	default:
		return ErrInvalid.Newf("push: the endpoint must be https")
	}
	if !allowLocal {
		if ip := net.ParseIP(u.Hostname()); ip != nil && !publicIP(ip) {
			return ErrInvalid.Newf("push: the endpoint's address is not public")
		}
		if h := strings.ToLower(u.Hostname()); h == "localhost" || strings.HasSuffix(h, ".localhost") {
			return ErrInvalid.Newf("push: the endpoint's address is not public")
		}
	}
	return nil
}

// publicIP reports whether ip is a global unicast address outside the
// private, loopback, link-local and unspecified ranges.
func publicIP(ip net.IP) bool {
	return ip.IsGlobalUnicast() && !ip.IsPrivate() && !ip.IsLoopback() && !ip.IsLinkLocalUnicast()
}

// publicOnly is a net.Dialer Control function refusing connections to
// non-public addresses: device-supplied endpoints must not reach the
// server's own network, whatever their name resolves to at dial time.
func publicOnly(_, address string, _ syscall.RawConn) error {
	host, _, err := net.SplitHostPort(address)
	if err != nil {
		return err
	}
	if ip := net.ParseIP(host); ip == nil || !publicIP(ip) {
		return fmt.Errorf("push: refusing to connect to non-public address %s", host)
	}
	return nil
}
