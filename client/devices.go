package client

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"strconv"
	"time"

	"github.com/ferryhq/ferry/device/devicelist"
	"github.com/ferryhq/ferry/wire/wirepb"
	"google.golang.org/protobuf/proto"
)

// Errors about device lists.
var (
	// ErrUnlistedDevice: the server names a device that the account's
	// signed device list does not hold. The client refuses to encrypt to
	// (or accept messages from) it: only the account's primary can add a
	// device (design invariant 7).
	ErrUnlistedDevice = errors.New("client: device is not on the account's signed device list")
	// ErrNoDeviceList: the account has published no signed device list.
	ErrNoDeviceList = errors.New("client: account has no signed device list")
	// ErrIdentityMismatch: a device's identity key differs from the one its
	// account's signed device list names.
	ErrIdentityMismatch = errors.New("client: identity key does not match the signed device list")
	// ErrNotPrimary: the operation needs the account's primary device.
	ErrNotPrimary = errors.New("client: only the primary device (1) can do this")
)

// Settings keys for verified device lists.
const (
	setPinned  = "pin/"     // + account: the identity key that signs its device lists
	setListVer = "listver/" // + account: newest verified version
	setList    = "list/"    // + account: that SignedDeviceList, encoded
)

// verifiedList is the newest device list this device has verified for an
// account, from the local store (nil if none).
func (c *Client) verifiedList(ctx context.Context, account string) (*wirepb.DeviceList, error) {
	raw, ok, err := c.st.GetSetting(ctx, setList+account)
	if err != nil || !ok {
		return nil, err
	}
	s := &wirepb.SignedDeviceList{}
	if err := proto.Unmarshal(raw, s); err != nil {
		return nil, fmt.Errorf("client: stored device list of %s: %w", account, err)
	}
	return devicelist.Parse(s)
}

// refreshList fetches account's newest signed device list, verifies it
// against what this device trusts (pinned signer, no rollback) and stores it.
func (c *Client) refreshList(ctx context.Context, conn *Conn, account string) (*wirepb.DeviceList, error) {
	r, err := conn.Do(ctx, &wirepb.ClientFrame{Body: &wirepb.ClientFrame_GetDeviceList{GetDeviceList: &wirepb.GetDeviceList{Username: account}}})
	if err != nil {
		return nil, fmt.Errorf("client: fetch device list of %s: %w", account, err)
	}
	s := r.GetGetDeviceList().GetList()
	if s == nil {
		return nil, fmt.Errorf("%w: %s", ErrNoDeviceList, account)
	}
	return c.acceptList(ctx, account, s)
}

// acceptList verifies s as account's list and stores it as the newest.
func (c *Client) acceptList(ctx context.Context, account string, s *wirepb.SignedDeviceList) (*wirepb.DeviceList, error) {
	pinned, _, err := c.st.GetSetting(ctx, setPinned+account)
	if err != nil {
		return nil, err
	}
	var seen uint64
	if v, ok, err := c.st.GetSetting(ctx, setListVer+account); err != nil {
		return nil, err
	} else if ok {
		seen, _ = strconv.ParseUint(string(v), 10, 64)
	}
	seenList, _, err := c.st.GetSetting(ctx, setList+account)
	if err != nil {
		return nil, err
	}
	var seenBytes []byte
	if seenList != nil {
		old := &wirepb.SignedDeviceList{}
		if proto.Unmarshal(seenList, old) == nil {
			seenBytes = old.List
		}
	}
	l, err := devicelist.VerifyNext(s, account, pinned, seen, seenBytes)
	if err != nil {
		return nil, fmt.Errorf("client: device list of %s: %w", account, err)
	}
	if pinned == nil {
		if pinned = listIdentity(l, 1); pinned == nil {
			return nil, fmt.Errorf("client: device list of %s has no primary", account)
		}
		if err := c.st.SetSetting(ctx, setPinned+account, pinned); err != nil {
			return nil, err
		}
	}
	raw, err := proto.Marshal(s)
	if err != nil {
		return nil, err
	}
	if err := c.st.SetSetting(ctx, setList+account, raw); err != nil {
		return nil, err
	}
	return l, c.st.SetSetting(ctx, setListVer+account, []byte(strconv.FormatUint(l.Version, 10)))
}

// listIdentity is the identity key the list names for device id, or nil.
func listIdentity(l *wirepb.DeviceList, id uint32) []byte {
	for _, d := range l.GetDevices() {
		if d.DeviceId == id {
			return d.IdentityKey
		}
	}
	return nil
}

