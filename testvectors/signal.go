package testvectors

import (
	"bytes"
	"context"
	"errors"
	"fmt"

	"github.com/ferryhq/ferry/client/e2ee"
	"github.com/ferryhq/ferry/internal/signalsafe"
	"github.com/ferryhq/ferry/wire/wirepb"
	"go.mau.fi/libsignal/ecc"
	"go.mau.fi/libsignal/groups"
	"go.mau.fi/libsignal/keys/identity"
	"go.mau.fi/libsignal/keys/prekey"
	"go.mau.fi/libsignal/protocol"
	"go.mau.fi/libsignal/session"
	"go.mau.fi/libsignal/state/record"
	"go.mau.fi/libsignal/util/optional"
	"google.golang.org/protobuf/proto"
)

// Kinds of the Signal vectors.
const (
	KindSignalSession = "signal-session"
	KindSignalGroup   = "signal-group"
)

// Verdicts of the Signal vectors.
const (
	ErrBundle            = "ErrBundle"            // the initiator refuses the prekey bundle (X3DH does not start)
	ErrDecrypt           = "ErrDecrypt"           // the receiver cannot decrypt a message's bytes
	ErrPlaintextMismatch = "ErrPlaintextMismatch" // it decrypts to other bytes than the vector's plaintext
	ErrNotReproduced     = "ErrNotReproduced"     // the sender, replayed with the seed, makes other bytes
)

var signalVerdicts = []string{ErrBundle, ErrDecrypt, ErrPlaintextMismatch, ErrNotReproduced}

func init() {
	families = append(families,
		family{kind: KindSignalSession, verdict: signalVerdicts, gen: signalSessionVectors,
			decode: func() vector { return &SignalSessionVector{} }},
		family{kind: KindSignalGroup, verdict: signalVerdicts[1:], gen: signalGroupVectors,
			decode: func() vector { return &SignalGroupVector{} }})
}

// SignalParty is one device of a Signal vector with its long-term keys.
type SignalParty struct {
	Name            string `json:"name"`
	DeviceID        uint32 `json:"device_id"`
	RegistrationID  uint32 `json:"registration_id"`
	IdentityPrivate Hex    `json:"identity_private"` // Curve25519, 32 bytes
	IdentityPublic  Hex    `json:"identity_public"`  // 33 bytes, 0x05 first
}

// KeyPairJS is a prekey with its id.
type KeyPairJS struct {
	ID        uint32 `json:"id"`
	Private   Hex    `json:"private"`
	Public    Hex    `json:"public"`
	Signature Hex    `json:"signature,omitempty"` // signed prekey: XEdDSA by the identity key over public
}

// SignalMessageJS is one message of a transcript.
type SignalMessageJS struct {
	From       string `json:"from"`           // the sending party's name
	Type       string `json:"type,omitempty"` // PREKEY_SIGNAL_MESSAGE or SIGNAL_MESSAGE (Envelope.type)
	Text       string `json:"text"`           // Content.text, for humans
	Plaintext  Hex    `json:"plaintext"`      // padded wirepb.Content: what the sender encrypted
	Ciphertext Hex    `json:"ciphertext"`     // Envelope.content
}

// SignalSessionVector is an X3DH setup and a double-ratchet transcript
// between alice (initiator) and bob. bundle is the prekey bundle alice
// claimed (a wirepb.PreKeyBundle); bob holds the private halves. A
// verifier replays it: with crypto/rand set to the ChaCha8 stream of seed
// (testing/cryptotest.SetGlobalRandom's), alice processes bundle, then for
// each message the sender encrypts plaintext (it must give ciphertext,
// byte for byte: ErrNotReproduced) and the receiver decrypts ciphertext
// (it must succeed, ErrDecrypt, and give plaintext, ErrPlaintextMismatch).
// An implementation that draws randomness differently can still check the
// receiving side: every message decrypts with the private keys given.
type SignalSessionVector struct {
	Header
	Seed             uint64            `json:"seed"`
	Alice            SignalParty       `json:"alice"`
	Bob              SignalParty       `json:"bob"`
	BobSignedPreKey  KeyPairJS         `json:"bob_signed_prekey"`
	BobOneTimePreKey KeyPairJS         `json:"bob_one_time_prekey"`
	Bundle           Hex               `json:"bundle"`
	Messages         []SignalMessageJS `json:"messages"`
}

// party is the live state of one SignalParty.
type party struct {
	addr *protocol.SignalAddress // how the other side names it
	st   *memStore
}

