package localstore

import (
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strings"

	"google.golang.org/protobuf/proto"

	"github.com/ferryhq/ferry/wire/wirepb"
)

// This file holds the groups this device belongs to and the group sender
// keys (package e2ee turns the sender-key records into libsignal objects).

// ---------------------------------------------------------------- sender keys

// OwnSenderKey is the sender under which a group's sending key of this
// device itself is stored (other senders are "account:device", libsignal's
// address string).
const OwnSenderKey = ""

// SenderKey returns the serialized sender-key record of sender (an
// "account:device" address, or OwnSenderKey) in group groupID.
func (t *Tx) SenderKey(ctx context.Context, groupID, sender string) ([]byte, bool, error) {
	var rec []byte
	err := t.tx.QueryRowContext(ctx, `SELECT record FROM sender_keys WHERE group_id = ? AND sender = ?`,
		groupID, sender).Scan(&rec)
	if errors.Is(err, sql.ErrNoRows) {
		return nil, false, nil
	}
	if err != nil {
		return nil, false, fmt.Errorf("localstore: load sender key %s/%s: %w", groupID, sender, err)
	}
	return rec, true, nil
}

// SaveSenderKey stores (or replaces) the serialized sender-key record of
// sender in group groupID.
func (t *Tx) SaveSenderKey(ctx context.Context, groupID, sender string, record []byte) error {
	if groupID == "" {
		return errors.New("localstore: sender key without a group id")
	}
	if record == nil {
		record = []byte{}
	}
	_, err := t.tx.ExecContext(ctx,
		`INSERT INTO sender_keys(group_id, sender, record, updated_ms) VALUES(?, ?, ?, ?)
		 ON CONFLICT(group_id, sender) DO UPDATE SET record = excluded.record, updated_ms = excluded.updated_ms`,
		groupID, sender, record, nowMs())
	if err != nil {
		return fmt.Errorf("localstore: save sender key %s/%s: %w", groupID, sender, err)
	}
	return nil
}

// DeleteSenderKey removes one sender's key in a group (no error if absent).
func (t *Tx) DeleteSenderKey(ctx context.Context, groupID, sender string) error {
	if _, err := t.tx.ExecContext(ctx, `DELETE FROM sender_keys WHERE group_id = ? AND sender = ?`,
		groupID, sender); err != nil {
		return fmt.Errorf("localstore: delete sender key %s/%s: %w", groupID, sender, err)
	}
	return nil
}

// DeleteSenderKeys removes every sender key of a group, this device's own
// included.
func (t *Tx) DeleteSenderKeys(ctx context.Context, groupID string) error {
	if _, err := t.tx.ExecContext(ctx, `DELETE FROM sender_keys WHERE group_id = ?`, groupID); err != nil {
		return fmt.Errorf("localstore: delete sender keys of %s: %w", groupID, err)
	}
	return nil
}

// SenderKeySenders lists, ascending, the senders whose key this device holds
// for a group (OwnSenderKey, "", first if it has its own).
func (t *Tx) SenderKeySenders(ctx context.Context, groupID string) ([]string, error) {
	rows, err := t.tx.QueryContext(ctx, `SELECT sender FROM sender_keys WHERE group_id = ? ORDER BY sender`, groupID)
	if err != nil {
		return nil, fmt.Errorf("localstore: list sender keys of %s: %w", groupID, err)
	}
	defer rows.Close()
	var out []string
	for rows.Next() {
		var s string
		if err := rows.Scan(&s); err != nil {
			return nil, fmt.Errorf("localstore: list sender keys of %s: %w", groupID, err)
		}
		out = append(out, s)
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("localstore: list sender keys of %s: %w", groupID, err)
	}
	return out, nil
}

// ---------------------------------------------------------------- groups

// Group errors. Compare with errors.Is.
var (
	// ErrNoGroup: no group with that id is stored (MarkDistributed,
	// UnmarkDistributed).
	ErrNoGroup = errors.New("localstore: no such group")
	// ErrAmbiguousGroupName: GroupByName found several groups with that
	// name; the error lists their ids, most recently updated first.
	ErrAmbiguousGroupName = errors.New("localstore: several groups have this name")
	// ErrInvalidGroup: SaveGroup got no group or one without an id.
	ErrInvalidGroup = errors.New("localstore: invalid group")
)

// SaveGroup stores a group's membership (as the server reported it), keyed
// by its group id. The set of devices this device distributed its sender
// key to is kept. An update older than the stored one (lower version: a
// GROUP_UPDATE that arrived after a newer GetGroup answer) is ignored
// without error.
func (s *Store) SaveGroup(ctx context.Context, info *wirepb.GroupInfo) error {
	return s.Update(ctx, func(tx *Tx) error { return tx.SaveGroup(ctx, info) })
}

