package client

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/ferryhq/ferry/client/e2ee"
	"github.com/ferryhq/ferry/client/localstore"
	"github.com/ferryhq/ferry/wire/wirepb"
)

// Event is something Receive hands to its callback.
type Event struct {
	// Message is a new message (incoming, or a copy of one this account sent
	// from another device). Failed is set when it could not be decrypted.
	Message *localstore.Message
	// Receipt is set for a delivered receipt (✓✓) of an own message.
	Receipt *wirepb.Receipt
	// Err is why Message could not be decrypted.
	Err error
	// Group is a group's membership after a change (set with Message nil).
	Group *wirepb.GroupInfo
	// Imported counts history messages added from a chunk another device of
	// this account sent (after linking); set with Message nil.
	Imported int
	// Presence is a watched account's presence (ReceiveOptions.Subscribe):
	// first its state at connect, then each change. Best-effort.
	Presence *wirepb.PresenceInfo
	// Typing is someone typing (or stopping) in a conversation of this
	// account. Treat it as stopped after Typing.TtlMs without a refresh.
	Typing *wirepb.TypingEvent
}

// ReceiveOptions for Receive.
type ReceiveOptions struct {
	// UntilEmpty returns once the backlog present at connect is processed
	// and acked. Otherwise Receive runs until ctx ends.
	UntilEmpty bool
	// Handle is called for each event, in inbox order, after it is stored.
	Handle func(Event)
	// Subscribe names accounts whose presence to watch; the subscription is
	// made again on every connection, and their state then is handed to
	// Handle as Presence events.
	Subscribe []string
	// OnConn, if set, is called with each new connection once it is
	// authenticated (for requests such as Typing on it), and with nil when
	// it ends. It runs on Receive's goroutine: do not block.
	OnConn func(*Conn)
}

// healthyAfter is how long a connection must last before a reconnect
// starts the backoff over (a server that accepts and then fails at once
// does not get hammered).
const healthyAfter = 10 * time.Second

// ackBatch is the most ids one Ack carries.
const ackBatch = 32

// Receive connects as this device, stores and acks everything handed to it
// and reconnects with backoff when the connection breaks. It returns nil
// when ctx ends or (UntilEmpty) the backlog is done; it returns an error for
// failures that reconnecting cannot fix (auth failed, replaced by another
// connection of this device).
func (c *Client) Receive(ctx context.Context, o ReceiveOptions) error {
	bo := c.opts.Backoff
	for {
		conn, err := c.connect(ctx, false)
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			if !retryable(err) {
				return err
			}
			c.log.Debug("client: connect failed", "err", err)
		} else {
			start := time.Now()
			done, err := c.serve(ctx, conn, o)
			if time.Since(start) > healthyAfter {
				bo.Reset() // only a connection that lasted resets the backoff
			}
			conn.Close()
			if done || ctx.Err() != nil {
				return nil
			}
			var ce *CloseError
			if errors.As(err, &ce) && !ce.Reconnect() {
				return err
			}
			if err != nil && !errors.As(err, &ce) && !retryable(err) {
				return err
			}
			c.log.Debug("client: connection lost", "err", err)
		}
		if bo.Wait(ctx) != nil {
			return nil
		}
	}
}

