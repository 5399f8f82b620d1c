package e2ee

import (
	"bytes"
	"context"
	"crypto/sha256"
	"crypto/subtle"
	"errors"
	"fmt"

	"go.mau.fi/libsignal/groups"
	groupRecord "go.mau.fi/libsignal/groups/state/record"
	groupStore "go.mau.fi/libsignal/groups/state/store"
	"go.mau.fi/libsignal/protocol"
	"go.mau.fi/libsignal/signalerror"
	"google.golang.org/protobuf/proto"

	"github.com/ferryhq/ferry/client/localstore"
	"github.com/ferryhq/ferry/wire/wirepb"
)

// Groups use Signal sender keys. Each device has one sending key per group
// (a chain key and a signing key pair); it hands the key to every other
// member device as a SenderKeyDistributionMessage (SKDM) inside a pairwise
// Signal message (Content.sender_key), and then encrypts each group message
// once (GroupEncrypt) for the server to fan out as a SENDER_KEY_MESSAGE
// envelope. Receivers keep one record per (group, sending device).
//
// libsignal's sender-key messages are signed but carry no MAC: a chain key
// that is wrong for a message (corrupt state, a key id collision) can
// decrypt it to garbage without an error. Every group Content therefore
// carries group_check = SHA-256(group_id || text)[:16], which Receive
// verifies after unpadding and decoding; it also binds the message to the
// group id the envelope names.
//
// Key rotation: RotateSenderKey forgets this device's sending key for a
// group; the next SenderKeyDistribution makes a new one
// (new key id, new chain), which devices that only hold the old key cannot
// decrypt (they get ErrNoSenderKey). Rotate when a member or a device
// leaves, then distribute the new key to the remaining devices.

// Group limits.
const (
	// MaxGroupIDLen bounds a group id (the server's are 32 hex characters).
	MaxGroupIDLen = 64
	// GroupCheckLen is the length of Content.group_check.
	GroupCheckLen = 16
	// maxSKDM bounds a serialized SenderKeyDistributionMessage (a real one
	// is about 80 bytes).
	maxSKDM         = 1024
	chainKeyLen     = 32
	signatureLen    = 64
	minSenderKeyMsg = 1 + 2 + 16 + signatureLen // version, ciphertext field header, one block, signature
)

// Group errors. Compare with errors.Is.
var (
	// ErrNoSenderKey: a group message came from a device whose sender key
	// (for that group, or with that key id) this device does not hold. It
	// is recorded as failed like any ErrDecrypt; the sender may be asked to
	// distribute its key again, but this message stays unreadable.
	// GroupEncrypt returns it when this device has no sending key for the
	// group yet (call SenderKeyDistribution first).
	ErrNoSenderKey = errors.New("e2ee: no sender key")
	// ErrInvalidSenderKey: a pairwise message carried a malformed sender key
	// distribution (bad group id, empty, truncated or otherwise invalid
	// SenderKeyDistributionMessage bytes). Receive wraps it in ErrDecrypt.
	ErrInvalidSenderKey = errors.New("e2ee: invalid sender key distribution")
	// errGroupCheck: a group message decrypted, but its group_check does
	// not match its group and text.
	errGroupCheck = errors.New("group check does not match")
)

// ownSender is the libsignal address under which this device's own
// sending keys are kept (stored as localstore.OwnSenderKey). No real device
// has an empty account name.
var ownSender = protocol.NewSignalAddress("", 0)

// validGroupID: 1..MaxGroupIDLen printable ASCII bytes.
func validGroupID(id string) bool {
	if len(id) == 0 || len(id) > MaxGroupIDLen {
		return false
	}
	for i := 0; i < len(id); i++ {
		if id[i] < 0x21 || id[i] > 0x7e {
			return false
		}
	}
	return true
}

// GroupCheck is Content.group_check for a group message: the first 16
// bytes of SHA-256(groupID || text).
func GroupCheck(groupID, text string) []byte {
	h := sha256.New()
	h.Write([]byte(groupID))
	h.Write([]byte(text))
	return h.Sum(nil)[:GroupCheckLen]
}

