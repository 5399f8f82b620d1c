package e2ee

import (
	"context"
	"errors"
	"fmt"

	"go.mau.fi/libsignal/protocol"
	"go.mau.fi/libsignal/session"
	"go.mau.fi/libsignal/signalerror"
	"go.mau.fi/libsignal/state/record"
)

// maxArchivedStates is libsignal's bound on a record's previous states.
const maxArchivedStates = 40

// libsignal v0.2.1's Cipher.DecryptWithRecord tries the current session
// state and then each previous one *in place*: a failed attempt on a state
// can already have ratcheted it (new root key, new sending chain) before its
// MAC check fails, and when another state then decrypts, the damaged state
// is kept. After a simultaneous session setup (both sides send a prekey
// message at once) this leaves a side sending on a chain the other cannot
// follow. The functions below do what Cipher.Decrypt and
// Cipher.DecryptMessage do, but try every state on a fresh copy of the
// record, as the reference implementation does.

// decryptSignal decrypts a SignalMessage from addr with the stored session
// and stores the updated session through ss.
func decryptSignal(ctx context.Context, ss *sigStore, addr *protocol.SignalAddress, m *protocol.SignalMessage) ([]byte, error) {
	ok, err := ss.ContainsSession(ctx, addr)
	if err != nil {
		return nil, err
	}
	if !ok {
		return nil, fmt.Errorf("%w with %s", ErrNoSession, addr)
	}
	rec, err := ss.LoadSession(ctx, addr)
	if err != nil {
		return nil, err
	}
	cipher := session.NewCipher(session.NewBuilder(ss, ss, ss, ss, addr, ser), addr)
	rec, pt, err := decryptWithRecord(ctx, cipher, rec, m)
	if err != nil {
		return nil, err
	}
	if err := ss.SaveIdentity(ctx, addr, rec.SessionState().RemoteIdentityKey()); err != nil {
		return nil, err
	}
	if err := ss.StoreSession(ctx, addr, rec); err != nil {
		return nil, err
	}
	return pt, nil
}

// decryptPreKey processes a PreKeySignalMessage from addr (X3DH, receiving
// side, unless its session exists already), decrypts the message in it,
// stores the session and removes the one-time prekey it used.
func decryptPreKey(ctx context.Context, ss *sigStore, addr *protocol.SignalAddress, m *protocol.PreKeySignalMessage) ([]byte, error) {
	rec, err := ss.LoadSession(ctx, addr)
	if err != nil {
		return nil, err
	}
	builder := session.NewBuilder(ss, ss, ss, ss, addr, ser)
	usedPreKey, err := builder.Process(ctx, rec, m)
	if err != nil {
		return nil, err
	}
	rec, pt, err := decryptWithRecord(ctx, session.NewCipher(builder, addr), rec, m.WhisperMessage())
	if err != nil {
		return nil, err
	}
	if err := ss.StoreSession(ctx, addr, rec); err != nil {
		return nil, err
	}
	if usedPreKey != nil && !usedPreKey.IsEmpty {
		if err := ss.RemovePreKey(ctx, usedPreKey.Value); err != nil {
			return nil, err
		}
	}
	return pt, nil
}

// decryptWithRecord decrypts m with the current state of rec or, failing
// that, with one of its previous states, which then becomes current. Each
// attempt works on its own copy of rec; the returned record is the copy that
// succeeded (rec itself is not modified).
func decryptWithRecord(ctx context.Context, cipher *session.Cipher, rec *record.Session, m *protocol.SignalMessage) (*record.Session, []byte, error) {
	snapshot := rec.Serialize()
	fresh := func() (*record.Session, error) {
		return record.NewSessionFromBytes(snapshot, ser.Session, ser.State)
	}

	r, err := fresh()
	if err != nil {
		return nil, nil, fmt.Errorf("%w: %v", errCorrupt, err)
	}
	pt, _, err := cipher.DecryptWithState(ctx, r.SessionState(), m)
	if err == nil {
		return r, pt, nil
	}
	if errors.Is(err, signalerror.ErrOldCounter) {
		return nil, nil, err
	}
	n := len(r.PreviousSessionStates())
	for i := range n {
		r, err := fresh()
		if err != nil {
			return nil, nil, fmt.Errorf("%w: %v", errCorrupt, err)
		}
		pt, _, err := cipher.DecryptWithState(ctx, r.PreviousSessionStates()[i], m)
		if errors.Is(err, signalerror.ErrOldCounter) {
			return nil, nil, err
		}
		if err != nil {
			continue
		}
		// Promote state i: it becomes current, the old current state is
		// the newest previous one.
		s := r.Structure()
		prev := make([]*record.StateStructure, 0, len(s.PreviousStates))
		prev = append(prev, s.SessionState)
		for j, p := range s.PreviousStates {
			if j != i {
				prev = append(prev, p)
			}
		}
		if len(prev) > maxArchivedStates {
			prev = prev[:maxArchivedStates]
		}
		nr, err := record.NewSessionFromStructure(&record.SessionStructure{
			SessionState: s.PreviousStates[i], PreviousStates: prev,
		}, ser.Session, ser.State)
		if err != nil {
			return nil, nil, fmt.Errorf("%w: %v", errCorrupt, err)
		}
		return nr, pt, nil
	}
	return nil, nil, signalerror.ErrNoValidSessions
}
