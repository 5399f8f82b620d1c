package testvectors

import (
	"bytes"
	"crypto/ed25519"
	"errors"

	"github.com/ferryhq/ferry/device"
	"github.com/ferryhq/ferry/keys"
	"github.com/ferryhq/ferry/store/storepb"
	"github.com/ferryhq/ferry/wire"
	"github.com/ferryhq/ferry/wire/wirepb"
	"go.mau.fi/libsignal/ecc"
)

// Kinds of the signature vectors.
const (
	KindDeviceAuth   = "deviceauth"
	KindSignedPreKey = "signedprekey"
)

func init() {
	families = append(families,
		family{kind: KindDeviceAuth, verdict: codeNames(wirepb.ErrorCode_AUTH_FAILED, wirepb.ErrorCode_BAD_SIGNATURE, wirepb.ErrorCode_INVALID_KEY),
			gen: deviceAuthVectors, decode: func() vector { return &DeviceAuthVector{} }},
		family{kind: KindSignedPreKey, verdict: codeNames(wirepb.ErrorCode_BAD_SIGNATURE, wirepb.ErrorCode_INVALID_KEY),
			gen: signedPreKeyVectors, decode: func() vector { return &SignedPreKeyVector{} }})
}

func codeNames(cs ...wirepb.ErrorCode) []string {
	out := make([]string, len(cs))
	for i, c := range cs {
		out[i] = c.String()
	}
	return out
}

// codeVerdict is "valid" for nil, else err's wire code name.
func codeVerdict(err error) (string, error) {
	if err == nil {
		return ExpectValid, nil
	}
	if c := wire.CodeOf(err); c != wirepb.ErrorCode_ERROR_CODE_UNSPECIFIED {
		return c.String(), err
	}
	return "other", err
}

// DeviceAuthVector is one challenge signature as the server checks it.
// Mode "register": device.VerifyRegister(challenge, username, signing_key,
// signature), the Ed25519 signature over wire.RegisterMessage =
// "ferry-register-v1" 0x00 challenge username. Mode "auth":
// device.VerifyAuth with the stored device {stored_device_id, signing_key}
// and the Auth frame's (username, device_id, signature), over
// wire.AuthMessage = "ferry-auth-v1" 0x00 challenge username 0x00
// device_id(4, big-endian). The verdict is "valid" or the wire error code.
// signed_message is the message a correct signature covers, for humans.
type DeviceAuthVector struct {
	Header
	Mode           string `json:"mode"`
	Challenge      Hex    `json:"challenge"`
	Username       string `json:"username"`
	DeviceID       uint32 `json:"device_id,omitempty"`
	StoredDeviceID uint32 `json:"stored_device_id,omitempty"`
	SigningKey     Hex    `json:"signing_key"`
	Signature      Hex    `json:"signature"`
	SignedMessage  Hex    `json:"signed_message"`
}

func (v *DeviceAuthVector) Check() (string, error) {
	switch v.Mode {
	case "register":
		return codeVerdict(device.VerifyRegister(v.Challenge, v.Username, v.SigningKey, v.Signature))
	case "auth":
		dev := &storepb.Device{Id: v.StoredDeviceID, SigningKey: v.SigningKey}
		return codeVerdict(device.VerifyAuth(dev, v.Challenge, wire.DeviceAddr{Account: v.Username, Device: v.DeviceID}, v.Signature))
	}
	return "other", errors.New(`mode must be "register" or "auth"`)
}

func (v *DeviceAuthVector) message() []byte {
	if v.Mode == "register" {
		return wire.RegisterMessage(v.Challenge, v.Username)
	}
	return wire.AuthMessage(v.Challenge, v.Username, v.DeviceID)
}

func (v *DeviceAuthVector) Consistent() error {
	if !bytes.Equal(v.message(), v.SignedMessage) {
		return errors.New("signed_message is not the message of challenge, username and device_id")
	}
	return nil
}

func edKey(name string) ed25519.PrivateKey { return ed25519.NewKeyFromSeed(fixedSeed(name)) }

