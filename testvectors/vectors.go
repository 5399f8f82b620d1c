// Package testvectors holds Ferry's test vectors and their verifier, for
// auditors and for other implementations of the protocol.
//
// Vectors are JSON files, one case per file, under testvectors/<kind>/. Each
// names its kind ("kind") and what a correct implementation concludes
// ("expect"). The committed files are the source of truth; the generator
// (Generate, WriteDir; ferry vectors generate DIR) writes them byte for byte.
//
// Kinds (one folder each):
//
//	wire            frames: decode (wire.DecodeClientFrame / DecodeServerFrame) and encode
//	deviceauth      Register and Auth challenge signatures (device.VerifyRegister / VerifyAuth)
//	signedprekey    signed prekeys (keys.VerifySignedPreKey)
//	devicelist      signed device lists: devicelist.VerifyNext's verdict
//	signal-session  an X3DH setup and a double-ratchet transcript (libsignal)
//	signal-group    a sender-key group exchange (libsignal)
//	inbox           the exact Pebble keys and values the inbox stores for a send
//	push            exactly what each push provider receives for a wake-up
//
// Generate writes them all (ferry vectors generate DIR); VerifyDir checks a
// tree of them (ferry vectors verify DIR). See README.md in this folder for
// each kind's fields.
package testvectors

import (
	"bytes"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"sort"

	"github.com/ferryhq/ferry/device/devicelist"
	"github.com/ferryhq/ferry/wire/wirepb"
	"google.golang.org/protobuf/proto"
)

// KindDeviceList is the kind of signed device list vectors.
const KindDeviceList = "devicelist"

// ExpectValid is the "expect" value of a vector that must be accepted.
const ExpectValid = "valid"

// Result is the outcome of one vector file.
type Result struct {
	Path        string // as found under the directory given to VerifyDir
	Kind        string
	Description string
	Expect      string // what the vector says
	Got         string // what this implementation concluded ("valid" or an error name)
	OK          bool   // Got == Expect and the file is consistent
	Detail      string // why not OK, or the error message behind Got
}

// Hex is a byte string written as lowercase hex in JSON.
type Hex []byte

func (h Hex) MarshalJSON() ([]byte, error) { return json.Marshal(hex.EncodeToString(h)) }

func (h *Hex) UnmarshalJSON(b []byte) error {
	var s string
	if err := json.Unmarshal(b, &s); err != nil {
		return err
	}
	d, err := hex.DecodeString(s)
	if err != nil {
		return err
	}
	*h = d
	return nil
}

// Header is the part every vector has.
type Header struct {
	Kind        string `json:"kind"`
	Description string `json:"description"`
	Expect      string `json:"expect"`
}

func (h *Header) header() *Header { return h }

// vector is one decoded case of some kind.
type vector interface {
	header() *Header
	// Check computes this implementation's verdict ("valid" or an error
	// name) and the error behind it.
	Check() (string, error)
	// Consistent reports whether the human-readable copies in the file say
	// what its bytes say (only asked when the verdict matched).
	Consistent() error
}

// family is one kind of vector: its generator and its decoder.
type family struct {
	kind    string
	verdict []string                          // the error names its expect may hold
	gen     func() (map[string]vector, error) // by case name
	decode  func() vector                     // a new empty vector to decode into
}

var families []family

func familyOf(kind string) *family {
	for i := range families {
		if families[i].kind == kind {
			return &families[i]
		}
	}
	return nil
}

// Kinds lists the vector kinds, in the order Generate writes them.
func Kinds() []string {
	out := make([]string, len(families))
	for i, f := range families {
		out[i] = f.kind
	}
	return out
}

// DeviceListVector is one signed-device-list case. A verifier runs
// devicelist.VerifyNext(signed_list, username, pinned_identity_key (empty:
// trust on first use), seen_version, seen_list) and compares its verdict
// with expect: "valid" or the error's name (ErrInvalid, ErrBadSignature,
// ErrWrongSigner, ErrWrongAccount, ErrRollback).
type DeviceListVector struct {
	Header
	Username          string         `json:"username"`
	PinnedIdentityKey Hex            `json:"pinned_identity_key"`
	SeenVersion       uint64         `json:"seen_version"`
	SeenList          Hex            `json:"seen_list,omitempty"`
	SignedList        SignedList     `json:"signed_list"`
	List              *DecodedList   `json:"list,omitempty"` // signed_list.list decoded, for humans; absent if it does not decode
	Keys              map[string]Hex `json:"keys,omitempty"` // public keys by name, for humans
}

// SignedList is a wirepb.SignedDeviceList.
type SignedList struct {
	List      Hex `json:"list"`
	Signature Hex `json:"signature"`
}