// ---------------------------------------------------------------- store

var _ groupStore.SenderKey = (*sigStore)(nil)

// senderKeyCol maps a SenderKeyName to the store's (group id, sender).
func senderKeyCol(n *protocol.SenderKeyName) (string, string, error) {
	if n == nil || n.Sender() == nil || !validGroupID(n.GroupID()) {
		return "", "", errors.New("e2ee: invalid sender key name")
	}
	if n.Sender().Name() == "" {
		return n.GroupID(), localstore.OwnSenderKey, nil
	}
	return n.GroupID(), n.Sender().String(), nil
}

// LoadSenderKey returns a new record decoded from the stored bytes, or a new
// empty record (never nil) if there is none.
func (s *sigStore) LoadSenderKey(ctx context.Context, n *protocol.SenderKeyName) (*groupRecord.SenderKey, error) {
	g, sender, err := senderKeyCol(n)
	if err != nil {
		return nil, err
	}
	b, ok, err := s.tx.SenderKey(ctx, g, sender)
	if err != nil {
		return nil, s.fail(err)
	}
	if !ok {
		return groupRecord.NewSenderKey(ser.SenderKeyRecord, ser.SenderKeyState), nil
	}
	var r *groupRecord.SenderKey
	if err := safe(func() error {
		st, err := ser.SenderKeyRecord.Deserialize(b)
		if err != nil {
			return err
		}
		if err := checkSenderKeyRecord(st); err != nil {
			return err
		}
		r, err = groupRecord.NewSenderKeyFromStruct(st, ser.SenderKeyRecord, ser.SenderKeyState)
		return err
	}); err != nil || r == nil {
		return nil, fmt.Errorf("%w: sender key %s/%s: %v", errCorrupt, g, sender, err)
	}
	return r, nil
}

// checkSenderKeyRecord checks that every field libsignal dereferences or
// decodes is present and well formed.
func checkSenderKeyRecord(r *groupRecord.SenderKeyStructure) error {
	if r == nil {
		return errors.New("no record")
	}
	for _, st := range r.SenderKeyStates {
		switch {
		case st == nil:
			return errors.New("nil state")
		case st.SenderChainKey == nil || len(st.SenderChainKey.ChainKey) != chainKeyLen:
			return errors.New("malformed chain key")
		case !validKey(st.SigningKeyPublic):
			return errors.New("malformed signing key")
		case st.SigningKeyPrivate != nil && len(st.SigningKeyPrivate) != privLen:
			return errors.New("malformed signing private key")
		}
		for _, k := range st.Keys {
			if k == nil || len(k.CipherKey) != 32 || len(k.IV) != 16 {
				return errors.New("malformed message key")
			}
		}
	}
	return nil
}

func (s *sigStore) StoreSenderKey(ctx context.Context, n *protocol.SenderKeyName, r *groupRecord.SenderKey) error {
	g, sender, err := senderKeyCol(n)
	if err != nil {
		return err
	}
	if r == nil {
		return errors.New("e2ee: nil sender key record")
	}
	b := r.Serialize()
	if len(b) == 0 {
		return errors.New("e2ee: sender key record does not serialize")
	}
	return s.fail(s.tx.SaveSenderKey(ctx, g, sender, b))
}

// ---------------------------------------------------------------- sending

