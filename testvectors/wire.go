package testvectors

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"

	"github.com/ferryhq/ferry/wire"
	"github.com/ferryhq/ferry/wire/wirepb"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"
)

// KindWire is the kind of frame vectors.
const KindWire = "wire"

// WireVector is one WebSocket message. A verifier decodes hex as a
// ClientFrame (direction "client": wire.DecodeClientFrame, the server's
// decoder) or a ServerFrame ("server": wire.DecodeServerFrame) with the
// limit max_frame_bytes (0: none); a "text" WebSocket message is refused
// before decoding (BAD_REQUEST: only binary messages carry frames). The
// verdict is "valid" or the wire error code (BAD_REQUEST, FRAME_TOO_LARGE).
// For valid frames, "frame" is the decoded frame in protobuf's JSON form and
// hex is its deterministic encoding: both must match.
type WireVector struct {
	Header
	Direction     string          `json:"direction"`    // "client" or "server"
	MessageType   string          `json:"message_type"` // "binary" or "text"
	MaxFrameBytes int             `json:"max_frame_bytes"`
	Body          string          `json:"body,omitempty"` // the frame's body type, for humans
	Hex           Hex             `json:"hex"`
	Frame         json.RawMessage `json:"frame,omitempty"`
}

func init() {
	families = append(families, family{kind: KindWire,
		verdict: []string{wirepb.ErrorCode_BAD_REQUEST.String(), wirepb.ErrorCode_FRAME_TOO_LARGE.String()},
		gen:     wireVectors, decode: func() vector { return &WireVector{} }})
}

func (v *WireVector) decodeFrame() (proto.Message, error) {
	if v.MessageType != "binary" {
		return nil, wire.Errorf(wirepb.ErrorCode_BAD_REQUEST, "text frames are not part of the protocol")
	}
	switch v.Direction {
	case "client":
		f, err := wire.DecodeClientFrame(v.Hex, v.MaxFrameBytes)
		if err != nil {
			return nil, err
		}
		return f, nil
	case "server":
		f, err := wire.DecodeServerFrame(v.Hex, v.MaxFrameBytes)
		if err != nil {
			return nil, err
		}
		return f, nil
	}
	return nil, fmt.Errorf("direction %q is neither client nor server", v.Direction)
}

// Check decodes the frame with package wire.
func (v *WireVector) Check() (string, error) {
	_, err := v.decodeFrame()
	if err == nil {
		return ExpectValid, nil
	}
	if c := wire.CodeOf(err); c != wirepb.ErrorCode_ERROR_CODE_UNSPECIFIED {
		return c.String(), err
	}
	return "other", err
}

// Consistent checks, for a valid frame, that "frame" is what hex decodes
// to and hex is the frame's deterministic encoding.
func (v *WireVector) Consistent() error {
	f, err := v.decodeFrame()
	if err != nil {
		if len(v.Frame) != 0 {
			return errors.New(`an invalid frame has a "frame" field`)
		}
		return nil
	}
	want := f.ProtoReflect().New().Interface()
	if err := protojson.Unmarshal(v.Frame, want); err != nil {
		return fmt.Errorf(`"frame" does not decode: %w`, err)
	}
	if !proto.Equal(f, want) {
		return errors.New(`"frame" does not match hex`)
	}
	enc, err := proto.MarshalOptions{Deterministic: true}.Marshal(f)
	if err != nil || !bytes.Equal(enc, v.Hex) {
		return errors.New("hex is not the frame's deterministic encoding")
	}
	if b := bodyName(f); b != v.Body {
		return fmt.Errorf(`"body" is %q, the frame's body is %q`, v.Body, b)
	}
	return nil
}

// bodyName names the frame's body: "hello", "response.welcome", "event.envelope".
func bodyName(f proto.Message) string {
	m := f.ProtoReflect()
	o := m.Descriptor().Oneofs().ByName("body")
	fd := m.WhichOneof(o)
	if fd == nil {
		return ""
	}
	name := string(fd.Name())
	if fd.Message() != nil {
		inner := m.Get(fd).Message()
		for _, on := range []protoreflect.Name{"result", "body"} {
			if io := inner.Descriptor().Oneofs().ByName(on); io != nil {
				if w := inner.WhichOneof(io); w != nil {
					return name + "." + string(w.Name())
				} else if inner.Has(inner.Descriptor().Fields().ByName("error")) {
					return name + ".error"
				}
			}
		}
	}
	return name
}