func deviceAuthVectors() (map[string]vector, error) {
	challenge := fixedSeed("challenge") // 32 bytes
	other := fixedSeed("another challenge")
	alice, eve := edKey("alice.1 device key"), edKey("eve device key")
	alicePub := Hex(alice.Public().(ed25519.PublicKey))
	reg := func(desc, expect string, key ed25519.PrivateKey, signedUser, user string, ch []byte, mod func(*DeviceAuthVector)) *DeviceAuthVector {
		v := &DeviceAuthVector{Header: Header{Description: desc, Expect: expect}, Mode: "register",
			Challenge: Hex(challenge), Username: user, SigningKey: alicePub}
		v.Signature = ed25519.Sign(key, wire.RegisterMessage(ch, signedUser))
		v.SignedMessage = v.message()
		if mod != nil {
			mod(v)
			v.SignedMessage = v.message()
		}
		return v
	}
	auth := func(desc, expect string, key ed25519.PrivateKey, msg []byte, claimed uint32, mod func(*DeviceAuthVector)) *DeviceAuthVector {
		v := &DeviceAuthVector{Header: Header{Description: desc, Expect: expect}, Mode: "auth",
			Challenge: Hex(challenge), Username: "alice", DeviceID: claimed, StoredDeviceID: 1, SigningKey: alicePub}
		v.Signature = ed25519.Sign(key, msg)
		if mod != nil {
			mod(v)
		}
		v.SignedMessage = v.message()
		return v
	}
	am := func(ch []byte, user string, id uint32) []byte { return wire.AuthMessage(ch, user, id) }
	flip := func(v *DeviceAuthVector) { v.Signature = bytes.Clone(v.Signature); v.Signature[10] ^= 0x01 }
	return map[string]vector{
		"register-valid":             reg("alice registers: her new device key signs the register message", ExpectValid, alice, "alice", "alice", challenge, nil),
		"register-flipped-signature": reg("one bit of the signature flipped", "BAD_SIGNATURE", alice, "alice", "alice", challenge, flip),
		"register-other-username":    reg("signed for username alicia, sent for alice", "BAD_SIGNATURE", alice, "alicia", "alice", challenge, nil),
		"register-old-challenge":     reg("signed over another connection's challenge (replay)", "BAD_SIGNATURE", alice, "alice", "alice", other, nil),
		"register-wrong-key":         reg("signed by a key other than the one sent", "BAD_SIGNATURE", eve, "alice", "alice", challenge, nil),
		"register-short-key": reg("the signing key is 31 bytes", "INVALID_KEY", alice, "alice", "alice", challenge,
			func(v *DeviceAuthVector) { v.SigningKey = v.SigningKey[:31] }),
		"register-short-signature": reg("the signature is 63 bytes", "BAD_SIGNATURE", alice, "alice", "alice", challenge,
			func(v *DeviceAuthVector) { v.Signature = v.Signature[:63] }),
		"register-short-challenge": reg("the challenge is 31 bytes", "BAD_SIGNATURE", alice, "alice", "alice", challenge,
			func(v *DeviceAuthVector) {
				v.Challenge = v.Challenge[:31]
				v.Signature = ed25519.Sign(alice, wire.RegisterMessage(v.Challenge, "alice"))
			}),
		"auth-valid":              auth("alice's device 1 answers the challenge", ExpectValid, alice, am(challenge, "alice", 1), 1, nil),
		"auth-flipped-signature":  auth("one bit of the signature flipped", "AUTH_FAILED", alice, am(challenge, "alice", 1), 1, flip),
		"auth-wrong-key":          auth("signed by eve's key, not the stored key of alice.1", "AUTH_FAILED", eve, am(challenge, "alice", 1), 1, nil),
		"auth-old-challenge":      auth("a signature over another connection's challenge (replay)", "AUTH_FAILED", alice, am(other, "alice", 1), 1, nil),
		"auth-other-device-id":    auth("signed for device 2 of alice, sent as device 1", "AUTH_FAILED", alice, am(challenge, "alice", 2), 1, nil),
		"auth-device-id-mismatch": auth("the stored record is device 1, the frame names device 2 (signed for 2)", "AUTH_FAILED", alice, am(challenge, "alice", 2), 2, nil),
		"auth-register-signature": auth("a register signature (other context string) replayed as auth", "AUTH_FAILED", alice,
			wire.RegisterMessage(challenge, "alice"), 1, nil),
		"auth-short-signature": auth("the signature is 63 bytes", "AUTH_FAILED", alice, am(challenge, "alice", 1), 1,
			func(v *DeviceAuthVector) { v.Signature = v.Signature[:63] }),
	}, nil
}

