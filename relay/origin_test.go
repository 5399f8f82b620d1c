package relay

import (
	"net/http/httptest"
	"testing"
)

// TestCheckOrigin: browsers must come from an allowed origin or the
// server's own host; native clients send no Origin.
func TestCheckOrigin(t *testing.T) {
	s := New(Config{AllowedOrigins: []string{"https://app.example.org"}}, Deps{})
	any := New(Config{AllowedOrigins: []string{"*"}}, Deps{})
	tests := map[string]struct {
		srv    *Server
		host   string
		origin string
		ok     bool
	}{
		"native client":        {s, "chat.example.org", "", true},
		"allowed origin":       {s, "chat.example.org", "https://app.example.org", true},
		"allowed, other case":  {s, "chat.example.org", "https://APP.example.org", true},
		"same host":            {s, "chat.example.org", "https://chat.example.org", true},
		"foreign page":         {s, "chat.example.org", "https://evil.example.com", false},
		"lookalike suffix":     {s, "chat.example.org", "https://app.example.org.evil.com", false},
		"garbage origin":       {s, "chat.example.org", "::not a url", false},
		"star allows any page": {any, "chat.example.org", "https://evil.example.com", true},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			r := httptest.NewRequest("GET", "http://"+tc.host+"/v1/ws", nil)
			if tc.origin != "" {
				r.Header.Set("Origin", tc.origin)
			}
			if got := tc.srv.checkOrigin(r); got != tc.ok {
				t.Errorf("checkOrigin(%q on %s) = %v, want %v", tc.origin, tc.host, got, tc.ok)
			}
		})
	}
}
