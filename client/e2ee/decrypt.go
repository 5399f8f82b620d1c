package e2ee

import (
	"context"
	"encoding/json"
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
// attempt works on its own deep copy of a state, so rec is never modified
// and a failed attempt leaves no trace; the result is a new record.
func decryptWithRecord(ctx context.Context, cipher *session.Cipher, rec *record.Session, m *protocol.SignalMessage) (*record.Session, []byte, error) {
	base := rec.Structure() // read-only from here on
	try := func(s *record.StateStructure) (st *record.State, pt []byte, err error) {
		if err := safe(func() error {
			var err error
			st, err = copyState(s)
			return err
		}); err != nil {
			return nil, nil, fmt.Errorf("%w: %v", errCorrupt, err)
		}
		pt, _, err = cipher.DecryptWithState(ctx, st, m)
		return st, pt, err
	}
	build := func(cur *record.State, prev []*record.StateStructure) (*record.Session, error) {
		r, err := record.NewSessionFromStructure(&record.SessionStructure{
			SessionState:   record.NewSessionFromState(cur, ser.Session).Structure().SessionState,
			PreviousStates: prev,
		}, ser.Session, ser.State)
		if err != nil {
			return nil, fmt.Errorf("%w: %v", errCorrupt, err)
		}
		return r, nil
	}

	st, pt, err := try(base.SessionState)
	if err == nil {
		r, err := build(st, base.PreviousStates)
		return r, pt, err
	}
	if errors.Is(err, signalerror.ErrOldCounter) {
		return nil, nil, err
	}
	for i, ps := range base.PreviousStates {
		st, pt, err := try(ps)
		if errors.Is(err, signalerror.ErrOldCounter) {
			return nil, nil, err
		}
		if err != nil {
			continue
		}
		// State i becomes current; the old current state becomes the newest
		// previous one.
		prev := make([]*record.StateStructure, 0, len(base.PreviousStates))
		prev = append(prev, base.SessionState)
		for j, p := range base.PreviousStates {
			if j != i {
				prev = append(prev, p)
			}
		}
		if len(prev) > maxArchivedStates {
			prev = prev[:maxArchivedStates]
		}
		r, err := build(st, prev)
		return r, pt, err
	}
	return nil, nil, signalerror.ErrNoValidSessions
}

// copyState builds a State from a deep copy of s (a JSON round trip, done
// here rather than by libsignal's state serializer, whose debug logging
// formats the whole state, keys included).
func copyState(s *record.StateStructure) (*record.State, error) {
	if s == nil {
		return nil, errors.New("no state")
	}
	b, err := json.Marshal(s)
	if err != nil {
		return nil, err
	}
	var c record.StateStructure
	if err := json.Unmarshal(b, &c); err != nil {
		return nil, err
	}
	return record.NewStateFromStructure(&c, ser.State)
}
