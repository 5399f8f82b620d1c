package localstore

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
)

// Well-known setting keys. Callers may use any other key too.
const (
	SettingServerURL = "server_url" // the server's base URL
	SettingUsername  = "username"   // this device's account
	SettingDeviceID  = "device_id"  // this device's id, decimal
	SettingDeviceKey = "device_key" // Ed25519 private key (never leaves the device)
)

// GetSetting returns the value stored under key and whether there is one.
func (s *Store) GetSetting(ctx context.Context, key string) ([]byte, bool, error) {
	return getSetting(ctx, s.db, key)
}

// SetSetting stores v under key, replacing any previous value.
func (s *Store) SetSetting(ctx context.Context, key string, v []byte) error {
	return setSetting(ctx, s.db, key, v)
}

// DeleteSetting removes key; it is not an error if it is absent.
func (s *Store) DeleteSetting(ctx context.Context, key string) error {
	if _, err := s.db.ExecContext(ctx, `DELETE FROM settings WHERE key = ?`, key); err != nil {
		return fmt.Errorf("localstore: delete setting %q: %w", key, err)
	}
	return nil
}

// GetSetting is Store.GetSetting inside the transaction.
func (t *Tx) GetSetting(ctx context.Context, key string) ([]byte, bool, error) {
	return getSetting(ctx, t.tx, key)
}

// SetSetting is Store.SetSetting inside the transaction.
func (t *Tx) SetSetting(ctx context.Context, key string, v []byte) error {
	return setSetting(ctx, t.tx, key, v)
}

func getSetting(ctx context.Context, q querier, key string) ([]byte, bool, error) {
	var v []byte
	err := q.QueryRowContext(ctx, `SELECT value FROM settings WHERE key = ?`, key).Scan(&v)
	if errors.Is(err, sql.ErrNoRows) {
		return nil, false, nil
	}
	if err != nil {
		return nil, false, fmt.Errorf("localstore: get setting %q: %w", key, err)
	}
	if v == nil {
		v = []byte{}
	}
	return v, true, nil
}

func setSetting(ctx context.Context, q querier, key string, v []byte) error {
	if v == nil {
		v = []byte{}
	}
	_, err := q.ExecContext(ctx,
		`INSERT INTO settings(key, value) VALUES(?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value`,
		key, v)
	if err != nil {
		return fmt.Errorf("localstore: set setting %q: %w", key, err)
	}
	return nil
}
