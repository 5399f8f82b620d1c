package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// TestBlackBoxACMEIssuance: ferryd gets its certificate from a local ACME
// server (Let's Encrypt's pebble test CA; `apt-get install pebble`) on the
// first TLS handshake for its --acme-domain, serves HTTPS with it, and
// refuses a handshake for a name it was not told. Pebble is run with
// PEBBLE_VA_ALWAYS_VALID=1: the challenge itself (TLS-ALPN-01 on port 443)
// cannot be reached here, the ACME flow around it is real.
func TestBlackBoxACMEIssuance(t *testing.T) {
	bin, err := exec.LookPath("pebble")
	if err != nil {
		t.Skip("pebble (the ACME test server) is not installed: apt-get install pebble")
	}
	dir := t.TempDir()
	certFile, keyFile := filepath.Join(dir, "cert.pem"), filepath.Join(dir, "key.pem")
	roots := writeSelfSigned(t, certFile, keyFile) // the ACME server's own HTTPS
	acmePort, mgmtPort := freePort(t), freePort(t)
	cfg := fmt.Sprintf(`{"pebble": {"listenAddress": "127.0.0.1:%d", "managementListenAddress": "127.0.0.1:%d",
		"certificate": %q, "privateKey": %q, "httpPort": %d, "tlsPort": %d, "ocspResponderURL": "",
		"externalAccountBindingRequired": false}}`, acmePort, mgmtPort, certFile, keyFile, freePort(t), freePort(t))
	cfgFile := filepath.Join(dir, "pebble.json")
	if err := os.WriteFile(cfgFile, []byte(cfg), 0o644); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	pb := exec.CommandContext(ctx, bin, "-config", cfgFile)
	pb.Env = append(os.Environ(), "PEBBLE_VA_ALWAYS_VALID=1", "PEBBLE_WFE_NONCEREJECT=0")
	pbLog := &syncBuffer{}
	pb.Stdout, pb.Stderr = pbLog, pbLog
	if err := pb.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cancel(); _ = pb.Wait() })

	hc := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: roots}}}
	directory := fmt.Sprintf("https://127.0.0.1:%d/dir", acmePort)
	var issuer []byte
	for deadline := time.Now().Add(20 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		issuer, err = get(hc, fmt.Sprintf("https://127.0.0.1:%d/roots/0", mgmtPort))
		if err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("pebble did not come up: %v\n%s", err, pbLog.String())
		}
	}
	issued := x509.NewCertPool()
	if !issued.AppendCertsFromPEM(issuer) {
		t.Fatalf("pebble's root is not PEM: %q", issuer)
	}

	srv := startServer(t, filepath.Join(dir, "data"), "--acme-domain", "ferry.test", "--acme-cache", filepath.Join(dir, "acme"),
		"--acme-directory", directory, "--acme-ca-file", certFile, "--acme-email", "ops@ferry.test")
	client := &http.Client{Timeout: 60 * time.Second, Transport: &http.Transport{
		TLSClientConfig: &tls.Config{RootCAs: issued, ServerName: "ferry.test"}}}
	body, err := get(client, "https://"+srv.addr+"/healthz")
	if err != nil {
		t.Fatalf("HTTPS with the issued certificate: %v\nferryd:\n%s\npebble:\n%s", err, srv.log.String(), pbLog.String())
	}
	if strings.TrimSpace(string(body)) != "ok" {
		t.Errorf("/healthz = %q", body)
	}
	c, err := tls.Dial("tcp", srv.addr, &tls.Config{ServerName: "evil.test", InsecureSkipVerify: true})
	if err == nil {
		c.Close()
		t.Errorf("a handshake for a name not in --acme-domain succeeded")
	}
	if ms, _ := filepath.Glob(filepath.Join(dir, "acme", "ferry.test*")); len(ms) == 0 {
		t.Errorf("the certificate was not kept in --acme-cache")
	}
}

func get(c *http.Client, url string) ([]byte, error) {
	resp, err := c.Get(url)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("%s: %s", url, resp.Status)
	}
	return io.ReadAll(resp.Body)
}

func freePort(t *testing.T) int {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port
}
