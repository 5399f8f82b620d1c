// Package localstore is a Ferry device's local store: one SQLite file (for
// the CLI, HOME/device.db) holding the device's settings, its Signal state
// (own identity, trusted remote identities, sessions, prekeys, group sender
// keys), the groups it belongs to and its message history.
//
// The file is opened in WAL mode with a busy timeout, synchronous=FULL and
// foreign keys on, so that several processes may share one home (a running
// `ferry recv` and a `ferry send`): every write transaction starts with
// BEGIN IMMEDIATE and so takes the write lock up front, and the others wait
// for it (up to BusyTimeout) instead of failing. Every commit is fsynced
// before it returns, so a caller may act on it (ack an envelope, send a
// ciphertext) right after.
//
// Signal state is kept serialized (raw key bytes, serialized session
// records): every load returns fresh bytes that the caller owns, never a
// pointer into shared state.
//
// The schema is created and migrated by Open; its version is SQLite's
// user_version (see SchemaVersion).
package localstore

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	_ "modernc.org/sqlite" // registers the "sqlite" driver
)

// SchemaVersion is the schema version Open migrates a file to (SQLite's
// PRAGMA user_version).
const SchemaVersion = 3

// BusyTimeout is how long a statement waits for a lock another connection
// (or process) holds before failing with SQLITE_BUSY.
const BusyTimeout = 10 * time.Second

// ErrTooNew is returned by Open for a file whose schema is newer than this
// code knows.
var ErrTooNew = errors.New("localstore: database schema is newer than this program")

// Store is an open local store. It is safe for concurrent use, also by
// several processes on the same file.
type Store struct {
	db   *sql.DB
	path string
}

// Options tune OpenWith. The zero value is what Open uses.
type Options struct {
	// NoSync turns fsync off (synchronous=OFF): commits are much cheaper
	// but the last ones may be lost, or the file corrupted, on a power
	// failure or OS crash (not on a process crash). Only for tests,
	// fuzzing and load tools, never for a real device: an ack or a sent
	// ciphertext could then outlive the state it depends on.
	NoSync bool
}

// Open opens (creating it with mode 0600 if needed) the store at path and
// migrates its schema. The path must not contain '?'.
func Open(path string) (*Store, error) { return OpenWith(path, Options{}) }

