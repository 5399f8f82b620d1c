package wire

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"strings"
	"testing"

	"github.com/ferryhq/ferry/wire/wirepb"
	"google.golang.org/protobuf/proto"
)

func TestSignedMessagesLayout(t *testing.T) {
	ch := bytes.Repeat([]byte{0xAB}, ChallengeSize)
	tests := map[string]struct {
		got, want []byte
	}{
		"register": {RegisterMessage(ch, "alice"), append(append([]byte("ferry-register-v1\x00"), ch...), "alice"...)},
		"auth":     {AuthMessage(ch, "alice", 0x01020304), append(append(append([]byte("ferry-auth-v1\x00"), ch...), "alice\x00"...), 1, 2, 3, 4)},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			if !bytes.Equal(tc.got, tc.want) {
				t.Fatalf("got %s\nwant %s", hex.EncodeToString(tc.got), hex.EncodeToString(tc.want))
			}
		})
	}
	// Different devices and different challenges never sign the same bytes.
	if bytes.Equal(AuthMessage(ch, "alice", 1), AuthMessage(ch, "alice", 2)) {
		t.Fatal("device id not bound")
	}
	if bytes.Equal(AuthMessage(ch, "ab", 1), AuthMessage(ch, "a", 1)) {
		t.Fatal("username not bound")
	}
}

func TestCloseReconnects(t *testing.T) {
	tests := map[int]bool{
		CloseProtocolError: false, CloseUnsupportedVersion: false, CloseAuthFailed: false,
		CloseReplaced: false, CloseDeviceRemoved: false, CloseFrameTooLarge: false,
		CloseServerShutdown: true, CloseSlowConsumer: true, CloseHandshakeTimeout: true,
		CloseInternal: true, ClosePingTimeout: true, 1006: true, 1001: true, 1009: false, 1008: false,
	}
	for code, want := range tests {
		if got := CloseReconnects(code); got != want {
			t.Errorf("CloseReconnects(%d) = %v, want %v", code, got, want)
		}
	}
}

func TestValidClientMsgID(t *testing.T) {
	tests := map[string]bool{
		"": false, "a": true, strings.Repeat("x", 64): true, strings.Repeat("x", 65): false,
		"a b": false, "a\x00": false, "é": false, "0123456789abcdef": true, "~!@#": true,
	}
	for id, want := range tests {
		if got := ValidClientMsgID(id); got != want {
			t.Errorf("ValidClientMsgID(%q) = %v, want %v", id, got, want)
		}
	}
}

func TestErrorsMatchByCode(t *testing.T) {
	err := fmt.Errorf("device: register: %w", Errorf(wirepb.ErrorCode_USERNAME_TAKEN, "device: %q is taken", "bob"))
	if !errors.Is(err, ErrUsernameTaken) || errors.Is(err, ErrAuthFailed) {
		t.Fatal("errors.Is must match by code only")
	}
	if CodeOf(err) != wirepb.ErrorCode_USERNAME_TAKEN || CodeOf(errors.New("x")) != wirepb.ErrorCode_ERROR_CODE_UNSPECIFIED {
		t.Fatal("CodeOf")
	}
	if !Errorf(wirepb.ErrorCode_UNAVAILABLE, "x").Retryable || Errorf(wirepb.ErrorCode_BAD_REQUEST, "x").Retryable {
		t.Fatal("retryable must follow the code")
	}
	p := Errorf(wirepb.ErrorCode_RATE_LIMITED, "slow down")
	p.RetryAfterMs = 250
	back := FromProto(p.Proto())
	if back.Code != p.Code || back.Message != p.Message || !back.Retryable || back.RetryAfterMs != 250 {
		t.Fatalf("round trip: %+v", back)
	}
}

func TestDecodeClientFrame(t *testing.T) {
	good, _ := proto.Marshal(&wirepb.ClientFrame{Id: 7, Body: &wirepb.ClientFrame_Hello{Hello: &wirepb.Hello{MinVersion: 1, MaxVersion: 1}}})
	noID, _ := proto.Marshal(&wirepb.ClientFrame{Body: &wirepb.ClientFrame_Hello{Hello: &wirepb.Hello{}}})
	noBody, _ := proto.Marshal(&wirepb.ClientFrame{Id: 3})
	tests := map[string]struct {
		in   []byte
		max  int
		code wirepb.ErrorCode
	}{
		"good":      {good, 0, 0},
		"too large": {good, 3, wirepb.ErrorCode_FRAME_TOO_LARGE},
		"garbage":   {[]byte{0xff, 0xff, 0xff}, 0, wirepb.ErrorCode_BAD_REQUEST},
		"no id":     {noID, 0, wirepb.ErrorCode_BAD_REQUEST},
		"no body":   {noBody, 0, wirepb.ErrorCode_BAD_REQUEST},
		"empty":     {nil, 0, wirepb.ErrorCode_BAD_REQUEST},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			f, err := DecodeClientFrame(tc.in, tc.max)
			if CodeOf(err) != tc.code {
				t.Fatalf("got %v, want %v", err, tc.code)
			}
			if tc.code == 0 && (f.Id != 7 || f.GetHello().GetMaxVersion() != 1) {
				t.Fatalf("decoded %v", f)
			}
		})
	}
}