// SignedPreKeyVector is one signed prekey as keys.VerifySignedPreKey checks
// it: identity_key (33 bytes, 0x05 first) must have signed public_key with
// XEdDSA. The verdict is "valid" or the wire error code (INVALID_KEY,
// BAD_SIGNATURE).
type SignedPreKeyVector struct {
	Header
	IdentityKey  Hex            `json:"identity_key"`
	SignedPreKey SignedPreKeyJS `json:"signed_prekey"`
	Keys         map[string]Hex `json:"keys,omitempty"` // named public keys, for humans
}

// SignedPreKeyJS is a wirepb.SignedPreKey.
type SignedPreKeyJS struct {
	ID        uint32 `json:"id"`
	PublicKey Hex    `json:"public_key"`
	Signature Hex    `json:"signature"`
}

func (v *SignedPreKeyVector) Check() (string, error) {
	return codeVerdict(keys.VerifySignedPreKey(v.IdentityKey, &wirepb.SignedPreKey{
		Id: v.SignedPreKey.ID, PublicKey: v.SignedPreKey.PublicKey, Signature: v.SignedPreKey.Signature}))
}

func (v *SignedPreKeyVector) Consistent() error { return nil }

func xeddsa(signer string, msg []byte) Hex {
	sig, _ := withSeed(2, func() ([64]byte, error) { return ecc.CalculateSignature(fixedKey(signer).PrivateKey(), msg), nil })
	return Hex(sig[:])
}

func signedPreKeyVectors() (map[string]vector, error) {
	ik, spk := pubKey("bob.1"), pubKey("bob.1 signed prekey 1")
	named := map[string]Hex{"bob.1": ik, "bob.1 signed prekey 1": spk, "eve": pubKey("eve")}
	mk := func(desc, expect string, ik []byte, id uint32, pub, sig []byte) *SignedPreKeyVector {
		return &SignedPreKeyVector{Header: Header{Description: desc, Expect: expect}, IdentityKey: ik,
			SignedPreKey: SignedPreKeyJS{ID: id, PublicKey: pub, Signature: sig}, Keys: named}
	}
	good := xeddsa("bob.1", spk)
	flipped := func(b []byte, i int) []byte { c := bytes.Clone(b); c[i] ^= 0x01; return c }
	typed := bytes.Clone(spk)
	typed[0] = 0x06
	return map[string]vector{
		"valid":             mk("bob.1's signed prekey 1, signed by bob.1's identity key", ExpectValid, ik, 1, spk, good),
		"tampered-key":      mk("one bit of the prekey flipped after signing", "BAD_SIGNATURE", ik, 1, flipped(spk, 5), good),
		"tampered-sig":      mk("one bit of the signature flipped", "BAD_SIGNATURE", ik, 1, spk, flipped(good, 3)),
		"wrong-signer":      mk("signed by eve's identity key, served with bob.1's", "BAD_SIGNATURE", ik, 1, spk, xeddsa("eve", spk)),
		"id-zero":           mk("signed prekey id 0 (reserved)", "INVALID_KEY", ik, 0, spk, good),
		"short-key":         mk("the prekey is 32 bytes (no 0x05 type byte)", "INVALID_KEY", ik, 1, spk[1:], good),
		"bad-type-byte":     mk("the prekey's type byte is 0x06", "INVALID_KEY", ik, 1, typed, good),
		"short-identity":    mk("the identity key is 32 bytes", "INVALID_KEY", ik[1:], 1, spk, good),
		"short-signature":   mk("the signature is 63 bytes", "BAD_SIGNATURE", ik, 1, spk, good[:63]),
		"signature-of-self": mk("the identity key's signature over itself, not over the prekey", "BAD_SIGNATURE", ik, 1, spk, xeddsa("bob.1", ik)),
	}, nil
}