// OpenWith is Open with options.
func OpenWith(path string, o Options) (*Store, error) {
	if path == "" || strings.ContainsRune(path, '?') {
		return nil, fmt.Errorf("localstore: invalid path %q", path)
	}
	abs, err := filepath.Abs(path)
	if err != nil {
		return nil, fmt.Errorf("localstore: %w", err)
	}
	// The file holds private keys: create it owner-only. SQLite gives the
	// -wal and -shm files the database file's mode.
	f, err := os.OpenFile(abs, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("localstore: %w", err)
	}
	f.Close()

	sync := "FULL"
	if o.NoSync {
		sync = "OFF"
	}
	dsn := abs + "?_txlock=immediate" +
		fmt.Sprintf("&_pragma=busy_timeout(%d)", BusyTimeout.Milliseconds()) +
		"&_pragma=journal_mode(WAL)" +
		"&_pragma=synchronous(" + sync + ")" +
		"&_pragma=foreign_keys(1)"
	db, err := sql.Open("sqlite", dsn)
	if err != nil {
		return nil, fmt.Errorf("localstore: open %s: %w", abs, err)
	}
	db.SetMaxIdleConns(4)
	s := &Store{db: db, path: abs}
	// SQLite can answer SQLITE_BUSY without waiting while another process
	// turns a new file into WAL mode or recovers its WAL; retry the first
	// transaction for up to BusyTimeout.
	deadline := time.Now().Add(BusyTimeout)
	for {
		err = s.migrate(context.Background())
		if err == nil {
			return s, nil
		}
		if !isBusy(err) || time.Now().After(deadline) {
			db.Close()
			return nil, err
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// isBusy reports whether err is SQLite's "database is locked".
func isBusy(err error) bool {
	s := err.Error()
	return strings.Contains(s, "SQLITE_BUSY") || strings.Contains(s, "database is locked")
}

// Path is the absolute path of the database file.
func (s *Store) Path() string { return s.path }

// Close closes the store. Transactions still open are rolled back.
func (s *Store) Close() error { return s.db.Close() }

// migrations[i] moves the schema from version i to i+1.
var migrations = []string{
	// 0 -> 1
	`
CREATE TABLE settings (
	key   TEXT PRIMARY KEY,
	value BLOB NOT NULL
) WITHOUT ROWID;

CREATE TABLE counters (
	name  TEXT PRIMARY KEY,
	value INTEGER NOT NULL
) WITHOUT ROWID;

CREATE TABLE local_identity (
	id              INTEGER PRIMARY KEY CHECK (id = 1),
	public_key      BLOB NOT NULL,
	private_key     BLOB NOT NULL,
	registration_id INTEGER NOT NULL
);

CREATE TABLE remote_identities (
	address       TEXT PRIMARY KEY,
	identity_key  BLOB NOT NULL,
	first_seen_ms INTEGER NOT NULL,
	updated_ms    INTEGER NOT NULL
) WITHOUT ROWID;

CREATE TABLE sessions (
	address    TEXT PRIMARY KEY,
	account    TEXT NOT NULL,
	device_id  INTEGER NOT NULL,
	record     BLOB NOT NULL,
	updated_ms INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX sessions_by_account ON sessions(account, device_id);

CREATE TABLE prekeys (
	id          INTEGER PRIMARY KEY,
	public_key  BLOB NOT NULL,
	private_key BLOB NOT NULL,
	created_ms  INTEGER NOT NULL
);

CREATE TABLE signed_prekeys (
	id           INTEGER PRIMARY KEY,
	public_key   BLOB NOT NULL,
	private_key  BLOB NOT NULL,
	signature    BLOB NOT NULL,
	timestamp_ms INTEGER NOT NULL
);

CREATE TABLE messages (
	local_id       INTEGER PRIMARY KEY AUTOINCREMENT,
	peer           TEXT NOT NULL,
	grp            TEXT NOT NULL DEFAULT '',
	outgoing       INTEGER NOT NULL,
	sender         TEXT NOT NULL,
	sender_device  INTEGER NOT NULL,
	seq            INTEGER NOT NULL,
	server_time_ms INTEGER NOT NULL,
	text           TEXT NOT NULL,
	client_msg_id  TEXT NOT NULL,
	envelope_id    INTEGER NOT NULL DEFAULT 0,
	delivered      INTEGER NOT NULL DEFAULT 0,
	failed         INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX messages_by_conversation ON messages(peer, grp, seq, local_id);
CREATE INDEX messages_by_client_msg_id ON messages(peer, client_msg_id);
-- A retried send (same client message id) is stored once.
CREATE UNIQUE INDEX messages_own_sends ON messages(peer, grp, client_msg_id)
	WHERE envelope_id = 0 AND outgoing = 1;

CREATE TABLE seen (
	envelope_id INTEGER PRIMARY KEY,
	seen_ms     INTEGER NOT NULL
);
`,
	// 1 -> 2: groups (sender keys and membership)
	`
CREATE TABLE sender_keys (
	group_id   TEXT NOT NULL,
	sender     TEXT NOT NULL, -- "account:device", or '' for this device's own sending key
	record     BLOB NOT NULL,
	updated_ms INTEGER NOT NULL,
	PRIMARY KEY (group_id, sender)
) WITHOUT ROWID;

CREATE TABLE groups (
	group_id    TEXT PRIMARY KEY,
	name        TEXT NOT NULL,
	version     INTEGER NOT NULL,
	info        BLOB NOT NULL,               -- an encoded wirepb.GroupInfo
	distributed BLOB NOT NULL DEFAULT x'',   -- JSON list of "account.device"
	updated_ms  INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX groups_by_name ON groups(name, updated_ms);

CREATE INDEX messages_by_group ON messages(grp, seq, local_id);
`,
	// 2 -> 3: read marks (receipts are "up to seq" markers)
	`
ALTER TABLE messages ADD COLUMN read INTEGER NOT NULL DEFAULT 0;
`,
}

func (s *Store) migrate(ctx context.Context) error {
	// The check and the migration run in one IMMEDIATE transaction, so two
	// processes opening a new file at once do not both migrate it.
	return s.Update(ctx, func(tx *Tx) error {
		var v int
		if err := tx.tx.QueryRowContext(ctx, "PRAGMA user_version").Scan(&v); err != nil {
			return fmt.Errorf("localstore: read schema version: %w", err)
		}
		if v > len(migrations) {
			return fmt.Errorf("%w (version %d, known up to %d)", ErrTooNew, v, len(migrations))
		}
		for ; v < len(migrations); v++ {
			if _, err := tx.tx.ExecContext(ctx, migrations[v]); err != nil {
				return fmt.Errorf("localstore: migrate schema %d->%d: %w", v, v+1, err)
			}
			if _, err := tx.tx.ExecContext(ctx, fmt.Sprintf("PRAGMA user_version = %d", v+1)); err != nil {
				return fmt.Errorf("localstore: set schema version: %w", err)
			}
		}
		return nil
	})
}

// Tx is a write (or, from View, read-only) transaction. Its methods are the
// Signal state and history operations that must commit together, e.g. a
// received envelope's session update, its history row and its seen mark.
// A Tx is not safe for concurrent use.
type Tx struct {
	s  *Store
	tx *sql.Tx
}

// Begin starts a write transaction. It takes the database's write lock
// (BEGIN IMMEDIATE), waiting up to BusyTimeout for another writer. The caller
// must Commit or Rollback it.
func (s *Store) Begin(ctx context.Context) (*Tx, error) {
	tx, err := s.db.BeginTx(ctx, nil)
	if err != nil {
		return nil, fmt.Errorf("localstore: begin: %w", err)
	}
	return &Tx{s: s, tx: tx}, nil
}

// Commit commits the transaction durably.
func (t *Tx) Commit() error {
	if err := t.tx.Commit(); err != nil {
		return fmt.Errorf("localstore: commit: %w", err)
	}
	return nil
}

// Rollback abandons the transaction. It is a no-op after Commit.
func (t *Tx) Rollback() error {
	err := t.tx.Rollback()
	if err != nil && !errors.Is(err, sql.ErrTxDone) {
		return fmt.Errorf("localstore: rollback: %w", err)
	}
	return nil
}

// Update runs fn in a write transaction and commits it if fn returns nil;
// otherwise (or if fn panics) it rolls back and returns fn's error.
func (s *Store) Update(ctx context.Context, fn func(*Tx) error) error {
	tx, err := s.Begin(ctx)
	if err != nil {
		return err
	}
	defer tx.Rollback()
	if err := fn(tx); err != nil {
		return err
	}
	return tx.Commit()
}

// View runs fn in a read-only transaction (a consistent snapshot). fn must
// not write.
func (s *Store) View(ctx context.Context, fn func(*Tx) error) error {
	tx, err := s.db.BeginTx(ctx, &sql.TxOptions{ReadOnly: true})
	if err != nil {
		return fmt.Errorf("localstore: begin: %w", err)
	}
	t := &Tx{s: s, tx: tx}
	defer t.Rollback()
	return fn(t)
}

// querier is what both *sql.DB and *sql.Tx offer.
type querier interface {
	ExecContext(ctx context.Context, query string, args ...any) (sql.Result, error)
	QueryContext(ctx context.Context, query string, args ...any) (*sql.Rows, error)
	QueryRowContext(ctx context.Context, query string, args ...any) *sql.Row
}

func nowMs() int64 { return time.Now().UnixMilli() }

// clone returns a copy of b that shares no memory with it (nil stays nil).
func clone(b []byte) []byte {
	if b == nil {
		return nil
	}
	return append(make([]byte, 0, len(b)), b...)
}
