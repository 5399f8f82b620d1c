// Package e2ee is the device side of Ferry's end-to-end encryption: Signal
// sessions (X3DH + double ratchet, go.mau.fi/libsignal v0.2.1) over the
// device's local store (package localstore).
//
// The library is treated as untrusted: every byte string is validated
// (lengths, key type byte 0x05, message version byte 0x33) before it reaches a
// parser, and every call into it runs under recover(), so a panic becomes an
// error. Signal state never stays in memory between calls: each operation
// loads fresh records from the store inside one transaction and commits the
// records the library stored only if the whole operation succeeded.
// Decryption does not use libsignal's Cipher.Decrypt: that tries the session
// states of a record in place, so a failed try on one state can leave it
// ratcheted to garbage when another state then decrypts (this breaks
// sessions after both sides set one up at once). This package tries each
// state on its own copy instead (see decrypt.go).
//
// Concurrency: a Device serializes its state-changing calls, and every
// write transaction takes the store's write lock (BEGIN IMMEDIATE), so
// several processes may use one store (a `ferry recv` and a `ferry send`).
// Each call that changes Signal state commits (fsynced) before it returns:
// an Encrypt's ciphertext may leave at once, a Receive's envelope may be
// acked at once.
//
// Groups use Signal sender keys (see group.go): SenderKeyDistribution,
// RotateSenderKey, GroupEncrypt, and Receive for SENDER_KEY_MESSAGE
// envelopes and for pairwise messages carrying a sender key.
//
// Identity keys: trust on first use, and a changed key is accepted but
// reported (as Signal does for unverified contacts). BuildSession with a
// bundle whose identity key differs from the one known for that device builds
// the session, replaces the key, and returns an error wrapping
// ErrIdentityChanged; Receive of a PreKeySignalMessage carrying a new identity
// key stores the message as usual (nil error) and calls the handler set with
// SetIdentityChangeHandler. Callers should warn the user ("safety number
// changed") and carry on.
//
// Importing this package installs a libsignal logger that drops Debug and
// Info messages (the default one prints to stdout, and Debug lines format key
// material); warnings and errors go to SetLibraryLog's function, if any.
package e2ee

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"math/big"
	"sync"
	"sync/atomic"
	"time"

	"go.mau.fi/libsignal/ecc"
	"go.mau.fi/libsignal/keys/identity"
	"go.mau.fi/libsignal/logger"
	"go.mau.fi/libsignal/serialize"

	"github.com/ferryhq/ferry/client/localstore"
	"github.com/ferryhq/ferry/wire/wirepb"
)

// Limits and constants of the key material.
const (
	// MaxRegistrationID is the largest registration id (they are 1..16380).
	MaxRegistrationID = 16380
	// MaxPreKeyID is the largest one-time prekey id this package hands out.
	// Ids are 1..MaxPreKeyID and wrap around; 0 means "no prekey" to
	// libsignal and 0xFFFFFF is its never-deleted "last resort" id.
	MaxPreKeyID = 0xFFFFFE
	// MaxPreKeysPerCall bounds Create's and NewPreKeys' count.
	MaxPreKeysPerCall = 10000
	// SignedPreKeyID is the id of the signed prekey Create makes.
	SignedPreKeyID = 1
	// MaxCiphertext is the largest envelope content Receive will parse.
	MaxCiphertext = 1 << 20

	keyLen        = 33 // serialized Curve25519 public key: 0x05 || 32 bytes
	privLen       = 32
	sigLen        = 64
	djbType       = 0x05
	versionByte   = 0x33 // Signal message version 3, current version 3
	nextPreKeyCtr = "e2ee.next_prekey_id"
)