func keyPairOf(priv []byte) (*ecc.ECKeyPair, error) {
	if len(priv) != 32 {
		return nil, fmt.Errorf("private key of %d bytes", len(priv))
	}
	k := ecc.NewDjbECPrivateKey([32]byte(priv))
	return ecc.NewECKeyPair(ecc.CreateKeyPair(priv).PublicKey(), k), nil
}

func newParty(p SignalParty) (*party, error) {
	kp, err := keyPairOf(p.IdentityPrivate)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", p.Name, err)
	}
	id := identity.NewKeyPair(identity.NewKey(kp.PublicKey()), kp.PrivateKey())
	return &party{addr: protocol.NewSignalAddress(p.Name, p.DeviceID), st: newMemStore(id, p.RegistrationID)}, nil
}

func (p *party) cipher(peer *party) *session.Cipher {
	b := session.NewBuilder(p.st, p.st, p.st, p.st, peer.addr, ser)
	return session.NewCipher(b, peer.addr)
}

// content is the padded Content a Ferry client encrypts for text.
func content(text string, groupID string) []byte {
	c := &wirepb.Content{Text: text, SentTimeMs: createdMs}
	if groupID != "" {
		c.GroupCheck = e2ee.GroupCheck(groupID, text)
	}
	b, err := proto.MarshalOptions{Deterministic: true}.Marshal(c)
	if err != nil {
		panic(err)
	}
	return e2ee.Pad(b)
}

func textOf(plaintext []byte) string {
	b, err := e2ee.Unpad(plaintext)
	if err != nil {
		return ""
	}
	var c wirepb.Content
	if proto.Unmarshal(b, &c) != nil {
		return ""
	}
	return c.Text
}

func bundleOf(b []byte) (*prekey.Bundle, error) {
	var w wirepb.PreKeyBundle
	if err := proto.Unmarshal(b, &w); err != nil {
		return nil, err
	}
	if w.SignedPrekey == nil || w.OneTimePrekey == nil || len(w.IdentityKey) != 33 ||
		len(w.SignedPrekey.PublicKey) != 33 || len(w.OneTimePrekey.PublicKey) != 33 || len(w.SignedPrekey.Signature) != 64 {
		return nil, errors.New("bundle is incomplete")
	}
	pub := func(k []byte) ecc.ECPublicKeyable { return ecc.NewDjbECPublicKey([32]byte(k[1:])) }
	return prekey.NewBundle(w.RegistrationId, w.DeviceId, optional.NewOptionalUint32(w.OneTimePrekey.Id),
		w.SignedPrekey.Id, pub(w.OneTimePrekey.PublicKey), pub(w.SignedPrekey.PublicKey),
		[64]byte(w.SignedPrekey.Signature), identity.NewKey(pub(w.IdentityKey))), nil
}