// fill sets every field of m (but oneofs and the fields in skip) to a
// value derived from its number, recursing into messages to depth.
func fill(m protoreflect.Message, depth int) {
	fields := m.Descriptor().Fields()
	for i := 0; i < fields.Len(); i++ {
		fd := fields.Get(i)
		if fd.ContainingOneof() != nil || fd.Name() == "error" && m.Descriptor().Name() == "Response" {
			continue
		}
		if fd.Message() != nil && depth <= 0 {
			continue
		}
		if fd.IsList() {
			l := m.Mutable(fd).List()
			if fd.Message() != nil {
				e := l.NewElement()
				fill(e.Message(), depth-1)
				l.Append(e)
			} else {
				l.Append(scalar(fd))
			}
			continue
		}
		if fd.Message() != nil {
			fill(m.Mutable(fd).Message(), depth-1)
			continue
		}
		m.Set(fd, scalar(fd))
	}
}

func scalar(fd protoreflect.FieldDescriptor) protoreflect.Value {
	n := uint64(fd.Number())
	switch fd.Kind() {
	case protoreflect.BoolKind:
		return protoreflect.ValueOfBool(true)
	case protoreflect.EnumKind:
		vals := fd.Enum().Values()
		return protoreflect.ValueOfEnum(vals.Get(vals.Len() - 1).Number())
	case protoreflect.Int32Kind, protoreflect.Sint32Kind, protoreflect.Sfixed32Kind:
		return protoreflect.ValueOfInt32(int32(n))
	case protoreflect.Int64Kind, protoreflect.Sint64Kind, protoreflect.Sfixed64Kind:
		return protoreflect.ValueOfInt64(int64(createdMs + n))
	case protoreflect.Uint32Kind, protoreflect.Fixed32Kind:
		return protoreflect.ValueOfUint32(uint32(n))
	case protoreflect.Uint64Kind, protoreflect.Fixed64Kind:
		return protoreflect.ValueOfUint64(n)
	case protoreflect.StringKind:
		return protoreflect.ValueOfString(string(fd.Name()))
	case protoreflect.BytesKind:
		return protoreflect.ValueOfBytes(bytes.Repeat([]byte{byte(n)}, 4))
	}
	panic(fmt.Sprintf("testvectors: no sample for %s", fd.FullName()))
}

// framesOf returns one frame per member of the oneof "oneof" of parent's
// type, each made by wrap from a filled body.
func framesOf(parent protoreflect.Message, oneof protoreflect.Name, wrap func(body protoreflect.Message) proto.Message) map[string]proto.Message {
	out := map[string]proto.Message{}
	o := parent.Descriptor().Oneofs().ByName(oneof)
	for i := 0; i < o.Fields().Len(); i++ {
		fd := o.Fields().Get(i)
		m := parent.New()
		body := m.Mutable(fd).Message()
		fill(body, 3)
		out[string(fd.Name())] = wrap(m)
	}
	return out
}

