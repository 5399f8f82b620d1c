package main

import (
	"context"
	"slices"
	"strings"
	"testing"

	"golang.org/x/crypto/acme"
)

func TestTransportFlags(t *testing.T) {
	dir := t.TempDir()
	acmeOK := acmeFlags{domains: stringList{"chat.example.org"}, cache: dir, directory: acme.LetsEncryptURL}
	tests := map[string]struct {
		c       config
		wantErr string // "" : no error
		tls     bool
	}{
		"loopback plain":        {c: config{listen: "127.0.0.1:7600"}},
		"public plain refused":  {c: config{listen: "0.0.0.0:7600"}, wantErr: "refusing plain text"},
		"public plain insecure": {c: config{listen: "0.0.0.0:7600", insecure: true}},
		"files":                 {c: config{listen: ":443", tlsCert: "c.pem", tlsKey: "k.pem"}, tls: true},
		"cert without key":      {c: config{listen: ":443", tlsCert: "c.pem"}, wantErr: "go together"},
		"acme":                  {c: config{listen: ":443", acme: acmeOK}, tls: true},
		"acme and files": {c: config{listen: ":443", tlsCert: "c.pem", tlsKey: "k.pem", acme: acmeOK},
			wantErr: "exclude each other"},
		"acme without cache": {c: config{listen: ":443", acme: acmeFlags{domains: stringList{"a.example"}}},
			wantErr: "--acme-cache"},
		"acme cache without domain": {c: config{listen: ":443", acme: acmeFlags{cache: dir}},
			wantErr: "need --acme-domain"},
		"acme directory without domain": {c: config{listen: "127.0.0.1:1", acme: acmeFlags{directory: "https://localhost:14000/dir"}},
			wantErr: "need --acme-domain"},
		"acme localhost": {c: config{listen: ":443", acme: acmeFlags{domains: stringList{"localhost"}, cache: dir}},
			wantErr: "cannot validate"},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			cfg, err := transport(tc.c)
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("err = %v, want one containing %q", err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if (cfg != nil) != tc.tls {
				t.Fatalf("TLS config = %v, want TLS %v", cfg, tc.tls)
			}
		})
	}
}

// TestACMEManager: the manager asks the configured directory, answers
// TLS-ALPN-01 on the serving listener, and gets certificates only for the
// named hosts (anyone can point a DNS name at the server and make it ask a
// CA for it otherwise).
func TestACMEManager(t *testing.T) {
	f := acmeFlags{domains: stringList{"chat.example.org", "ferry.example.org"}, cache: t.TempDir(),
		email: "ops@example.org", directory: "https://acme.test:14000/dir"}
	m, err := acmeManager(f)
	if err != nil {
		t.Fatal(err)
	}
	if m.Client.DirectoryURL != f.directory || m.Email != f.email {
		t.Errorf("directory %q email %q, want %q %q", m.Client.DirectoryURL, m.Email, f.directory, f.email)
	}
	for host, ok := range map[string]bool{"chat.example.org": true, "ferry.example.org": true,
		"evil.example.org": false, "127.0.0.1": false} {
		if err := m.HostPolicy(context.Background(), host); (err == nil) != ok {
			t.Errorf("HostPolicy(%s) = %v, want allowed %v", host, err, ok)
		}
	}
	if !slices.Contains(m.TLSConfig().NextProtos, acme.ALPNProto) {
		t.Errorf("TLS config does not offer %s: TLS-ALPN-01 challenges would fail", acme.ALPNProto)
	}
}
