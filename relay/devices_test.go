package relay

import (
	"bytes"
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"errors"
	"github.com/ferryhq/ferry/internal/ratelimit"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"slices"
	"testing"
	"time"

	"github.com/cockroachdb/pebble/v2"
	"github.com/ferryhq/ferry/client"
	"github.com/ferryhq/ferry/device"
	"github.com/ferryhq/ferry/device/devicelist"
	"github.com/ferryhq/ferry/group"
	"github.com/ferryhq/ferry/inbox"
	"github.com/ferryhq/ferry/keys"
	"github.com/ferryhq/ferry/presence"
	"github.com/ferryhq/ferry/store"
	"github.com/ferryhq/ferry/wire"
	"github.com/ferryhq/ferry/wire/wirepb"
	"go.mau.fi/libsignal/ecc"
	"golang.org/x/time/rate"
)

// denv is env with the stores at hand.
type denv struct {
	*env
	db       *pebble.DB
	accounts *device.Store
	keys     *keys.Store
	groups   *group.Store
}

func newDevEnv(t *testing.T, cfg Config, do device.Options) *denv {
	t.Helper()
	return newGroupEnv(t, cfg, do, group.Options{})
}

// newGroupEnv is newDevEnv with group store options; each more function
// may change the Deps (e.g. add Push) before the server is made.
func newGroupEnv(t *testing.T, cfg Config, do device.Options, gro group.Options, more ...func(*pebble.DB, *Deps)) *denv {
	t.Helper()
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	db, err := store.OpenMem()
	if err != nil {
		t.Fatal(err)
	}
	var srv *Server
	ib, err := inbox.New(db, inbox.Options{OnAppend: func(d []wire.DeviceAddr) { srv.OnAppend(d) }, SweepInterval: -1})
	if err != nil {
		t.Fatal(err)
	}
	accts, ks := device.New(db, do), keys.New(db, keys.Options{})
	groups := group.New(db, accts, gro)
	deps := Deps{Accounts: accts, Prekeys: ks, Inbox: ib, Groups: groups, Presence: presence.NewStore(db)}
	for _, f := range more {
		f(db, &deps)
	}
	srv = New(cfg, deps)
	hs := httptest.NewServer(fakeRemote(srv.Handler()))
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_ = srv.Shutdown(ctx)
		hs.Close()
		ib.Close()
		db.Close()
	})
	return &denv{env: &env{t: t, srv: srv, http: hs, inbox: ib}, db: db, accounts: accts, keys: ks, groups: groups}
}

// fakeRemote lets a test connect "from" another address: a request's
// X-Test-Remote header ("ip:port") replaces its RemoteAddr.
func fakeRemote(h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if a := r.Header.Get("X-Test-Remote"); a != "" {
			r.RemoteAddr = a
		}
		h.ServeHTTP(w, r)
	})
}

// mdev is one device of an account, with its keys.
type mdev struct {
	name     string
	id       uint32
	key      ed25519.PrivateKey
	reg      uint32
	identity *ecc.ECKeyPair
}

func (d *mdev) addr() wire.DeviceAddr { return wire.DeviceAddr{Account: d.name, Device: d.id} }
func (d *mdev) ik() []byte            { return d.identity.PublicKey().Serialize() }

func newIdentity(t *testing.T) *ecc.ECKeyPair {
	t.Helper()
	kp, err := ecc.GenerateKeyPair()
	if err != nil {
		t.Fatal(err)
	}
	return kp
}

// registerPrimary registers name and uploads its identity key.
func (e *denv) registerPrimary(name string) (*mdev, *client.Conn) {
	e.t.Helper()
	_, key, _ := ed25519.GenerateKey(rand.Reader)
	d := &mdev{name: name, id: 1, key: key, reg: 11, identity: newIdentity(e.t)}
	c := e.dial()
	if _, err := c.Register(ctx(e.t), name, key, d.reg); err != nil {
		e.t.Fatalf("register %s: %v", name, err)
	}
	upload(e.t, c, d.identity)
	return d, c
}

// addDevice adds a device to the store directly (no link flow), connects
// it and uploads its identity key.
func (e *denv) addDevice(name string) (*mdev, *client.Conn) {
	e.t.Helper()
	pub, key, _ := ed25519.GenerateKey(rand.Reader)
	rec, err := e.accounts.AddDevice(ctx(e.t), name, pub, 22)
	if err != nil {
		e.t.Fatal(err)
	}
	d := &mdev{name: name, id: rec.Id, key: key, reg: 22, identity: newIdentity(e.t)}
	c := e.authDev(d, false)
	upload(e.t, c, d.identity)
	return d, c
}

func (e *denv) authDev(d *mdev, sendOnly bool) *client.Conn {
	e.t.Helper()
	c := e.dial()
	if _, err := c.Auth(ctx(e.t), d.name, d.id, d.key, sendOnly); err != nil {
		e.t.Fatalf("auth %s: %v", d.addr(), err)
	}
	return c
}

