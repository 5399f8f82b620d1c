package e2ee

import (
	"context"
	"errors"
	"fmt"

	"go.mau.fi/libsignal/ecc"
	"go.mau.fi/libsignal/keys/identity"
	"go.mau.fi/libsignal/protocol"
	"go.mau.fi/libsignal/state/record"
	"go.mau.fi/libsignal/state/store"

	"github.com/ferryhq/ferry/client/localstore"
)

// sigStore gives libsignal the store interfaces it wants (IdentityKey,
// PreKey, SignedPreKey, Session) on top of one localstore transaction. It
// keeps nothing but bytes: each load builds new records, so nothing libsignal
// mutates is shared with the store or with a later call.
type sigStore struct {
	d  *Device
	tx *localstore.Tx

	// err is the first storage error a store call hit. It tells a local
	// failure (retry later, do not ack) from a cryptographic one.
	err error
	// changed lists addresses whose trusted identity key was replaced.
	changed []*protocol.SignalAddress
	// untrusted is the identity verifier's error, if it rejected a key.
	untrusted error
}

var (
	_ store.IdentityKey  = (*sigStore)(nil)
	_ store.PreKey       = (*sigStore)(nil)
	_ store.SignedPreKey = (*sigStore)(nil)
	_ store.Session      = (*sigStore)(nil)
)

func (d *Device) sigStore(tx *localstore.Tx) *sigStore { return &sigStore{d: d, tx: tx} }

// fail remembers a storage error and returns it.
func (s *sigStore) fail(err error) error {
	if err != nil && s.err == nil {
		s.err = err
	}
	return err
}

// errCorrupt marks stored Signal state that does not decode. It is not a
// storage (retryable) error.
var errCorrupt = errors.New("e2ee: stored Signal state is corrupt")

// --- IdentityKey

func (s *sigStore) GetIdentityKeyPair() *identity.KeyPair { return s.d.identityKeyPair() }

func (s *sigStore) GetLocalRegistrationID() uint32 { return s.d.regID }

func (s *sigStore) SaveIdentity(ctx context.Context, addr *protocol.SignalAddress, key *identity.Key) error {
	if key == nil || key.PublicKey() == nil {
		return errors.New("e2ee: nil identity key")
	}
	k := key.Serialize()
	if !validKey(k) {
		return errors.New("e2ee: malformed identity key")
	}
	if v := s.d.verifier.Load(); v != nil {
		if err := (*v)(addr.Name(), addr.DeviceID(), k); err != nil {
			s.untrusted = err
			return fmt.Errorf("%w %s: %w", ErrUntrustedIdentity, addr, err)
		}
	}
	replaced, err := s.tx.SaveRemoteIdentity(ctx, addr.String(), k)
	if err != nil {
		return s.fail(err)
	}
	if replaced != nil {
		s.changed = append(s.changed, protocol.NewSignalAddress(addr.Name(), addr.DeviceID()))
	}
	return nil
}

// IsTrustedIdentity asks the device's identity verifier (see
// Device.SetIdentityVerifier) if one is set; without one it trusts every
// key: on first use it is recorded, and a changed key is accepted, recorded
// and reported (see SaveIdentity and the package documentation).
func (s *sigStore) IsTrustedIdentity(ctx context.Context, addr *protocol.SignalAddress, key *identity.Key) (bool, error) {
	v := s.d.verifier.Load()
	if v == nil {
		return true, nil
	}
	if key == nil || key.PublicKey() == nil {
		return false, nil
	}
	k := key.Serialize()
	if !validKey(k) {
		return false, nil
	}
	if err := (*v)(addr.Name(), addr.DeviceID(), k); err != nil {
		s.untrusted = err
		return false, nil
	}
	return true, nil
}

// --- PreKey

func (s *sigStore) LoadPreKey(ctx context.Context, id uint32) (*record.PreKey, error) {
	k, ok, err := s.tx.PreKey(ctx, id)
	if err != nil {
		return nil, s.fail(err)
	}
	if !ok {
		return nil, nil // libsignal: ErrNoOneTimeKeyFound
	}
	kp, err := keyPair(k.PublicKey, k.PrivateKey)
	if err != nil {
		return nil, err
	}
	return record.NewPreKey(id, kp, ser.PreKeyRecord), nil
}

func (s *sigStore) StorePreKey(ctx context.Context, id uint32, r *record.PreKey) error {
	if r == nil || r.KeyPair() == nil {
		return errors.New("e2ee: nil prekey")
	}
	priv := r.KeyPair().PrivateKey().Serialize()
	return s.fail(s.tx.SavePreKey(ctx, localstore.KeyPair{
		ID: id, PublicKey: r.KeyPair().PublicKey().Serialize(), PrivateKey: priv[:],
	}))
}

func (s *sigStore) ContainsPreKey(ctx context.Context, id uint32) (bool, error) {
	_, ok, err := s.tx.PreKey(ctx, id)
	return ok, s.fail(err)
}