// checkIdentity is the e2ee identity verifier: a remote device's identity
// key must be the one its account's newest verified list names.
func (c *Client) checkIdentity(account string, deviceID uint32, key []byte) error {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	l, err := c.verifiedList(ctx, account)
	if err != nil {
		return err
	}
	if l == nil {
		return fmt.Errorf("%w: no verified list for %s", ErrUnlistedDevice, account)
	}
	want := listIdentity(l, deviceID)
	switch {
	case want == nil:
		return fmt.Errorf("%w: %s.%d (list version %d)", ErrUnlistedDevice, account, deviceID, l.Version)
	case !bytes.Equal(want, key):
		return fmt.Errorf("%w: %s.%d", ErrIdentityMismatch, account, deviceID)
	}
	return nil
}

// ensureListed makes sure (account, deviceID) is on a verified list,
// fetching the newest list once if it is not.
func (c *Client) ensureListed(ctx context.Context, conn *Conn, account string, deviceID uint32) error {
	l, err := c.verifiedList(ctx, account)
	if err != nil {
		return err
	}
	if l != nil && listIdentity(l, deviceID) != nil {
		return nil
	}
	if l, err = c.refreshList(ctx, conn, account); err != nil {
		return err
	}
	if listIdentity(l, deviceID) == nil {
		return fmt.Errorf("%w: the server names %s.%d but %s's list (version %d) does not",
			ErrUnlistedDevice, account, deviceID, account, l.Version)
	}
	return nil
}

// publishList signs and publishes a device list for this (primary) account.
func (c *Client) publishList(ctx context.Context, conn *Conn, devices []*wirepb.DeviceListEntry) (*wirepb.DeviceList, []uint32, error) {
	if c.deviceID != 1 {
		return nil, nil, ErrNotPrimary
	}
	var version uint64 = 1
	if cur, err := c.verifiedList(ctx, c.username); err != nil {
		return nil, nil, err
	} else if cur != nil {
		version = cur.Version + 1
	}
	l := &wirepb.DeviceList{Username: c.username, Version: version, Devices: devices, CreatedMs: time.Now().UnixMilli()}
	s, err := devicelist.Sign(c.dev.IdentityPrivateKey(), l)
	if err != nil {
		return nil, nil, err
	}
	r, err := conn.Do(ctx, &wirepb.ClientFrame{Body: &wirepb.ClientFrame_PublishDeviceList{PublishDeviceList: &wirepb.PublishDeviceList{List: s}}})
	if err != nil {
		return nil, nil, fmt.Errorf("client: publish device list: %w", err)
	}
	if _, err := c.acceptList(ctx, c.username, s); err != nil {
		return nil, nil, err
	}
	return l, r.GetPublishDeviceList().GetRemoved(), nil
}

// DeviceInfo is one device of this account, as its verified list says.
type DeviceInfo struct {
	ID          uint32
	IdentityKey []byte
	This        bool
}

// Devices fetches, verifies and returns this account's device list.
func (c *Client) Devices(ctx context.Context) (uint64, []DeviceInfo, error) {
	conn, err := c.connect(ctx, true)
	if err != nil {
		return 0, nil, err
	}
	defer conn.Close()
	l, err := c.refreshList(ctx, conn, c.username)
	if err != nil {
		return 0, nil, err
	}
	out := make([]DeviceInfo, 0, len(l.Devices))
	for _, d := range l.Devices {
		out = append(out, DeviceInfo{ID: d.DeviceId, IdentityKey: d.IdentityKey, This: d.DeviceId == c.deviceID})
	}
	return l.Version, out, nil
}

// RemoveDevice unlinks device id. The primary publishes a list without it
// (the server then deletes its inbox, keys and auth key and closes its
// socket); another device may only remove itself.
func (c *Client) RemoveDevice(ctx context.Context, id uint32) error {
	if c.username == "" {
		return ErrNotRegistered
	}
	conn, err := c.connect(ctx, true)
	if err != nil {
		return err
	}
	defer conn.Close()
	if c.deviceID != 1 {
		if id != c.deviceID {
			return ErrNotPrimary
		}
		_, err := conn.Do(ctx, &wirepb.ClientFrame{Body: &wirepb.ClientFrame_RemoveDevice{RemoveDevice: &wirepb.RemoveDevice{DeviceId: id}}})
		return err
	}
	if id == 1 {
		return fmt.Errorf("client: the primary device cannot be removed")
	}
	l, err := c.refreshList(ctx, conn, c.username)
	if err != nil {
		return err
	}
	var keep []*wirepb.DeviceListEntry
	found := false
	for _, d := range l.Devices {
		if d.DeviceId == id {
			found = true
			continue
		}
		keep = append(keep, d)
	}
	if !found {
		return fmt.Errorf("client: device %d is not on this account's list", id)
	}
	if _, _, err := c.publishList(ctx, conn, keep); err != nil {
		return err
	}
	return c.dev.DropSession(ctx, c.username, id)
}
