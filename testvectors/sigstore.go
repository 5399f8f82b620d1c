package testvectors

import (
	"context"
	"errors"

	groupRecord "go.mau.fi/libsignal/groups/state/record"
	"go.mau.fi/libsignal/keys/identity"
	"go.mau.fi/libsignal/protocol"
	"go.mau.fi/libsignal/serialize"
	"go.mau.fi/libsignal/state/record"
)

// memStore is an in-memory libsignal store for one party of a vector. As
// libsignal-notes.md asks, records are kept serialized and handed out as
// fresh copies, and missing records are new empty ones, not nil.
type memStore struct {
	idKey      *identity.KeyPair
	regID      uint32
	identities map[string][]byte
	preKeys    map[uint32]*record.PreKey
	signed     map[uint32]*record.SignedPreKey
	sessions   map[string][]byte
	senderKeys map[string][]byte
}

var ser = serialize.NewProtoBufSerializer()

func newMemStore(id *identity.KeyPair, regID uint32) *memStore {
	return &memStore{idKey: id, regID: regID, identities: map[string][]byte{}, preKeys: map[uint32]*record.PreKey{},
		signed: map[uint32]*record.SignedPreKey{}, sessions: map[string][]byte{}, senderKeys: map[string][]byte{}}
}

func (s *memStore) GetIdentityKeyPair() *identity.KeyPair { return s.idKey }
func (s *memStore) GetLocalRegistrationID() uint32        { return s.regID }
func (s *memStore) SaveIdentity(_ context.Context, a *protocol.SignalAddress, k *identity.Key) error {
	s.identities[a.String()] = k.Serialize()
	return nil
}
func (s *memStore) IsTrustedIdentity(context.Context, *protocol.SignalAddress, *identity.Key) (bool, error) {
	return true, nil
}

func (s *memStore) LoadPreKey(_ context.Context, id uint32) (*record.PreKey, error) {
	return s.preKeys[id], nil
}
func (s *memStore) StorePreKey(_ context.Context, id uint32, r *record.PreKey) error {
	s.preKeys[id] = r
	return nil
}
func (s *memStore) ContainsPreKey(_ context.Context, id uint32) (bool, error) {
	_, ok := s.preKeys[id]
	return ok, nil
}
func (s *memStore) RemovePreKey(_ context.Context, id uint32) error {
	delete(s.preKeys, id)
	return nil
}

func (s *memStore) LoadSignedPreKey(_ context.Context, id uint32) (*record.SignedPreKey, error) {
	return s.signed[id], nil
}
func (s *memStore) LoadSignedPreKeys(context.Context) ([]*record.SignedPreKey, error) {
	var out []*record.SignedPreKey
	for _, r := range s.signed {
		out = append(out, r)
	}
	return out, nil
}
func (s *memStore) StoreSignedPreKey(_ context.Context, id uint32, r *record.SignedPreKey) error {
	s.signed[id] = r
	return nil
}
func (s *memStore) ContainsSignedPreKey(_ context.Context, id uint32) (bool, error) {
	_, ok := s.signed[id]
	return ok, nil
}
func (s *memStore) RemoveSignedPreKey(_ context.Context, id uint32) error {
	delete(s.signed, id)
	return nil
}

func (s *memStore) LoadSession(_ context.Context, a *protocol.SignalAddress) (*record.Session, error) {
	b, ok := s.sessions[a.String()]
	if !ok {
		return record.NewSession(ser.Session, ser.State), nil
	}
	return record.NewSessionFromBytes(b, ser.Session, ser.State)
}
func (s *memStore) GetSubDeviceSessions(context.Context, string) ([]uint32, error) { return nil, nil }
func (s *memStore) StoreSession(_ context.Context, a *protocol.SignalAddress, r *record.Session) error {
	if r == nil {
		return errors.New("nil session")
	}
	s.sessions[a.String()] = r.Serialize()
	return nil
}
func (s *memStore) ContainsSession(_ context.Context, a *protocol.SignalAddress) (bool, error) {
	_, ok := s.sessions[a.String()]
	return ok, nil
}
func (s *memStore) DeleteSession(_ context.Context, a *protocol.SignalAddress) error {
	delete(s.sessions, a.String())
	return nil
}
func (s *memStore) DeleteAllSessions(context.Context) error { clear(s.sessions); return nil }

func skKey(n *protocol.SenderKeyName) string { return n.GroupID() + "/" + n.Sender().String() }

func (s *memStore) LoadSenderKey(_ context.Context, n *protocol.SenderKeyName) (*groupRecord.SenderKey, error) {
	b, ok := s.senderKeys[skKey(n)]
	if !ok {
		return groupRecord.NewSenderKey(ser.SenderKeyRecord, ser.SenderKeyState), nil
	}
	return groupRecord.NewSenderKeyFromBytes(b, ser.SenderKeyRecord, ser.SenderKeyState)
}
func (s *memStore) StoreSenderKey(_ context.Context, n *protocol.SenderKeyName, r *groupRecord.SenderKey) error {
	if r == nil {
		return errors.New("nil sender key")
	}
	s.senderKeys[skKey(n)] = r.Serialize()
	return nil
}
