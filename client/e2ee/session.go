package e2ee

import (
	"context"
	"errors"
	"fmt"
	"time"

	"go.mau.fi/libsignal/ecc"
	"go.mau.fi/libsignal/keys/identity"
	"go.mau.fi/libsignal/keys/prekey"
	"go.mau.fi/libsignal/protocol"
	"go.mau.fi/libsignal/session"
	"go.mau.fi/libsignal/util/optional"
	"google.golang.org/protobuf/proto"

	"github.com/ferryhq/ferry/client/localstore"
	"github.com/ferryhq/ferry/wire/wirepb"
)

// HasSession reports whether this device has a session with the device
// (account, deviceID).
func (d *Device) HasSession(ctx context.Context, account string, deviceID uint32) (bool, error) {
	var ok bool
	err := d.st.View(ctx, func(tx *localstore.Tx) error {
		var err error
		ok, err = tx.HasSession(ctx, protocol.NewSignalAddress(account, deviceID).String())
		return err
	})
	return ok, err
}

// SessionDevices lists the device ids of account this device has a session
// with, ascending.
func (d *Device) SessionDevices(ctx context.Context, account string) ([]uint32, error) {
	var ids []uint32
	err := d.st.View(ctx, func(tx *localstore.Tx) error {
		var err error
		ids, err = tx.SessionDevices(ctx, account)
		return err
	})
	return ids, err
}

// DropSession deletes the session with (account, deviceID), e.g. when the
// server reports the device as removed or stale. The device's trusted
// identity key is kept, so a new key is still reported as a change.
func (d *Device) DropSession(ctx context.Context, account string, deviceID uint32) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.st.Update(ctx, func(tx *localstore.Tx) error {
		return tx.DeleteSession(ctx, protocol.NewSignalAddress(account, deviceID).String())
	})
}

// ---------------------------------------------------------------- bundles

// bundleFromWire validates a PreKeyBundle completely (every length, key type
// byte, id and the signed prekey signature) before anything of it reaches
// libsignal, and converts it.
func bundleFromWire(b *wirepb.PreKeyBundle) (*prekey.Bundle, error) {
	bad := func(format string, args ...any) error {
		return fmt.Errorf("%w: %s", ErrInvalidBundle, fmt.Sprintf(format, args...))
	}
	if b == nil {
		return nil, bad("no bundle")
	}
	if b.DeviceId == 0 {
		return nil, bad("device id 0")
	}
	if b.RegistrationId < 1 || b.RegistrationId > MaxRegistrationID {
		return nil, bad("registration id %d not in 1..%d", b.RegistrationId, MaxRegistrationID)
	}
	if !validKey(b.IdentityKey) {
		return nil, bad("identity key: want %d bytes starting 0x05, got %d", keyLen, len(b.IdentityKey))
	}
	spk := b.SignedPrekey
	if spk == nil {
		return nil, bad("no signed prekey")
	}
	if spk.Id == 0 || spk.Id > 0xFFFFFF {
		return nil, bad("signed prekey id %d", spk.Id)
	}
	if !validKey(spk.PublicKey) {
		return nil, bad("signed prekey: want %d bytes starting 0x05, got %d", keyLen, len(spk.PublicKey))
	}
	if len(spk.Signature) != sigLen {
		return nil, bad("signed prekey signature: want %d bytes, got %d", sigLen, len(spk.Signature))
	}
	idKey := ecc.NewDjbECPublicKey([32]byte(b.IdentityKey[1:]))
	spkPub := ecc.NewDjbECPublicKey([32]byte(spk.PublicKey[1:]))
	sig := [64]byte(spk.Signature)
	var valid bool
	if err := safe(func() error {
		valid = ecc.VerifySignature(idKey, spk.PublicKey, sig)
		return nil
	}); err != nil || !valid {
		return nil, ErrBadSignature
	}

	otkID := optional.NewEmptyUint32()
	var otk ecc.ECPublicKeyable // a nil interface when absent: libsignal tests it against nil
	if pk := b.OneTimePrekey; pk != nil {
		if pk.Id == 0 || pk.Id > 0xFFFFFF {
			return nil, bad("one-time prekey id %d", pk.Id)
		}
		if !validKey(pk.PublicKey) {
			return nil, bad("one-time prekey: want %d bytes starting 0x05, got %d", keyLen, len(pk.PublicKey))
		}
		otkID = optional.NewOptionalUint32(pk.Id)
		otk = ecc.NewDjbECPublicKey([32]byte(pk.PublicKey[1:]))
	}
	return prekey.NewBundle(b.RegistrationId, b.DeviceId, otkID, spk.Id, otk, spkPub, sig, identity.NewKey(idKey)), nil
}