// SenderKeyDistribution returns this device's SenderKeyDistributionMessage
// for the group, as bytes for Content.sender_key.message: its current key id,
// chain iteration, chain key and public signing key. The first call for a
// group (and the first after RotateSenderKey) creates the key and commits it
// before returning. A device that processes it can decrypt this device's
// group messages from the current iteration on, not earlier ones.
func (d *Device) SenderKeyDistribution(ctx context.Context, groupID string) ([]byte, error) {
	if !validGroupID(groupID) {
		return nil, fmt.Errorf("%w: group id %q", ErrInvalidArgument, groupID)
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	var out []byte
	err := d.st.Update(ctx, func(tx *localstore.Tx) error {
		ss := d.sigStore(tx)
		name := protocol.NewSenderKeyName(groupID, ownSender)
		err := safe(func() error {
			m, err := groups.NewGroupSessionBuilder(ss, ser).Create(ctx, name)
			if err != nil {
				return err
			}
			out = m.Serialize()
			return nil
		})
		if err != nil {
			if ss.err != nil {
				return ss.err
			}
			return fmt.Errorf("e2ee: sender key for %s: %w", groupID, err)
		}
		if _, err := checkSKDM(out); err != nil {
			return fmt.Errorf("e2ee: sender key for %s: made an invalid distribution message: %w", groupID, err)
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	return out, nil
}

// RotateSenderKey forgets this device's sending key for the group and
// empties the group's distribution set (localstore.Store.Distributed), in
// one transaction. The next SenderKeyDistribution makes a new key (until
// then GroupEncrypt fails with ErrNoSenderKey), which devices holding only
// the old one cannot decrypt: rotate when a member or a device leaves the
// group, then distribute the new key to the remaining devices. Keys
// received from other devices are kept.
func (d *Device) RotateSenderKey(ctx context.Context, groupID string) error {
	if !validGroupID(groupID) {
		return fmt.Errorf("%w: group id %q", ErrInvalidArgument, groupID)
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.st.Update(ctx, func(tx *localstore.Tx) error {
		if err := tx.DeleteSenderKey(ctx, groupID, localstore.OwnSenderKey); err != nil {
			return err
		}
		return tx.ResetDistributed(ctx, groupID)
	})
}

// ForgetGroup deletes every sender key of the group (this device's own and
// those received) and empties its distribution set, e.g. after this account
// left or was removed. Group messages that arrive later fail with
// ErrNoSenderKey. The group row and its history are kept.
func (d *Device) ForgetGroup(ctx context.Context, groupID string) error {
	if !validGroupID(groupID) {
		return fmt.Errorf("%w: group id %q", ErrInvalidArgument, groupID)
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.st.Update(ctx, func(tx *localstore.Tx) error {
		if err := tx.DeleteSenderKeys(ctx, groupID); err != nil {
			return err
		}
		return tx.ResetDistributed(ctx, groupID)
	})
}

// HasSenderKey reports whether this device holds the sender key of device
// (account, deviceID) for the group.
func (d *Device) HasSenderKey(ctx context.Context, groupID, account string, deviceID uint32) (bool, error) {
	var ok bool
	err := d.st.View(ctx, func(tx *localstore.Tx) error {
		var err error
		_, ok, err = tx.SenderKey(ctx, groupID, protocol.NewSignalAddress(account, deviceID).String())
		return err
	})
	return ok, err
}

// GroupEncrypt encrypts c once for every member device of the group with
// this device's sender key. It sets c.GroupCheck, pads the encoded Content
// and returns the signed SenderKeyMessage bytes for GroupSend.content (type
// SENDER_KEY_MESSAGE). The chain step is committed (fsynced) before it
// returns. c must not carry a history chunk or a sender key distribution
// (those go pairwise only).
//
// It does not create the key: without one (first use, or after
// RotateSenderKey) it fails with ErrNoSenderKey. Order matters: a
// distribution message carries the chain's current iteration, so a device
// can read only messages encrypted after the SenderKeyDistribution call
// that made what it got. Send: SenderKeyDistribution, hand the result to
// every member device that lacks it (pairwise), then GroupEncrypt.
func (d *Device) GroupEncrypt(ctx context.Context, groupID string, c *wirepb.Content) ([]byte, error) {
	if !validGroupID(groupID) || c == nil || c.History != nil || c.SenderKey != nil {
		return nil, fmt.Errorf("%w: group encrypt for %q", ErrInvalidArgument, groupID)
	}
	c.GroupCheck = GroupCheck(groupID, c.Text)
	pt, err := proto.Marshal(c)
	if err != nil {
		return nil, fmt.Errorf("e2ee: encode content: %w", err)
	}
	return d.groupEncryptRaw(ctx, groupID, Pad(pt))
}

// groupEncryptRaw is GroupEncrypt of an already padded plaintext.
func (d *Device) groupEncryptRaw(ctx context.Context, groupID string, padded []byte) ([]byte, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	var out []byte
	err := d.st.Update(ctx, func(tx *localstore.Tx) error {
		ss := d.sigStore(tx)
		name := protocol.NewSenderKeyName(groupID, ownSender)
		rec, err := ss.LoadSenderKey(ctx, name)
		if err != nil {
			return err
		}
		if rec.IsEmpty() {
			return fmt.Errorf("%w: this device has no sending key for group %s (call SenderKeyDistribution "+
				"and hand its result to the member devices first)", ErrNoSenderKey, groupID)
		}
		err = safe(func() error {
			m, err := groups.NewGroupCipher(groups.NewGroupSessionBuilder(ss, ser), name, ss).Encrypt(ctx, padded)
			if err != nil {
				return err
			}
			out = m.SignedSerialize() // Serialize() would drop the signature
			return nil
		})
		if err != nil {
			if ss.err != nil {
				return ss.err
			}
			return fmt.Errorf("e2ee: group encrypt for %s: %w", groupID, err)
		}
		if _, err := checkSenderKeyMessage(out); err != nil {
			return fmt.Errorf("e2ee: group encrypt for %s: made an invalid message: %w", groupID, err)
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	return out, nil
}

// ---------------------------------------------------------------- receiving

// checkSKDM validates serialized SenderKeyDistributionMessage bytes
// completely before libsignal builds one from them (its parser panics on
// empty input and empty keys).
func checkSKDM(b []byte) (*protocol.SenderKeyDistributionMessageStructure, error) {
	switch {
	case len(b) < 2:
		return nil, fmt.Errorf("%w: %d bytes", errMalformed, len(b))
	case len(b) > maxSKDM:
		return nil, fmt.Errorf("%w: %d bytes", errMalformed, len(b))
	case b[0] != versionByte:
		return nil, errVersion
	}
	var s *protocol.SenderKeyDistributionMessageStructure
	err := safe(func() error {
		var err error
		if s, err = ser.SenderKeyDistributionMessage.Deserialize(b); err != nil {
			return fmt.Errorf("%w: %w", errMalformed, err)
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	switch {
	case s.Version != protocol.CurrentVersion:
		return nil, errVersion
	case len(s.ChainKey) != chainKeyLen:
		return nil, fmt.Errorf("%w: chain key of %d bytes", errMalformed, len(s.ChainKey))
	case !validKey(s.SigningKey):
		return nil, fmt.Errorf("%w: signing key", errMalformed)
	}
	return s, nil
}

// checkSenderKeyMessage validates serialized SenderKeyMessage bytes
// (version byte, signature length, ciphertext a non-empty multiple of the
// AES block: libsignal's CBC decryption panics on other lengths).
func checkSenderKeyMessage(b []byte) (*protocol.SenderKeyMessageStructure, error) {
	switch {
	case len(b) < minSenderKeyMsg:
		return nil, fmt.Errorf("%w: %d bytes", errMalformed, len(b))
	case len(b) > MaxCiphertext:
		return nil, errTooLarge
	case b[0] != versionByte:
		// The signature covers a re-serialization that writes the version
		// as "3": other bytes with high nibble 3 would verify too.
		return nil, errVersion
	}
	var s *protocol.SenderKeyMessageStructure
	err := safe(func() error {
		var err error
		if s, err = ser.SenderKeyMessage.Deserialize(b); err != nil {
			return fmt.Errorf("%w: %w", errMalformed, err)
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	switch {
	case s.Version != protocol.CurrentVersion:
		return nil, errVersion
	case len(s.Signature) != signatureLen:
		return nil, fmt.Errorf("%w: signature", errMalformed)
	case len(s.CipherText) == 0 || len(s.CipherText)%16 != 0:
		return nil, fmt.Errorf("%w: ciphertext of %d bytes", errMalformed, len(s.CipherText))
	}
	return s, nil
}

// processSenderKey stores the sender key of device from (the pairwise
// message's authenticated sender) that sk distributes. A distribution of a
// key this device already holds (same key id and signing key) changes
// nothing, so re-sent keys do not lose skipped message keys.
func processSenderKey(ctx context.Context, ss *sigStore, from *protocol.SignalAddress, sk *wirepb.SenderKeyDistribution) error {
	if !validGroupID(sk.GroupId) {
		return fmt.Errorf("%w: group id %q", ErrInvalidSenderKey, sk.GroupId)
	}
	s, err := checkSKDM(sk.Message)
	if err != nil {
		return fmt.Errorf("%w: %w", ErrInvalidSenderKey, err)
	}
	name := protocol.NewSenderKeyName(sk.GroupId, from)
	rec, err := ss.LoadSenderKey(ctx, name)
	if err != nil && ss.err == nil && errors.Is(err, errCorrupt) {
		// A corrupt record is useless: the sender's key replaces it.
		rec, err = groupRecord.NewSenderKey(ser.SenderKeyRecord, ser.SenderKeyState), nil
	}
	if err != nil {
		return err
	}
	for _, st := range rec.Structure().SenderKeyStates {
		if st.KeyID == s.ID && bytes.Equal(st.SigningKeyPublic, s.SigningKey) {
			return nil
		}
	}
	// What groups.SessionBuilder.Process does, on the record loaded above.
	err = safe(func() error {
		m, err := protocol.NewSenderKeyDistributionMessageFromStruct(s, ser.SenderKeyDistributionMessage)
		if err != nil {
			return err
		}
		rec.AddSenderKeyState(m.ID(), m.Iteration(), m.ChainKey(), m.SignatureKey())
		return ss.StoreSenderKey(ctx, name, rec)
	})
	if err != nil {
		if ss.err != nil {
			return ss.err
		}
		return fmt.Errorf("%w: %w", ErrInvalidSenderKey, err)
	}
	return nil
}

// decryptGroup decrypts a validated SenderKeyMessage from device from in
// group groupID and stores the advanced chain through ss.
func decryptGroup(ctx context.Context, ss *sigStore, groupID string, from *protocol.SignalAddress, s *protocol.SenderKeyMessageStructure) ([]byte, error) {
	name := protocol.NewSenderKeyName(groupID, from)
	rec, err := ss.LoadSenderKey(ctx, name)
	if err != nil {
		return nil, err
	}
	if rec.IsEmpty() {
		return nil, fmt.Errorf("%w of %s in group %s", ErrNoSenderKey, from, groupID)
	}
	var pt []byte
	err = safe(func() error {
		m, err := protocol.NewSenderKeyMessageFromStruct(s, ser.SenderKeyMessage)
		if err != nil {
			return err
		}
		pt, err = groups.NewGroupCipher(groups.NewGroupSessionBuilder(ss, ser), name, ss).Decrypt(ctx, m)
		return err
	})
	switch {
	case err == nil:
		return pt, nil
	case errors.Is(err, signalerror.ErrNoSenderKeyForUser), errors.Is(err, signalerror.ErrNoSenderKeyStateForID):
		return nil, fmt.Errorf("%w of %s in group %s (key id %d)", ErrNoSenderKey, from, groupID, s.ID)
	default:
		return nil, err
	}
}

// checkGroupContent verifies a decrypted group Content's group_check.
func checkGroupContent(groupID string, c *wirepb.Content) error {
	if len(c.GroupCheck) != GroupCheckLen ||
		subtle.ConstantTimeCompare(c.GroupCheck, GroupCheck(groupID, c.Text)) != 1 {
		return errGroupCheck
	}
	return nil
}
