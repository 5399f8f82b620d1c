package relay

import (
	"context"

	"github.com/ferryhq/ferry/wire"
	"github.com/ferryhq/ferry/wire/wirepb"
)

// setPush stores this device's push registration (Deps.Push checks it),
// replacing any earlier one.
func (c *conn) setPush(ctx context.Context, m *wirepb.SetPush) error {
	if c.s.deps.Push == nil {
		return wire.Errorf(wirepb.ErrorCode_PUSH_UNSUPPORTED, "relay: this server sends no pushes")
	}
	if err := c.s.deps.Push.Set(ctx, c.addr, m.Registration); err != nil {
		return err
	}
	c.s.log.Info("relay: push registration set", "device", c.addr.String(), "kind", m.Registration.Kind.String())
	return nil
}

// clearPush removes this device's push registration.
func (c *conn) clearPush(ctx context.Context) error {
	if c.s.deps.Push == nil {
		return nil // nothing is registered on a server without pushes
	}
	return c.s.deps.Push.Clear(ctx, c.addr)
}