// serve processes one connection's events; done reports UntilEmpty reached.
func (c *Client) serve(ctx context.Context, conn *Conn, o ReceiveOptions) (done bool, err error) {
	var (
		pending   []uint64
		wg        sync.WaitGroup
		refilling atomic.Bool
	)
	defer wg.Wait()
	flush := func() {
		if len(pending) == 0 {
			return
		}
		ids := pending
		pending = nil
		wg.Add(1)
		go func() {
			defer wg.Done()
			// A lost ack only means a redelivery, which is dropped by id.
			_, _ = conn.Do(ctx, &wirepb.ClientFrame{Body: &wirepb.ClientFrame_Ack{Ack: &wirepb.Ack{EnvelopeIds: ids}}})
		}()
	}
	defer flush()
	if o.OnConn != nil {
		o.OnConn(conn)
		defer o.OnConn(nil)
	}
	if len(o.Subscribe) > 0 {
		ps, err := conn.SubscribePresence(ctx, o.Subscribe)
		if err != nil {
			return false, err
		}
		for _, p := range ps {
			if o.Handle != nil {
				o.Handle(Event{Presence: p})
			}
		}
	}
	for {
		var ev *wirepb.Event
		select {
		case e, ok := <-conn.Events():
			if !ok {
				return false, conn.Err()
			}
			ev = e
		case <-ctx.Done():
			return false, ctx.Err()
		}
		switch b := ev.Body.(type) {
		case *wirepb.Event_Envelope:
			if err := c.handleEnvelope(ctx, conn, b.Envelope, o.Handle); err != nil {
				return false, err
			}
			pending = append(pending, b.Envelope.Id)
			if len(pending) >= ackBatch || len(conn.Events()) == 0 {
				flush()
			}
		case *wirepb.Event_Presence:
			if o.Handle != nil {
				o.Handle(Event{Presence: b.Presence})
			}
		case *wirepb.Event_Typing:
			if o.Handle != nil {
				o.Handle(Event{Typing: b.Typing})
			}
		case *wirepb.Event_QueueEmpty:
			if o.UntilEmpty {
				flush()
				return true, nil
			}
		case *wirepb.Event_PrekeysLow:
			// One refill at a time, and only while the server still holds
			// few: a burst of claims must not grow the local key store.
			if !refilling.CompareAndSwap(false, true) {
				continue
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				defer refilling.Store(false)
				r, err := conn.Do(ctx, &wirepb.ClientFrame{Body: &wirepb.ClientFrame_KeyStatus{KeyStatus: &wirepb.KeyStatus{}}})
				if err != nil || r.GetKeyStatus().GetOneTimePrekeys() >= b.PrekeysLow.OneTimePrekeys+prekeyBatch/2 {
					return
				}
				up, err := c.dev.NewPreKeys(ctx, prekeyBatch)
				if err == nil {
					_, err = conn.Do(ctx, &wirepb.ClientFrame{Body: &wirepb.ClientFrame_UploadKeys{UploadKeys: up}})
				}
				if err != nil {
					c.log.Warn("client: prekey refill failed", "err", err)
				}
			}()
		}
	}
}

// handleEnvelope stores one envelope's effect locally. An error means the
// envelope must not be acked (local storage trouble); undecryptable
// messages are recorded as failed and acked.
func (c *Client) handleEnvelope(ctx context.Context, conn *Conn, env *wirepb.Envelope, handle func(Event)) error {
	if env.Type == wirepb.EnvelopeType_GROUP_UPDATE {
		g := env.Group
		if g == nil {
			return nil
		}
		member := false
		for _, m := range g.Members {
			member = member || m.Username == c.username
		}
		var err error
		if member {
			err = c.st.SaveGroup(ctx, g)
		} else if err = c.st.DeleteGroup(ctx, g.GroupId); err == nil {
			// Out of the group: its sender keys are of no more use.
			err = c.dev.ForgetGroup(ctx, g.GroupId)
		}
		if err != nil {
			return err
		}
		if handle != nil {
			handle(Event{Group: g})
		}
		return nil
	}
	if env.Type == wirepb.EnvelopeType_RECEIPT {
		r := env.Receipt
		if r == nil {
			return nil
		}
		// An "up to seq" marker: everything of ours in that conversation up
		// to r.Seq was delivered to (or read by) r.Username.
		peer := r.To
		if peer == c.username {
			peer = r.Username
		}
		if r.GroupId != "" {
			peer = ""
		}
		if _, err := c.st.MarkUpTo(ctx, peer, r.GroupId, r.Seq, r.Kind == wirepb.ReceiptKind_READ); err != nil {
			return err
		}
		if handle != nil {
			handle(Event{Receipt: r})
		}
		return nil
	}
	// Messages are accepted only from devices on the sender's signed list
	// (the identity verifier checks the key); learn a new list first.
	if seen, err := c.st.Seen(ctx, env.Id); err != nil {
		return err
	} else if !seen && env.Sender != "" && env.SenderDevice != 0 {
		if err := c.ensureListed(ctx, conn, env.Sender, env.SenderDevice); err != nil && (retryable(err) || ctx.Err() != nil) {
			return err // could not ask: try again after reconnecting
		}
	}
	msg, dup, err := c.dev.Receive(ctx, c.username, env)
	if dup {
		return nil
	}
	if msg != nil && msg.SenderKey {
		return nil // a sender key for a group: stored, nothing to show
	}
	if msg != nil && msg.HistoryChunk {
		if handle != nil {
			handle(Event{Imported: msg.Imported})
		}
		return nil
	}
	if err != nil && !errors.Is(err, e2ee.ErrDecrypt) {
		return fmt.Errorf("client: store envelope %d: %w", env.Id, err)
	}
	if handle != nil && msg != nil {
		handle(Event{Message: msg, Err: err})
	}
	return nil
}