func wireVectors() (map[string]vector, error) {
	out := map[string]vector{}
	enc := func(m proto.Message) []byte {
		b, err := proto.MarshalOptions{Deterministic: true}.Marshal(m)
		if err != nil {
			panic(err)
		}
		return b
	}
	valid := func(dir, desc string, f proto.Message, max int) *WireVector {
		j, err := protojson.MarshalOptions{UseProtoNames: true}.Marshal(f)
		if err != nil {
			panic(err)
		}
		var c bytes.Buffer
		if err := json.Compact(&c, j); err != nil {
			panic(err)
		}
		return &WireVector{Header: Header{Description: desc, Expect: ExpectValid}, Direction: dir,
			MessageType: "binary", MaxFrameBytes: max, Body: bodyName(f), Hex: enc(f), Frame: c.Bytes()}
	}
	bad := func(dir, desc, expect string, b []byte, max int) *WireVector {
		return &WireVector{Header: Header{Description: desc, Expect: expect}, Direction: dir,
			MessageType: "binary", MaxFrameBytes: max, Hex: b}
	}
	const limit = 2 << 20 // ferryd's default --max-frame-bytes
	cf := &wirepb.ClientFrame{}
	for name, m := range framesOf(cf.ProtoReflect(), "body", func(m protoreflect.Message) proto.Message { return m.Interface() }) {
		f := m.(*wirepb.ClientFrame)
		f.Id = 40 + uint64(f.ProtoReflect().WhichOneof(cf.ProtoReflect().Descriptor().Oneofs().ByName("body")).Number())
		out["client-"+name] = valid("client", "a ClientFrame with a "+name+" body, every field set", f, limit)
	}
	for name, m := range framesOf((&wirepb.Response{}).ProtoReflect(), "result", func(m protoreflect.Message) proto.Message {
		m.Interface().(*wirepb.Response).Id = 7
		return &wirepb.ServerFrame{Body: &wirepb.ServerFrame_Response{Response: m.Interface().(*wirepb.Response)}}
	}) {
		out["server-response-"+name] = valid("server", "a Response with a "+name+" result, every field set", m, 0)
	}
	for name, m := range framesOf((&wirepb.Event{}).ProtoReflect(), "body", func(m protoreflect.Message) proto.Message {
		return &wirepb.ServerFrame{Body: &wirepb.ServerFrame_Event{Event: m.Interface().(*wirepb.Event)}}
	}) {
		out["server-event-"+name] = valid("server", "an Event with a "+name+" body, every field set", m, 0)
	}
	errResp := &wirepb.Response{Id: 7, Error: &wirepb.Error{}}
	fill(errResp.Error.ProtoReflect(), 3)
	errResp.Error.Code = wirepb.ErrorCode_DEVICE_MISMATCH
	out["server-response-error"] = valid("server", "a Response carrying an Error (DEVICE_MISMATCH, with its mismatch)",
		&wirepb.ServerFrame{Body: &wirepb.ServerFrame_Response{Response: errResp}}, 0)

	hello := enc(&wirepb.ClientFrame{Id: 1, Body: &wirepb.ClientFrame_Hello{Hello: &wirepb.Hello{MinVersion: 1, MaxVersion: 1, Client: "ferry-cli/0.1"}}})
	out["client-hello-minimal"] = valid("client", "the first frame a client sends: Hello for version 1",
		&wirepb.ClientFrame{Id: 1, Body: &wirepb.ClientFrame_Hello{Hello: &wirepb.Hello{MinVersion: 1, MaxVersion: 1, Client: "ferry-cli/0.1"}}}, limit)
	bigSend := &wirepb.ClientFrame{Id: 9, Body: &wirepb.ClientFrame_Send{Send: &wirepb.Send{ClientMsgId: "m1", To: "bob",
		Ciphertexts: []*wirepb.DeviceCiphertext{{Username: "bob", DeviceId: 1, RegistrationId: 1,
			Type: wirepb.EnvelopeType_SIGNAL_MESSAGE, Content: bytes.Repeat([]byte{0x33}, 200)}}}}}
	big := enc(bigSend)
	out["client-at-frame-limit"] = valid("client", fmt.Sprintf("a Send of exactly max_frame_bytes (%d) bytes", len(big)), bigSend, len(big))
	out["client-over-frame-limit"] = bad("client", fmt.Sprintf("the same Send with max_frame_bytes one less (%d)", len(big)-1),
		"FRAME_TOO_LARGE", big, len(big)-1)
	out["client-truncated"] = bad("client", "a Hello frame without its last byte", "BAD_REQUEST", hello[:len(hello)-1], limit)
	badType := protowire.AppendTag(nil, 1, protowire.BytesType) // id as a length-delimited field
	badType = protowire.AppendBytes(badType, []byte{1})
	out["client-bad-wire-type"] = bad("client", "field 1 (id) encoded as bytes instead of a varint", "BAD_REQUEST", badType, limit)
	out["client-no-body"] = bad("client", "a frame with an id and no body", "BAD_REQUEST", enc(&wirepb.ClientFrame{Id: 1}), limit)
	unknown := protowire.AppendVarint(protowire.AppendTag(enc(&wirepb.ClientFrame{Id: 1}), 99, protowire.VarintType), 1)
	out["client-unknown-body"] = bad("client", "a frame whose only body is field 99, unknown to version 1", "BAD_REQUEST", unknown, limit)
	out["client-id-zero"] = bad("client", "a Hello with request id 0 (reserved)", "BAD_REQUEST",
		enc(&wirepb.ClientFrame{Body: &wirepb.ClientFrame_Hello{Hello: &wirepb.Hello{MinVersion: 1, MaxVersion: 1}}}), limit)
	// Hello{client: "\xff"} by hand: Go's encoder refuses invalid UTF-8.
	h := protowire.AppendTag(nil, 3, protowire.BytesType)
	h = protowire.AppendBytes(h, []byte{0xff})
	inv := protowire.AppendVarint(protowire.AppendTag(nil, 1, protowire.VarintType), 1)
	inv = protowire.AppendBytes(protowire.AppendTag(inv, 2, protowire.BytesType), h)
	out["client-invalid-utf8"] = bad("client", "a Hello whose client string is not UTF-8 (proto3 strings must be)", "BAD_REQUEST", inv, limit)
	out["client-empty"] = bad("client", "an empty message (decodes to a frame with no body)", "BAD_REQUEST", []byte{}, limit)
	text := bad("client", "a WebSocket text message carrying a valid Hello: only binary messages carry frames", "BAD_REQUEST", hello, limit)
	text.MessageType = "text"
	out["client-text-message"] = text
	out["server-truncated"] = bad("server", "a Response without its last byte", "BAD_REQUEST",
		enc(&wirepb.ServerFrame{Body: &wirepb.ServerFrame_Response{Response: &wirepb.Response{Id: 3, Result: &wirepb.Response_Ack{Ack: &wirepb.AckResult{Deleted: 2}}}}})[:7], 0)
	out["server-no-body"] = bad("server", "a ServerFrame with neither response nor event", "BAD_REQUEST", []byte{}, 0)
	return out, nil
}