func upload(t *testing.T, c *client.Conn, ik *ecc.ECKeyPair) {
	t.Helper()
	if err := uploadErr(t, c, ik); err != nil {
		t.Fatal(err)
	}
}

func uploadErr(t *testing.T, c *client.Conn, ik *ecc.ECKeyPair) error {
	t.Helper()
	spk := newIdentity(t)
	sig := ecc.CalculateSignature(ik.PrivateKey(), spk.PublicKey().Serialize())
	otk := newIdentity(t)
	_, err := c.Do(ctx(t), &wirepb.ClientFrame{Body: &wirepb.ClientFrame_UploadKeys{UploadKeys: &wirepb.UploadKeys{
		IdentityKey:    ik.PublicKey().Serialize(),
		SignedPrekey:   &wirepb.SignedPreKey{Id: 1, PublicKey: spk.PublicKey().Serialize(), Signature: sig[:]},
		OneTimePrekeys: []*wirepb.PreKey{{Id: 1, PublicKey: otk.PublicKey().Serialize()}}}}})
	return err
}

// signList signs a list of primary's account naming devs (primary first).
func signList(t *testing.T, signer *ecc.ECKeyPair, name string, version uint64, devs ...*mdev) *wirepb.SignedDeviceList {
	t.Helper()
	l := &wirepb.DeviceList{Username: name, Version: version, CreatedMs: time.Now().UnixMilli()}
	for _, d := range devs {
		l.Devices = append(l.Devices, &wirepb.DeviceListEntry{DeviceId: d.id, IdentityKey: d.ik()})
	}
	s, err := devicelist.Sign(signer.PrivateKey(), l)
	if err != nil {
		// Sign refuses lists that do not verify; tests need some anyway.
		b, _ := devicelist.Encode(l)
		sig := ecc.CalculateSignature(signer.PrivateKey(), devicelist.SignedBytes(b))
		return &wirepb.SignedDeviceList{List: b, Signature: sig[:]}
	}
	return s
}

func publish(t *testing.T, c *client.Conn, s *wirepb.SignedDeviceList) (*wirepb.PublishDeviceListResult, error) {
	t.Helper()
	r, err := c.Do(ctx(t), &wirepb.ClientFrame{Body: &wirepb.ClientFrame_PublishDeviceList{PublishDeviceList: &wirepb.PublishDeviceList{List: s}}})
	return r.GetPublishDeviceList(), err
}

func getList(t *testing.T, c *client.Conn, name string) (*wirepb.SignedDeviceList, error) {
	t.Helper()
	r, err := c.Do(ctx(t), &wirepb.ClientFrame{Body: &wirepb.ClientFrame_GetDeviceList{GetDeviceList: &wirepb.GetDeviceList{Username: name}}})
	return r.GetGetDeviceList().GetList(), err
}

func wantErr(t *testing.T, err error, code wirepb.ErrorCode) {
	t.Helper()
	if wire.CodeOf(err) != code {
		t.Fatalf("got %v, want %v", err, code)
	}
}

// waitClosed waits until c is closed and checks the close code.
func waitClosed(t *testing.T, c *client.Conn, code int) {
	t.Helper()
	select {
	case <-c.Done():
	case <-time.After(10 * time.Second):
		t.Fatalf("connection still open, want close %d", code)
	}
	var ce *client.CloseError
	if !errors.As(c.Err(), &ce) || ce.Code != code {
		t.Fatalf("closed with %v, want %d", c.Err(), code)
	}
}

