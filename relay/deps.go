package relay

import (
	"context"

	"github.com/ferryhq/ferry/group"
	"github.com/ferryhq/ferry/inbox"
	"github.com/ferryhq/ferry/presence"
	"github.com/ferryhq/ferry/push"
	"github.com/ferryhq/ferry/store/storepb"
	"github.com/ferryhq/ferry/wire"
	"github.com/ferryhq/ferry/wire/wirepb"
)

// Accounts is what the relay needs of the device store.
type Accounts interface {
	Register(ctx context.Context, username string, signingKey []byte, registrationID uint32) (*storepb.Device, error)
	Account(ctx context.Context, username string) (*storepb.Account, error)
	Device(ctx context.Context, addr wire.DeviceAddr) (*storepb.Device, error)
	AddDevice(ctx context.Context, username string, signingKey []byte, registrationID uint32) (*storepb.Device, error)
	RemoveDevice(ctx context.Context, addr wire.DeviceAddr) error
	DeviceList(ctx context.Context, username string) (*wirepb.SignedDeviceList, uint64, error)
	PublishDeviceList(ctx context.Context, username string, signed *wirepb.SignedDeviceList, primaryIdentity []byte) ([]uint32, error)
}

// Prekeys is what the relay needs of the prekey directory.
type Prekeys interface {
	Upload(ctx context.Context, dev wire.DeviceAddr, up *wirepb.UploadKeys) (int, error)
	Claim(ctx context.Context, requester wire.DeviceAddr, account string, deviceIDs []uint32) ([]*wirepb.PreKeyBundle, error)
	Count(ctx context.Context, dev wire.DeviceAddr) (int, bool, error)
	LowThreshold() int
	IdentityKey(ctx context.Context, dev wire.DeviceAddr) ([]byte, error)
	DeleteDevice(ctx context.Context, dev wire.DeviceAddr) error
}

// Inbox is what the relay needs of the inbox store.
type Inbox interface {
	Append(ctx context.Context, m inbox.Send) (inbox.Accepted, error)
	AppendGroup(ctx context.Context, m inbox.GroupAppend) (inbox.Accepted, error)
	Lookup(ctx context.Context, sender wire.DeviceAddr, clientMsgID string) (inbox.Accepted, bool, error)
	Range(ctx context.Context, dev wire.DeviceAddr, after uint64, limit int) ([]inbox.Item, error)
	RangeRaw(ctx context.Context, dev wire.DeviceAddr, after uint64, limit int) ([]inbox.Item, error)
	Get(ctx context.Context, dev wire.DeviceAddr, id uint64) (*wirepb.Envelope, error)
	Ack(ctx context.Context, dev wire.DeviceAddr, ids []uint64, follow map[uint64][]inbox.Entry) ([]uint64, error)
	AppendMarkers(ctx context.Context, entries []inbox.Entry) (int, error)
	DeleteDevice(ctx context.Context, dev wire.DeviceAddr) error
}

// Groups is what the relay needs of the group membership store.
type Groups interface {
	// CreateWith and ChangeWith hand the membership writes to commit, which
	// stores them in the batch of the GROUP_UPDATE (see group.CommitFunc).
	CreateWith(ctx context.Context, creator, name string, members []string, commit group.CommitFunc) (*storepb.Group, error)
	Get(ctx context.Context, id string) (*storepb.Group, error)
	ChangeWith(ctx context.Context, requester, id string, op wirepb.GroupChange_Op, members []string, commit group.CommitFunc) (group.Change, error)
	ListFor(ctx context.Context, username string) ([]*storepb.Group, error)
}

// Push is what the relay needs of the push dispatcher (push.Dispatcher).
type Push interface {
	// Wake asks for a wake-up push to a device with no live receiving
	// connection here. It must never block or do I/O: the inbox committer
	// calls it.
	Wake(dev wire.DeviceAddr, r push.Reason)
	// Set and Clear store and remove a device's push registration.
	Set(ctx context.Context, dev wire.DeviceAddr, reg *wirepb.PushRegistration) error
	Clear(ctx context.Context, dev wire.DeviceAddr) error
}

// Presence is what the relay needs of the presence store: last seen
// (best-effort) and the privacy setting (durable). presence.Store is one.
type Presence = presence.Backend

// Cluster is what the relay needs of cluster mode (package route); nil in
// the embedded single-node mode.
type Cluster interface {
	// Home returns "" if this node serves account now, else the URL of the
	// node that does (the client is redirected there); an error (retryable)
	// when nobody does.
	Home(ctx context.Context, account string) (redirect string, err error)
	// Forward runs f as dev on the node that owns the other account or the
	// group f is about. handled is false when that is this node (or f is
	// about nothing else), and the relay serves f itself.
	Forward(ctx context.Context, dev wire.DeviceAddr, f *wirepb.ClientFrame) (res *wirepb.Response, handled bool, err error)
	// Deliver hands an encoded ServerFrame (typing) to devices of other
	// nodes' connections, best-effort.
	Deliver(ctx context.Context, devs []wire.DeviceAddr, frame []byte)
	// ServesAccount reports whether this node serves account now.
	ServesAccount(account string) bool
	// DeviceConnected and DeviceDisconnected tell the cluster's device
	// registry that dev's receiving connection is on this node / ended.
	// They must not block (the registry is in Redis).
	DeviceConnected(dev wire.DeviceAddr)
	DeviceDisconnected(dev wire.DeviceAddr)
}

// Deps are the stores the relay serves from.
type Deps struct {
	Accounts Accounts
	Prekeys  Prekeys
	Inbox    Inbox
	Groups   Groups
	// Push sends wake-ups to offline devices; nil = none (SetPush is then
	// PUSH_UNSUPPORTED).
	Push     Push
	Presence Presence // nil: kept in memory only
	// Cluster routes sockets and requests in cluster mode; nil: one node.
	Cluster Cluster
}
