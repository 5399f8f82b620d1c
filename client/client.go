package client

import (
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	mrand "math/rand/v2"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"time"

	"github.com/ferryhq/ferry/client/e2ee"
	"github.com/ferryhq/ferry/client/localstore"
	"github.com/ferryhq/ferry/wire"
	"github.com/ferryhq/ferry/wire/wirepb"
)

// Errors of the device.
var (
	ErrNotRegistered     = errors.New("client: this home has no registered device (run register first)")
	ErrAlreadyRegistered = errors.New("client: this home already has a registered device")
	ErrNoServer          = errors.New("client: no server URL (pass --server)")
)

// Settings keys in the local store.
const (
	setServer   = "server"
	setUsername = "username"
	setDeviceID = "device_id"
	setKey      = "device_key" // Ed25519 private key; never leaves the device
)

// prekeyBatch is how many one-time prekeys a device uploads at a time.
const prekeyBatch = 100

// Options for Open.
type Options struct {
	Home       string       // directory of the local store
	Logger     *slog.Logger // nil = discard
	Backoff    Backoff      // reconnect and retry waits
	ClientName string
}

// Client is one device: its keys, sessions and history in a local store.
type Client struct {
	opts Options
	log  *slog.Logger
	st   *localstore.Store
	dev  *e2ee.Device // nil until registered

	server   string
	homeMu   sync.Mutex
	home     string // guarded by homeMu: cluster mode, the node serving this account ("" : server)
	username string
	deviceID uint32
	key      ed25519.PrivateKey
}

// Open opens (creating) the device store in o.Home.
func Open(ctx context.Context, o Options) (*Client, error) {
	if err := os.MkdirAll(o.Home, 0o700); err != nil {
		return nil, fmt.Errorf("client: create home: %w", err)
	}
	st, err := localstore.Open(filepath.Join(o.Home, "device.db"))
	if err != nil {
		return nil, err
	}
	c := &Client{opts: o, st: st, log: o.Logger}
	if c.log == nil {
		c.log = slog.New(slog.DiscardHandler)
	}
	if v, ok, err := st.GetSetting(ctx, setServer); err != nil {
		st.Close()
		return nil, err
	} else if ok {
		c.server = string(v)
	}
	if err := c.loadDevice(ctx); err != nil {
		st.Close()
		return nil, err
	}
	return c, nil
}

func (c *Client) loadDevice(ctx context.Context) error {
	user, ok, err := c.st.GetSetting(ctx, setUsername)
	if err != nil || !ok {
		return err
	}
	idb, _, err := c.st.GetSetting(ctx, setDeviceID)
	if err != nil {
		return err
	}
	key, _, err := c.st.GetSetting(ctx, setKey)
	if err != nil {
		return err
	}
	id, err := strconv.ParseUint(string(idb), 10, 32)
	if err != nil || len(key) != ed25519.PrivateKeySize {
		return errors.New("client: local store has a broken device record")
	}
	dev, err := e2ee.Load(ctx, c.st)
	if err != nil {
		return err
	}
	c.username, c.deviceID, c.key, c.dev = string(user), uint32(id), ed25519.PrivateKey(key), dev
	c.dev.SetIdentityVerifier(c.checkIdentity)
	return nil
}

// Close closes the local store.
func (c *Client) Close() error { return c.st.Close() }

// Store is the device's local store (history, settings).
func (c *Client) Store() *localstore.Store { return c.st }

// Username is the account name, "" before registration.
func (c *Client) Username() string { return c.username }

// DeviceID is this device's id within its account.
func (c *Client) DeviceID() uint32 { return c.deviceID }

// Server is the remembered server URL.
func (c *Client) Server() string { return c.server }

// SetServer remembers a server URL.
func (c *Client) SetServer(ctx context.Context, server string) error {
	if _, err := ServerURL(server); err != nil {
		return err
	}
	c.server = server
	return c.st.SetSetting(ctx, setServer, []byte(server))
}