func TestPublishAndGetDeviceList(t *testing.T) {
	e := newDevEnv(t, Config{}, device.Options{})
	bob, bc := e.registerPrimary("bob")
	_, ac := e.registerPrimary("alice")

	if l, err := getList(t, ac, "bob"); err != nil || l != nil {
		t.Fatalf("before publishing: %v %v", l, err)
	}
	_, err := getList(t, ac, "nobody")
	wantErr(t, err, wirepb.ErrorCode_UNKNOWN_ACCOUNT)

	v1 := signList(t, bob.identity, "bob", 1, bob)
	r, err := publish(t, bc, v1)
	if err != nil || r.Version != 1 || len(r.Removed) != 0 {
		t.Fatalf("publish v1: %v %v", r, err)
	}
	got, err := getList(t, ac, "bob")
	if err != nil || !bytes.Equal(got.List, v1.List) || !bytes.Equal(got.Signature, v1.Signature) {
		t.Fatalf("alice got %v %v", got, err)
	}
	if _, err := devicelist.VerifyNext(got, "bob", bob.ik(), 0, nil); err != nil {
		t.Fatalf("served list does not verify: %v", err)
	}

	_, err = publish(t, bc, v1)
	wantErr(t, err, wirepb.ErrorCode_DEVICE_LIST_STALE)

	bob2, b2c := e.addDevice("bob")
	v2 := signList(t, bob.identity, "bob", 2, bob, bob2)
	if r, err := publish(t, bc, v2); err != nil || r.Version != 2 {
		t.Fatalf("publish v2: %v %v", r, err)
	}
	// Only the primary publishes.
	_, err = publish(t, b2c, signList(t, bob.identity, "bob", 3, bob, bob2))
	wantErr(t, err, wirepb.ErrorCode_NOT_PRIMARY)

	// Signed by another key (a list naming that key as device 1).
	mallory := &mdev{name: "bob", id: 1, identity: newIdentity(t)}
	_, err = publish(t, bc, signList(t, mallory.identity, "bob", 3, mallory, bob2))
	wantErr(t, err, wirepb.ErrorCode_DEVICE_LIST_INVALID)
	// Signed by the right key but naming another key for device 1.
	_, err = publish(t, bc, signList(t, bob.identity, "bob", 3, mallory, bob2))
	wantErr(t, err, wirepb.ErrorCode_DEVICE_LIST_INVALID)
	// Another identity key for a device than the one it uploaded.
	fake2 := &mdev{name: "bob", id: bob2.id, identity: newIdentity(t)}
	_, err = publish(t, bc, signList(t, bob.identity, "bob", 3, bob, fake2))
	wantErr(t, err, wirepb.ErrorCode_DEVICE_LIST_INVALID)
	// A device the account does not have.
	ghost := &mdev{name: "bob", id: 9, identity: newIdentity(t)}
	_, err = publish(t, bc, signList(t, bob.identity, "bob", 3, bob, bob2, ghost))
	wantErr(t, err, wirepb.ErrorCode_DEVICE_LIST_INVALID)
	// Another account's list.
	_, err = publish(t, bc, signList(t, bob.identity, "alice", 3, bob))
	wantErr(t, err, wirepb.ErrorCode_DEVICE_LIST_INVALID)
	// Tampered bytes.
	bad := signList(t, bob.identity, "bob", 3, bob, bob2)
	bad.List[len(bad.List)-1] ^= 1
	_, err = publish(t, bc, bad)
	wantErr(t, err, wirepb.ErrorCode_DEVICE_LIST_INVALID)
	_, err = publish(t, bc, nil)
	wantErr(t, err, wirepb.ErrorCode_DEVICE_LIST_INVALID)

	if got, _ := getList(t, ac, "bob"); !bytes.Equal(got.List, v2.List) {
		t.Fatal("a refused list replaced v2")
	}
	// A listed device cannot change its identity key afterwards.
	if err := uploadErr(t, b2c, newIdentity(t)); wire.CodeOf(err) != wirepb.ErrorCode_IDENTITY_KEY_CHANGED {
		t.Fatalf("upload of another identity key: %v", err)
	}
}

// A device listed before it uploaded can only upload the key the list names.
func TestUploadMustMatchList(t *testing.T) {
	e := newDevEnv(t, Config{}, device.Options{})
	bob, bc := e.registerPrimary("bob")
	pub, key, _ := ed25519.GenerateKey(rand.Reader)
	rec, err := e.accounts.AddDevice(ctx(t), "bob", pub, 5)
	if err != nil {
		t.Fatal(err)
	}
	bob2 := &mdev{name: "bob", id: rec.Id, key: key, reg: 5, identity: newIdentity(t)}
	if _, err := publish(t, bc, signList(t, bob.identity, "bob", 1, bob, bob2)); err != nil {
		t.Fatal(err)
	}
	c := e.authDev(bob2, false)
	if err := uploadErr(t, c, newIdentity(t)); wire.CodeOf(err) != wirepb.ErrorCode_IDENTITY_KEY_CHANGED {
		t.Fatalf("upload of an unlisted identity key: %v", err)
	}
	upload(t, c, bob2.identity)
}

func TestPublishNeedsPrimaryKeys(t *testing.T) {
	e := newDevEnv(t, Config{}, device.Options{})
	_, c := e.register("carol")
	ik := newIdentity(t)
	_, err := publish(t, c, signList(t, ik, "carol", 1, &mdev{id: 1, identity: ik}))
	wantErr(t, err, wirepb.ErrorCode_NO_KEYS)
}