// SaveGroup is Store.SaveGroup inside the transaction.
func (t *Tx) SaveGroup(ctx context.Context, info *wirepb.GroupInfo) error {
	if info == nil || info.GroupId == "" {
		return fmt.Errorf("%w: no group id", ErrInvalidGroup)
	}
	b, err := proto.Marshal(info)
	if err != nil {
		return fmt.Errorf("localstore: encode group %s: %w", info.GroupId, err)
	}
	_, err = t.tx.ExecContext(ctx,
		`INSERT INTO groups(group_id, name, version, info, updated_ms) VALUES(?, ?, ?, ?, ?)
		 ON CONFLICT(group_id) DO UPDATE SET name = excluded.name, version = excluded.version,
		   info = excluded.info, updated_ms = excluded.updated_ms
		 WHERE excluded.version >= groups.version`,
		info.GroupId, info.Name, int64(info.Version), b, nowMs())
	if err != nil {
		return fmt.Errorf("localstore: save group %s: %w", info.GroupId, err)
	}
	return nil
}

// Group returns the stored membership of a group (a fresh copy).
func (s *Store) Group(ctx context.Context, groupID string) (*wirepb.GroupInfo, bool, error) {
	return group(ctx, s.db, groupID)
}

// Group is Store.Group inside the transaction.
func (t *Tx) Group(ctx context.Context, groupID string) (*wirepb.GroupInfo, bool, error) {
	return group(ctx, t.tx, groupID)
}

func group(ctx context.Context, q querier, groupID string) (*wirepb.GroupInfo, bool, error) {
	var b []byte
	err := q.QueryRowContext(ctx, `SELECT info FROM groups WHERE group_id = ?`, groupID).Scan(&b)
	if errors.Is(err, sql.ErrNoRows) {
		return nil, false, nil
	}
	if err != nil {
		return nil, false, fmt.Errorf("localstore: load group %s: %w", groupID, err)
	}
	info, err := decodeGroup(groupID, b)
	if err != nil {
		return nil, false, err
	}
	return info, true, nil
}

func decodeGroup(groupID string, b []byte) (*wirepb.GroupInfo, error) {
	var info wirepb.GroupInfo
	if err := proto.Unmarshal(b, &info); err != nil {
		return nil, fmt.Errorf("localstore: decode group %s: %w", groupID, err)
	}
	return &info, nil
}

// GroupByName returns the group with this display name, ok=false if none
// has it. Names are not unique: if several groups have it, the error wraps
// ErrAmbiguousGroupName and lists their ids (most recently updated first).
func (s *Store) GroupByName(ctx context.Context, name string) (*wirepb.GroupInfo, bool, error) {
	rows, err := s.db.QueryContext(ctx,
		`SELECT group_id, info FROM groups WHERE name = ? ORDER BY updated_ms DESC, group_id`, name)
	if err != nil {
		return nil, false, fmt.Errorf("localstore: find group %q: %w", name, err)
	}
	defer rows.Close()
	var ids []string
	var first []byte
	for rows.Next() {
		var id string
		var b []byte
		if err := rows.Scan(&id, &b); err != nil {
			return nil, false, fmt.Errorf("localstore: find group %q: %w", name, err)
		}
		if ids = append(ids, id); len(ids) == 1 {
			first = b
		}
	}
	if err := rows.Err(); err != nil {
		return nil, false, fmt.Errorf("localstore: find group %q: %w", name, err)
	}
	switch len(ids) {
	case 0:
		return nil, false, nil
	case 1:
		g, err := decodeGroup(ids[0], first)
		return g, err == nil, err
	default:
		return nil, false, fmt.Errorf("%w: %q is the name of groups %s (use an id)",
			ErrAmbiguousGroupName, name, strings.Join(ids, ", "))
	}
}

// Groups returns every stored group, ordered by name, then group id.
func (s *Store) Groups(ctx context.Context) ([]*wirepb.GroupInfo, error) {
	rows, err := s.db.QueryContext(ctx, `SELECT group_id, info FROM groups ORDER BY name, group_id`)
	if err != nil {
		return nil, fmt.Errorf("localstore: list groups: %w", err)
	}
	defer rows.Close()
	var out []*wirepb.GroupInfo
	for rows.Next() {
		var id string
		var b []byte
		if err := rows.Scan(&id, &b); err != nil {
			return nil, fmt.Errorf("localstore: list groups: %w", err)
		}
		info, err := decodeGroup(id, b)
		if err != nil {
			return nil, err
		}
		out = append(out, info)
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("localstore: list groups: %w", err)
	}
	return out, nil
}

// DeleteGroup removes a group and its distribution set (no error if it is
// not stored). It keeps the group's sender keys and history: forget the keys
// with e2ee's Device.ForgetGroup (or Tx.DeleteSenderKeys).
func (s *Store) DeleteGroup(ctx context.Context, groupID string) error {
	return s.Update(ctx, func(tx *Tx) error { return tx.DeleteGroup(ctx, groupID) })
}