// Errors. Compare with errors.Is.
var (
	// ErrNoDevice: Load found no identity in the store (run Create first).
	ErrNoDevice = errors.New("e2ee: no device identity in the store")
	// ErrDeviceExists: Create found an identity in the store already.
	ErrDeviceExists = errors.New("e2ee: the store already holds a device identity")
	// ErrNoSession: there is no session with that device (build one from a
	// prekey bundle first).
	ErrNoSession = errors.New("e2ee: no session")
	// ErrInvalidBundle: a prekey bundle is malformed (length, key type, id).
	ErrInvalidBundle = errors.New("e2ee: invalid prekey bundle")
	// ErrBadSignature: the bundle's signed prekey signature does not verify.
	// It also matches ErrInvalidBundle.
	ErrBadSignature = fmt.Errorf("%w: signed prekey signature does not verify", ErrInvalidBundle)
	// ErrIdentityChanged: a peer device's identity key differs from the one
	// trusted before. The operation succeeded and the new key is now trusted.
	ErrIdentityChanged = errors.New("e2ee: identity key changed")
	// ErrUntrustedIdentity: the identity verifier (SetIdentityVerifier)
	// rejected a remote identity key; no session was built or changed.
	ErrUntrustedIdentity = errors.New("e2ee: untrusted identity key")
	// ErrDecrypt: an envelope could not be decrypted or decoded. Receive
	// has recorded it as a failed history row and marked it seen: ack it.
	ErrDecrypt = errors.New("e2ee: cannot decrypt")
	// ErrInvalidEnvelope: Receive got no envelope or one with id 0; nothing
	// was recorded.
	ErrInvalidEnvelope = errors.New("e2ee: invalid envelope")
	// ErrUnsupportedType: Receive does not handle this envelope type. For
	// RECEIPT and GROUP_UPDATE nothing is recorded; other types it cannot
	// decrypt (unknown ones) are recorded as failed and the error wraps both
	// ErrDecrypt and ErrUnsupportedType.
	ErrUnsupportedType = errors.New("e2ee: envelope type not handled by Receive")
	// ErrInvalidArgument: a caller passed an unusable value (empty account,
	// device id 0, nil content, a count out of range).
	ErrInvalidArgument = errors.New("e2ee: invalid argument")

	errLibPanic = errors.New("libsignal panicked")
)

// ser encodes messages as protobuf and records as JSON. It is stateless.
var ser = serialize.NewProtoBufSerializer()

// ---------------------------------------------------------------- library logger

var libLog atomic.Pointer[func(level, caller, msg string)]

// SetLibraryLog sets where libsignal's warnings and errors go (level is
// "WARNING" or "ERROR"); nil discards them, which is the default. Its debug
// and info messages are always dropped.
func SetLibraryLog(fn func(level, caller, msg string)) {
	if fn == nil {
		libLog.Store(nil)
		return
	}
	libLog.Store(&fn)
}

type quietLogger struct{}

func (quietLogger) Debug(caller, msg string)   {}
func (quietLogger) Info(caller, msg string)    {}
func (quietLogger) Warning(caller, msg string) { forward("WARNING", caller, msg) }
func (quietLogger) Error(caller, msg string)   { forward("ERROR", caller, msg) }
func (quietLogger) Configure(settings string)  {}

func forward(level, caller, msg string) {
	if fn := libLog.Load(); fn != nil {
		(*fn)(level, caller, msg)
	}
}

func init() {
	var l logger.Loggable = quietLogger{}
	logger.Setup(&l)
}

// recovered counts the panics safe turned into errors (tests report it).
var recovered atomic.Int64

// safe runs f, turning a panic into an error.
func safe(f func() error) (err error) {
	defer func() {
		if r := recover(); r != nil {
			recovered.Add(1)
			err = fmt.Errorf("%w: %v", errLibPanic, r)
		}
	}()
	return f()
}

// ---------------------------------------------------------------- device

// Device is this device's Signal identity and the operations on its
// sessions. Its identity is loaded once; everything else is read from and
// written to the store per call, so several Devices (in several processes)
// may share one store. Methods are safe for concurrent use; calls that
// change Signal state are serialized.
type Device struct {
	st    *localstore.Store
	regID uint32
	pub   [32]byte // identity public key without the type byte
	priv  [32]byte

	onIDChange atomic.Pointer[func(account string, deviceID uint32)]
	verifier   atomic.Pointer[func(account string, deviceID uint32, identityKey []byte) error]

	mu sync.Mutex // serializes every call that changes Signal state
}