// Unlisting a device removes it: auth fails, its sockets close with 4004,
// its inbox and prekeys are gone.
func TestUnlistingRemovesDevice(t *testing.T) {
	e := newDevEnv(t, Config{}, device.Options{})
	bob, bc := e.registerPrimary("bob")
	bob2, b2c := e.addDevice("bob")
	b2send := e.authDev(bob2, true)
	_, ac := e.registerPrimary("alice")
	if _, err := publish(t, bc, signList(t, bob.identity, "bob", 1, bob, bob2)); err != nil {
		t.Fatal(err)
	}
	// Two messages wait in bob.2's inbox.
	b2c.Close()
	waitClosed(t, b2c, 1000)
	for _, id := range []string{"m1", "m2"} {
		_, err := ac.Do(ctx(t), &wirepb.ClientFrame{Body: &wirepb.ClientFrame_Send{Send: &wirepb.Send{ClientMsgId: id, To: "bob",
			Ciphertexts: []*wirepb.DeviceCiphertext{
				{Username: "bob", DeviceId: 1, RegistrationId: bob.reg, Type: wirepb.EnvelopeType_SIGNAL_MESSAGE, Content: []byte("x")},
				{Username: "bob", DeviceId: bob2.id, RegistrationId: bob2.reg, Type: wirepb.EnvelopeType_SIGNAL_MESSAGE, Content: []byte("y")},
			}}}})
		if err != nil {
			t.Fatal(err)
		}
	}
	if items, _ := e.inbox.Range(ctx(t), bob2.addr(), 0, 10); len(items) != 2 {
		t.Fatalf("bob.2 holds %d entries before removal", len(items))
	}
	b2c = e.authDev(bob2, false)

	r, err := publish(t, bc, signList(t, bob.identity, "bob", 2, bob))
	if err != nil || !slices.Equal(r.Removed, []uint32{bob2.id}) {
		t.Fatalf("publish v2: %v %v", r, err)
	}
	waitClosed(t, b2c, wire.CloseDeviceRemoved)
	waitClosed(t, b2send, wire.CloseDeviceRemoved)
	c := e.dial()
	if _, err := c.Auth(ctx(t), "bob", bob2.id, bob2.key, false); !errors.Is(err, wire.ErrAuthFailed) {
		t.Fatalf("auth of a removed device: %v", err)
	}
	checkPurged(t, e, bob2.addr())
	// Senders must now leave bob.2 out.
	_, err = ac.Do(ctx(t), &wirepb.ClientFrame{Body: &wirepb.ClientFrame_Send{Send: &wirepb.Send{ClientMsgId: "m3", To: "bob",
		Ciphertexts: []*wirepb.DeviceCiphertext{
			{Username: "bob", DeviceId: 1, RegistrationId: bob.reg, Type: wirepb.EnvelopeType_SIGNAL_MESSAGE, Content: []byte("x")},
			{Username: "bob", DeviceId: bob2.id, RegistrationId: bob2.reg, Type: wirepb.EnvelopeType_SIGNAL_MESSAGE, Content: []byte("y")},
		}}}})
	var we *wire.Error
	if !errors.As(err, &we) || we.Code != wirepb.ErrorCode_DEVICE_MISMATCH || len(we.Mismatch.GetExtra()) != 1 {
		t.Fatalf("send to a removed device: %v", err)
	}
}

// checkPurged checks that nothing of dev is left in the store.
func checkPurged(t *testing.T, e *denv, dev wire.DeviceAddr) {
	t.Helper()
	if items, err := e.inbox.Range(ctx(t), dev, 0, 10); err != nil || len(items) != 0 {
		t.Fatalf("%s still holds %d inbox entries (%v)", dev, len(items), err)
	}
	if n, bytes, _ := e.inbox.Depth(ctx(t), dev); n != 0 || bytes != 0 {
		t.Fatalf("%s inbox depth %d/%d", dev, n, bytes)
	}
	if k, _ := e.keys.IdentityKey(ctx(t), dev); k != nil {
		t.Fatalf("%s identity key still stored", dev)
	}
	if n, has, _ := e.keys.Count(ctx(t), dev); n != 0 || has {
		t.Fatalf("%s still holds prekeys: %d, %v", dev, n, has)
	}
	if _, err := e.accounts.Device(ctx(t), dev); !errors.Is(err, device.ErrUnknownDevice) {
		t.Fatalf("%s still in the account: %v", dev, err)
	}
}

// ---------------------------------------------------------------- linking

// newLinker is a new device's side of linking: a connection after Hello
// and the keys it announces.
type newLinker struct {
	c    *client.Conn
	d    *mdev
	eph  []byte
	code []byte
}

func (e *denv) linkStart(name string) (*newLinker, error) {
	e.t.Helper()
	pub, key, _ := ed25519.GenerateKey(rand.Reader)
	eph := make([]byte, 32)
	rand.Read(eph)
	nl := &newLinker{c: e.dial(), d: &mdev{name: name, key: key, reg: 33, identity: newIdentity(e.t)}, eph: eph}
	r, err := nl.c.Do(ctx(e.t), &wirepb.ClientFrame{Body: &wirepb.ClientFrame_LinkStart{LinkStart: &wirepb.LinkStart{
		DeviceKey: pub, RegistrationId: 33, IdentityKey: nl.d.ik(), EphemeralKey: eph}}})
	if err != nil {
		return nl, err
	}
	nl.code = r.GetLinkStart().GetCodeId()
	if len(nl.code) != 8 {
		e.t.Fatalf("code id of %d bytes", len(nl.code))
	}
	return nl, nil
}

func getLink(t *testing.T, c *client.Conn, code []byte) (*wirepb.GetLinkResult, error) {
	t.Helper()
	r, err := c.Do(ctx(t), &wirepb.ClientFrame{Body: &wirepb.ClientFrame_GetLink{GetLink: &wirepb.GetLink{CodeId: code}}})
	return r.GetGetLink(), err
}

