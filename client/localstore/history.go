package localstore

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"time"

	"github.com/ferryhq/ferry/wire"
)

// Message is one row of the device's message history.
type Message struct {
	LocalID      int64     // assigned by the store
	Peer         string    // the other account of the 1:1 conversation; "" in a group
	Group        string    // the group id; "" for 1:1
	Outgoing     bool      // sent by this account (by this device, or a sync copy from another one)
	Sender       string    // sending account
	SenderDevice uint32    // sending device
	Seq          uint64    // server's per-conversation sequence number; history is ordered by it
	ServerTime   time.Time // server's accept time (zero if unknown)
	Text         string
	ClientMsgID  string
	EnvelopeID   uint64 // the envelope it came in; 0 for this device's own sends
	Delivered    bool   // ✓✓ for outgoing: a recipient device acked it
	Failed       bool   // the envelope could not be decrypted; Text is empty
	Read         bool   // outgoing: read by the other side (up-to-seq READ marker)
	// HistoryChunk and Imported are set (not stored) on what
	// e2ee.Device.Receive returns for a history chunk from another device of
	// this account: it is no message itself; Imported messages were added.
	HistoryChunk bool
	Imported     int
	// SenderKey is set (not stored) on what e2ee.Device.Receive returns for
	// a pairwise message that carried a group sender key: it is no message
	// itself and has no history row (LocalID 0); ack it without showing it.
	SenderKey bool
}

// ErrInvalidMessage is returned for a history row that cannot be stored as
// given (e.g. no client message id on an own send).
var ErrInvalidMessage = errors.New("localstore: invalid message")

const messageColumns = `local_id, peer, grp, outgoing, sender, sender_device, seq, server_time_ms, text,
	client_msg_id, envelope_id, delivered, failed, read`

func timeToMs(t time.Time) int64 {
	if t.IsZero() {
		return 0
	}
	return t.UnixMilli()
}

func msToTime(ms int64) time.Time {
	if ms == 0 {
		return time.Time{}
	}
	return time.UnixMilli(ms)
}

func insertMessage(ctx context.Context, q querier, m Message, ignoreDup bool) (int64, bool, error) {
	query := `INSERT INTO messages(peer, grp, outgoing, sender, sender_device, seq, server_time_ms, text,
		client_msg_id, envelope_id, delivered, failed) VALUES(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)`
	if ignoreDup {
		query += ` ON CONFLICT DO NOTHING`
	}
	res, err := q.ExecContext(ctx, query, m.Peer, m.Group, m.Outgoing, m.Sender, m.SenderDevice,
		int64(m.Seq), timeToMs(m.ServerTime), m.Text, m.ClientMsgID, int64(m.EnvelopeID), m.Delivered, m.Failed)
	if err != nil {
		return 0, false, fmt.Errorf("localstore: add message: %w", err)
	}
	if n, _ := res.RowsAffected(); n == 0 {
		return 0, false, nil
	}
	id, err := res.LastInsertId()
	if err != nil {
		return 0, false, fmt.Errorf("localstore: add message: %w", err)
	}
	return id, true, nil
}

// AddOutgoing records a message this device sent, once the server accepted
// it (✓; m.Seq and m.ServerTime are the server's). Outgoing is set and
// EnvelopeID and Failed cleared. A message with the same conversation (Peer,
// Group) and ClientMsgID is stored only once, so recording a retried send
// again is harmless: the first row is kept and its local id returned.
func (s *Store) AddOutgoing(ctx context.Context, m Message) (localID int64, err error) {
	if !wire.ValidClientMsgID(m.ClientMsgID) {
		return 0, fmt.Errorf("%w: client message id %q", ErrInvalidMessage, m.ClientMsgID)
	}
	if m.Peer == "" && m.Group == "" {
		return 0, fmt.Errorf("%w: no conversation", ErrInvalidMessage)
	}
	m.Outgoing = true
	m.EnvelopeID = 0
	m.Failed = false
	err = s.Update(ctx, func(tx *Tx) error {
		id, ok, err := insertMessage(ctx, tx.tx, m, true)
		if err != nil {
			return err
		}
		if !ok {
			err = tx.tx.QueryRowContext(ctx,
				`SELECT local_id FROM messages WHERE peer = ? AND grp = ? AND client_msg_id = ?
				 AND envelope_id = 0 AND outgoing = 1`, m.Peer, m.Group, m.ClientMsgID).Scan(&id)
			if err != nil {
				return fmt.Errorf("localstore: add message: %w", err)
			}
		}
		localID = id
		return nil
	})
	return localID, err
}