// Create generates this device's identity key pair, a registration id in
// 1..16380, signed prekey SignedPreKeyID and oneTime one-time prekeys (ids
// from 1), and saves them in st in one transaction. It fails with
// ErrDeviceExists if st already has an identity.
func Create(ctx context.Context, st *localstore.Store, oneTime int) (*Device, error) {
	if oneTime < 0 || oneTime > MaxPreKeysPerCall {
		return nil, fmt.Errorf("%w: %d one-time prekeys", ErrInvalidArgument, oneTime)
	}
	n, err := rand.Int(rand.Reader, big.NewInt(MaxRegistrationID))
	if err != nil {
		return nil, fmt.Errorf("e2ee: %w", err)
	}
	idKey, err := ecc.GenerateKeyPair()
	if err != nil {
		return nil, fmt.Errorf("e2ee: %w", err)
	}
	d := &Device{st: st, regID: uint32(n.Int64()) + 1}
	d.pub = idKey.PublicKey().PublicKey()
	d.priv = idKey.PrivateKey().Serialize()

	spk, err := d.newSignedPreKey(SignedPreKeyID)
	if err != nil {
		return nil, err
	}
	err = st.Update(ctx, func(tx *localstore.Tx) error {
		err := tx.CreateLocalIdentity(ctx, localstore.LocalIdentity{
			PublicKey: d.IdentityKey(), PrivateKey: d.priv[:], RegistrationID: d.regID,
		})
		if errors.Is(err, localstore.ErrExists) {
			return ErrDeviceExists
		}
		if err != nil {
			return err
		}
		if err := tx.SaveSignedPreKey(ctx, spk); err != nil {
			return err
		}
		_, err = d.addPreKeys(ctx, tx, oneTime)
		return err
	})
	if err != nil {
		return nil, err
	}
	return d, nil
}

// Load opens the device saved in st by Create. It fails with ErrNoDevice if
// there is none.
func Load(ctx context.Context, st *localstore.Store) (*Device, error) {
	var id localstore.LocalIdentity
	var spks []localstore.SignedKeyPair
	var ok bool
	err := st.View(ctx, func(tx *localstore.Tx) error {
		var err error
		if id, ok, err = tx.LocalIdentity(ctx); err != nil || !ok {
			return err
		}
		spks, err = tx.SignedPreKeys(ctx)
		return err
	})
	if err != nil {
		return nil, err
	}
	if !ok {
		return nil, ErrNoDevice
	}
	if !validKey(id.PublicKey) || len(id.PrivateKey) != privLen ||
		id.RegistrationID < 1 || id.RegistrationID > MaxRegistrationID {
		return nil, fmt.Errorf("%w: identity", errCorrupt)
	}
	if len(spks) == 0 {
		return nil, fmt.Errorf("%w: no signed prekey", errCorrupt)
	}
	s := spks[len(spks)-1]
	if !validKey(s.PublicKey) || len(s.Signature) != sigLen {
		return nil, fmt.Errorf("%w: signed prekey %d", errCorrupt, s.ID)
	}
	d := &Device{st: st, regID: id.RegistrationID}
	copy(d.pub[:], id.PublicKey[1:])
	copy(d.priv[:], id.PrivateKey)
	return d, nil
}

// RegistrationID is this device's Signal registration id (1..16380).
func (d *Device) RegistrationID() uint32 { return d.regID }

// IdentityKey is this device's public identity key: 33 bytes, 0x05 prefix.
// The slice is the caller's.
func (d *Device) IdentityKey() []byte { return append([]byte{djbType}, d.pub[:]...) }

// identityKeyPair builds a fresh libsignal key pair (nothing shared).
func (d *Device) identityKeyPair() *identity.KeyPair {
	return identity.NewKeyPair(identity.NewKey(ecc.NewDjbECPublicKey(d.pub)), ecc.NewDjbECPrivateKey(d.priv))
}

func (d *Device) newSignedPreKey(id uint32) (localstore.SignedKeyPair, error) {
	kp, err := ecc.GenerateKeyPair()
	if err != nil {
		return localstore.SignedKeyPair{}, fmt.Errorf("e2ee: %w", err)
	}
	pub := kp.PublicKey().Serialize()
	var sig [64]byte
	if err := safe(func() error {
		sig = ecc.CalculateSignature(ecc.NewDjbECPrivateKey(d.priv), pub)
		return nil
	}); err != nil {
		return localstore.SignedKeyPair{}, fmt.Errorf("e2ee: sign prekey: %w", err)
	}
	priv := kp.PrivateKey().Serialize()
	return localstore.SignedKeyPair{
		KeyPair:     localstore.KeyPair{ID: id, PublicKey: pub, PrivateKey: priv[:]},
		Signature:   sig[:],
		TimestampMs: time.Now().UnixMilli(),
	}, nil
}