// Register creates the account and its primary device on the server and
// uploads the device's Signal keys.
func (c *Client) Register(ctx context.Context, username string) error {
	if c.username != "" {
		return ErrAlreadyRegistered
	}
	if c.server == "" {
		return ErrNoServer
	}
	dev, err := e2ee.Load(ctx, c.st)
	if err != nil {
		if dev, err = e2ee.Create(ctx, c.st, prekeyBatch); err != nil {
			return err
		}
	}
	_, key, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		return err
	}
	var id uint32
	conn, home, err := DialAs(ctx, c.server, DialOptions{ClientName: c.opts.ClientName}, func(conn *Conn) (err error) {
		id, err = conn.Register(ctx, username, key, dev.RegistrationID())
		return err
	})
	if err != nil {
		return fmt.Errorf("client: register %q: %w", username, err)
	}
	defer conn.Close()
	c.setHome(home)
	for _, kv := range []struct {
		k string
		v []byte
	}{{setKey, key}, {setDeviceID, []byte(strconv.FormatUint(uint64(id), 10))}, {setUsername, []byte(username)}} {
		if err := c.st.SetSetting(ctx, kv.k, kv.v); err != nil {
			return err
		}
	}
	c.username, c.deviceID, c.key, c.dev = username, id, key, dev
	c.dev.SetIdentityVerifier(c.checkIdentity)
	up, err := dev.InitialUpload(ctx)
	if err != nil {
		return err
	}
	if _, err := conn.Do(ctx, &wirepb.ClientFrame{Body: &wirepb.ClientFrame_UploadKeys{UploadKeys: up}}); err != nil {
		return fmt.Errorf("client: upload keys: %w", err)
	}
	// The account's first signed device list: this primary alone. Its own
	// identity key is the one that signs every later list.
	if err := c.st.SetSetting(ctx, setPinned+username, dev.IdentityKey()); err != nil {
		return err
	}
	_, _, err = c.publishList(ctx, conn, []*wirepb.DeviceListEntry{{DeviceId: id, IdentityKey: dev.IdentityKey()}})
	return err
}

// getHome is the node to dial first: the one last found serving this
// account, or the configured server.
func (c *Client) getHome() string {
	c.homeMu.Lock()
	defer c.homeMu.Unlock()
	if c.home != "" {
		return c.home
	}
	return c.server
}

func (c *Client) setHome(url string) {
	c.homeMu.Lock()
	c.home = url
	c.homeMu.Unlock()
}

// connect dials and authenticates. A receiving connection also makes sure
// the server holds this device's keys.
func (c *Client) connect(ctx context.Context, sendOnly bool) (*Conn, error) {
	if c.username == "" {
		return nil, ErrNotRegistered
	}
	if c.server == "" {
		return nil, ErrNoServer
	}
	auth := func(conn *Conn) error {
		_, err := conn.Auth(ctx, c.username, c.deviceID, c.key, sendOnly)
		return err
	}
	// The node last found serving this account first (cluster mode), then
	// the configured server, which redirects.
	home := c.getHome()
	conn, at, err := DialAs(ctx, home, DialOptions{ClientName: c.opts.ClientName}, auth)
	if err != nil && home != c.server {
		conn, at, err = DialAs(ctx, c.server, DialOptions{ClientName: c.opts.ClientName}, auth)
	}
	if err != nil {
		var de *DialError
		if errors.As(err, &de) {
			return nil, err
		}
		return nil, fmt.Errorf("client: auth as %s.%d: %w", c.username, c.deviceID, err)
	}
	c.setHome(at)
	if !sendOnly {
		r, err := conn.Do(ctx, &wirepb.ClientFrame{Body: &wirepb.ClientFrame_KeyStatus{KeyStatus: &wirepb.KeyStatus{}}})
		if err == nil && !r.GetKeyStatus().GetHasSignedPrekey() {
			var up *wirepb.UploadKeys
			if up, err = c.dev.InitialUpload(ctx); err == nil {
				_, err = conn.Do(ctx, &wirepb.ClientFrame{Body: &wirepb.ClientFrame_UploadKeys{UploadKeys: up}})
			}
		}
		if err != nil {
			conn.Close()
			return nil, fmt.Errorf("client: key status: %w", err)
		}
	}
	return conn, nil
}

// Sent is the server's acceptance (✓) of a message.
type Sent struct {
	To          string
	Seq         uint64
	ServerTime  time.Time
	ClientMsgID string
	Duplicate   bool
}

// maxMismatchRounds bounds how often one send re-fetches device lists.
const maxMismatchRounds = 5

// retryable reports whether err may go away on a retry (new connection,
// later time).
func retryable(err error) bool {
	var we *wire.Error
	if errors.As(err, &we) {
		return we.Retryable
	}
	var ce *CloseError
	if errors.As(err, &ce) {
		return ce.Reconnect()
	}
	var de *DialError
	if errors.As(err, &de) {
		return de.Temporary()
	}
	return errors.Is(err, ErrClosed)
}

// Send encrypts text for every device of `to` and every other device of
// this account, and returns once the server has committed it (✓). Network
// failures and retryable errors are retried, with backoff, under the same
// client message id until ctx ends, so a message is never stored twice.
func (c *Client) Send(ctx context.Context, to, text string) (Sent, error) {
	return c.SendWithID(ctx, NewMessageID(), to, text)
}

