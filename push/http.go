package push

import (
	"context"
	"io"
	"net"
	"net/http"
	"time"

	"github.com/ferryhq/ferry/wire/wirepb"
)

// maxResponseBody bounds what is read of a provider's answer.
const maxResponseBody = 64 << 10

// EndpointClient returns the HTTP client for device-supplied endpoints (Web
// Push, UnifiedPush): no proxy from the environment, and, unless allowLocal,
// connections only to public addresses (checked at dial time, so a name
// that resolves to the server's own network is refused too).
func EndpointClient(allowLocal bool) *http.Client {
	d := &net.Dialer{Timeout: 10 * time.Second, KeepAlive: 30 * time.Second}
	if !allowLocal {
		d.Control = publicOnly
	}
	return &http.Client{
		Transport: &http.Transport{
			DialContext:           d.DialContext,
			ForceAttemptHTTP2:     true,
			MaxIdleConnsPerHost:   4,
			IdleConnTimeout:       90 * time.Second,
			TLSHandshakeTimeout:   10 * time.Second,
			ResponseHeaderTimeout: 30 * time.Second,
		},
		// An endpoint that redirects is not followed: the registered URL is the target.
		CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
	}
}

// defaultClient is the client for the configured provider APIs (APNs, FCM).
func defaultClient() *http.Client {
	return &http.Client{Transport: &http.Transport{
		Proxy:                 http.ProxyFromEnvironment,
		ForceAttemptHTTP2:     true,
		MaxIdleConnsPerHost:   16,
		IdleConnTimeout:       90 * time.Second,
		TLSHandshakeTimeout:   10 * time.Second,
		ResponseHeaderTimeout: 30 * time.Second,
	}}
}

// do sends req and returns the status, the start of the body and the
// Retry-After delay; a transport error is a retryable *StatusError.
func do(ctx context.Context, c *http.Client, kind wirepb.PushKind, req *http.Request) (*http.Response, []byte, error) {
	resp, err := c.Do(req.WithContext(ctx))
	if err != nil {
		return nil, nil, &StatusError{Kind: kind, Err: err}
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(io.LimitReader(resp.Body, maxResponseBody))
	_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, maxResponseBody)) // let the connection be reused
	return resp, body, nil
}

// statusErr builds the error of a non-2xx answer.
func statusErr(kind wirepb.PushKind, resp *http.Response, reason string, invalid bool) *StatusError {
	return &StatusError{Kind: kind, Status: resp.StatusCode, Reason: reason, Invalid: invalid,
		RetryAfter: retryAfter(resp.Header.Get("Retry-After"), time.Now())}
}