// BuildSession validates a prekey bundle of a device of account (lengths,
// 0x05 key type bytes, ids, the signed prekey's signature by the identity
// key) and runs X3DH with it, replacing any session with that device. Bad
// bundles fail with an error wrapping ErrInvalidBundle (ErrBadSignature for
// the signature). If the bundle's identity key differs from the one trusted
// for that device, the session is built all the same, the new key is
// trusted, and the error wraps ErrIdentityChanged (see the package
// documentation).
func (d *Device) BuildSession(ctx context.Context, account string, b *wirepb.PreKeyBundle) error {
	if account == "" {
		return fmt.Errorf("%w: empty account", ErrInvalidArgument)
	}
	lb, err := bundleFromWire(b)
	if err != nil {
		return err
	}
	addr := protocol.NewSignalAddress(account, b.DeviceId)

	d.mu.Lock()
	defer d.mu.Unlock()
	var changed bool
	err = d.st.Update(ctx, func(tx *localstore.Tx) error {
		ss := d.sigStore(tx)
		builder := session.NewBuilder(ss, ss, ss, ss, addr, ser)
		err := safe(func() error { return builder.ProcessBundle(ctx, lb) })
		if err != nil {
			if ss.err != nil {
				return ss.err
			}
			if ss.untrusted != nil {
				return fmt.Errorf("%w %s: %w", ErrUntrustedIdentity, addr, ss.untrusted)
			}
			return fmt.Errorf("%w: %w", ErrInvalidBundle, err)
		}
		changed = len(ss.changed) > 0
		return nil
	})
	if err != nil {
		return err
	}
	if changed {
		return fmt.Errorf("%w: %s", ErrIdentityChanged, addr)
	}
	return nil
}

// ---------------------------------------------------------------- encrypt

// Encrypt pads and encrypts c for device (account, deviceID). The session
// update is committed (fsynced) before Encrypt returns, so the ciphertext may
// leave right away. The result has Type PREKEY_SIGNAL_MESSAGE until the peer
// has answered, SIGNAL_MESSAGE after, and RegistrationId set to the peer's
// registration id from the session. Without a session it fails with
// ErrNoSession.
func (d *Device) Encrypt(ctx context.Context, account string, deviceID uint32, c *wirepb.Content) (*wirepb.DeviceCiphertext, error) {
	if account == "" || deviceID == 0 || c == nil {
		return nil, fmt.Errorf("%w: encrypt for %q.%d", ErrInvalidArgument, account, deviceID)
	}
	pt, err := proto.Marshal(c)
	if err != nil {
		return nil, fmt.Errorf("e2ee: encode content: %w", err)
	}
	return d.encryptRaw(ctx, account, deviceID, Pad(pt))
}