// run replays the transcript; gen, when set, makes the ciphertexts instead
// of checking them (the generator).
func (v *SignalSessionVector) run(gen bool) (string, error) {
	ctx := context.Background()
	type res struct {
		verdict string
		err     error
	}
	r, _ := withSeed(v.Seed, func() (res, error) {
		var out res
		perr := signalsafe.Protect(func() {
			alice, err := newParty(v.Alice)
			if err != nil {
				out = res{ErrBundle, err}
				return
			}
			bob, err := newParty(v.Bob)
			if err != nil {
				out = res{ErrBundle, err}
				return
			}
			spk, err1 := keyPairOf(v.BobSignedPreKey.Private)
			otk, err2 := keyPairOf(v.BobOneTimePreKey.Private)
			if err := errors.Join(err1, err2); err != nil || len(v.BobSignedPreKey.Signature) != 64 {
				out = res{ErrDecrypt, fmt.Errorf("bob's prekeys: %v", err)}
				return
			}
			bob.st.signed[v.BobSignedPreKey.ID] = record.NewSignedPreKey(v.BobSignedPreKey.ID, createdMs, spk,
				[64]byte(v.BobSignedPreKey.Signature), ser.SignedPreKeyRecord)
			bob.st.preKeys[v.BobOneTimePreKey.ID] = record.NewPreKey(v.BobOneTimePreKey.ID, otk, ser.PreKeyRecord)

			b, err := bundleOf(v.Bundle)
			if err == nil {
				err = session.NewBuilder(alice.st, alice.st, alice.st, alice.st, bob.addr, ser).ProcessBundle(ctx, b)
			}
			if err != nil {
				out = res{ErrBundle, err}
				return
			}
			for i := range v.Messages {
				m := &v.Messages[i]
				from, to := alice, bob
				if m.From == v.Bob.Name {
					from, to = bob, alice
				} else if m.From != v.Alice.Name {
					out = res{ErrDecrypt, fmt.Errorf("message %d: from %q is neither party", i, m.From)}
					return
				}
				ct, err := from.cipher(to).Encrypt(ctx, m.Plaintext)
				if err != nil {
					out = res{ErrNotReproduced, fmt.Errorf("message %d: encrypt: %w", i, err)}
					return
				}
				typ := wirepb.EnvelopeType_SIGNAL_MESSAGE
				if ct.Type() == protocol.PREKEY_TYPE {
					typ = wirepb.EnvelopeType_PREKEY_SIGNAL_MESSAGE
				}
				if gen {
					m.Type, m.Ciphertext = typ.String(), ct.Serialize()
				}
				pt, err := decryptAs(ctx, to, from, m.Type, m.Ciphertext)
				if err != nil {
					out = res{ErrDecrypt, fmt.Errorf("message %d: %w", i, err)}
					return
				}
				if !bytes.Equal(pt, m.Plaintext) {
					out = res{ErrPlaintextMismatch, fmt.Errorf("message %d decrypts to other bytes", i)}
					return
				}
				if m.Type != typ.String() || !bytes.Equal(ct.Serialize(), m.Ciphertext) {
					out = res{ErrNotReproduced, fmt.Errorf("message %d: the sender makes other bytes with this seed", i)}
					return
				}
			}
			out = res{ExpectValid, nil}
		})
		if perr != nil {
			out = res{ErrDecrypt, perr}
		}
		return out, nil
	})
	return r.verdict, r.err
}

// decryptAs decrypts ct at receiver me, sent by from.
func decryptAs(ctx context.Context, me, from *party, typ string, ct []byte) ([]byte, error) {
	if len(ct) == 0 || ct[0] != 0x33 {
		return nil, errors.New("version byte is not 0x33")
	}
	c := me.cipher(from)
	switch typ {
	case wirepb.EnvelopeType_PREKEY_SIGNAL_MESSAGE.String():
		m, err := protocol.NewPreKeySignalMessageFromBytes(ct, ser.PreKeySignalMessage, ser.SignalMessage)
		if err != nil {
			return nil, err
		}
		return c.DecryptMessage(ctx, m)
	case wirepb.EnvelopeType_SIGNAL_MESSAGE.String():
		m, err := protocol.NewSignalMessageFromBytes(ct, ser.SignalMessage)
		if err != nil {
			return nil, err
		}
		return c.Decrypt(ctx, m)
	}
	return nil, fmt.Errorf("type %q", typ)
}

func (v *SignalSessionVector) Check() (string, error) { return v.run(false) }

func (v *SignalSessionVector) Consistent() error {
	for _, p := range []SignalParty{v.Alice, v.Bob} {
		if !bytes.Equal(ecc.CreateKeyPair(p.IdentityPrivate).PublicKey().Serialize(), p.IdentityPublic) {
			return fmt.Errorf("%s: identity_public is not the private key's", p.Name)
		}
	}
	for _, k := range []KeyPairJS{v.BobSignedPreKey, v.BobOneTimePreKey} {
		if !bytes.Equal(ecc.CreateKeyPair(k.Private).PublicKey().Serialize(), k.Public) {
			return fmt.Errorf("prekey %d: public is not the private key's", k.ID)
		}
	}
	for i, m := range v.Messages {
		if textOf(m.Plaintext) != m.Text {
			return fmt.Errorf("message %d: text is not the plaintext's", i)
		}
	}
	return nil
}

func signalParty(name string, dev, reg uint32) SignalParty {
	k := fixedKey(name + " identity")
	priv := k.PrivateKey().Serialize()
	return SignalParty{Name: name, DeviceID: dev, RegistrationID: reg, IdentityPrivate: priv[:], IdentityPublic: k.PublicKey().Serialize()}
}

func prekeyJS(name string, id uint32) KeyPairJS {
	k := fixedKey(name)
	priv := k.PrivateKey().Serialize()
	return KeyPairJS{ID: id, Private: priv[:], Public: k.PublicKey().Serialize()}
}

