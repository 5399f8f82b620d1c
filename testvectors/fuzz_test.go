package testvectors

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// The verifier reads files from anyone: any bytes give a Result, never a
// panic that escapes, and a file that is not a committed vector is not
// reported OK by accident of a broken decoder (it may be OK only if it
// verifies).
func FuzzVerifyBytes(f *testing.F) {
	files, _ := filepath.Glob(filepath.Join("*", "*.json"))
	for _, p := range files {
		b, err := os.ReadFile(p)
		if err == nil && len(b) < 4096 {
			f.Add(filepath.Dir(p), b)
		}
	}
	f.Add("wire", []byte(`{"kind":"signal-session","expect":"ErrBundle","alice":{"identity_private":"00"}}`))
	f.Add("inbox", []byte(`{"kind":"inbox","expect":"valid","steps":[{"op":"send","sender":"a.1"}]}`))
	f.Fuzz(func(t *testing.T, kind string, b []byte) {
		r := verifyBytes(filepath.Join(kind, "x.json"), b)
		if strings.HasPrefix(r.Detail, "verifier panicked") {
			t.Fatal(r.Detail) // libsignal's panics are caught where it is called; this is ours
		}
		if r.OK && r.Got != r.Expect {
			t.Fatalf("OK with got %q != expect %q", r.Got, r.Expect)
		}
		if !r.OK && r.Detail == "" && r.Got == r.Expect {
			t.Fatalf("failed without a reason: %+v", r)
		}
	})
}