func (s *sigStore) RemovePreKey(ctx context.Context, id uint32) error {
	return s.fail(s.tx.RemovePreKey(ctx, id))
}

// --- SignedPreKey

func signedRecord(k localstore.SignedKeyPair) (*record.SignedPreKey, error) {
	kp, err := keyPair(k.PublicKey, k.PrivateKey)
	if err != nil {
		return nil, err
	}
	if len(k.Signature) != sigLen {
		return nil, errCorrupt
	}
	return record.NewSignedPreKey(k.ID, k.TimestampMs, kp, [64]byte(k.Signature), ser.SignedPreKeyRecord), nil
}

func (s *sigStore) LoadSignedPreKey(ctx context.Context, id uint32) (*record.SignedPreKey, error) {
	k, ok, err := s.tx.SignedPreKey(ctx, id)
	if err != nil {
		return nil, s.fail(err)
	}
	if !ok {
		return nil, nil // libsignal: ErrNoSignedPreKey
	}
	return signedRecord(k)
}

func (s *sigStore) LoadSignedPreKeys(ctx context.Context) ([]*record.SignedPreKey, error) {
	ks, err := s.tx.SignedPreKeys(ctx)
	if err != nil {
		return nil, s.fail(err)
	}
	out := make([]*record.SignedPreKey, 0, len(ks))
	for _, k := range ks {
		r, err := signedRecord(k)
		if err != nil {
			return nil, err
		}
		out = append(out, r)
	}
	return out, nil
}

func (s *sigStore) StoreSignedPreKey(ctx context.Context, id uint32, r *record.SignedPreKey) error {
	if r == nil || r.KeyPair() == nil {
		return errors.New("e2ee: nil signed prekey")
	}
	priv := r.KeyPair().PrivateKey().Serialize()
	sig := r.Signature()
	return s.fail(s.tx.SaveSignedPreKey(ctx, localstore.SignedKeyPair{
		KeyPair:     localstore.KeyPair{ID: id, PublicKey: r.KeyPair().PublicKey().Serialize(), PrivateKey: priv[:]},
		Signature:   sig[:],
		TimestampMs: r.Timestamp(),
	}))
}

func (s *sigStore) ContainsSignedPreKey(ctx context.Context, id uint32) (bool, error) {
	_, ok, err := s.tx.SignedPreKey(ctx, id)
	return ok, s.fail(err)
}

func (s *sigStore) RemoveSignedPreKey(ctx context.Context, id uint32) error {
	return s.fail(s.tx.RemoveSignedPreKey(ctx, id))
}

// --- Session

// LoadSession returns a new record decoded from the stored bytes, or a new
// empty record (never nil) if there is none.
func (s *sigStore) LoadSession(ctx context.Context, addr *protocol.SignalAddress) (*record.Session, error) {
	b, ok, err := s.tx.Session(ctx, addr.String())
	if err != nil {
		return nil, s.fail(err)
	}
	if !ok {
		return record.NewSession(ser.Session, ser.State), nil
	}
	var r *record.Session
	if err := safe(func() error {
		var err error
		r, err = record.NewSessionFromBytes(b, ser.Session, ser.State)
		return err
	}); err != nil || r == nil {
		return nil, fmt.Errorf("%w: session %s: %v", errCorrupt, addr, err)
	}
	return r, nil
}

func (s *sigStore) GetSubDeviceSessions(ctx context.Context, name string) ([]uint32, error) {
	ids, err := s.tx.SessionDevices(ctx, name)
	return ids, s.fail(err)
}

func (s *sigStore) StoreSession(ctx context.Context, addr *protocol.SignalAddress, r *record.Session) error {
	if r == nil {
		return errors.New("e2ee: nil session record")
	}
	return s.fail(s.tx.SaveSession(ctx, addr.String(), addr.Name(), addr.DeviceID(), r.Serialize()))
}

func (s *sigStore) ContainsSession(ctx context.Context, addr *protocol.SignalAddress) (bool, error) {
	ok, err := s.tx.HasSession(ctx, addr.String())
	return ok, s.fail(err)
}

func (s *sigStore) DeleteSession(ctx context.Context, addr *protocol.SignalAddress) error {
	return s.fail(s.tx.DeleteSession(ctx, addr.String()))
}

func (s *sigStore) DeleteAllSessions(ctx context.Context) error {
	return s.fail(s.tx.DeleteAllSessions(ctx))
}

// keyPair rebuilds a libsignal key pair from stored bytes (33-byte public key
// with type byte, 32-byte private key), checking both.
func keyPair(pub, priv []byte) (*ecc.ECKeyPair, error) {
	if !validKey(pub) || len(priv) != privLen {
		return nil, errCorrupt
	}
	return ecc.NewECKeyPair(ecc.NewDjbECPublicKey([32]byte(pub[1:])), ecc.NewDjbECPrivateKey([32]byte(priv))), nil
}
