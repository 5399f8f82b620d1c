package client

import (
	"context"
	"crypto/aes"
	"crypto/cipher"
	"crypto/ecdh"
	"crypto/ed25519"
	"crypto/hkdf"
	"crypto/rand"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/base32"
	"encoding/binary"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/ferryhq/ferry/client/e2ee"
	"github.com/ferryhq/ferry/client/localstore"
	"github.com/ferryhq/ferry/wire"
	"github.com/ferryhq/ferry/wire/wirepb"
	"google.golang.org/protobuf/proto"
)

// Errors of linking.
var (
	// ErrBadLinkCode: the text is not a link code.
	ErrBadLinkCode = errors.New("client: not a link code")
	// ErrLinkCodeMismatch: the server's answer for a code does not match the
	// code's commitment (a server substituting keys is caught here).
	ErrLinkCodeMismatch = errors.New("client: the server's link request does not match the code")
	// ErrLinkMaterial: the sealed link material does not open.
	ErrLinkMaterial = errors.New("client: link material does not decrypt")
)

const (
	linkCodeContext = "ferry-link-code-v1"
	linkSealContext = "ferry-link-v1"
	codeIDSize      = 8
	commitmentSize  = 16
	// HistoryPerConversation is how many recent messages of each
	// conversation the primary sends to a newly linked device.
	HistoryPerConversation = 100
	historyChunk           = 50
)

var codeEncoding = base32.StdEncoding.WithPadding(base32.NoPadding)

// linkCommitment binds a link code to every key the new device sent, so the
// primary can tell if the server swapped any of them.
func linkCommitment(eph, identity, deviceKey []byte, regID uint32) []byte {
	h := sha256.New()
	h.Write([]byte(linkCodeContext))
	h.Write(eph)
	h.Write(identity)
	h.Write(deviceKey)
	_ = binary.Write(h, binary.BigEndian, regID)
	return h.Sum(nil)[:commitmentSize]
}

// EncodeLinkCode and ParseLinkCode convert between the code's parts and the
// text a person copies (base32, 39 characters, case-insensitive).
func EncodeLinkCode(codeID, commitment []byte) string {
	return strings.ToLower(codeEncoding.EncodeToString(append(append([]byte{}, codeID...), commitment...)))
}

// ParseLinkCode splits a link code into its id and commitment.
func ParseLinkCode(code string) (codeID, commitment []byte, err error) {
	b, err := codeEncoding.DecodeString(strings.ToUpper(strings.TrimSpace(code)))
	if err != nil || len(b) != codeIDSize+commitmentSize {
		return nil, nil, ErrBadLinkCode
	}
	return b[:codeIDSize], b[codeIDSize:], nil
}

// sealKey derives the AES-256-GCM key shared by the primary and the new
// device from their ephemeral X25519 keys.
func sealKey(shared, codeID, newEph, primaryEph []byte) ([]byte, error) {
	info := append(append([]byte(linkSealContext), newEph...), primaryEph...)
	return hkdf.Key(sha256.New, shared, codeID, string(info), 32)
}

func gcm(key []byte) (cipher.AEAD, error) {
	blk, err := aes.NewCipher(key)
	if err != nil {
		return nil, err
	}
	return cipher.NewGCM(blk)
}

// Linking is a new device waiting for its primary's approval.
type Linking struct {
	c       *Client
	conn    *Conn
	dev     *e2ee.Device
	key     ed25519.PrivateKey
	eph     *ecdh.PrivateKey
	codeID  []byte
	Code    string    // show this to the person; they approve it on the primary
	Expires time.Time // the code's end
}

// StartLink begins linking this (unregistered) home as a new device of an
// existing account: it returns the code to approve on the primary.
func (c *Client) StartLink(ctx context.Context) (*Linking, error) {
	return c.StartLinkTo(ctx, "")
}