func signalSessionVectors() (map[string]vector, error) {
	alice, bob := signalParty("alice", 1, 1111), signalParty("bob", 1, 2222)
	spk, otk := prekeyJS("bob signed prekey", 1), prekeyJS("bob one-time prekey", 7)
	spk.Signature = xeddsa("bob identity", spk.Public)
	bundle := func(ik, sig []byte) Hex {
		b, _ := proto.MarshalOptions{Deterministic: true}.Marshal(&wirepb.PreKeyBundle{DeviceId: bob.DeviceID, RegistrationId: bob.RegistrationID,
			IdentityKey: ik, SignedPrekey: &wirepb.SignedPreKey{Id: spk.ID, PublicKey: spk.Public, Signature: sig},
			OneTimePrekey: &wirepb.PreKey{Id: otk.ID, PublicKey: otk.Public}})
		return b
	}
	script := []struct{ from, text string }{
		{"alice", "hi bob"}, {"alice", "are you there?"}, {"bob", "hi alice"},
		{"alice", "good"}, {"bob", "see you"}, {"bob", "bye"},
	}
	base := func(desc string) *SignalSessionVector {
		v := &SignalSessionVector{Header: Header{Description: desc, Expect: ExpectValid}, Seed: 11, Alice: alice, Bob: bob,
			BobSignedPreKey: spk, BobOneTimePreKey: otk, Bundle: bundle(bob.IdentityPublic, spk.Signature)}
		for _, s := range script {
			v.Messages = append(v.Messages, SignalMessageJS{From: s.from, Text: s.text, Plaintext: content(s.text, "")})
		}
		if got, err := v.run(true); got != ExpectValid {
			panic(fmt.Sprintf("testvectors: transcript: %s %v", got, err))
		}
		return v
	}
	valid := base("X3DH (alice claims bob's bundle with a one-time prekey) and six messages, two prekey messages then the ratchet both ways")
	tampered := base("the transcript with one bit of bob's first reply flipped (its MAC no longer verifies)")
	tampered.Expect = ErrDecrypt
	tampered.Messages[2].Ciphertext[len(tampered.Messages[2].Ciphertext)-3] ^= 0x01
	wrongPT := base("the transcript with alice's second plaintext changed after encryption")
	wrongPT.Expect = ErrPlaintextMismatch
	wrongPT.Messages[1].Text = "are you here?"
	wrongPT.Messages[1].Plaintext = content(wrongPT.Messages[1].Text, "")
	badBundle := base("bob's bundle with a signed prekey signature by another key (a server substituting the prekey)")
	badBundle.Expect = ErrBundle
	badBundle.Bundle = bundle(bob.IdentityPublic, xeddsa("eve", spk.Public))
	otherSeed := base("the transcript replayed with another seed: the receiving side still decrypts, the sender makes other bytes")
	otherSeed.Expect = ErrNotReproduced
	otherSeed.Seed = 12
	return map[string]vector{"x3dh-ratchet": valid, "tampered-reply": tampered, "plaintext-mismatch": wrongPT,
		"bundle-bad-signature": badBundle, "other-seed": otherSeed}, nil
}

// SignalGroupVector is a sender-key group exchange: alice creates her
// sender key for group_id, hands bob the SenderKeyDistributionMessage
// (distribution, sent pairwise in Content.sender_key) and sends messages
// (SenderKeyMessage, signed serialization). A verifier replays it like a
// session vector: alice's side with the seeded randomness must make the
// same bytes (ErrNotReproduced), bob must process distribution and decrypt
// every ciphertext (ErrDecrypt) to plaintext (ErrPlaintextMismatch).
type SignalGroupVector struct {
	Header
	Seed         uint64            `json:"seed"`
	GroupID      string            `json:"group_id"`
	Sender       GroupSender       `json:"sender"`
	Distribution Hex               `json:"distribution"`
	Messages     []SignalMessageJS `json:"messages"`
}

// GroupSender names the sending device of a group vector.
type GroupSender struct {
	Name     string `json:"name"`
	DeviceID uint32 `json:"device_id"`
}