func approve(t *testing.T, c *client.Conn, code []byte) (uint32, error) {
	t.Helper()
	r, err := c.Do(ctx(t), &wirepb.ClientFrame{Body: &wirepb.ClientFrame_ApproveLink{ApproveLink: &wirepb.ApproveLink{
		CodeId: code, EphemeralKey: bytes.Repeat([]byte{7}, 32), Sealed: []byte("sealed link material")}}})
	return r.GetApproveLink().GetDeviceId(), err
}

func TestLinkFlow(t *testing.T) {
	e := newDevEnv(t, Config{}, device.Options{})
	bob, bc := e.registerPrimary("bob")
	nl, err := e.linkStart("bob")
	if err != nil {
		t.Fatal(err)
	}
	gl, err := getLink(t, bc, nl.code)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(gl.DeviceKey, nl.d.key.Public().(ed25519.PublicKey)) || gl.RegistrationId != 33 ||
		!bytes.Equal(gl.IdentityKey, nl.d.ik()) || !bytes.Equal(gl.EphemeralKey, nl.eph) || gl.ExpiresMs <= time.Now().UnixMilli() {
		t.Fatalf("GetLink %v", gl)
	}
	id, err := approve(t, bc, nl.code)
	if err != nil || id != 2 {
		t.Fatalf("approve: %d %v", id, err)
	}
	ev := nextEvent(t, nl.c, (*wirepb.Event).GetLinkApproved, func(l *wirepb.LinkApproved) bool { return l == nil })
	if ev.Username != "bob" || ev.DeviceId != 2 || string(ev.Sealed) != "sealed link material" || !bytes.Equal(ev.EphemeralKey, bytes.Repeat([]byte{7}, 32)) {
		t.Fatalf("LinkApproved %v", ev)
	}
	// The new device authenticates on the same connection.
	nl.d.id = ev.DeviceId
	if _, err := nl.c.Auth(ctx(t), "bob", nl.d.id, nl.d.key, false); err != nil {
		t.Fatalf("auth after linking: %v", err)
	}
	upload(t, nl.c, nl.d.identity)
	if _, err := publish(t, bc, signList(t, bob.identity, "bob", 1, bob, nl.d)); err != nil {
		t.Fatal(err)
	}

	// A code works once.
	_, err = getLink(t, bc, nl.code)
	wantErr(t, err, wirepb.ErrorCode_LINK_CODE_INVALID)
	_, err = approve(t, bc, nl.code)
	wantErr(t, err, wirepb.ErrorCode_LINK_CODE_INVALID)
	// Guessed codes.
	guess := make([]byte, 8)
	rand.Read(guess)
	_, err = getLink(t, bc, guess)
	wantErr(t, err, wirepb.ErrorCode_LINK_CODE_INVALID)
	_, err = approve(t, bc, guess)
	wantErr(t, err, wirepb.ErrorCode_LINK_CODE_INVALID)
	_, err = getLink(t, bc, []byte{1, 2, 3})
	wantErr(t, err, wirepb.ErrorCode_LINK_CODE_INVALID)
	// Only the primary looks up or approves.
	nl2, err := e.linkStart("bob")
	if err != nil {
		t.Fatal(err)
	}
	_, err = getLink(t, nl.c, nl2.code)
	wantErr(t, err, wirepb.ErrorCode_NOT_PRIMARY)
	_, err = approve(t, nl.c, nl2.code)
	wantErr(t, err, wirepb.ErrorCode_NOT_PRIMARY)
	// Another account's primary may approve a code it was shown: the code
	// is the secret (and the client checks its commitment).
	_, ac := e.registerPrimary("alice")
	if id, err := approve(t, ac, nl2.code); err != nil || id != 2 {
		t.Fatalf("alice approves: %d %v", id, err)
	}
}

