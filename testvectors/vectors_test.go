package testvectors

import (
	"bytes"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/ferryhq/ferry/device/devicelist"
)

// Every committed vector gives its expected verdict. Not parallel: the
// Signal vectors replace crypto/rand.Reader while they run (see withSeed).
func TestVectors(t *testing.T) {
	files, err := filepath.Glob(filepath.Join("*", "*.json"))
	if err != nil || len(files) == 0 {
		t.Fatalf("no vectors found (%v)", err)
	}
	for _, f := range files {
		t.Run(f, func(t *testing.T) {
			r := VerifyFile(f)
			if !r.OK {
				t.Fatalf("%s (%s): expect %q, got %q: %s", f, r.Description, r.Expect, r.Got, r.Detail)
			}
		})
	}
}

// The coverage the vectors promise: every verdict of every kind occurs.
func TestVectorsCoverEveryVerdict(t *testing.T) {
	rs, err := VerifyDir(".")
	if err != nil {
		t.Fatal(err)
	}
	seen := map[string]int{}
	for _, r := range rs {
		seen[r.Kind+" "+r.Expect]++
	}
	for _, f := range families {
		for _, want := range append([]string{ExpectValid}, f.verdict...) {
			if seen[f.kind+" "+want] == 0 {
				t.Errorf("no %s vector expects %s", f.kind, want)
			}
		}
	}
}

// Flipping any one bit-0 of a valid vector's signed bytes (list or
// signature) makes it fail.
func TestFlippedBytesFail(t *testing.T) {
	files, _ := filepath.Glob(filepath.Join(KindDeviceList, "*.json"))
	n := 0
	for _, f := range files {
		v := readVector(t, f)
		if v.Expect != ExpectValid {
			continue
		}
		n++
		t.Run(filepath.Base(f), func(t *testing.T) {
			t.Parallel()
			for _, part := range []*Hex{&v.SignedList.List, &v.SignedList.Signature} {
				for i := range *part {
					for _, bit := range []byte{0x01, 0x80} {
						(*part)[i] ^= bit
						got, err := v.Check()
						(*part)[i] ^= bit
						if got == ExpectValid {
							t.Fatalf("byte %d ^ %#x of %s still verifies", i, bit, partName(v, part))
						}
						if devicelist.Kind(err) == nil {
							t.Fatalf("error of another package: %v", err)
						}
					}
				}
			}
		})
	}
	if n < 3 {
		t.Fatalf("only %d valid vectors", n)
	}
}

func partName(v *DeviceListVector, p *Hex) string {
	if p == &v.SignedList.List {
		return "the list"
	}
	return "the signature"
}

func readVector(t *testing.T, f string) *DeviceListVector {
	t.Helper()
	b, err := os.ReadFile(f)
	if err != nil {
		t.Fatal(err)
	}
	var v DeviceListVector
	if err := json.Unmarshal(b, &v); err != nil {
		t.Fatal(err)
	}
	return &v
}

// VerifyDir reports broken files as failed results, not as errors.
func TestVerifyDirReportsBadFiles(t *testing.T) {
	dir := t.TempDir()
	write := func(name, body string) {
		p := filepath.Join(dir, name)
		os.MkdirAll(filepath.Dir(p), 0o755)
		if err := os.WriteFile(p, []byte(body), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	good, _ := os.ReadFile(filepath.Join(KindDeviceList, "valid-tofu.json"))
	write("devicelist/good.json", string(good))
	// Expectation changed: the verifier must disagree.
	write("devicelist/lie.json", strings.Replace(string(good), `"expect": "valid"`, `"expect": "ErrRollback"`, 1))
	// The human-readable copy lies.
	write("devicelist/human.json", strings.Replace(string(good), `"version": 1`, `"version": 7`, 1))
	write("devicelist/garbage.json", "{")
	write("devicelist/typo.json", `{"kind":"devicelist","expectt":"valid"}`)
	write("devicelist/bad-expect.json", strings.Replace(string(good), `"expect": "valid"`, `"expect": "nope"`, 1))
	write("other/x.json", `{"description":"?"}`)
	write("devicelist/readme.txt", "not a vector")
	if _, err := VerifyDir(filepath.Join(dir, "empty-does-not-exist")); err == nil {
		t.Fatal("missing directory is not an error")
	}
	rs, err := VerifyDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]Result{}
	for _, r := range rs {
		rel, _ := filepath.Rel(dir, r.Path)
		got[rel] = r
	}
	if len(got) != 7 {
		t.Fatalf("%d results: %v", len(got), got)
	}
	if r := got["devicelist/good.json"]; !r.OK || r.Got != ExpectValid {
		t.Fatalf("good: %+v", r)
	}
	for _, name := range []string{"lie", "human", "garbage", "typo", "bad-expect"} {
		if r := got["devicelist/"+name+".json"]; r.OK || r.Detail == "" && r.Got == r.Expect {
			t.Errorf("%s: %+v", name, r)
		}
	}
	if r := got["other/x.json"]; r.OK || r.Kind != "other" || !strings.Contains(r.Detail, "unknown vector kind") {
		t.Errorf("unknown kind: %+v", r)
	}
	if !bytes.Contains(good, []byte(`"kind": "devicelist"`)) {
		t.Fatal("vectors name their kind")
	}
}

// byteField names, per kind, a hex field of its valid vectors whose bytes
// a one-byte change must be caught in.
var byteField = map[string]string{
	KindWire: "hex", KindDeviceAuth: "signature", KindSignedPreKey: "signature", KindDeviceList: "signature",
	KindSignalSession: "ciphertext", KindSignalGroup: "ciphertext", KindInbox: "value", KindPush: "body_hex",
}

// ChangeOneByte changes the first byte of the first value of field in a
// vector file's JSON text (one hex digit) and returns the new text.
func changeOneByte(t *testing.T, b []byte, field string) []byte {
	t.Helper()
	marker := `"` + field + `": "`
	i := bytes.Index(b, []byte(marker))
	if i < 0 {
		t.Fatalf("no %s field", field)
	}
	i += len(marker)
	out := bytes.Clone(b)
	if out[i] == '0' {
		out[i] = '1'
	} else {
		out[i] = '0'
	}
	return out
}

// One changed byte in one valid vector of each kind fails that vector, and
// only it.
func TestOneChangedByteFailsEachKind(t *testing.T) {
	for _, kind := range Kinds() {
		t.Run(kind, func(t *testing.T) {
			field, ok := byteField[kind]
			if !ok {
				t.Fatalf("no field to change for kind %s", kind)
			}
			files, _ := filepath.Glob(filepath.Join(kind, "*.json"))
			var pick string
			for _, f := range files {
				if r := VerifyFile(f); r.OK && r.Expect == ExpectValid {
					pick = f
					break
				}
			}
			if pick == "" {
				t.Fatalf("no valid %s vector", kind)
			}
			dir := t.TempDir()
			for _, f := range files {
				b, _ := os.ReadFile(f)
				if f == pick {
					b = changeOneByte(t, b, field)
				}
				os.MkdirAll(filepath.Join(dir, kind), 0o755)
				if err := os.WriteFile(filepath.Join(dir, f), b, 0o644); err != nil {
					t.Fatal(err)
				}
			}
			rs, err := VerifyDir(dir)
			if err != nil {
				t.Fatal(err)
			}
			for _, r := range rs {
				changed := filepath.Base(r.Path) == filepath.Base(pick)
				if r.OK == changed {
					t.Errorf("%s: OK=%v after changing one byte of %s's %s", r.Path, r.OK, pick, field)
				}
			}
		})
	}
}