// StartLinkTo is StartLink naming the account to join ("" : unnamed),
// which a cluster needs: the code is kept by the node serving the account,
// and the others redirect there.
func (c *Client) StartLinkTo(ctx context.Context, account string) (*Linking, error) {
	if c.username != "" {
		return nil, ErrAlreadyRegistered
	}
	if c.server == "" {
		return nil, ErrNoServer
	}
	dev, err := e2ee.Load(ctx, c.st)
	if err != nil {
		if dev, err = e2ee.Create(ctx, c.st, prekeyBatch); err != nil {
			return nil, err
		}
	}
	_, key, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		return nil, err
	}
	eph, err := ecdh.X25519().GenerateKey(rand.Reader)
	if err != nil {
		return nil, err
	}
	pub := key.Public().(ed25519.PublicKey)
	var r *wirepb.Response
	conn, _, err := DialAs(ctx, c.server, DialOptions{ClientName: c.opts.ClientName}, func(conn *Conn) (err error) {
		r, err = conn.Do(ctx, &wirepb.ClientFrame{Body: &wirepb.ClientFrame_LinkStart{LinkStart: &wirepb.LinkStart{
			DeviceKey: pub, RegistrationId: dev.RegistrationID(), IdentityKey: dev.IdentityKey(), EphemeralKey: eph.PublicKey().Bytes(),
			Account: account}}})
		return err
	})
	if err != nil {
		var de *DialError
		if errors.As(err, &de) {
			return nil, err
		}
		return nil, fmt.Errorf("client: start linking: %w", err)
	}
	res := r.GetLinkStart()
	if len(res.GetCodeId()) != codeIDSize {
		conn.Close()
		return nil, errors.New("client: server sent a bad link code id")
	}
	commit := linkCommitment(eph.PublicKey().Bytes(), dev.IdentityKey(), pub, dev.RegistrationID())
	return &Linking{c: c, conn: conn, dev: dev, key: key, eph: eph, codeID: res.CodeId,
		Code: EncodeLinkCode(res.CodeId, commit), Expires: time.UnixMilli(res.ExpiresMs)}, nil
}