func TestLinkStartChecks(t *testing.T) {
	e := newDevEnv(t, Config{}, device.Options{})
	_, c := e.registerPrimary("bob")
	ik := newIdentity(t).PublicKey().Serialize()
	topBit := bytes.Clone(ik)
	topBit[32] |= 0x80
	good := func() *wirepb.LinkStart {
		return &wirepb.LinkStart{DeviceKey: make([]byte, 32), RegistrationId: 1, IdentityKey: ik, EphemeralKey: make([]byte, 32)}
	}
	tests := map[string]struct {
		mut  func(*wirepb.LinkStart)
		code wirepb.ErrorCode
	}{
		"device key":         {func(m *wirepb.LinkStart) { m.DeviceKey = m.DeviceKey[:31] }, wirepb.ErrorCode_INVALID_KEY},
		"registration 0":     {func(m *wirepb.LinkStart) { m.RegistrationId = 0 }, wirepb.ErrorCode_BAD_REQUEST},
		"registration 16381": {func(m *wirepb.LinkStart) { m.RegistrationId = 16381 }, wirepb.ErrorCode_BAD_REQUEST},
		"identity length":    {func(m *wirepb.LinkStart) { m.IdentityKey = ik[:32] }, wirepb.ErrorCode_INVALID_KEY},
		"identity type":      {func(m *wirepb.LinkStart) { m.IdentityKey = append([]byte{6}, ik[1:]...) }, wirepb.ErrorCode_INVALID_KEY},
		"identity top bit":   {func(m *wirepb.LinkStart) { m.IdentityKey = topBit }, wirepb.ErrorCode_INVALID_KEY},
		"ephemeral":          {func(m *wirepb.LinkStart) { m.EphemeralKey = nil }, wirepb.ErrorCode_INVALID_KEY},
	}
	nc := e.dial()
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			m := good()
			tc.mut(m)
			_, err := nc.Do(ctx(t), &wirepb.ClientFrame{Body: &wirepb.ClientFrame_LinkStart{LinkStart: m}})
			wantErr(t, err, tc.code)
		})
	}
	// After authentication LinkStart is out of place; a linking connection
	// cannot Register or start a second link.
	_, err := c.Do(ctx(t), &wirepb.ClientFrame{Body: &wirepb.ClientFrame_LinkStart{LinkStart: good()}})
	wantErr(t, err, wirepb.ErrorCode_UNEXPECTED_FRAME)
	if _, err := nc.Do(ctx(t), &wirepb.ClientFrame{Body: &wirepb.ClientFrame_LinkStart{LinkStart: good()}}); err != nil {
		t.Fatal(err)
	}
	_, err = nc.Do(ctx(t), &wirepb.ClientFrame{Body: &wirepb.ClientFrame_LinkStart{LinkStart: good()}})
	wantErr(t, err, wirepb.ErrorCode_UNEXPECTED_FRAME)
	_, key, _ := ed25519.GenerateKey(rand.Reader)
	_, err = nc.Register(ctx(t), "newname", key, 1)
	wantErr(t, err, wirepb.ErrorCode_UNEXPECTED_FRAME)
}

func TestLinkExpires(t *testing.T) {
	e := newDevEnv(t, Config{LinkTTL: 300 * time.Millisecond}, device.Options{})
	_, bc := e.registerPrimary("bob")
	nl, err := e.linkStart("bob")
	if err != nil {
		t.Fatal(err)
	}
	// The linking connection lives until the code expires, not the 10 s
	// handshake deadline; then it is closed.
	waitClosed(t, nl.c, wire.CloseHandshakeTimeout)
	_, err = getLink(t, bc, nl.code)
	wantErr(t, err, wirepb.ErrorCode_LINK_CODE_EXPIRED)
	_, err = approve(t, bc, nl.code)
	wantErr(t, err, wirepb.ErrorCode_LINK_CODE_EXPIRED)
	if acct, _ := e.accounts.Account(ctx(t), "bob"); len(acct.Devices) != 1 {
		t.Fatal("an expired code added a device")
	}
}

// A code whose device went away before expiry is invalid.
func TestLinkDeviceLeft(t *testing.T) {
	e := newDevEnv(t, Config{LinkAttemptRate: rate.Inf}, device.Options{})
	_, bc := e.registerPrimary("bob")
	nl, err := e.linkStart("bob")
	if err != nil {
		t.Fatal(err)
	}
	nl.c.Close()
	deadline := time.Now().Add(10 * time.Second)
	for {
		_, err = getLink(t, bc, nl.code)
		if wire.CodeOf(err) == wirepb.ErrorCode_LINK_CODE_INVALID {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("GetLink after the new device left: %v", err)
		}
		time.Sleep(10 * time.Millisecond)
	}
	_, err = approve(t, bc, nl.code)
	wantErr(t, err, wirepb.ErrorCode_LINK_CODE_INVALID)
	if acct, _ := e.accounts.Account(ctx(t), "bob"); len(acct.Devices) != 1 {
		t.Fatal("a departed device was added")
	}
}

func TestLinkRateLimits(t *testing.T) {
	e := newDevEnv(t, Config{LinkStartRate: rate.Every(time.Hour), LinkStartBurst: 2,
		LinkAttemptRate: rate.Every(time.Hour), LinkAttemptBurst: 3}, device.Options{})
	_, bc := e.registerPrimary("bob")
	for range 2 {
		if _, err := e.linkStart("bob"); err != nil {
			t.Fatal(err)
		}
	}
	_, err := e.linkStart("bob")
	var we *wire.Error
	if !errors.As(err, &we) || we.Code != wirepb.ErrorCode_RATE_LIMITED || !we.Retryable || we.RetryAfterMs == 0 {
		t.Fatalf("third LinkStart from one address: %v", err)
	}
	guess := make([]byte, 8)
	for range 3 {
		rand.Read(guess)
		_, err := getLink(t, bc, guess)
		wantErr(t, err, wirepb.ErrorCode_LINK_CODE_INVALID)
	}
	_, err = getLink(t, bc, guess)
	wantErr(t, err, wirepb.ErrorCode_RATE_LIMITED)
	_, err = approve(t, bc, guess)
	wantErr(t, err, wirepb.ErrorCode_RATE_LIMITED)
}