// NewMessageID makes a random client message id.
func NewMessageID() string {
	var b [16]byte
	_, _ = rand.Read(b[:])
	return hex.EncodeToString(b[:])
}

// SendWithID is Send under a caller-chosen client message id.
func (c *Client) SendWithID(ctx context.Context, id, to, text string) (Sent, error) {
	if c.username == "" {
		return Sent{}, ErrNotRegistered
	}
	content := &wirepb.Content{Text: text, SentTimeMs: time.Now().UnixMilli()}
	bo := c.opts.Backoff
	var conn *Conn
	defer func() {
		if conn != nil {
			conn.Close()
		}
	}()
	rounds := 0
	var lastFix error // the latest failure to fix the device set
	for {
		if conn == nil {
			var err error
			if conn, err = c.connect(ctx, true); err != nil {
				conn = nil
				if !retryable(err) || ctx.Err() != nil {
					return Sent{}, err
				}
				if waitRetryAfter(ctx, err, &bo) != nil {
					return Sent{}, err
				}
				continue
			}
		}
		res, err := c.sendOnce(ctx, conn, id, to, content)
		if err == nil {
			s := Sent{To: to, Seq: res.Seq, ServerTime: time.UnixMilli(res.ServerTimeMs), ClientMsgID: id, Duplicate: res.Duplicate}
			_, err = c.st.AddOutgoing(ctx, localstore.Message{Peer: to, Outgoing: true, Sender: c.username,
				SenderDevice: c.deviceID, Seq: s.Seq, ServerTime: s.ServerTime, Text: text, ClientMsgID: id})
			return s, err
		}
		var we *wire.Error
		switch {
		case errors.As(err, &we) && we.Code == wirepb.ErrorCode_DEVICE_MISMATCH && we.Mismatch != nil:
			if rounds++; rounds > maxMismatchRounds {
				if lastFix != nil {
					return Sent{}, lastFix // why the set could not be fixed
				}
				return Sent{}, err
			}
			if err = c.fixDevices(ctx, conn, we.Mismatch); err == nil {
				continue
			}
			lastFix = err
			// fixing failed: classify that error like any other
			if errors.Is(err, ErrUnlistedDevice) {
				break // counted above; look again after a wait
			}
			if ctx.Err() != nil || !retryable(err) {
				return Sent{}, err
			}
		case errors.Is(err, ErrUnlistedDevice):
			// A just-linked device shows up on the server a moment before
			// its primary publishes the list naming it: look again a few
			// times, then refuse for good.
			if rounds++; rounds > maxMismatchRounds {
				return Sent{}, err
			}
		case ctx.Err() != nil || !retryable(err):
			return Sent{}, err
		}
		c.log.Debug("client: send retry", "err", err)
		if errors.Is(err, ErrClosed) || conn.Err() != nil {
			conn.Close()
			conn = nil
		}
		if we != nil && we.RetryAfterMs > 0 {
			t := time.NewTimer(time.Duration(we.RetryAfterMs) * time.Millisecond)
			select {
			case <-t.C:
			case <-ctx.Done():
				t.Stop()
				return Sent{}, err
			}
		} else if bo.Wait(ctx) != nil {
			return Sent{}, err
		}
	}
}

func (c *Client) sendOnce(ctx context.Context, conn *Conn, id, to string, content *wirepb.Content) (*wirepb.SendResult, error) {
	peers, err := c.knownDevices(ctx, to)
	if err != nil {
		return nil, err
	}
	if len(peers) == 0 {
		if err := c.claim(ctx, conn, to, nil); err != nil {
			return nil, err
		}
		if peers, err = c.knownDevices(ctx, to); err != nil {
			return nil, err
		}
	}
	var targets []wire.DeviceAddr
	for _, d := range peers {
		targets = append(targets, wire.DeviceAddr{Account: to, Device: d})
	}
	if to != c.username {
		own, err := c.knownDevices(ctx, c.username)
		if err != nil {
			return nil, err
		}
		for _, d := range own {
			targets = append(targets, wire.DeviceAddr{Account: c.username, Device: d})
		}
	}
	var cts []*wirepb.DeviceCiphertext
	for _, t := range targets {
		if t.Account == c.username && t.Device == c.deviceID {
			continue
		}
		has, err := c.dev.HasSession(ctx, t.Account, t.Device)
		if err != nil {
			return nil, err
		}
		if !has {
			if err := c.claim(ctx, conn, t.Account, []uint32{t.Device}); err != nil {
				return nil, err
			}
		}
		ct, err := c.dev.Encrypt(ctx, t.Account, t.Device, content)
		if err != nil {
			return nil, fmt.Errorf("client: encrypt for %s: %w", t, err)
		}
		cts = append(cts, ct)
	}
	r, err := conn.Do(ctx, &wirepb.ClientFrame{Body: &wirepb.ClientFrame_Send{Send: &wirepb.Send{
		ClientMsgId: id, To: to, Ciphertexts: cts}}})
	if err != nil {
		return nil, err
	}
	return r.GetSend(), nil
}