// addPreKeys generates and saves n one-time prekeys with the next free ids.
func (d *Device) addPreKeys(ctx context.Context, tx *localstore.Tx, n int) ([]*wirepb.PreKey, error) {
	next, err := tx.Counter(ctx, nextPreKeyCtr)
	if err != nil {
		return nil, err
	}
	out := make([]*wirepb.PreKey, 0, n)
	for len(out) < n {
		if next < 1 || next > MaxPreKeyID {
			next = 1
		}
		id := uint32(next)
		next++
		// After a wrap-around, skip ids that are still unused.
		if _, exists, err := tx.PreKey(ctx, id); err != nil {
			return nil, err
		} else if exists {
			continue
		}
		kp, err := ecc.GenerateKeyPair()
		if err != nil {
			return nil, fmt.Errorf("e2ee: %w", err)
		}
		priv := kp.PrivateKey().Serialize()
		k := localstore.KeyPair{ID: id, PublicKey: kp.PublicKey().Serialize(), PrivateKey: priv[:]}
		if err := tx.SavePreKey(ctx, k); err != nil {
			return nil, err
		}
		out = append(out, &wirepb.PreKey{Id: id, PublicKey: k.PublicKey})
	}
	if err := tx.SetCounter(ctx, nextPreKeyCtr, next); err != nil {
		return nil, err
	}
	return out, nil
}

// InitialUpload returns what the first UploadKeys carries: the identity key,
// the newest signed prekey and every unused one-time prekey.
func (d *Device) InitialUpload(ctx context.Context) (*wirepb.UploadKeys, error) {
	up := &wirepb.UploadKeys{IdentityKey: d.IdentityKey()}
	err := d.st.View(ctx, func(tx *localstore.Tx) error {
		spks, err := tx.SignedPreKeys(ctx)
		if err != nil {
			return err
		}
		if len(spks) == 0 {
			return fmt.Errorf("%w: no signed prekey", errCorrupt)
		}
		s := spks[len(spks)-1]
		up.SignedPrekey = &wirepb.SignedPreKey{Id: s.ID, PublicKey: s.PublicKey, Signature: s.Signature}
		pks, err := tx.PreKeys(ctx)
		if err != nil {
			return err
		}
		for _, k := range pks {
			up.OneTimePrekeys = append(up.OneTimePrekeys, &wirepb.PreKey{Id: k.ID, PublicKey: k.PublicKey})
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	return up, nil
}

// NewPreKeys generates and saves n more one-time prekeys (the next ids) and
// returns the UploadKeys that publishes them (identity key set, no signed
// prekey).
func (d *Device) NewPreKeys(ctx context.Context, n int) (*wirepb.UploadKeys, error) {
	if n < 1 || n > MaxPreKeysPerCall {
		return nil, fmt.Errorf("%w: %d one-time prekeys", ErrInvalidArgument, n)
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	up := &wirepb.UploadKeys{IdentityKey: d.IdentityKey()}
	err := d.st.Update(ctx, func(tx *localstore.Tx) error {
		var err error
		up.OneTimePrekeys, err = d.addPreKeys(ctx, tx, n)
		return err
	})
	if err != nil {
		return nil, err
	}
	return up, nil
}

// PreKeyCount is the number of unused one-time prekeys this device holds.
func (d *Device) PreKeyCount(ctx context.Context) (int, error) {
	var n int
	err := d.st.View(ctx, func(tx *localstore.Tx) error {
		var err error
		n, err = tx.PreKeyCount(ctx)
		return err
	})
	return n, err
}

// SetIdentityChangeHandler sets a function called (after the change is
// committed) whenever Receive accepts a message from a device whose identity
// key differs from the one trusted before; the new key is trusted from then
// on. BuildSession reports the same with ErrIdentityChanged instead. nil
// removes the handler.
func (d *Device) SetIdentityChangeHandler(fn func(account string, deviceID uint32)) {
	if fn == nil {
		d.onIDChange.Store(nil)
		return
	}
	d.onIDChange.Store(&fn)
}

func validKey(k []byte) bool { return len(k) == keyLen && k[0] == djbType }

// IdentityPrivateKey is this device's identity private key, for signing
// device lists (the primary) with XEdDSA. It never leaves the device.
func (d *Device) IdentityPrivateKey() ecc.ECPrivateKeyable {
	return ecc.NewDjbECPrivateKey(d.priv)
}

// SetIdentityVerifier installs a check every remote identity key must pass
// before a session is built with it or a session-creating message is
// accepted (the client checks keys against verified, signed device lists).
// A key it rejects makes BuildSession fail and Receive record the message as
// failed, with the verifier's error wrapped.
func (d *Device) SetIdentityVerifier(fn func(account string, deviceID uint32, identityKey []byte) error) {
	if fn == nil {
		d.verifier.Store(nil)
		return
	}
	d.verifier.Store(&fn)
}
