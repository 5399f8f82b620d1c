package main

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net/http"
	"os"
	"time"

	"golang.org/x/crypto/acme"
	"golang.org/x/crypto/acme/autocert"
)

// acmeFlags configure automatic certificates.
type acmeFlags struct {
	domains   stringList
	cache     string
	email     string
	directory string
	caFile    string // PEM roots for the ACME directory's HTTPS ("": the system's)
}

// transport checks the transport flags and returns the TLS config to
// serve with (nil: plain text). Plain text is refused on a non-loopback
// address unless --insecure; files and ACME exclude each other.
func transport(c config) (*tls.Config, error) {
	files := c.tlsCert != "" || c.tlsKey != ""
	auto := len(c.acme.domains) > 0
	switch {
	case (c.tlsCert == "") != (c.tlsKey == ""):
		return nil, errors.New("--tls-cert and --tls-key go together")
	case files && auto:
		return nil, errors.New("--acme-domain and --tls-cert/--tls-key exclude each other")
	case !auto && (c.acme.cache != "" || c.acme.email != "" || c.acme.caFile != "" || (c.acme.directory != "" && c.acme.directory != acme.LetsEncryptURL)):
		return nil, errors.New("--acme-cache, --acme-email and --acme-directory need --acme-domain")
	case files:
		return &tls.Config{MinVersion: tls.VersionTLS12}, nil // ServeTLS loads the files
	case auto:
		m, err := acmeManager(c.acme)
		if err != nil {
			return nil, err
		}
		return m.TLSConfig(), nil
	case !c.insecure && !isLoopback(c.listen):
		return nil, fmt.Errorf("refusing plain text on non-loopback address %s: give --tls-cert/--tls-key, --acme-domain or --insecure", c.listen)
	}
	return nil, nil
}

// acmeManager builds the autocert manager: TLS-ALPN-01 challenges answered
// on the serving listener (its TLSConfig offers acme-tls/1), certificates
// only for the named hosts, account and certificates kept in the cache
// directory so a restart does not ask the CA again.
func acmeManager(f acmeFlags) (*autocert.Manager, error) {
	if f.cache == "" {
		return nil, errors.New("--acme-domain needs --acme-cache (certificates must survive restarts: CAs rate-limit issuance)")
	}
	for _, d := range f.domains {
		if d == "" || d == "localhost" || isLoopback(d+":0") {
			return nil, fmt.Errorf("--acme-domain %q: a CA cannot validate it", d)
		}
	}
	hc := http.DefaultClient
	if f.caFile != "" {
		pem, err := os.ReadFile(f.caFile)
		if err != nil {
			return nil, fmt.Errorf("--acme-ca-file: %w", err)
		}
		roots := x509.NewCertPool()
		if !roots.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("--acme-ca-file %s: no PEM certificates", f.caFile)
		}
		tr := http.DefaultTransport.(*http.Transport).Clone()
		tr.TLSClientConfig = &tls.Config{RootCAs: roots, MinVersion: tls.VersionTLS12}
		hc = &http.Client{Transport: tr, Timeout: time.Minute}
	}
	return &autocert.Manager{
		Prompt:     autocert.AcceptTOS,
		HostPolicy: autocert.HostWhitelist(f.domains...),
		Cache:      autocert.DirCache(f.cache),
		Email:      f.email,
		Client:     &acme.Client{DirectoryURL: f.directory, HTTPClient: hc},
	}, nil
}