// claim fetches bundles (all devices of account when ids is nil), builds
// sessions and records the devices as known.
// waitRetryAfter waits as long as a refused dial's Retry-After says (429:
// too many connections from this address; 503: draining), else the next
// backoff step.
func waitRetryAfter(ctx context.Context, err error, bo *Backoff) error {
	var de *DialError
	if !errors.As(err, &de) || de.RetryAfter <= 0 {
		return bo.Wait(ctx)
	}
	t := time.NewTimer(de.RetryAfter + mrand.N(de.RetryAfter/4+1)) // jitter: not all back at once
	defer t.Stop()
	select {
	case <-t.C:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// doPaced is conn.Do that waits out RATE_LIMITED answers (their
// retry_after_ms) until ctx ends, for requests a client makes in bulk:
// bundle claims and sender keys to every device of a group.
func doPaced(ctx context.Context, conn *Conn, f *wirepb.ClientFrame) (*wirepb.Response, error) {
	for {
		r, err := conn.Do(ctx, f)
		var we *wire.Error
		if !errors.As(err, &we) || we.Code != wirepb.ErrorCode_RATE_LIMITED || we.RetryAfterMs == 0 {
			return r, err
		}
		t := time.NewTimer(time.Duration(we.RetryAfterMs) * time.Millisecond)
		select {
		case <-t.C:
		case <-ctx.Done():
			t.Stop()
			return nil, err
		}
	}
}

func (c *Client) claim(ctx context.Context, conn *Conn, account string, ids []uint32) error {
	r, err := doPaced(ctx, conn, &wirepb.ClientFrame{Body: &wirepb.ClientFrame_ClaimBundles{ClaimBundles: &wirepb.ClaimBundles{
		Username: account, DeviceIds: ids}}})
	if err != nil {
		return fmt.Errorf("client: fetch keys of %s: %w", account, err)
	}
	for _, b := range r.GetClaimBundles().GetBundles() {
		if account == c.username && b.DeviceId == c.deviceID {
			continue
		}
		// Only devices on the account's signed list get a session; the
		// identity verifier then checks the bundle's key against the list.
		if err := c.ensureListed(ctx, conn, account, b.DeviceId); err != nil {
			return err
		}
		if err := c.dev.BuildSession(ctx, account, b); err != nil {
			if !errors.Is(err, e2ee.ErrIdentityChanged) {
				return fmt.Errorf("client: session with %s.%d: %w", account, b.DeviceId, err)
			}
			c.log.Warn("client: identity key changed", "device", fmt.Sprintf("%s.%d", account, b.DeviceId))
		}
	}
	return nil
}

// fixDevices applies a DEVICE_MISMATCH: new devices get sessions, removed
// ones are forgotten, re-registered ones get fresh sessions.
func (c *Client) fixDevices(ctx context.Context, conn *Conn, mm *wirepb.DeviceMismatch) error {
	for _, r := range mm.Extra {
		if err := c.dev.DropSession(ctx, r.Username, r.DeviceId); err != nil {
			return err
		}
	}
	need := map[string][]uint32{}
	for _, r := range mm.Stale {
		if err := c.dev.DropSession(ctx, r.Username, r.DeviceId); err != nil {
			return err
		}
		need[r.Username] = append(need[r.Username], r.DeviceId)
	}
	for _, r := range mm.Missing {
		need[r.Username] = append(need[r.Username], r.DeviceId)
	}
	for acct, ids := range need {
		if err := c.claim(ctx, conn, acct, ids); err != nil {
			return err
		}
	}
	return nil
}

// knownDevices are the devices of account this device has sessions with:
// the device list as last learned from bundles and mismatch answers.
func (c *Client) knownDevices(ctx context.Context, account string) ([]uint32, error) {
	return c.dev.SessionDevices(ctx, account)
}

// History is the local history of the 1:1 conversation with peer.
func (c *Client) History(ctx context.Context, peer string) ([]localstore.Message, error) {
	return c.st.History(ctx, peer, "")
}