func TestLinkTooManyDevices(t *testing.T) {
	e := newDevEnv(t, Config{}, device.Options{MaxDevices: 2})
	_, bc := e.registerPrimary("bob")
	nl, err := e.linkStart("bob")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := approve(t, bc, nl.code); err != nil {
		t.Fatal(err)
	}
	nl2, err := e.linkStart("bob")
	if err != nil {
		t.Fatal(err)
	}
	_, err = approve(t, bc, nl2.code)
	wantErr(t, err, wirepb.ErrorCode_TOO_MANY_DEVICES)
	// The code still works once there is room.
	if err := e.accounts.RemoveDevice(ctx(t), wire.DeviceAddr{Account: "bob", Device: 2}); err != nil {
		t.Fatal(err)
	}
	if id, err := approve(t, bc, nl2.code); err != nil || id != 3 {
		t.Fatalf("approve after making room: %d %v", id, err)
	}
}

// ---------------------------------------------------------------- removal and sync

func TestRemoveDevice(t *testing.T) {
	e := newDevEnv(t, Config{}, device.Options{})
	bob, bc := e.registerPrimary("bob")
	bob2, b2c := e.addDevice("bob")
	bob3, b3c := e.addDevice("bob")
	if _, err := publish(t, bc, signList(t, bob.identity, "bob", 1, bob, bob2, bob3)); err != nil {
		t.Fatal(err)
	}
	remove := func(c *client.Conn, id uint32) error {
		_, err := c.Do(ctx(t), &wirepb.ClientFrame{Body: &wirepb.ClientFrame_RemoveDevice{RemoveDevice: &wirepb.RemoveDevice{DeviceId: id}}})
		return err
	}
	wantErr(t, remove(b2c, bob3.id), wirepb.ErrorCode_NOT_PRIMARY)
	wantErr(t, remove(b2c, 1), wirepb.ErrorCode_NOT_PRIMARY)
	wantErr(t, remove(bc, 1), wirepb.ErrorCode_BAD_REQUEST)
	wantErr(t, remove(bc, 0), wirepb.ErrorCode_BAD_REQUEST)
	wantErr(t, remove(bc, 9), wirepb.ErrorCode_UNKNOWN_DEVICE)

	// A device removes itself: it gets the answer, then 4004.
	if err := remove(b2c, bob2.id); err != nil {
		t.Fatalf("self-removal: %v", err)
	}
	waitClosed(t, b2c, wire.CloseDeviceRemoved)
	checkPurged(t, e, bob2.addr())
	// The primary removes another device.
	if err := remove(bc, bob3.id); err != nil {
		t.Fatal(err)
	}
	waitClosed(t, b3c, wire.CloseDeviceRemoved)
	checkPurged(t, e, bob3.addr())
	wantErr(t, remove(bc, bob3.id), wirepb.ErrorCode_UNKNOWN_DEVICE)
	// The stored list still names them until the primary publishes anew,
	// which it can.
	if _, err := publish(t, bc, signList(t, bob.identity, "bob", 2, bob)); err != nil {
		t.Fatal(err)
	}
}

func TestSyncToDevice(t *testing.T) {
	e := newDevEnv(t, Config{MaxMessageBytes: 100}, device.Options{})
	bob, bc := e.registerPrimary("bob")
	bob2, b2c := e.addDevice("bob")
	_ = bob
	sync := func(id string, dev, reg uint32, typ wirepb.EnvelopeType, content string) (*wirepb.SendResult, error) {
		r, err := bc.Do(ctx(t), &wirepb.ClientFrame{Body: &wirepb.ClientFrame_SyncToDevice{SyncToDevice: &wirepb.SyncToDevice{
			ClientMsgId: id, DeviceId: dev, RegistrationId: reg, Type: typ, Content: []byte(content)}}})
		return r.GetSyncToDevice(), err
	}
	sig := wirepb.EnvelopeType_SIGNAL_MESSAGE
	r, err := sync("h1", bob2.id, bob2.reg, wirepb.EnvelopeType_PREKEY_SIGNAL_MESSAGE, "history-1")
	if err != nil || r.Seq != 0 || r.Duplicate || r.ServerTimeMs == 0 {
		t.Fatalf("sync: %v %v", r, err)
	}
	r2, err := sync("h1", bob2.id, bob2.reg, sig, "history-1")
	if err != nil || !r2.Duplicate || r2.ServerTimeMs != r.ServerTimeMs {
		t.Fatalf("retry: %v %v", r2, err)
	}
	if _, err := sync("h2", bob2.id, bob2.reg, sig, "history-2"); err != nil {
		t.Fatal(err)
	}
	env := nextEnvelope(t, b2c)
	if env.Sender != "bob" || env.SenderDevice != 1 || env.To != "bob" || env.Seq != 0 || string(env.Content) != "history-1" ||
		env.ClientMsgId != "h1" || env.Type != wirepb.EnvelopeType_PREKEY_SIGNAL_MESSAGE {
		t.Fatalf("envelope %v", env)
	}
	if env2 := nextEnvelope(t, b2c); env2.ClientMsgId != "h2" {
		t.Fatalf("second envelope %q: the retry was stored twice", env2.ClientMsgId)
	}

	_, err = sync("h3", 1, bob.reg, sig, "x")
	wantErr(t, err, wirepb.ErrorCode_BAD_REQUEST) // to itself
	_, err = sync("h3", 9, 1, sig, "x")
	wantErr(t, err, wirepb.ErrorCode_UNKNOWN_DEVICE)
	_, err = sync("h3", bob2.id, bob2.reg+1, sig, "x")
	var we *wire.Error
	if !errors.As(err, &we) || we.Code != wirepb.ErrorCode_DEVICE_MISMATCH || len(we.Mismatch.GetStale()) != 1 || we.Mismatch.Stale[0].DeviceId != bob2.id {
		t.Fatalf("wrong registration id: %v", err)
	}
	_, err = sync("h3", bob2.id, bob2.reg, wirepb.EnvelopeType_SENDER_KEY_MESSAGE, "x")
	wantErr(t, err, wirepb.ErrorCode_BAD_REQUEST)
	_, err = sync("", bob2.id, bob2.reg, sig, "x")
	wantErr(t, err, wirepb.ErrorCode_BAD_REQUEST)
	_, err = sync("h3", bob2.id, bob2.reg, sig, "")
	wantErr(t, err, wirepb.ErrorCode_BAD_REQUEST)
	_, err = sync("h3", bob2.id, bob2.reg, sig, string(make([]byte, 101)))
	wantErr(t, err, wirepb.ErrorCode_MESSAGE_TOO_LARGE)
	// Acking a sync copy makes no receipt for the sender.
	ack(t, b2c, env.Id)
	if _, err := sync("h4", bob2.id, bob2.reg, sig, "x"); err != nil {
		t.Fatal(err)
	}
	select {
	case ev := <-bc.Events():
		if ev.GetEnvelope().GetType() == wirepb.EnvelopeType_RECEIPT {
			t.Fatal("receipt for a sync copy")
		}
	case <-time.After(100 * time.Millisecond):
	}
}

