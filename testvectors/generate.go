package testvectors

import (
	"crypto/sha256"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"sort"

	"go.mau.fi/libsignal/ecc"
)

// Generate builds every vector and returns the files, by path relative to
// the vectors folder ("<kind>/<case>.json"). The output depends on nothing
// but this code: keys come from fixed seeds and randomness from seeded
// streams (see withSeed), so two runs, in a test or not, give the same
// bytes. It replaces crypto/rand.Reader while it runs (see withSeed).
func Generate() (map[string][]byte, error) {
	out := map[string][]byte{}
	for _, f := range families {
		vs, err := f.gen()
		if err != nil {
			return nil, fmt.Errorf("testvectors: generate %s: %w", f.kind, err)
		}
		for name, v := range vs {
			h := v.header()
			h.Kind = f.kind
			if got, err := v.Check(); got != h.Expect {
				return nil, fmt.Errorf("testvectors: generated %s/%s gives %s (%v), want %s", f.kind, name, got, err, h.Expect)
			}
			if err := v.Consistent(); err != nil {
				return nil, fmt.Errorf("testvectors: generated %s/%s: %w", f.kind, name, err)
			}
			b, err := json.MarshalIndent(v, "", "  ")
			if err != nil {
				return nil, fmt.Errorf("testvectors: encode %s/%s: %w", f.kind, name, err)
			}
			out[f.kind+"/"+name+".json"] = append(b, '\n')
		}
	}
	return out, nil
}

// WriteDir generates every vector into dir: it replaces the *.json files
// of each kind's folder and leaves everything else alone.
func WriteDir(dir string) (int, error) {
	files, err := Generate()
	if err != nil {
		return 0, err
	}
	for _, k := range Kinds() {
		if err := os.MkdirAll(filepath.Join(dir, k), 0o755); err != nil {
			return 0, fmt.Errorf("testvectors: %w", err)
		}
		old, _ := filepath.Glob(filepath.Join(dir, k, "*.json"))
		for _, p := range old {
			if err := os.Remove(p); err != nil {
				return 0, fmt.Errorf("testvectors: %w", err)
			}
		}
	}
	paths := make([]string, 0, len(files))
	for p := range files {
		paths = append(paths, p)
	}
	sort.Strings(paths)
	for _, p := range paths {
		if err := os.WriteFile(filepath.Join(dir, filepath.FromSlash(p)), files[p], 0o644); err != nil {
			return 0, fmt.Errorf("testvectors: %w", err)
		}
	}
	return len(paths), nil
}

// fixedKey is the Curve25519 key pair of name, from a fixed 32-byte seed.
func fixedKey(name string) *ecc.ECKeyPair {
	seed := sha256.Sum256([]byte("ferry-testvectors-v1 " + name))
	return ecc.CreateKeyPair(seed[:])
}

func pubKey(name string) []byte { return fixedKey(name).PublicKey().Serialize() }

// fixedSeed is a 32-byte seed for other key types (Ed25519).
func fixedSeed(name string) []byte {
	s := sha256.Sum256([]byte("ferry-testvectors-v1 " + name))
	return s[:]
}