// Wait blocks until the primary approves, then finishes: opens the sealed
// material, saves the device, authenticates and uploads its keys.
func (l *Linking) Wait(ctx context.Context) error {
	defer l.conn.Close()
	c := l.c
	var ap *wirepb.LinkApproved
	for ap == nil {
		select {
		case ev, ok := <-l.conn.Events():
			if !ok {
				return fmt.Errorf("client: waiting for approval: %w", l.conn.Err())
			}
			ap = ev.GetLinkApproved()
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	peer, err := ecdh.X25519().NewPublicKey(ap.EphemeralKey)
	if err != nil {
		return ErrLinkMaterial
	}
	shared, err := l.eph.ECDH(peer)
	if err != nil {
		return ErrLinkMaterial
	}
	k, err := sealKey(shared, l.codeID, l.eph.PublicKey().Bytes(), ap.EphemeralKey)
	if err != nil {
		return err
	}
	aead, err := gcm(k)
	if err != nil {
		return err
	}
	pt, err := aead.Open(nil, make([]byte, aead.NonceSize()), ap.Sealed, l.codeID)
	if err != nil {
		return ErrLinkMaterial
	}
	var m wirepb.LinkMaterial
	if err := proto.Unmarshal(pt, &m); err != nil || m.Username != ap.Username || len(m.PrimaryIdentityKey) != 33 {
		return ErrLinkMaterial
	}
	for _, kv := range []struct {
		k string
		v []byte
	}{
		{setPinned + m.Username, m.PrimaryIdentityKey},
		{setKey, l.key},
		{setDeviceID, []byte(strconv.FormatUint(uint64(ap.DeviceId), 10))},
		{setUsername, []byte(m.Username)},
	} {
		if err := c.st.SetSetting(ctx, kv.k, kv.v); err != nil {
			return err
		}
	}
	c.username, c.deviceID, c.key, c.dev = m.Username, ap.DeviceId, l.key, l.dev
	c.dev.SetIdentityVerifier(c.checkIdentity)
	if _, err := l.conn.Auth(ctx, c.username, c.deviceID, c.key, true); err != nil {
		return fmt.Errorf("client: auth as the new device: %w", err)
	}
	up, err := c.dev.InitialUpload(ctx)
	if err != nil {
		return err
	}
	if _, err := l.conn.Do(ctx, &wirepb.ClientFrame{Body: &wirepb.ClientFrame_UploadKeys{UploadKeys: up}}); err != nil {
		return fmt.Errorf("client: upload keys: %w", err)
	}
	return nil
}

// Close abandons a link that was not waited for.
func (l *Linking) Close() { l.conn.Close() }

// ApproveLink (on the primary) adds the device behind code to this account:
// it checks the server's copy of the request against the code, seals the
// account's link material to the new device, publishes the new signed
// device list and sends the new device the recent history. It returns the
// new device's id.
func (c *Client) ApproveLink(ctx context.Context, code string) (uint32, error) {
	if c.username == "" {
		return 0, ErrNotRegistered
	}
	if c.deviceID != 1 {
		return 0, ErrNotPrimary
	}
	codeID, commit, err := ParseLinkCode(code)
	if err != nil {
		return 0, err
	}
	conn, err := c.connect(ctx, true)
	if err != nil {
		return 0, err
	}
	defer conn.Close()
	r, err := conn.Do(ctx, &wirepb.ClientFrame{Body: &wirepb.ClientFrame_GetLink{GetLink: &wirepb.GetLink{CodeId: codeID}}})
	if err != nil {
		return 0, fmt.Errorf("client: look up link code: %w", err)
	}
	req := r.GetGetLink()
	if subtle.ConstantTimeCompare(commit, linkCommitment(req.EphemeralKey, req.IdentityKey, req.DeviceKey, req.RegistrationId)) != 1 {
		return 0, ErrLinkCodeMismatch
	}
	// Seal the material to the new device's ephemeral key.
	newEph, err := ecdh.X25519().NewPublicKey(req.EphemeralKey)
	if err != nil {
		return 0, ErrLinkCodeMismatch
	}
	eph, err := ecdh.X25519().GenerateKey(rand.Reader)
	if err != nil {
		return 0, err
	}
	shared, err := eph.ECDH(newEph)
	if err != nil {
		return 0, err
	}
	k, err := sealKey(shared, codeID, req.EphemeralKey, eph.PublicKey().Bytes())
	if err != nil {
		return 0, err
	}
	aead, err := gcm(k)
	if err != nil {
		return 0, err
	}
	pt, err := proto.Marshal(&wirepb.LinkMaterial{Username: c.username, PrimaryIdentityKey: c.dev.IdentityKey()})
	if err != nil {
		return 0, err
	}
	sealed := aead.Seal(nil, make([]byte, aead.NonceSize()), pt, codeID)
	r, err = conn.Do(ctx, &wirepb.ClientFrame{Body: &wirepb.ClientFrame_ApproveLink{ApproveLink: &wirepb.ApproveLink{
		CodeId: codeID, EphemeralKey: eph.PublicKey().Bytes(), Sealed: sealed}}})
	if err != nil {
		return 0, fmt.Errorf("client: approve link: %w", err)
	}
	id := r.GetApproveLink().GetDeviceId()

	cur, err := c.refreshList(ctx, conn, c.username)
	if err != nil {
		return id, err
	}
	devs := append([]*wirepb.DeviceListEntry{}, cur.Devices...)
	devs = append(devs, &wirepb.DeviceListEntry{DeviceId: id, IdentityKey: req.IdentityKey})
	if _, _, err := c.publishList(ctx, conn, devs); err != nil {
		return id, err
	}
	if err := c.sendHistory(ctx, conn, id); err != nil {
		return id, fmt.Errorf("client: device %d linked, but sending it the history failed: %w", id, err)
	}
	return id, nil
}

// sendHistory sends the recent history of every conversation to a newly
// linked device of this account, end-to-end encrypted, in chunks.
func (c *Client) sendHistory(ctx context.Context, conn *Conn, id uint32) error {
	// The new device uploads its keys right after it is approved: wait for them.
	bo := c.opts.Backoff
	for {
		err := c.claim(ctx, conn, c.username, []uint32{id})
		if err == nil {
			break
		}
		if wire.CodeOf(err) != wirepb.ErrorCode_NO_KEYS || ctx.Err() != nil {
			return err
		}
		if bo.Wait(ctx) != nil {
			return err
		}
	}
	peers, err := c.st.Conversations(ctx)
	if err != nil {
		return err
	}
	var all []*wirepb.HistoryMessage
	for _, p := range peers {
		h, err := c.st.History(ctx, p, "")
		if err != nil {
			return err
		}
		if len(h) > HistoryPerConversation {
			h = h[len(h)-HistoryPerConversation:]
		}
		for _, m := range h {
			if m.Failed {
				continue
			}
			all = append(all, historyMessage(m))
		}
	}
	prefix := NewMessageID()[:16]
	for n := 0; n == 0 || n*historyChunk < len(all); n++ {
		part := all[n*historyChunk : min(len(all), (n+1)*historyChunk)]
		last := (n+1)*historyChunk >= len(all)
		ct, err := c.dev.Encrypt(ctx, c.username, id, &wirepb.Content{
			History: &wirepb.HistoryChunk{Messages: part, Last: last}, SentTimeMs: time.Now().UnixMilli()})
		if err != nil {
			return err
		}
		if _, err := conn.Do(ctx, &wirepb.ClientFrame{Body: &wirepb.ClientFrame_SyncToDevice{SyncToDevice: &wirepb.SyncToDevice{
			ClientMsgId: fmt.Sprintf("hist-%s-%d", prefix, n), DeviceId: id, RegistrationId: ct.RegistrationId,
			Type: ct.Type, Content: ct.Content}}}); err != nil {
			return err
		}
		if last {
			break
		}
	}
	return nil
}

func historyMessage(m localstore.Message) *wirepb.HistoryMessage {
	h := &wirepb.HistoryMessage{Peer: m.Peer, Group: m.Group, Outgoing: m.Outgoing, Sender: m.Sender,
		SenderDevice: m.SenderDevice, Seq: m.Seq, Text: m.Text, ClientMsgId: m.ClientMsgID, Delivered: m.Delivered}
	if !m.ServerTime.IsZero() {
		h.ServerTimeMs = m.ServerTime.UnixMilli()
	}
	return h
}
