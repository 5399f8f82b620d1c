package main

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// The CLI reports bad input with the server's stable error codes and exit
// codes: 2 for usage, 1 for a refused request.
func TestBlackBoxCLIErrors(t *testing.T) {
	srv := startServer(t, t.TempDir())
	alice := register(t, srv, "alice")
	tests := map[string]struct {
		home     string
		args     []string
		code     int
		contains string
	}{
		"no command":        {t.TempDir(), nil, 2, "usage"},
		"unknown command":   {t.TempDir(), []string{"fly"}, 2, "unknown command"},
		"send without text": {alice, []string{"send", "bob"}, 2, "usage: ferry send"},
		"invalid username":  {t.TempDir(), []string{"--server", srv.url(), "register", "No Way"}, 1, "INVALID_USERNAME"},
		"username taken":    {t.TempDir(), []string{"--server", srv.url(), "register", "alice"}, 1, "USERNAME_TAKEN"},
		"unknown recipient": {alice, []string{"send", "nobody", "hi"}, 1, "UNKNOWN_ACCOUNT"},
		"not registered":    {t.TempDir(), []string{"--server", srv.url(), "send", "alice", "hi"}, 1, "no registered device"},
		"no server":         {t.TempDir(), []string{"register", "carol"}, 1, "no server URL"},
		"bad server url":    {t.TempDir(), []string{"--server", "127.0.0.1:1", "recv"}, 2, "bad server URL"},
		"push usage":        {alice, []string{"push", "set", "unifiedpush"}, 2, "usage: ferry push"},
		"push kind off":     {alice, []string{"push", "set", "fcm", "tok"}, 1, "PUSH_UNSUPPORTED"},
		"push plain http":   {alice, []string{"push", "set", "unifiedpush", "http://up.example/x"}, 1, "PUSH_INVALID"},
		"push bad webpush":  {alice, []string{"push", "set", "webpush", "{}"}, 2, "bad web push subscription"},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			out, errs, code := ferry(t, tc.home, tc.args...)
			if code != tc.code || !strings.Contains(out+errs, tc.contains) {
				t.Fatalf("exit %d, output %q %q; want exit %d containing %q", code, out, errs, tc.code, tc.contains)
			}
		})
	}
}

func TestBlackBoxRefusesPlainTextOnPublicAddress(t *testing.T) {
	out, err := exec.Command(filepath.Join(binDir, "ferryd"), "--listen", "0.0.0.0:0", "--data", t.TempDir()).CombinedOutput()
	if err == nil || !strings.Contains(string(out), "refusing plain text") {
		t.Fatalf("ferryd on 0.0.0.0 without TLS: err %v, output %q", err, out)
	}
}

func TestBlackBoxTLS(t *testing.T) {
	dir := t.TempDir()
	certFile, keyFile := filepath.Join(dir, "cert.pem"), filepath.Join(dir, "key.pem")
	pool := writeSelfSigned(t, certFile, keyFile)
	srv := startServer(t, t.TempDir(), "--tls-cert", certFile, "--tls-key", keyFile)
	c := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}}}
	resp, err := c.Get("https://" + srv.addr + "/healthz")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 200 || resp.TLS == nil {
		t.Fatalf("healthz over TLS: %v", resp.Status)
	}
}

func writeSelfSigned(t *testing.T, certFile, keyFile string) *x509.CertPool {
	t.Helper()
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "127.0.0.1"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		IPAddresses: []net.IP{net.ParseIP("127.0.0.1")}, KeyUsage: x509.KeyUsageDigitalSignature,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	kb, _ := x509.MarshalECPrivateKey(key)
	if err := os.WriteFile(certFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(keyFile, pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: kb}), 0o600); err != nil {
		t.Fatal(err)
	}
	cert, _ := x509.ParseCertificate(der)
	pool := x509.NewCertPool()
	pool.AddCert(cert)
	return pool
}

// vectorField is, per vector kind (folder), a hex field a changed byte
// in must make `ferry vectors verify` fail.
var vectorField = map[string]string{
	"wire": "hex", "deviceauth": "signature", "signedprekey": "signature", "devicelist": "signature",
	"signal-session": "ciphertext", "signal-group": "ciphertext", "inbox": "value", "push": "body_hex",
}

// `ferry vectors verify` passes on the committed vectors; changing one
// byte of a valid vector of any kind makes it exit 1 and name that case.
func TestBlackBoxVectorsVerify(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "v")
	if out, err := exec.Command("cp", "-r", "../../testvectors", dir).CombinedOutput(); err != nil {
		t.Fatalf("copy vectors: %v %s", err, out)
	}
	if out, errs, code := ferry(t, t.TempDir(), "vectors", "verify", dir); code != 0 || !strings.Contains(out, " 0 failed") {
		t.Fatalf("committed vectors: exit %d\n%s%s", code, out, errs)
	}
	entries, _ := os.ReadDir(dir)
	kinds := 0
	for _, e := range entries {
		if e.IsDir() {
			kinds++
		}
	}
	n := 0
	for kind, field := range vectorField {
		files, _ := filepath.Glob(filepath.Join(dir, kind, "*.json"))
		var p string
		var orig []byte
		for _, f := range files {
			b, _ := os.ReadFile(f)
			if strings.Contains(string(b), `"expect": "valid"`) {
				p, orig = f, b
				break
			}
		}
		if p == "" {
			t.Fatalf("no valid %s vector", kind)
		}
		marker := `"` + field + `": "`
		i := strings.Index(string(orig), marker)
		if i < 0 {
			t.Fatalf("no %s field in %s", field, p)
		}
		b := []byte(string(orig))
		i += len(marker)
		if b[i] == '0' {
			b[i] = '1'
		} else {
			b[i] = '0'
		}
		if err := os.WriteFile(p, b, 0o600); err != nil {
			t.Fatal(err)
		}
		out, _, code := ferry(t, t.TempDir(), "vectors", "verify", dir)
		if code != 1 || !strings.Contains(out, "FAIL "+p+":") || !strings.Contains(out, " 1 failed") {
			t.Fatalf("one changed byte in %s: exit %d\n%s", p, code, out)
		}
		if err := os.WriteFile(p, orig, 0o600); err != nil {
			t.Fatal(err)
		}
		n++
	}
	if n != kinds {
		t.Fatalf("checked %d kinds of %d folders", n, kinds)
	}
}

// `ferry vectors generate` into an empty folder writes exactly the
// committed vectors, byte for byte.
func TestBlackBoxVectorsGenerate(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "gen")
	mustFerry(t, t.TempDir(), "vectors", "generate", dir)
	want, _ := filepath.Glob("../../testvectors/*/*.json")
	got, _ := filepath.Glob(filepath.Join(dir, "*", "*.json"))
	if len(want) == 0 || len(got) != len(want) {
		t.Fatalf("generated %d files, %d committed", len(got), len(want))
	}
	for _, w := range want {
		rel, _ := filepath.Rel("../../testvectors", w)
		a, err := os.ReadFile(filepath.Join(dir, rel))
		if err != nil {
			t.Fatalf("not generated: %s", rel)
		}
		b, _ := os.ReadFile(w)
		if string(a) != string(b) {
			t.Errorf("%s: generated bytes differ from the committed file", rel)
		}
	}
}