// AddReceived records a message that came in envelope m.EnvelopeID (which
// must not be 0) and returns its local id. It does not mark the envelope
// seen: do that with MarkSeen in the same transaction.
func (t *Tx) AddReceived(ctx context.Context, m Message) (int64, error) {
	if m.EnvelopeID == 0 {
		return 0, fmt.Errorf("%w: envelope id 0", ErrInvalidMessage)
	}
	if id, ok, err := t.existing(ctx, m); err != nil || ok {
		return id, err
	}
	id, _, err := insertMessage(ctx, t.tx, m, false)
	return id, err
}

// existing finds a row for the same message (conversation, sending device
// and client message id): a message can reach a newly linked device both
// directly and inside the history its primary sends.
func (t *Tx) existing(ctx context.Context, m Message) (int64, bool, error) {
	if m.ClientMsgID == "" {
		return 0, false, nil
	}
	var id int64
	err := t.tx.QueryRowContext(ctx, `SELECT local_id FROM messages
		WHERE peer = ? AND grp = ? AND client_msg_id = ? AND sender = ? AND sender_device = ? LIMIT 1`,
		m.Peer, m.Group, m.ClientMsgID, m.Sender, m.SenderDevice).Scan(&id)
	if errors.Is(err, sql.ErrNoRows) {
		return 0, false, nil
	}
	if err != nil {
		return 0, false, fmt.Errorf("localstore: find message: %w", err)
	}
	return id, true, nil
}

// ImportHistory adds messages from another device's history (a newly
// linked device's backfill). Messages already present are skipped. It
// returns how many were added.
func (t *Tx) ImportHistory(ctx context.Context, ms []Message) (int, error) {
	n := 0
	for _, m := range ms {
		if _, ok, err := t.existing(ctx, m); err != nil {
			return n, err
		} else if ok {
			continue
		}
		m.EnvelopeID = 0
		if _, added, err := insertMessage(ctx, t.tx, m, true); err != nil {
			return n, err
		} else if added {
			n++
		}
	}
	return n, nil
}

// History returns the messages of one conversation, ordered by Seq then
// LocalID: the 1:1 conversation with peer if group is "", else the group's
// (peer is then ignored; group rows have Peer "").
func (s *Store) History(ctx context.Context, peer, group string) ([]Message, error) {
	query := `SELECT ` + messageColumns + ` FROM messages WHERE peer = ? AND grp = '' ORDER BY seq, local_id`
	arg := peer
	if group != "" {
		query = `SELECT ` + messageColumns + ` FROM messages WHERE grp = ? ORDER BY seq, local_id`
		arg = group
	}
	rows, err := s.db.QueryContext(ctx, query, arg)
	if err != nil {
		return nil, fmt.Errorf("localstore: history: %w", err)
	}
	defer rows.Close()
	var ms []Message
	for rows.Next() {
		m, err := scanMessage(rows)
		if err != nil {
			return nil, fmt.Errorf("localstore: history: %w", err)
		}
		ms = append(ms, m)
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("localstore: history: %w", err)
	}
	return ms, nil
}

// Message returns the history row with the given local id.
func (s *Store) Message(ctx context.Context, localID int64) (Message, bool, error) {
	rows, err := s.db.QueryContext(ctx, `SELECT `+messageColumns+` FROM messages WHERE local_id = ?`, localID)
	if err != nil {
		return Message{}, false, fmt.Errorf("localstore: message: %w", err)
	}
	defer rows.Close()
	if !rows.Next() {
		return Message{}, false, rows.Err()
	}
	m, err := scanMessage(rows)
	if err != nil {
		return Message{}, false, fmt.Errorf("localstore: message: %w", err)
	}
	return m, true, nil
}

