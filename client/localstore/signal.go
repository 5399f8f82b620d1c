package localstore

import (
	"bytes"
	"context"
	"database/sql"
	"errors"
	"fmt"
)

// This file holds the device's Signal state. It stores bytes only: package
// e2ee turns them into libsignal objects and back. Every getter returns
// freshly allocated slices.

// LocalIdentity is the device's own long-term Signal identity.
type LocalIdentity struct {
	PublicKey      []byte // 33 bytes, 0x05 prefix
	PrivateKey     []byte // 32 bytes
	RegistrationID uint32
}

// KeyPair is a stored prekey: its id and raw key bytes.
type KeyPair struct {
	ID         uint32
	PublicKey  []byte // 33 bytes, 0x05 prefix
	PrivateKey []byte // 32 bytes
}

// SignedKeyPair is a stored signed prekey.
type SignedKeyPair struct {
	KeyPair
	Signature   []byte // 64 bytes, by the identity key over PublicKey
	TimestampMs int64
}

// ErrExists is returned when creating something that already exists, e.g. a
// second local identity.
var ErrExists = errors.New("localstore: already exists")

// LocalIdentity returns the device's identity, ok=false if none was saved.
func (t *Tx) LocalIdentity(ctx context.Context) (id LocalIdentity, ok bool, err error) {
	err = t.tx.QueryRowContext(ctx,
		`SELECT public_key, private_key, registration_id FROM local_identity WHERE id = 1`).
		Scan(&id.PublicKey, &id.PrivateKey, &id.RegistrationID)
	if errors.Is(err, sql.ErrNoRows) {
		return LocalIdentity{}, false, nil
	}
	if err != nil {
		return LocalIdentity{}, false, fmt.Errorf("localstore: load local identity: %w", err)
	}
	return id, true, nil
}

// CreateLocalIdentity saves the device's identity. It fails with ErrExists if
// one is saved already: an identity is never replaced.
func (t *Tx) CreateLocalIdentity(ctx context.Context, id LocalIdentity) error {
	res, err := t.tx.ExecContext(ctx,
		`INSERT INTO local_identity(id, public_key, private_key, registration_id) VALUES(1, ?, ?, ?)
		 ON CONFLICT(id) DO NOTHING`,
		id.PublicKey, id.PrivateKey, id.RegistrationID)
	if err != nil {
		return fmt.Errorf("localstore: save local identity: %w", err)
	}
	if n, _ := res.RowsAffected(); n == 0 {
		return fmt.Errorf("%w: local identity", ErrExists)
	}
	return nil
}

// RemoteIdentity returns the identity key trusted for a remote address
// (libsignal's address string, "account:device").
func (t *Tx) RemoteIdentity(ctx context.Context, addr string) ([]byte, bool, error) {
	var k []byte
	err := t.tx.QueryRowContext(ctx, `SELECT identity_key FROM remote_identities WHERE address = ?`, addr).Scan(&k)
	if errors.Is(err, sql.ErrNoRows) {
		return nil, false, nil
	}
	if err != nil {
		return nil, false, fmt.Errorf("localstore: load identity of %s: %w", addr, err)
	}
	return k, true, nil
}

// SaveRemoteIdentity records key as the identity of addr. It returns the key
// it replaced, if a different one was stored (nil on first use or when the
// key is unchanged).
func (t *Tx) SaveRemoteIdentity(ctx context.Context, addr string, key []byte) (replaced []byte, err error) {
	old, ok, err := t.RemoteIdentity(ctx, addr)
	if err != nil {
		return nil, err
	}
	now := nowMs()
	switch {
	case !ok:
		_, err = t.tx.ExecContext(ctx,
			`INSERT INTO remote_identities(address, identity_key, first_seen_ms, updated_ms) VALUES(?, ?, ?, ?)`,
			addr, key, now, now)
	case bytes.Equal(old, key):
		return nil, nil
	default:
		replaced = old
		_, err = t.tx.ExecContext(ctx,
			`UPDATE remote_identities SET identity_key = ?, first_seen_ms = ?, updated_ms = ? WHERE address = ?`,
			key, now, now, addr)
	}
	if err != nil {
		return nil, fmt.Errorf("localstore: save identity of %s: %w", addr, err)
	}
	return replaced, nil
}

// Session returns the serialized session record for addr.
func (t *Tx) Session(ctx context.Context, addr string) ([]byte, bool, error) {
	var rec []byte
	err := t.tx.QueryRowContext(ctx, `SELECT record FROM sessions WHERE address = ?`, addr).Scan(&rec)
	if errors.Is(err, sql.ErrNoRows) {
		return nil, false, nil
	}
	if err != nil {
		return nil, false, fmt.Errorf("localstore: load session %s: %w", addr, err)
	}
	return rec, true, nil
}

