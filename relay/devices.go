package relay

// Device lists, linking, removal and device-to-device sync (issue 3).
// Stubs: being implemented.

import (
	"context"

	"github.com/ferryhq/ferry/wire"
	"github.com/ferryhq/ferry/wire/wirepb"
)

func errNotYet() error {
	return wire.Errorf(wirepb.ErrorCode_BAD_REQUEST, "relay: not implemented yet")
}

// linkStart runs on the reader (handshake state); it reports whether the
// connection stays open.
func (c *conn) linkStart(id uint64, m *wirepb.LinkStart) bool { return c.badFrame(id, errNotYet()) }

func (c *conn) publishDeviceList(ctx context.Context, m *wirepb.PublishDeviceList) (*wirepb.PublishDeviceListResult, error) {
	return nil, errNotYet()
}

func (c *conn) getDeviceList(ctx context.Context, m *wirepb.GetDeviceList) (*wirepb.GetDeviceListResult, error) {
	return nil, errNotYet()
}

func (c *conn) getLink(ctx context.Context, m *wirepb.GetLink) (*wirepb.GetLinkResult, error) {
	return nil, errNotYet()
}

func (c *conn) approveLink(ctx context.Context, m *wirepb.ApproveLink) (*wirepb.ApproveLinkResult, error) {
	return nil, errNotYet()
}

func (c *conn) removeDevice(ctx context.Context, m *wirepb.RemoveDevice) (*wirepb.RemoveDeviceResult, error) {
	return nil, errNotYet()
}

func (c *conn) syncToDevice(ctx context.Context, m *wirepb.SyncToDevice) (*wirepb.SendResult, error) {
	return nil, errNotYet()
}
