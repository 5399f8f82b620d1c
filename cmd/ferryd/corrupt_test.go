package main

import (
	"bytes"
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// TestBlackBoxCorruptStoreRefusesToServe: a store Pebble finds damaged at
// open (flipped bytes in the MANIFEST, a missing table file) makes ferryd
// exit non-zero with a message naming the store, instead of serving wrong or
// missing data.
func TestBlackBoxCorruptStoreRefusesToServe(t *testing.T) {
	for name, damage := range map[string]func(t *testing.T, dir string){
		"manifest bytes flipped": func(t *testing.T, dir string) {
			p := onlyFile(t, dir, "MANIFEST-*")
			b, err := os.ReadFile(p)
			if err != nil {
				t.Fatal(err)
			}
			for i := len(b) / 3; i < len(b)/3+16 && i < len(b); i++ {
				b[i] ^= 0xff
			}
			if err := os.WriteFile(p, b, 0o644); err != nil {
				t.Fatal(err)
			}
		},
		"table file missing": func(t *testing.T, dir string) {
			if err := os.Remove(onlyFile(t, dir, "*.sst")); err != nil {
				t.Fatal(err)
			}
		},
	} {
		t.Run(name, func(t *testing.T) {
			dir := t.TempDir()
			srv := startServer(t, dir, "--compact-on-exit") // compaction leaves a table file
			newCrashDevice(t, srv, "victim")
			srv.term()
			damage(t, dir)

			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			cmd := exec.CommandContext(ctx, filepath.Join(binDir, "ferryd"), "--listen", "127.0.0.1:0", "--data", dir)
			var stderr bytes.Buffer
			cmd.Stderr = &stderr
			err := cmd.Run()
			if ctx.Err() != nil {
				t.Fatalf("ferryd kept running on a damaged store:\n%s", stderr.String())
			}
			ee, ok := err.(*exec.ExitError)
			if !ok || ee.ExitCode() != 1 {
				t.Fatalf("exit: %v, want status 1\n%s", err, stderr.String())
			}
			out := stderr.String()
			if !strings.Contains(out, "ferryd: store: open "+dir) || !strings.Contains(out, "refusing to serve") ||
				!strings.Contains(out, "store: damaged") {
				t.Errorf("the message does not say the store could not be opened:\n%s", out)
			}
			if strings.Contains(out, "serving") && !strings.Contains(out, "refusing to serve") ||
				!strings.Contains(out, "store: damaged") {
				t.Errorf("ferryd served:\n%s", out)
			}
			t.Logf("ferryd said:\n%s", out)
		})
	}
}

// onlyFile returns the one file in dir matching pattern.
func onlyFile(t *testing.T, dir, pattern string) string {
	t.Helper()
	m, err := filepath.Glob(filepath.Join(dir, pattern))
	if err != nil || len(m) == 0 {
		ls, _ := os.ReadDir(dir)
		var names []string
		for _, e := range ls {
			names = append(names, e.Name())
		}
		t.Fatalf("no %s in the data dir: %v", pattern, names)
	}
	return m[len(m)-1]
}