// HasSession reports whether a session record is stored for addr.
func (t *Tx) HasSession(ctx context.Context, addr string) (bool, error) {
	var one int
	err := t.tx.QueryRowContext(ctx, `SELECT 1 FROM sessions WHERE address = ?`, addr).Scan(&one)
	if errors.Is(err, sql.ErrNoRows) {
		return false, nil
	}
	if err != nil {
		return false, fmt.Errorf("localstore: check session %s: %w", addr, err)
	}
	return true, nil
}

// SaveSession stores the serialized session record for addr, which names
// device deviceID of account (kept to list an account's sessions).
func (t *Tx) SaveSession(ctx context.Context, addr, account string, deviceID uint32, record []byte) error {
	_, err := t.tx.ExecContext(ctx,
		`INSERT INTO sessions(address, account, device_id, record, updated_ms) VALUES(?, ?, ?, ?, ?)
		 ON CONFLICT(address) DO UPDATE SET account = excluded.account, device_id = excluded.device_id,
		   record = excluded.record, updated_ms = excluded.updated_ms`,
		addr, account, deviceID, record, nowMs())
	if err != nil {
		return fmt.Errorf("localstore: save session %s: %w", addr, err)
	}
	return nil
}

// DeleteSession removes the session for addr (no error if there is none).
func (t *Tx) DeleteSession(ctx context.Context, addr string) error {
	if _, err := t.tx.ExecContext(ctx, `DELETE FROM sessions WHERE address = ?`, addr); err != nil {
		return fmt.Errorf("localstore: delete session %s: %w", addr, err)
	}
	return nil
}

// DeleteAllSessions removes every session.
func (t *Tx) DeleteAllSessions(ctx context.Context) error {
	if _, err := t.tx.ExecContext(ctx, `DELETE FROM sessions`); err != nil {
		return fmt.Errorf("localstore: delete sessions: %w", err)
	}
	return nil
}

// SessionDevices lists, in ascending order, the device ids of account that
// this device has a session with.
func (t *Tx) SessionDevices(ctx context.Context, account string) ([]uint32, error) {
	rows, err := t.tx.QueryContext(ctx,
		`SELECT device_id FROM sessions WHERE account = ? ORDER BY device_id`, account)
	if err != nil {
		return nil, fmt.Errorf("localstore: list sessions of %s: %w", account, err)
	}
	defer rows.Close()
	var ids []uint32
	for rows.Next() {
		var id uint32
		if err := rows.Scan(&id); err != nil {
			return nil, fmt.Errorf("localstore: list sessions of %s: %w", account, err)
		}
		ids = append(ids, id)
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("localstore: list sessions of %s: %w", account, err)
	}
	return ids, nil
}

// PreKey returns the one-time prekey with the given id.
func (t *Tx) PreKey(ctx context.Context, id uint32) (KeyPair, bool, error) {
	k := KeyPair{ID: id}
	err := t.tx.QueryRowContext(ctx, `SELECT public_key, private_key FROM prekeys WHERE id = ?`, id).
		Scan(&k.PublicKey, &k.PrivateKey)
	if errors.Is(err, sql.ErrNoRows) {
		return KeyPair{}, false, nil
	}
	if err != nil {
		return KeyPair{}, false, fmt.Errorf("localstore: load prekey %d: %w", id, err)
	}
	return k, true, nil
}

// PreKeys returns every stored (unused) one-time prekey, by ascending id.
func (t *Tx) PreKeys(ctx context.Context) ([]KeyPair, error) {
	rows, err := t.tx.QueryContext(ctx, `SELECT id, public_key, private_key FROM prekeys ORDER BY id`)
	if err != nil {
		return nil, fmt.Errorf("localstore: list prekeys: %w", err)
	}
	defer rows.Close()
	var ks []KeyPair
	for rows.Next() {
		var k KeyPair
		if err := rows.Scan(&k.ID, &k.PublicKey, &k.PrivateKey); err != nil {
			return nil, fmt.Errorf("localstore: list prekeys: %w", err)
		}
		ks = append(ks, k)
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("localstore: list prekeys: %w", err)
	}
	return ks, nil
}

// PreKeyCount is the number of stored one-time prekeys.
func (t *Tx) PreKeyCount(ctx context.Context) (int, error) {
	var n int
	if err := t.tx.QueryRowContext(ctx, `SELECT count(*) FROM prekeys`).Scan(&n); err != nil {
		return 0, fmt.Errorf("localstore: count prekeys: %w", err)
	}
	return n, nil
}

