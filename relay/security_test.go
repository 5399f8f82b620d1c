package relay

import (
	"net/http"
	"net/http/httptest"
	"testing"
)

// TestCheckOrigin: native clients (no Origin) and same-host pages connect;
// other browser origins only if configured.
func TestCheckOrigin(t *testing.T) {
	tests := map[string]struct {
		allowed []string
		origin  string
		ok      bool
	}{
		"native app, no Origin":      {nil, "", true},
		"same host":                  {nil, "https://chat.example", true},
		"another site":               {nil, "https://evil.example", false},
		"configured origin":          {[]string{"https://app.example"}, "https://APP.example", true},
		"not the configured one":     {[]string{"https://app.example"}, "https://evil.example", false},
		"any, if configured with *":  {[]string{"*"}, "https://evil.example", true},
		"unparsable origin, no list": {nil, "://", false},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			s := New(Config{AllowedOrigins: tc.allowed}, Deps{})
			r := httptest.NewRequest(http.MethodGet, "https://chat.example/v1/ws", nil)
			if tc.origin != "" {
				r.Header.Set("Origin", tc.origin)
			}
			if got := s.checkOrigin(r); got != tc.ok {
				t.Fatalf("checkOrigin = %v, want %v", got, tc.ok)
			}
		})
	}
}

// TestAckIsScopedToOwnInbox: acking another device's envelope ids deletes
// nothing of theirs; the owner still gets the envelope.
func TestAckIsScopedToOwnInbox(t *testing.T) {
	e := newEnv(t, Config{})
	_, ac := e.register("alice")
	bob, bc := e.register("bob")
	_, mc := e.register("mallory")
	if _, err := send(t, ac, "m1", bob, "for bob"); err != nil {
		t.Fatal(err)
	}
	env := nextEnvelope(t, bc)
	if n := ack(t, mc, env.Id, env.Id+1, 1, 2, 3); n != 0 {
		t.Fatalf("mallory's ack of bob's ids deleted %d", n)
	}
	if n := ack(t, bc, env.Id); n != 1 {
		t.Fatalf("bob's own ack deleted %d, want 1 (his entry was still there)", n)
	}
}