// FuzzDecodeClientFrame: no input panics the server's frame decoder, and a
// frame it accepts has an id and a body and survives a round trip.
func FuzzDecodeClientFrame(f *testing.F) {
	seeds := []proto.Message{
		&wirepb.ClientFrame{Id: 1, Body: &wirepb.ClientFrame_Hello{Hello: &wirepb.Hello{MinVersion: 1, MaxVersion: 1, Client: "x"}}},
		&wirepb.ClientFrame{Id: 2, Body: &wirepb.ClientFrame_Send{Send: &wirepb.Send{ClientMsgId: "m", To: "bob",
			Ciphertexts: []*wirepb.DeviceCiphertext{{Username: "bob", DeviceId: 1, Type: 3, Content: []byte{0x33, 1, 2}}}}}},
		&wirepb.ClientFrame{Id: 3, Body: &wirepb.ClientFrame_Ack{Ack: &wirepb.Ack{EnvelopeIds: []uint64{1, 2, 1 << 60}}}},
		&wirepb.ClientFrame{Id: 4, Body: &wirepb.ClientFrame_UploadKeys{UploadKeys: &wirepb.UploadKeys{IdentityKey: make([]byte, 33),
			OneTimePrekeys: []*wirepb.PreKey{{Id: 1, PublicKey: make([]byte, 33)}}}}},
	}
	for _, m := range seeds {
		b, _ := proto.Marshal(m)
		f.Add(b)
	}
	f.Add([]byte{})
	f.Add([]byte{0x08, 0x01})
	f.Fuzz(func(t *testing.T, b []byte) {
		fr, err := DecodeClientFrame(b, 1<<20)
		if err != nil {
			return
		}
		if fr.Id == 0 || fr.Body == nil {
			t.Fatalf("accepted a frame without id or body: %v", fr)
		}
		again, err := proto.Marshal(fr)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := DecodeClientFrame(again, 0); err != nil {
			t.Fatalf("re-encoded frame rejected: %v", err)
		}
	})
}

// FuzzDecodeServerFrame: the client's decoder never panics.
func FuzzDecodeServerFrame(f *testing.F) {
	b, _ := proto.Marshal(&wirepb.ServerFrame{Body: &wirepb.ServerFrame_Event{Event: &wirepb.Event{
		Body: &wirepb.Event_Envelope{Envelope: &wirepb.Envelope{Id: 1, Sender: "a", Content: []byte{1}}}}}})
	f.Add(b)
	b, _ = proto.Marshal(&wirepb.ServerFrame{Body: &wirepb.ServerFrame_Response{Response: &wirepb.Response{Id: 1,
		Error: &wirepb.Error{Code: wirepb.ErrorCode_DEVICE_MISMATCH, Mismatch: &wirepb.DeviceMismatch{Missing: []*wirepb.DeviceRef{{Username: "b", DeviceId: 2}}}}}}})
	f.Add(b)
	f.Add([]byte{})
	f.Fuzz(func(t *testing.T, b []byte) {
		fr, err := DecodeServerFrame(b, 1<<20)
		if err == nil && fr.Body == nil {
			t.Fatal("accepted a frame without body")
		}
	})
}

func TestGroupViewHash(t *testing.T) {
	g := &wirepb.GroupInfo{Members: []*wirepb.GroupMember{
		{Username: "bob", Devices: []*wirepb.GroupDevice{{DeviceId: 2, RegistrationId: 7}, {DeviceId: 1, RegistrationId: 5}}},
		{Username: "alice", Devices: []*wirepb.GroupDevice{{DeviceId: 1, RegistrationId: 9}}},
	}}
	me := DeviceAddr{Account: "alice", Device: 1}
	h1 := GroupViewHash(g, me)
	// Order of members and devices does not matter; the sender is left out.
	g2 := &wirepb.GroupInfo{Members: []*wirepb.GroupMember{
		{Username: "alice", Devices: []*wirepb.GroupDevice{{DeviceId: 1, RegistrationId: 1234}}},
		{Username: "bob", Devices: []*wirepb.GroupDevice{{DeviceId: 1, RegistrationId: 5}, {DeviceId: 2, RegistrationId: 7}}},
	}}
	if !bytes.Equal(h1, GroupViewHash(g2, me)) {
		t.Fatal("hash depends on order or on the sender's own device")
	}
	g2.Members[1].Devices[1].RegistrationId = 8
	if bytes.Equal(h1, GroupViewHash(g2, me)) {
		t.Fatal("a re-registered device does not change the hash")
	}
	want := sha256.Sum256([]byte("bob\x00\x00\x00\x00\x01\x00\x00\x00\x05bob\x00\x00\x00\x00\x02\x00\x00\x00\x07"))
	if !bytes.Equal(h1, want[:]) {
		t.Fatalf("layout: got %x want %x", h1, want)
	}
}