func (v *SignalGroupVector) run(gen bool) (string, error) {
	ctx := context.Background()
	type res struct {
		verdict string
		err     error
	}
	r, _ := withSeed(v.Seed, func() (res, error) {
		var out res
		perr := signalsafe.Protect(func() {
			alice, bob := newMemStore(nil, 0), newMemStore(nil, 0)
			own := protocol.NewSenderKeyName(v.GroupID, protocol.NewSignalAddress(v.Sender.Name, v.Sender.DeviceID))
			skdm, err := groups.NewGroupSessionBuilder(alice, ser).Create(ctx, own)
			if err != nil {
				out = res{ErrNotReproduced, err}
				return
			}
			if gen {
				v.Distribution = skdm.Serialize()
			}
			m, err := protocol.NewSenderKeyDistributionMessageFromBytes(v.Distribution, ser.SenderKeyDistributionMessage)
			if err == nil {
				err = groups.NewGroupSessionBuilder(bob, ser).Process(ctx, own, m)
			}
			if err != nil {
				out = res{ErrDecrypt, fmt.Errorf("distribution: %w", err)}
				return
			}
			for i := range v.Messages {
				msg := &v.Messages[i]
				ct, err := groups.NewGroupCipher(groups.NewGroupSessionBuilder(alice, ser), own, alice).Encrypt(ctx, msg.Plaintext)
				if err != nil {
					out = res{ErrNotReproduced, fmt.Errorf("message %d: encrypt: %w", i, err)}
					return
				}
				if gen {
					msg.Ciphertext = ct.SignedSerialize()
				}
				skm, err := protocol.NewSenderKeyMessageFromBytes(msg.Ciphertext, ser.SenderKeyMessage)
				var pt []byte
				if err == nil {
					pt, err = groups.NewGroupCipher(groups.NewGroupSessionBuilder(bob, ser), own, bob).Decrypt(ctx, skm)
				}
				if err != nil {
					out = res{ErrDecrypt, fmt.Errorf("message %d: %w", i, err)}
					return
				}
				if !bytes.Equal(pt, msg.Plaintext) {
					out = res{ErrPlaintextMismatch, fmt.Errorf("message %d decrypts to other bytes", i)}
					return
				}
				if !bytes.Equal(ct.SignedSerialize(), msg.Ciphertext) {
					out = res{ErrNotReproduced, fmt.Errorf("message %d: the sender makes other bytes with this seed", i)}
					return
				}
			}
			if !bytes.Equal(skdm.Serialize(), v.Distribution) {
				out = res{ErrNotReproduced, errors.New("the sender makes another distribution message with this seed")}
				return
			}
			out = res{ExpectValid, nil}
		})
		if perr != nil {
			out = res{ErrDecrypt, perr}
		}
		return out, nil
	})
	return r.verdict, r.err
}

func (v *SignalGroupVector) Check() (string, error) { return v.run(false) }

func (v *SignalGroupVector) Consistent() error {
	for i, m := range v.Messages {
		if textOf(m.Plaintext) != m.Text {
			return fmt.Errorf("message %d: text is not the plaintext's", i)
		}
	}
	return nil
}

func signalGroupVectors() (map[string]vector, error) {
	const gid = "0123456789abcdef0123456789abcdef"
	sender := GroupSender{Name: "alice", DeviceID: 1}
	base := func(desc string) *SignalGroupVector {
		v := &SignalGroupVector{Header: Header{Description: desc, Expect: ExpectValid}, Seed: 21, GroupID: gid, Sender: sender}
		for _, t := range []string{"hello team", "lunch at noon?", "see you there"} {
			v.Messages = append(v.Messages, SignalMessageJS{From: "alice", Text: t, Plaintext: content(t, gid)})
		}
		if got, err := v.run(true); got != ExpectValid {
			panic(fmt.Sprintf("testvectors: group transcript: %s %v", got, err))
		}
		return v
	}
	valid := base("alice's sender key for a group, its distribution message, and three group messages bob decrypts")
	tampered := base("the exchange with one bit of the second message's signature flipped")
	tampered.Expect = ErrDecrypt
	tampered.Messages[1].Ciphertext[len(tampered.Messages[1].Ciphertext)-1] ^= 0x01
	badDist := base("the distribution message with one bit of its signing key flipped: no message verifies")
	badDist.Expect = ErrDecrypt
	badDist.Distribution[len(badDist.Distribution)-1] ^= 0x01
	wrongPT := base("the exchange with the third plaintext changed after encryption")
	wrongPT.Expect = ErrPlaintextMismatch
	wrongPT.Messages[2].Text = "see you later"
	wrongPT.Messages[2].Plaintext = content(wrongPT.Messages[2].Text, gid)
	otherSeed := base("the exchange replayed with another seed")
	otherSeed.Expect = ErrNotReproduced
	otherSeed.Seed = 22
	return map[string]vector{"sender-key": valid, "tampered-message": tampered, "tampered-distribution": badDist,
		"plaintext-mismatch": wrongPT, "other-seed": otherSeed}, nil
}
