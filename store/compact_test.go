package store

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"testing"

	"github.com/cockroachdb/pebble/v2"
)

func fill(t *testing.T, dir string) (secret []byte) {
	t.Helper()
	db, err := Open(dir, Options{})
	if err != nil {
		t.Fatal(err)
	}
	secret = []byte("deleted-value-that-must-not-survive-0123456789")
	for i := range 100 {
		k := []byte(fmt.Sprintf("i%03d", i))
		if err := db.Set(k, append(bytes.Clone(secret), byte(i)), pebble.Sync); err != nil {
			t.Fatal(err)
		}
		if i%2 == 0 {
			if err := db.Delete(k, pebble.Sync); err != nil {
				t.Fatal(err)
			}
		}
	}
	if err := db.Set([]byte("alive"), []byte("kept"), pebble.Sync); err != nil {
		t.Fatal(err)
	}
	if err := db.Close(); err != nil {
		t.Fatal(err)
	}
	return secret
}

func live(t *testing.T, dir string) []KV {
	t.Helper()
	db, err := Open(dir, Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	kvs, err := Dump(db)
	if err != nil {
		t.Fatal(err)
	}
	return kvs
}

// holds reports whether any file in dir holds b followed by an even byte
// (the deleted records).
func holdsDeleted(t *testing.T, dir string, secret []byte) bool {
	t.Helper()
	files, _ := filepath.Glob(filepath.Join(dir, "*"))
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			continue
		}
		for i := 0; i < 100; i += 2 {
			if bytes.Contains(b, append(bytes.Clone(secret), byte(i))) {
				return true
			}
		}
	}
	return false
}

// Compact keeps every live record, leaves files that are not Pebble's, and
// no file keeps a deleted value; without it they are still there.
func TestCompact(t *testing.T) {
	dir := t.TempDir()
	secret := fill(t, dir)
	if !holdsDeleted(t, dir, secret) {
		t.Fatal("deleted values are gone without compaction: this test would prove nothing")
	}
	before := live(t, dir)
	if err := os.WriteFile(filepath.Join(dir, "not-pebble.txt"), []byte("x"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := Compact(dir); err != nil {
		t.Fatal(err)
	}
	if holdsDeleted(t, dir, secret) {
		t.Fatal("a deleted value survived Compact")
	}
	if after := live(t, dir); fmt.Sprint(after) != fmt.Sprint(before) || len(after) != 51 {
		t.Fatalf("live records changed: %d before, %d after", len(before), len(after))
	}
	if _, err := os.Stat(filepath.Join(dir, "not-pebble.txt")); err != nil {
		t.Fatalf("Compact removed a file that is not Pebble's: %v", err)
	}
}

// A swap interrupted after any step is finished (or undone) by Open.
func TestCompactInterrupted(t *testing.T) {
	for _, phase := range []string{"copied", "delete", "move-half"} {
		t.Run(phase, func(t *testing.T) {
			dir := t.TempDir()
			secret := fill(t, dir)
			before := live(t, dir)
			tmp := filepath.Join(dir, compactDir)
			if err := copyLive(dir, tmp); err != nil {
				t.Fatal(err)
			}
			switch phase {
			case "delete":
				if err := setMarker(dir, "delete"); err != nil {
					t.Fatal(err)
				}
			case "move-half":
				if err := setMarker(dir, "delete"); err != nil {
					t.Fatal(err)
				}
				// Do the delete step, then move only one file.
				es, _ := os.ReadDir(dir)
				for _, e := range es {
					if pebbleFile.MatchString(e.Name()) {
						os.Remove(filepath.Join(dir, e.Name()))
					}
				}
				if err := setMarker(dir, "move"); err != nil {
					t.Fatal(err)
				}
				es, _ = os.ReadDir(tmp)
				if err := os.Rename(filepath.Join(tmp, es[0].Name()), filepath.Join(dir, es[0].Name())); err != nil {
					t.Fatal(err)
				}
			}
			if after := live(t, dir); fmt.Sprint(after) != fmt.Sprint(before) {
				t.Fatalf("records changed across the interrupted compaction (%s)", phase)
			}
			if _, err := os.Stat(tmp); !os.IsNotExist(err) {
				t.Fatalf("%s left behind", compactDir)
			}
			if phase != "copied" && holdsDeleted(t, dir, secret) {
				t.Fatal("a deleted value survived the finished swap")
			}
		})
	}
}