// encryptRaw is Encrypt of an already padded plaintext.
func (d *Device) encryptRaw(ctx context.Context, account string, deviceID uint32, padded []byte) (*wirepb.DeviceCiphertext, error) {
	addr := protocol.NewSignalAddress(account, deviceID)
	d.mu.Lock()
	defer d.mu.Unlock()
	out := &wirepb.DeviceCiphertext{Username: account, DeviceId: deviceID}
	err := d.st.Update(ctx, func(tx *localstore.Tx) error {
		ss := d.sigStore(tx)
		ok, err := tx.HasSession(ctx, addr.String())
		if err != nil {
			return err
		}
		if !ok {
			return fmt.Errorf("%w with %s", ErrNoSession, addr)
		}
		// libsignal's Encrypt panics on a record without a sending chain:
		// check it (and read the peer's registration id) first.
		rec, err := ss.LoadSession(ctx, addr)
		if err != nil {
			return err
		}
		var usable bool
		if err := safe(func() error {
			st := rec.SessionState()
			usable = st != nil && st.HasSenderChain() && st.RemoteIdentityKey() != nil
			if usable {
				out.RegistrationId = st.RemoteRegistrationID()
			}
			return nil
		}); err != nil || !usable {
			return fmt.Errorf("%w with %s (unusable record)", ErrNoSession, addr)
		}

		var msg protocol.CiphertextMessage
		cipher := session.NewCipher(session.NewBuilder(ss, ss, ss, ss, addr, ser), addr)
		err = safe(func() error {
			var err error
			msg, err = cipher.Encrypt(ctx, padded)
			if err != nil {
				return err
			}
			out.Content = msg.Serialize()
			return nil
		})
		if err != nil {
			if ss.err != nil {
				return ss.err
			}
			return fmt.Errorf("e2ee: encrypt for %s: %w", addr, err)
		}
		switch msg.Type() {
		case protocol.PREKEY_TYPE:
			out.Type = wirepb.EnvelopeType_PREKEY_SIGNAL_MESSAGE
		case protocol.WHISPER_TYPE:
			out.Type = wirepb.EnvelopeType_SIGNAL_MESSAGE
		default:
			return fmt.Errorf("e2ee: encrypt for %s: unexpected message type %d", addr, msg.Type())
		}
		if len(out.Content) == 0 || out.Content[0] != versionByte {
			return fmt.Errorf("e2ee: encrypt for %s: unexpected message version", addr)
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	return out, nil
}

// ---------------------------------------------------------------- receive

// Receive handles one envelope addressed to this device; me is this
// device's account. Everything it stores commits in one transaction: the
// Signal state change, the history row and the envelope's seen mark.
//
//   - An envelope seen before returns (nil, true, nil): ack it again.
//   - A decrypted one returns its history row and a nil error. Peer is the
//     sender, or env.To when the sender is me: then it is a sync copy of a
//     message my other device sent, and Outgoing is set. If the sender's
//     identity key changed, the handler set with SetIdentityChangeHandler
//     is told.
//   - A group message (SENDER_KEY_MESSAGE with env.GroupId) is decrypted
//     with the sender device's sender key for that group and its
//     group_check verified; its row has Group = env.GroupId and Peer ""
//     (Outgoing when the sender is me: another device of mine sent it).
//     Without the sender's key it fails with an error wrapping both
//     ErrDecrypt and ErrNoSenderKey.
//   - A pairwise message whose Content carries a sender key distribution
//     stores that key (for the group it names and the envelope's sender
//     device) and adds no history row: the returned Message has SenderKey
//     set and LocalID 0; ack it without showing it. If the distribution is
//     malformed the Message also has Failed set and the error wraps
//     ErrDecrypt and ErrInvalidSenderKey (still handled: ack it).
//   - One that cannot be decrypted (malformed, wrong key, replayed, bad
//     padding, bad Content, a failed group check, or a type Receive cannot
//     decrypt) is recorded as a Failed history row and marked seen; the row
//     is returned with an error wrapping ErrDecrypt. It will never decrypt
//     later.
//
// So whenever dup is true or the returned message is non-nil the envelope is
// durably handled and must be acked. Otherwise nothing was recorded: a
// storage error (do not ack, so it is redelivered), ErrInvalidEnvelope (nil
// or id 0) or ErrUnsupportedType (RECEIPT and GROUP_UPDATE envelopes are
// server-made and not handled here: see localstore.Store.MarkDelivered and
// SaveGroup).
func (d *Device) Receive(ctx context.Context, me string, env *wirepb.Envelope) (msg *localstore.Message, dup bool, err error) {
	if env == nil || env.Id == 0 {
		return nil, false, fmt.Errorf("%w: no envelope or id 0", ErrInvalidEnvelope)
	}
	if env.Type == wirepb.EnvelopeType_RECEIPT || env.Type == wirepb.EnvelopeType_GROUP_UPDATE {
		return nil, false, fmt.Errorf("%w: %v", ErrUnsupportedType, env.Type)
	}
	group := env.Type == wirepb.EnvelopeType_SENDER_KEY_MESSAGE

	m := localstore.Message{
		Peer:         env.Sender,
		Outgoing:     env.Sender == me && me != "",
		Sender:       env.Sender,
		SenderDevice: env.SenderDevice,
		Seq:          env.Seq,
		ClientMsgID:  env.ClientMsgId,
		EnvelopeID:   env.Id,
	}
	switch {
	case group && env.GroupId != "":
		m.Peer, m.Group = "", env.GroupId
	case m.Outgoing:
		m.Peer = env.To
	}
	if env.ServerTimeMs != 0 {
		m.ServerTime = time.UnixMilli(env.ServerTimeMs)
	}

	d.mu.Lock()
	defer d.mu.Unlock()
	var decErr, skErr error
	var changed []*protocol.SignalAddress
	err = d.st.Update(ctx, func(tx *localstore.Tx) error {
		if seen, err := tx.Seen(ctx, env.Id); err != nil || seen {
			dup = seen
			return err
		}
		ss := d.sigStore(tx)
		pt, err := d.decrypt(ctx, ss, env)
		var content *wirepb.Content
		if err == nil {
			content, err = decodeContent(pt)
		}
		if err == nil && group {
			err = checkGroupContent(env.GroupId, content)
		}
		if err == nil {
			m.Text = content.Text
		}
		if err != nil {
			// A local failure is not the envelope's fault: leave it unseen.
			if ss.err != nil {
				return ss.err
			}
			if ctx.Err() != nil {
				return ctx.Err()
			}
			decErr = err
			if ss.untrusted != nil {
				decErr = fmt.Errorf("%w: %w", ErrUntrustedIdentity, ss.untrusted)
			}
			return errRollback // drop whatever the library stored
		}
		changed = ss.changed
		if sk := content.GetSenderKey(); sk != nil && !group {
			// A sender key distribution: store the key; the message itself
			// is no history row. The pairwise session step is kept even if
			// the key is invalid (the envelope is handled either way).
			m.SenderKey, m.Text = true, ""
			err := processSenderKey(ctx, ss, protocol.NewSignalAddress(env.Sender, env.SenderDevice), sk)
			if err != nil {
				if ss.err != nil || ctx.Err() != nil {
					return errors.Join(ss.err, ctx.Err())
				}
				skErr = err
			}
			return tx.MarkSeen(ctx, env.Id)
		}
		if h := content.GetHistory(); h != nil && m.Outgoing && env.Seq == 0 && !group {
			// A history chunk from another device of this account (sent with
			// SyncToDevice): import its messages; the chunk itself is no message.
			n, err := tx.ImportHistory(ctx, historyMessages(h))
			if err != nil {
				return err
			}
			m.HistoryChunk, m.Imported = true, n
			return tx.MarkSeen(ctx, env.Id)
		}
		return addAndMarkSeen(ctx, tx, &m)
	})
	if dup {
		return nil, true, nil
	}
	if err != nil && !errors.Is(err, errRollback) {
		return nil, false, err
	}
	if decErr != nil {
		m.Failed, m.Text = true, ""
		err = d.st.Update(ctx, func(tx *localstore.Tx) error {
			if seen, err := tx.Seen(ctx, env.Id); err != nil || seen {
				dup = seen
				return err
			}
			return addAndMarkSeen(ctx, tx, &m)
		})
		if dup {
			return nil, true, nil
		}
		if err != nil {
			return nil, false, err
		}
		return &m, false, fmt.Errorf("%w: envelope %d from %s.%d: %w", ErrDecrypt, env.Id, env.Sender, env.SenderDevice, decErr)
	}
	if fn := d.onIDChange.Load(); fn != nil {
		for _, a := range changed {
			(*fn)(a.Name(), a.DeviceID())
		}
	}
	if skErr != nil {
		m.Failed = true
		return &m, false, fmt.Errorf("%w: envelope %d from %s.%d: %w", ErrDecrypt, env.Id, env.Sender, env.SenderDevice, skErr)
	}
	return &m, false, nil
}

// errRollback makes Update roll back without it being a failure.
var errRollback = errors.New("rollback")

func addAndMarkSeen(ctx context.Context, tx *localstore.Tx, m *localstore.Message) error {
	var err error
	if m.LocalID, err = tx.AddReceived(ctx, *m); err != nil {
		return err
	}
	return tx.MarkSeen(ctx, m.EnvelopeID)
}

var (
	errNoSender   = errors.New("envelope has no sender device")
	errEmpty      = errors.New("empty ciphertext")
	errTooLarge   = errors.New("ciphertext too large")
	errVersion    = errors.New("message version byte is not 0x33")
	errMalformed  = errors.New("malformed message")
	errNotHandled = fmt.Errorf("%w: cannot decrypt this type", ErrUnsupportedType)
)

// decrypt validates and decrypts env's content with libsignal, through ss.
func (d *Device) decrypt(ctx context.Context, ss *sigStore, env *wirepb.Envelope) ([]byte, error) {
	if env.Sender == "" || env.SenderDevice == 0 {
		return nil, errNoSender
	}
	c := env.Content
	switch {
	case len(c) == 0:
		return nil, errEmpty
	case len(c) > MaxCiphertext:
		return nil, errTooLarge
	case c[0] != versionByte:
		// Also stops the 0x33 -> 0x23 replay of prekey messages.
		return nil, errVersion
	}
	addr := protocol.NewSignalAddress(env.Sender, env.SenderDevice)

	var pt []byte
	switch env.Type {
	case wirepb.EnvelopeType_SIGNAL_MESSAGE:
		if err := checkSignalMessage(c); err != nil {
			return nil, err
		}
		err := safe(func() error {
			m, err := protocol.NewSignalMessageFromBytes(c, ser.SignalMessage)
			if err != nil {
				return err
			}
			pt, err = decryptSignal(ctx, ss, addr, m)
			return err
		})
		if err != nil {
			return nil, err
		}
	case wirepb.EnvelopeType_PREKEY_SIGNAL_MESSAGE:
		if err := checkPreKeySignalMessage(c); err != nil {
			return nil, err
		}
		err := safe(func() error {
			m, err := protocol.NewPreKeySignalMessageFromBytes(c, ser.PreKeySignalMessage, ser.SignalMessage)
			if err != nil {
				return err
			}
			pt, err = decryptPreKey(ctx, ss, addr, m)
			return err
		})
		if err != nil {
			return nil, err
		}
	case wirepb.EnvelopeType_SENDER_KEY_MESSAGE:
		if !validGroupID(env.GroupId) {
			return nil, fmt.Errorf("%w: group id %q", errMalformed, env.GroupId)
		}
		s, err := checkSenderKeyMessage(c)
		if err != nil {
			return nil, err
		}
		if pt, err = decryptGroup(ctx, ss, env.GroupId, addr, s); err != nil {
			return nil, err
		}
	default:
		return nil, fmt.Errorf("%w: %v", errNotHandled, env.Type)
	}
	return pt, nil
}

// checkSignalMessage validates a serialized SignalMessage's structure before
// libsignal builds one: version byte, key type and length, ciphertext length
// (CBC blocks: libsignal panics on a MAC-valid body of another length), MAC.
func checkSignalMessage(b []byte) error {
	if len(b) == 0 || b[0] != versionByte {
		return errVersion
	}
	if len(b) < 1+protocol.MacLength+1 {
		return fmt.Errorf("%w: %d bytes", errMalformed, len(b))
	}
	return safe(func() error {
		s, err := ser.SignalMessage.Deserialize(b)
		if err != nil {
			return fmt.Errorf("%w: %w", errMalformed, err)
		}
		switch {
		case s.Version != 3:
			return errVersion
		case !validKey(s.RatchetKey):
			return fmt.Errorf("%w: ratchet key", errMalformed)
		case len(s.CipherText) == 0 || len(s.CipherText)%16 != 0:
			return fmt.Errorf("%w: ciphertext of %d bytes", errMalformed, len(s.CipherText))
		case len(s.Mac) != protocol.MacLength:
			return fmt.Errorf("%w: mac", errMalformed)
		}
		return nil
	})
}

// checkPreKeySignalMessage validates a serialized PreKeySignalMessage and the
// SignalMessage inside it.
func checkPreKeySignalMessage(b []byte) error {
	if len(b) < 2 || b[0] != versionByte {
		return errVersion
	}
	var inner []byte
	err := safe(func() error {
		s, err := ser.PreKeySignalMessage.Deserialize(b)
		if err != nil {
			return fmt.Errorf("%w: %w", errMalformed, err)
		}
		switch {
		case s.Version != 3:
			return errVersion
		case !validKey(s.BaseKey):
			return fmt.Errorf("%w: base key", errMalformed)
		case !validKey(s.IdentityKey):
			return fmt.Errorf("%w: identity key", errMalformed)
		case s.SignedPreKeyID == 0:
			return fmt.Errorf("%w: signed prekey id 0", errMalformed)
		case s.PreKeyID != nil && !s.PreKeyID.IsEmpty && s.PreKeyID.Value == 0:
			return fmt.Errorf("%w: prekey id 0", errMalformed)
		}
		inner = s.Message
		return nil
	})
	if err != nil {
		return err
	}
	return checkSignalMessage(inner)
}

// decodeContent unpads a plaintext and decodes the Content in it.
func decodeContent(pt []byte) (*wirepb.Content, error) {
	b, err := Unpad(pt)
	if err != nil {
		return nil, err
	}
	var c wirepb.Content
	if err := proto.Unmarshal(b, &c); err != nil {
		return nil, fmt.Errorf("%w: content: %w", errMalformed, err)
	}
	return &c, nil
}

// historyMessages converts a history chunk for the local store.
func historyMessages(h *wirepb.HistoryChunk) []localstore.Message {
	out := make([]localstore.Message, 0, len(h.Messages))
	for _, x := range h.Messages {
		m := localstore.Message{Peer: x.Peer, Group: x.Group, Outgoing: x.Outgoing, Sender: x.Sender,
			SenderDevice: x.SenderDevice, Seq: x.Seq, Text: x.Text, ClientMsgID: x.ClientMsgId, Delivered: x.Delivered}
		if x.ServerTimeMs != 0 {
			m.ServerTime = time.UnixMilli(x.ServerTimeMs)
		}
		out = append(out, m)
	}
	return out
}
