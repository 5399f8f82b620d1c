package push

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"net/url"
	"strconv"
	"sync"
	"time"

	"github.com/ferryhq/ferry/wire/wirepb"
	"golang.org/x/oauth2"
	"golang.org/x/oauth2/google"
	"golang.org/x/oauth2/jwt"
)

// FCMEndpoint is the base URL of the FCM HTTP v1 API.
const FCMEndpoint = "https://fcm.googleapis.com"

// fcmScope is the OAuth2 scope of the FCM send API.
const fcmScope = "https://www.googleapis.com/auth/firebase.messaging"

// FCM speaks the Firebase Cloud Messaging HTTP v1 API
// (POST /v1/projects/{project}/messages:send) with an OAuth2 access token
// got for a service account (the JWT bearer grant, RFC 7523) and reused
// until it expires.
type FCM struct {
	// CredentialsJSON is the service account's JSON key file.
	CredentialsJSON []byte
	// TokenSource, if set, gives the OAuth2 access tokens instead of the
	// key file's JWT grant (e.g. google.DefaultTokenSource on a cloud host,
	// or a fixed token in the test vectors); CredentialsJSON may then be
	// nil and only names the project.
	TokenSource oauth2.TokenSource
	// ProjectID overrides the key file's project_id.
	ProjectID string
	// TokenURL overrides the key file's token_uri (tests, proxies).
	TokenURL string
	// Endpoint is the API's base URL; "" = FCMEndpoint.
	Endpoint string
	// Client for the API and the token endpoint; nil = a default client.
	Client *http.Client
	// TTL is the Android message lifetime; 0 = 1 day.
	TTL time.Duration

	once    sync.Once
	initErr error
	ts      oauth2.TokenSource
	project string
}

var _ Provider = (*FCM)(nil)

func (f *FCM) init() error {
	f.once.Do(func() {
		if f.Client == nil {
			f.Client = defaultClient()
		}
		if f.Endpoint == "" {
			f.Endpoint = FCMEndpoint
		}
		var conf *jwt.Config
		if f.TokenSource == nil {
			c, err := google.JWTConfigFromJSON(f.CredentialsJSON, fcmScope)
			if err != nil {
				f.initErr = fmt.Errorf("%w: FCM service account: %w", ErrConfig, err)
				return
			}
			if f.TokenURL != "" {
				c.TokenURL = f.TokenURL
			}
			conf = c
		}
		var meta struct {
			ProjectID string `json:"project_id"`
		}
		_ = json.Unmarshal(f.CredentialsJSON, &meta)
		f.project = f.ProjectID
		if f.project == "" {
			f.project = meta.ProjectID
		}
		if f.project == "" {
			f.initErr = fmt.Errorf("%w: FCM needs a project id", ErrConfig)
			return
		}
		if f.TokenSource != nil {
			f.ts = f.TokenSource
			return
		}
		// The token endpoint is called with a bounded client; Token() is
		// not cancellable by the push's context.
		tc := *f.Client
		if tc.Timeout == 0 {
			tc.Timeout = 30 * time.Second
		}
		f.ts = conf.TokenSource(context.WithValue(context.Background(), oauth2.HTTPClient, &tc))
	})
	return f.initErr
}

// Check loads the credentials, so a bad key file fails at startup.
func (f *FCM) Check() error { return f.init() }

// fcmMessage is the v1 request body: a data-only message (the app wakes
// and fetches), collapsible, high priority for messages.
func fcmMessage(token string, r Reason, ttl time.Duration) []byte {
	prio := "HIGH"
	if r == ReasonPrekeys {
		prio = "NORMAL"
	}
	m := map[string]any{"message": map[string]any{
		"token": token,
		"data":  map[string]string{"ferry": "wake"},
		"android": map[string]any{
			"priority":     prio,
			"collapse_key": CollapseID,
			"ttl":          strconv.FormatInt(int64(ttlOr(ttl).Seconds()), 10) + "s",
		},
	}}
	b, _ := json.Marshal(m)
	return b
}

// Push implements Provider.
func (f *FCM) Push(ctx context.Context, reg *wirepb.PushRegistration, r Reason) error {
	if err := f.init(); err != nil {
		return err
	}
	tok, err := f.ts.Token()
	if err != nil {
		// The token endpoint failed or refused: retry later like a 5xx.
		return &StatusError{Kind: wirepb.PushKind_FCM, Reason: "token endpoint", Err: err}
	}
	u := f.Endpoint + "/v1/projects/" + url.PathEscape(f.project) + "/messages:send"
	req, err := http.NewRequest(http.MethodPost, u, bytes.NewReader(fcmMessage(reg.Token, r, f.TTL)))
	if err != nil {
		return fmt.Errorf("%w: FCM endpoint: %w", ErrConfig, err)
	}
	req.Header.Set("Content-Type", "application/json")
	tok.SetAuthHeader(req)
	resp, body, err := do(ctx, f.Client, wirepb.PushKind_FCM, req)
	if err != nil {
		return err
	}
	if resp.StatusCode == http.StatusOK {
		return nil
	}
	var e struct {
		Error struct {
			Status  string `json:"status"`
			Details []struct {
				ErrorCode string `json:"errorCode"`
			} `json:"details"`
		} `json:"error"`
	}
	_ = json.Unmarshal(body, &e)
	reason := e.Error.Status
	for _, d := range e.Error.Details {
		if d.ErrorCode != "" {
			reason = d.ErrorCode
		}
	}
	invalid := resp.StatusCode == http.StatusNotFound || reason == "UNREGISTERED"
	return statusErr(wirepb.PushKind_FCM, resp, reason, invalid)
}
