package testvectors

import (
	"bytes"
	"flag"
	"os"
	"path/filepath"
	"slices"
	"testing"
	"testing/cryptotest"

	"github.com/ferryhq/ferry/device/devicelist"
	"github.com/ferryhq/ferry/wire/wirepb"
	"go.mau.fi/libsignal/ecc"
)

var update = flag.Bool("update", false, "rewrite the committed vector files (TestGenerate)")

// committed returns the committed vector files by path relative to this folder.
func committed(t *testing.T, dir string) map[string][]byte {
	t.Helper()
	out := map[string][]byte{}
	files, err := filepath.Glob(filepath.Join(dir, "*", "*.json"))
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		rel, _ := filepath.Rel(dir, f)
		out[filepath.ToSlash(rel)] = b
	}
	return out
}

func sameTree(t *testing.T, got, want map[string][]byte) {
	t.Helper()
	var gk, wk []string
	for k := range got {
		gk = append(gk, k)
	}
	for k := range want {
		wk = append(wk, k)
	}
	slices.Sort(gk)
	slices.Sort(wk)
	if !slices.Equal(gk, wk) {
		t.Fatalf("files differ:\n got  %v\n want %v\n(regenerate: go run ./cmd/ferry vectors generate testvectors)", gk, wk)
	}
	for k := range want {
		if !bytes.Equal(got[k], want[k]) {
			t.Errorf("%s differs from the generator's output (regenerate: go run ./cmd/ferry vectors generate testvectors)", k)
		}
	}
}

// TestGenerate writes the vectors with -update. Without it, it checks that
// the committed files are byte for byte what the generator makes.
func TestGenerate(t *testing.T) {
	if *update {
		n, err := WriteDir(".")
		if err != nil {
			t.Fatal(err)
		}
		t.Logf("wrote %d vectors", n)
		return
	}
	files, err := Generate()
	if err != nil {
		t.Fatal(err)
	}
	sameTree(t, files, committed(t, "."))
}

// Generating into an empty folder reproduces the committed tree exactly.
func TestWriteDirReproducesCommitted(t *testing.T) {
	dir := t.TempDir()
	if _, err := WriteDir(dir); err != nil {
		t.Fatal(err)
	}
	sameTree(t, committed(t, dir), committed(t, "."))
}

// withSeed (usable outside tests) gives the bytes that
// testing/cryptotest.SetGlobalRandom gives with the same seed.
func TestSeededMatchesCryptotest(t *testing.T) {
	l := dl("bob", 1, dev(1, "bob.1"))
	cryptotest.SetGlobalRandom(t, 7)
	a := sign("bob.1", l)
	k1, _ := newKeyPairForTest()
	b, _ := withSeed(7, func() (*wirepb.SignedDeviceList, error) {
		s := sign("bob.1", l)
		return s, nil
	})
	k2, _ := withSeed(7, func() ([]byte, error) {
		sign("bob.1", l)
		return newKeyPairForTest()
	})
	if !bytes.Equal(a.Signature, b.Signature) || !bytes.Equal(k1, k2) {
		t.Fatal("withSeed and cryptotest.SetGlobalRandom give different bytes")
	}
	c, _ := withSeed(8, func() (*wirepb.SignedDeviceList, error) { return sign("bob.1", l), nil })
	if bytes.Equal(a.Signature, c.Signature) {
		t.Fatal("another seed gives the same signature")
	}
	if _, err := devicelist.VerifyNext(a, "bob", nil, 0, nil); err != nil {
		t.Fatal(err)
	}
}

// The generator is deterministic: two runs give identical bytes.
func TestGenerateDeterministic(t *testing.T) {
	a, err := Generate()
	if err != nil {
		t.Fatal(err)
	}
	b, err := Generate()
	if err != nil {
		t.Fatal(err)
	}
	sameTree(t, a, b)
}

// newKeyPairForTest draws a Curve25519 key pair the way libsignal does
// (after the signature above, so it continues the same stream).
func newKeyPairForTest() ([]byte, error) {
	k, err := ecc.GenerateKeyPair()
	if err != nil {
		return nil, err
	}
	return k.PublicKey().Serialize(), nil
}
