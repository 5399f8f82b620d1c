package client

import (
	"context"
	"fmt"

	"github.com/ferryhq/ferry/wire/wirepb"
)

// SubscribePresence replaces this connection's presence subscriptions and
// returns the current presence of each account. Changes then arrive as
// Event.presence on Events (Receive hands them over as Event.Presence).
func (c *Conn) SubscribePresence(ctx context.Context, usernames []string) ([]*wirepb.PresenceInfo, error) {
	r, err := c.Do(ctx, &wirepb.ClientFrame{Body: &wirepb.ClientFrame_SubscribePresence{SubscribePresence: &wirepb.SubscribePresence{Usernames: usernames}}})
	if err != nil {
		return nil, fmt.Errorf("client: subscribe presence: %w", err)
	}
	return r.GetPresence().GetPresence(), nil
}

// GetPresence returns the current presence of accounts without subscribing.
func (c *Conn) GetPresence(ctx context.Context, usernames []string) ([]*wirepb.PresenceInfo, error) {
	r, err := c.Do(ctx, &wirepb.ClientFrame{Body: &wirepb.ClientFrame_GetPresence{GetPresence: &wirepb.GetPresence{Usernames: usernames}}})
	if err != nil {
		return nil, fmt.Errorf("client: get presence: %w", err)
	}
	return r.GetPresence().GetPresence(), nil
}

// Typing tells the other side of a conversation (peer, or groupID) that
// this device started or stopped typing. Refresh it before the TTL the
// receivers get (default 6 s) runs out, e.g. every 3 s while typing.
// It is best-effort: the server may answer RATE_LIMITED.
func (c *Conn) Typing(ctx context.Context, peer, groupID string, typing bool) error {
	_, err := c.Do(ctx, &wirepb.ClientFrame{Body: &wirepb.ClientFrame_Typing{Typing: &wirepb.Typing{Peer: peer, GroupId: groupID, Typing: typing}}})
	if err != nil {
		return fmt.Errorf("client: typing: %w", err)
	}
	return nil
}

// SetPresencePrivacy sets who may see this account's presence (vis
// VISIBILITY_UNSPECIFIED only reads the current setting).
func (c *Conn) SetPresencePrivacy(ctx context.Context, vis wirepb.PresenceVisibility, allow []string) (*wirepb.PresencePrivacy, error) {
	r, err := c.Do(ctx, &wirepb.ClientFrame{Body: &wirepb.ClientFrame_SetPresencePrivacy{SetPresencePrivacy: &wirepb.SetPresencePrivacy{Visibility: vis, Allow: allow}}})
	if err != nil {
		return nil, fmt.Errorf("client: presence privacy: %w", err)
	}
	return r.GetPresencePrivacy(), nil
}

// Presence asks the server for the presence of accounts (a one-shot,
// send-only connection: asking does not make this account online).
func (c *Client) Presence(ctx context.Context, usernames []string) ([]*wirepb.PresenceInfo, error) {
	conn, err := c.connect(ctx, true)
	if err != nil {
		return nil, err
	}
	defer conn.Close()
	return conn.GetPresence(ctx, usernames)
}

// SetPresencePrivacy sets who may see this account's presence.
func (c *Client) SetPresencePrivacy(ctx context.Context, vis wirepb.PresenceVisibility, allow []string) (*wirepb.PresencePrivacy, error) {
	conn, err := c.connect(ctx, true)
	if err != nil {
		return nil, err
	}
	defer conn.Close()
	return conn.SetPresencePrivacy(ctx, vis, allow)
}

// LocalGroup is a group known on this device by name or id (nil if none).
func (c *Client) LocalGroup(ctx context.Context, nameOrID string) (*wirepb.GroupInfo, error) {
	return c.localGroup(ctx, nameOrID)
}

// SendTyping is a one-shot Typing on a send-only connection (scripts; an
// interactive client uses Conn.Typing on its receiving connection).
func (c *Client) SendTyping(ctx context.Context, nameOrPeer string, group, typing bool) error {
	conn, err := c.connect(ctx, true)
	if err != nil {
		return err
	}
	defer conn.Close()
	if group {
		g, err := c.resolveGroup(ctx, conn, nameOrPeer)
		if err != nil {
			return err
		}
		return conn.Typing(ctx, "", g.GroupId, typing)
	}
	return conn.Typing(ctx, nameOrPeer, "", typing)
}