// DeleteGroup is Store.DeleteGroup inside the transaction.
func (t *Tx) DeleteGroup(ctx context.Context, groupID string) error {
	if _, err := t.tx.ExecContext(ctx, `DELETE FROM groups WHERE group_id = ?`, groupID); err != nil {
		return fmt.Errorf("localstore: delete group %s: %w", groupID, err)
	}
	return nil
}

// ---------------------------------------------------------------- distribution set

// MarkDistributed adds devices (each "account.device", as
// wire.DeviceAddr.String) to the set of devices this device has sent its
// current sender key for the group to. The group must be stored (SaveGroup)
// or the error wraps ErrNoGroup.
func (s *Store) MarkDistributed(ctx context.Context, groupID string, devices []string) error {
	return s.Update(ctx, func(tx *Tx) error { return tx.MarkDistributed(ctx, groupID, devices) })
}

// MarkDistributed is Store.MarkDistributed inside the transaction.
func (t *Tx) MarkDistributed(ctx context.Context, groupID string, devices []string) error {
	return t.changeDistributed(ctx, groupID, func(set []string) []string {
		return append(set, devices...)
	})
}

// UnmarkDistributed removes devices from the group's distribution set (e.g.
// a device that lost its sender keys and asked for them again). The group
// must be stored.
func (s *Store) UnmarkDistributed(ctx context.Context, groupID string, devices []string) error {
	return s.Update(ctx, func(tx *Tx) error { return tx.UnmarkDistributed(ctx, groupID, devices) })
}

// UnmarkDistributed is Store.UnmarkDistributed inside the transaction.
func (t *Tx) UnmarkDistributed(ctx context.Context, groupID string, devices []string) error {
	return t.changeDistributed(ctx, groupID, func(set []string) []string {
		return slices.DeleteFunc(set, func(d string) bool { return slices.Contains(devices, d) })
	})
}

func (t *Tx) changeDistributed(ctx context.Context, groupID string, change func([]string) []string) error {
	var b []byte
	err := t.tx.QueryRowContext(ctx, `SELECT distributed FROM groups WHERE group_id = ?`, groupID).Scan(&b)
	if errors.Is(err, sql.ErrNoRows) {
		return fmt.Errorf("%w: %s", ErrNoGroup, groupID)
	}
	if err != nil {
		return fmt.Errorf("localstore: load distribution of %s: %w", groupID, err)
	}
	set, err := decodeSet(groupID, b)
	if err != nil {
		return err
	}
	set = change(set)
	set = slices.DeleteFunc(set, func(d string) bool { return d == "" })
	slices.Sort(set)
	set = slices.Compact(set)
	enc := []byte{}
	if len(set) > 0 {
		if enc, err = json.Marshal(set); err != nil {
			return fmt.Errorf("localstore: encode distribution of %s: %w", groupID, err)
		}
	}
	if _, err := t.tx.ExecContext(ctx, `UPDATE groups SET distributed = ? WHERE group_id = ?`, enc, groupID); err != nil {
		return fmt.Errorf("localstore: save distribution of %s: %w", groupID, err)
	}
	return nil
}

// Distributed lists, ascending, the devices ("account.device") this device
// has sent its current sender key for the group to; nil for a group that is
// not stored.
func (s *Store) Distributed(ctx context.Context, groupID string) ([]string, error) {
	return distributed(ctx, s.db, groupID)
}

// Distributed is Store.Distributed inside the transaction.
func (t *Tx) Distributed(ctx context.Context, groupID string) ([]string, error) {
	return distributed(ctx, t.tx, groupID)
}

func distributed(ctx context.Context, q querier, groupID string) ([]string, error) {
	var b []byte
	err := q.QueryRowContext(ctx, `SELECT distributed FROM groups WHERE group_id = ?`, groupID).Scan(&b)
	if errors.Is(err, sql.ErrNoRows) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("localstore: load distribution of %s: %w", groupID, err)
	}
	return decodeSet(groupID, b)
}

func decodeSet(groupID string, b []byte) ([]string, error) {
	if len(b) == 0 {
		return nil, nil
	}
	var set []string
	if err := json.Unmarshal(b, &set); err != nil {
		return nil, fmt.Errorf("localstore: decode distribution of %s: %w", groupID, err)
	}
	return set, nil
}

// ResetDistributed empties the group's distribution set (its sender key
// was rotated: nobody has the new one yet). A group that is not stored is
// not an error.
func (s *Store) ResetDistributed(ctx context.Context, groupID string) error {
	return s.Update(ctx, func(tx *Tx) error { return tx.ResetDistributed(ctx, groupID) })
}

// ResetDistributed is Store.ResetDistributed inside the transaction.
func (t *Tx) ResetDistributed(ctx context.Context, groupID string) error {
	if _, err := t.tx.ExecContext(ctx, `UPDATE groups SET distributed = x'' WHERE group_id = ?`, groupID); err != nil {
		return fmt.Errorf("localstore: reset distribution of %s: %w", groupID, err)
	}
	return nil
}