// SavePreKey stores (or replaces) a one-time prekey.
func (t *Tx) SavePreKey(ctx context.Context, k KeyPair) error {
	if k.ID == 0 {
		return errors.New("localstore: prekey id 0 is reserved")
	}
	_, err := t.tx.ExecContext(ctx,
		`INSERT INTO prekeys(id, public_key, private_key, created_ms) VALUES(?, ?, ?, ?)
		 ON CONFLICT(id) DO UPDATE SET public_key = excluded.public_key, private_key = excluded.private_key,
		   created_ms = excluded.created_ms`,
		k.ID, k.PublicKey, k.PrivateKey, nowMs())
	if err != nil {
		return fmt.Errorf("localstore: save prekey %d: %w", k.ID, err)
	}
	return nil
}

// RemovePreKey deletes a one-time prekey (used once, by a session setup).
func (t *Tx) RemovePreKey(ctx context.Context, id uint32) error {
	if _, err := t.tx.ExecContext(ctx, `DELETE FROM prekeys WHERE id = ?`, id); err != nil {
		return fmt.Errorf("localstore: remove prekey %d: %w", id, err)
	}
	return nil
}

// SignedPreKey returns the signed prekey with the given id.
func (t *Tx) SignedPreKey(ctx context.Context, id uint32) (SignedKeyPair, bool, error) {
	k := SignedKeyPair{KeyPair: KeyPair{ID: id}}
	err := t.tx.QueryRowContext(ctx,
		`SELECT public_key, private_key, signature, timestamp_ms FROM signed_prekeys WHERE id = ?`, id).
		Scan(&k.PublicKey, &k.PrivateKey, &k.Signature, &k.TimestampMs)
	if errors.Is(err, sql.ErrNoRows) {
		return SignedKeyPair{}, false, nil
	}
	if err != nil {
		return SignedKeyPair{}, false, fmt.Errorf("localstore: load signed prekey %d: %w", id, err)
	}
	return k, true, nil
}

// SignedPreKeys returns every stored signed prekey, by ascending id (the
// last one is the newest).
func (t *Tx) SignedPreKeys(ctx context.Context) ([]SignedKeyPair, error) {
	rows, err := t.tx.QueryContext(ctx,
		`SELECT id, public_key, private_key, signature, timestamp_ms FROM signed_prekeys ORDER BY id`)
	if err != nil {
		return nil, fmt.Errorf("localstore: list signed prekeys: %w", err)
	}
	defer rows.Close()
	var ks []SignedKeyPair
	for rows.Next() {
		var k SignedKeyPair
		if err := rows.Scan(&k.ID, &k.PublicKey, &k.PrivateKey, &k.Signature, &k.TimestampMs); err != nil {
			return nil, fmt.Errorf("localstore: list signed prekeys: %w", err)
		}
		ks = append(ks, k)
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("localstore: list signed prekeys: %w", err)
	}
	return ks, nil
}

// SaveSignedPreKey stores (or replaces) a signed prekey.
func (t *Tx) SaveSignedPreKey(ctx context.Context, k SignedKeyPair) error {
	if k.ID == 0 {
		return errors.New("localstore: signed prekey id 0 is reserved")
	}
	_, err := t.tx.ExecContext(ctx,
		`INSERT INTO signed_prekeys(id, public_key, private_key, signature, timestamp_ms) VALUES(?, ?, ?, ?, ?)
		 ON CONFLICT(id) DO UPDATE SET public_key = excluded.public_key, private_key = excluded.private_key,
		   signature = excluded.signature, timestamp_ms = excluded.timestamp_ms`,
		k.ID, k.PublicKey, k.PrivateKey, k.Signature, k.TimestampMs)
	if err != nil {
		return fmt.Errorf("localstore: save signed prekey %d: %w", k.ID, err)
	}
	return nil
}

// RemoveSignedPreKey deletes a signed prekey.
func (t *Tx) RemoveSignedPreKey(ctx context.Context, id uint32) error {
	if _, err := t.tx.ExecContext(ctx, `DELETE FROM signed_prekeys WHERE id = ?`, id); err != nil {
		return fmt.Errorf("localstore: remove signed prekey %d: %w", id, err)
	}
	return nil
}

// Counter returns the value of a named counter (0 if it was never set).
func (t *Tx) Counter(ctx context.Context, name string) (uint64, error) {
	var v int64
	err := t.tx.QueryRowContext(ctx, `SELECT value FROM counters WHERE name = ?`, name).Scan(&v)
	if errors.Is(err, sql.ErrNoRows) {
		return 0, nil
	}
	if err != nil {
		return 0, fmt.Errorf("localstore: read counter %q: %w", name, err)
	}
	return uint64(v), nil
}

// SetCounter sets a named counter.
func (t *Tx) SetCounter(ctx context.Context, name string, v uint64) error {
	_, err := t.tx.ExecContext(ctx,
		`INSERT INTO counters(name, value) VALUES(?, ?) ON CONFLICT(name) DO UPDATE SET value = excluded.value`,
		name, int64(v))
	if err != nil {
		return fmt.Errorf("localstore: set counter %q: %w", name, err)
	}
	return nil
}