func scanMessage(rows *sql.Rows) (Message, error) {
	var m Message
	var seq, ms, env int64
	err := rows.Scan(&m.LocalID, &m.Peer, &m.Group, &m.Outgoing, &m.Sender, &m.SenderDevice, &seq, &ms,
		&m.Text, &m.ClientMsgID, &env, &m.Delivered, &m.Failed, &m.Read)
	m.Seq, m.ServerTime, m.EnvelopeID = uint64(seq), msToTime(ms), uint64(env)
	return m, err
}

// MarkUpTo applies an "up to seq" receipt marker: this account's outgoing
// messages in the conversation (peer for 1:1 with group "", or the group)
// with seq <= seq become delivered, and with read also read. It returns how
// many rows changed.
func (s *Store) MarkUpTo(ctx context.Context, peer, group string, seq uint64, read bool) (int, error) {
	set := "delivered = 1"
	if read {
		set = "delivered = 1, read = 1"
	}
	where := "peer = ? AND grp = ''"
	arg := peer
	if group != "" {
		where, arg = "grp = ?", group
	}
	res, err := s.db.ExecContext(ctx, `UPDATE messages SET `+set+` WHERE `+where+
		` AND outgoing = 1 AND seq <= ? AND seq > 0 AND (delivered = 0 OR (? AND read = 0))`, arg, int64(seq), read)
	if err != nil {
		return 0, fmt.Errorf("localstore: mark up to seq: %w", err)
	}
	n, err := res.RowsAffected()
	return int(n), err
}

// MarkDelivered marks this account's outgoing 1:1 messages to peer with the
// given client message id as delivered (✓✓). It reports whether a row changed
// (false if none matches or it was already marked).
func (s *Store) MarkDelivered(ctx context.Context, peer, clientMsgID string) (bool, error) {
	res, err := s.db.ExecContext(ctx,
		`UPDATE messages SET delivered = 1
		 WHERE peer = ? AND grp = '' AND client_msg_id = ? AND outgoing = 1 AND delivered = 0`,
		peer, clientMsgID)
	if err != nil {
		return false, fmt.Errorf("localstore: mark delivered: %w", err)
	}
	n, err := res.RowsAffected()
	if err != nil {
		return false, fmt.Errorf("localstore: mark delivered: %w", err)
	}
	return n > 0, nil
}

// Seen reports whether the envelope with this id was handled already (its
// history row is stored, so a redelivery only needs another ack).
func (s *Store) Seen(ctx context.Context, envelopeID uint64) (bool, error) {
	return seen(ctx, s.db, envelopeID)
}

// Seen is Store.Seen inside the transaction.
func (t *Tx) Seen(ctx context.Context, envelopeID uint64) (bool, error) {
	return seen(ctx, t.tx, envelopeID)
}

// MarkSeen records that the envelope was handled. Marking it twice is not
// an error.
func (t *Tx) MarkSeen(ctx context.Context, envelopeID uint64) error {
	_, err := t.tx.ExecContext(ctx,
		`INSERT INTO seen(envelope_id, seen_ms) VALUES(?, ?) ON CONFLICT(envelope_id) DO NOTHING`,
		int64(envelopeID), nowMs())
	if err != nil {
		return fmt.Errorf("localstore: mark envelope %d seen: %w", envelopeID, err)
	}
	return nil
}

func seen(ctx context.Context, q querier, envelopeID uint64) (bool, error) {
	var one int
	err := q.QueryRowContext(ctx, `SELECT 1 FROM seen WHERE envelope_id = ?`, int64(envelopeID)).Scan(&one)
	if errors.Is(err, sql.ErrNoRows) {
		return false, nil
	}
	if err != nil {
		return false, fmt.Errorf("localstore: check envelope %d: %w", envelopeID, err)
	}
	return true, nil
}

// Conversations lists the peers of every 1:1 conversation with history.
func (s *Store) Conversations(ctx context.Context) ([]string, error) {
	rows, err := s.db.QueryContext(ctx, `SELECT DISTINCT peer FROM messages WHERE grp = '' ORDER BY peer`)
	if err != nil {
		return nil, fmt.Errorf("localstore: conversations: %w", err)
	}
	defer rows.Close()
	var out []string
	for rows.Next() {
		var p string
		if err := rows.Scan(&p); err != nil {
			return nil, fmt.Errorf("localstore: conversations: %w", err)
		}
		out = append(out, p)
	}
	return out, rows.Err()
}