// DecodedList is a wirepb.DeviceList in JSON.
type DecodedList struct {
	Username  string        `json:"username"`
	Version   uint64        `json:"version"`
	Devices   []DecodedItem `json:"devices"`
	CreatedMs int64         `json:"created_ms"`
}

// DecodedItem is a wirepb.DeviceListEntry in JSON.
type DecodedItem struct {
	DeviceID    uint32 `json:"device_id"`
	IdentityKey Hex    `json:"identity_key"`
}

// Decode decodes list bytes for the "list" field; nil if they do not decode.
func Decode(list []byte) *DecodedList {
	l := &wirepb.DeviceList{}
	if proto.Unmarshal(list, l) != nil {
		return nil
	}
	d := &DecodedList{Username: l.Username, Version: l.Version, CreatedMs: l.CreatedMs, Devices: []DecodedItem{}}
	for _, e := range l.Devices {
		d.Devices = append(d.Devices, DecodedItem{DeviceID: e.DeviceId, IdentityKey: e.IdentityKey})
	}
	return d
}

// Check runs the vector through devicelist.VerifyNext and returns its
// verdict ("valid" or the error's name) and the error.
func (v *DeviceListVector) Check() (string, error) {
	var pinned []byte
	if len(v.PinnedIdentityKey) > 0 {
		pinned = v.PinnedIdentityKey
	}
	s := &wirepb.SignedDeviceList{List: v.SignedList.List, Signature: v.SignedList.Signature}
	_, err := devicelist.VerifyNext(s, v.Username, pinned, v.SeenVersion, v.SeenList)
	if err == nil {
		return ExpectValid, nil
	}
	return devicelist.KindName(err), err
}

// Consistent checks the "list" copy against the bytes.
func (v *DeviceListVector) Consistent() error {
	if d := Decode(v.SignedList.List); !decodedEqual(d, v.List) {
		return errors.New(`the "list" field does not match signed_list.list`)
	}
	return nil
}

// VerifyDir verifies every *.json file under dir (recursively), in path
// order. A file's kind is its "kind" field, or else the name of its folder.
// Problems with single files are failed Results; the error is for a
// directory that cannot be read or holds no vectors.
func VerifyDir(dir string) ([]Result, error) {
	var paths []string
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if !d.IsDir() && filepath.Ext(p) == ".json" {
			paths = append(paths, p)
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("testvectors: %w", err)
	}
	if len(paths) == 0 {
		return nil, fmt.Errorf("testvectors: no *.json vectors under %s", dir)
	}
	sort.Strings(paths)
	out := make([]Result, 0, len(paths))
	for _, p := range paths {
		out = append(out, VerifyFile(p))
	}
	return out, nil
}

// VerifyFile verifies one vector file.
func VerifyFile(path string) Result {
	b, err := os.ReadFile(path)
	if err != nil {
		return Result{Path: path, Detail: err.Error()}
	}
	return verifyBytes(path, b)
}

// verifyBytes verifies the contents b of the vector file at path. A panic
// (a bug, or a library fed bytes it cannot take) is a failed Result.
func verifyBytes(path string, b []byte) (r Result) {
	r = Result{Path: path}
	defer func() {
		if p := recover(); p != nil {
			r.OK, r.Detail = false, fmt.Sprintf("verifier panicked: %v", p)
		}
	}()
	var head struct {
		Kind string `json:"kind"`
	}
	if err := json.Unmarshal(b, &head); err != nil {
		r.Detail = "not JSON: " + err.Error()
		return r
	}
	r.Kind = head.Kind
	if r.Kind == "" {
		r.Kind = filepath.Base(filepath.Dir(path))
	}
	f := familyOf(r.Kind)
	if f == nil {
		r.Detail = fmt.Sprintf("unknown vector kind %q", r.Kind)
		return r
	}
	v := f.decode()
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		r.Detail = fmt.Sprintf("bad %s vector: %v", r.Kind, err)
		return r
	}
	h := v.header()
	r.Description, r.Expect = h.Description, h.Expect
	if h.Expect != ExpectValid && !slices.Contains(f.verdict, h.Expect) {
		r.Detail = fmt.Sprintf("expect %q is neither %q nor an error name %v", h.Expect, ExpectValid, f.verdict)
		return r
	}
	got, err := v.Check()
	r.Got = got
	if err != nil {
		r.Detail = err.Error()
	}
	if got != h.Expect {
		return r
	}
	if err := v.Consistent(); err != nil {
		r.Detail = err.Error()
		return r
	}
	r.OK = true
	return r
}

func decodedEqual(a, b *DecodedList) bool {
	if a == nil || b == nil {
		return a == nil && b == nil
	}
	ja, err1 := json.Marshal(a)
	jb, err2 := json.Marshal(b)
	return errors.Join(err1, err2) == nil && bytes.Equal(ja, jb)
}