// ---------------------------------------------------------------- units

func TestKeyedLimiterBounded(t *testing.T) {
	l := ratelimit.New[string](rate.Every(time.Second), 2, 3)
	now := time.Unix(1000, 0)
	for i := range 10 {
		if d := l.Take(string(rune('a'+i)), now); d != 0 {
			t.Fatalf("first take of key %d waited %v", i, d)
		}
	}
	if n := l.Len(); n != 3 {
		t.Fatalf("%d entries, bound 3", n)
	}
	l.Take("x", now)
	if d := l.Take("x", now); d != 0 {
		t.Fatal("burst 2 refused the second take")
	}
	if d := l.Take("x", now); d <= 0 || d > time.Second {
		t.Fatalf("third take waits %v", d)
	}
	// Idle entries go once full again.
	l.Take("y", now.Add(10*time.Second))
	if n := l.Len(); n != 1 {
		t.Fatalf("%d entries after idling", n)
	}
}

func TestRemoteKey(t *testing.T) {
	for in, want := range map[string]string{
		"192.0.2.1:5555":             "192.0.2.1",
		"[2001:db8:1:2:3:4:5:6]:443": "2001:db8:1:2::/64",
		"[2001:db8:1:2:ff::1]:1":     "2001:db8:1:2::/64",
		"[::ffff:192.0.2.1]:80":      "192.0.2.1",
		"pipe":                       "pipe",
	} {
		if got := remoteKey(in); got != want {
			t.Errorf("remoteKey(%q) = %q, want %q", in, got, want)
		}
	}
}

func TestLinkTableSweepsAndBounds(t *testing.T) {
	tb := newLinkTable(time.Minute, 2)
	now := time.Unix(1000, 0)
	live := &conn{ctx: context.Background()}
	a, b := &pendingLink{conn: live}, &pendingLink{conn: live}
	if tb.add(a, now) != nil || tb.add(b, now.Add(time.Second)) != nil {
		t.Fatal("add")
	}
	if err := tb.add(&pendingLink{conn: live}, now); wire.CodeOf(err) != wirepb.ErrorCode_RATE_LIMITED {
		t.Fatalf("over the bound: %v", err)
	}
	if _, err := tb.get(a.code[:], now.Add(time.Minute)); wire.CodeOf(err) != wirepb.ErrorCode_LINK_CODE_EXPIRED {
		t.Fatalf("expired: %v", err)
	}
	// Two TTLs later both are swept, making room.
	if err := tb.add(&pendingLink{conn: live}, now.Add(2*time.Minute+time.Second)); err != nil {
		t.Fatal(err)
	}
	if _, err := tb.get(a.code[:], now.Add(2*time.Minute+time.Second)); wire.CodeOf(err) != wirepb.ErrorCode_LINK_CODE_INVALID {
		t.Fatalf("swept: %v", err)
	}
	if len(tb.m) != 1 || tb.order.Len() != 1 {
		t.Fatalf("%d entries, %d in order", len(tb.m), tb.order.Len())
	}
}
