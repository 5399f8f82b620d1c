// Command ferry is Ferry's reference client: a real device with its own
// Signal keys, sessions and history in --home.
//
//	ferry [--home DIR] [--server URL] register NAME
//	ferry send NAME TEXT|-
//	ferry recv [--wait DURATION] [--json]
//	ferry history NAME [--json]
//	ferry chat [--group] NAME
//	ferry presence NAME [--json]
//	ferry privacy presence everyone|nobody|allow NAME...
//
// (`ferry --help` lists every command.)
package main

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/ferryhq/ferry/client"
	"github.com/ferryhq/ferry/client/localstore"
	"github.com/ferryhq/ferry/testvectors"
	"github.com/ferryhq/ferry/wire"
	"github.com/ferryhq/ferry/wire/wirepb"
)

const usage = `usage: ferry [--home DIR] [--server URL] COMMAND [ARGS]

commands:
  register NAME                create the account NAME and this device (needs --server once)
  send NAME TEXT               send TEXT (or - for standard input) to NAME; exits 0 after ✓
  recv [--wait D] [--json]     receive, decrypt, store and print messages;
                               without --wait, stop when the backlog is done
  history NAME [--json]        print the local history with NAME
  group create NAME MEMBER...  create a group (you are its first admin)
  group add|remove NAME MEMBER add or remove a member (admins)
  group admin|unadmin NAME MEMBER  make or unmake an admin (admins)
  group who-adds NAME admins|members  who may add and remove members (admins)
  group leave NAME             leave a group
  group send NAME TEXT|-       send TEXT to the group; exits 0 after ✓
  group info NAME [--json]     the group's members and devices
  group history NAME [--json]  the local history of a group
  read [--group] NAME          mark the conversation with NAME (or group NAME) read
  chat [--group] NAME          interactive chat: history, live messages, presence, typing, marks
  presence NAME [--json]       NAME's presence: online, last seen TIME, or unknown
  privacy presence everyone|nobody|allow NAME...
                               who may see your presence (online and last seen)
  typing [--group] [--stop] NAME  send one typing indicator (scripts; chat does this itself)
  vectors verify DIR           check the test vectors in DIR (exit 1 on any mismatch)
  vectors generate DIR         write every test vector into DIR (byte-identical to testvectors/)
  link [ACCOUNT]               make this home a new device of an existing account (name it for a cluster):
                               prints a link code, waits until the primary approves it
  devices list [--json]        this account's devices (from its verified signed list)
  devices approve CODE         (primary) link the device showing CODE
  devices remove ID            unlink device ID (the primary: any; others: themselves)
  push set unifiedpush URL     wake this device through a UnifiedPush endpoint while offline
  push set webpush JSON        ... through a browser PushSubscription (its JSON)
  push set apns|fcm TOKEN      ... through an APNs device token or an FCM registration token
  push clear                   stop push wake-ups to this device

global flags:
  --home DIR     device store (default ~/.ferry, or $FERRY_HOME)
  --server URL   server, e.g. ws://127.0.0.1:7600 or wss://host (remembered)
  --verbose      log connection events to stderr
`

func main() {
	os.Exit(run(os.Args[1:], os.Stdin, os.Stdout, os.Stderr))
}

func run(args []string, stdin io.Reader, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("ferry", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() { fmt.Fprint(stderr, usage) }
	home := fs.String("home", defaultHome(), "device store directory")
	server := fs.String("server", "", "server URL")
	verbose := fs.Bool("verbose", false, "log to stderr")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	if fs.NArg() == 0 {
		fs.Usage()
		return 2
	}
	if fs.Arg(0) == "vectors" {
		return cmdVectors(fs.Args()[1:], stdout, stderr)
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	level := slog.LevelWarn
	if *verbose {
		level = slog.LevelDebug
	}
	log := slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: level}))
	c, err := client.Open(ctx, client.Options{Home: *home, Logger: log, ClientName: "ferry-cli/1",
		Backoff: client.Backoff{Min: 100 * time.Millisecond, Max: 5 * time.Second}})
	if err != nil {
		fmt.Fprintln(stderr, "ferry:", err)
		return 1
	}
	defer c.Close()
	if *server != "" && *server != c.Server() {
		if err := c.SetServer(ctx, *server); err != nil {
			fmt.Fprintln(stderr, "ferry:", err)
			return 2
		}
	}
	cmd, rest := fs.Arg(0), fs.Args()[1:]
	switch cmd {
	case "register":
		err = cmdRegister(ctx, c, rest, stdout)
	case "send":
		err = cmdSend(ctx, c, rest, stdin, stdout)
	case "recv":
		err = cmdRecv(ctx, c, rest, stdout)
	case "history":
		err = cmdHistory(ctx, c, rest, stdout)
	case "link":
		err = cmdLink(ctx, c, rest, stdout)
	case "group":
		err = cmdGroup(ctx, c, rest, stdin, stdout)
	case "read":
		err = cmdRead(ctx, c, rest, stdout)
	case "devices":
		err = cmdDevices(ctx, c, rest, stdout)
	case "push":
		err = cmdPush(ctx, c, rest, stdout)
	case "presence":
		err = cmdPresence(ctx, c, rest, stdout)
	case "privacy":
		err = cmdPrivacy(ctx, c, rest, stdout)
	case "typing":
		err = cmdTyping(ctx, c, rest, stdout)
	case "chat":
		err = cmdChat(ctx, c, rest, stdin, stdout)
	default:
		fmt.Fprintf(stderr, "ferry: unknown command %q\n\n%s", cmd, usage)
		return 2
	}
	var ue usageError
	switch {
	case err == nil:
		return 0
	case errors.As(err, &ue):
		fmt.Fprintln(stderr, "ferry:", err)
		return 2
	default:
		fmt.Fprintln(stderr, "ferry:", describe(err))
		return 1
	}
}

// parseArgs parses flags that may come before, between or after the
// positional arguments ("history alice --json"), returning the positionals.
// A lone "-" is a positional (send's "read standard input").
func parseArgs(fs *flag.FlagSet, args []string) ([]string, error) {
	fs.SetOutput(io.Discard)
	var pos []string
	for {
		if err := fs.Parse(args); err != nil {
			return nil, err
		}
		args = fs.Args()
		if len(args) == 0 {
			return pos, nil
		}
		pos = append(pos, args[0])
		args = args[1:]
	}
}

type usageError string

func (e usageError) Error() string { return string(e) }

// describe prefixes server errors with their stable code.
func describe(err error) string {
	var we *wire.Error
	if errors.As(err, &we) {
		s := we.Code.String() + ": " + err.Error()
		if mm := we.Mismatch; mm != nil {
			s += fmt.Sprintf(" (missing %v, extra %v, stale %v)", refs(mm.Missing), refs(mm.Extra), refs(mm.Stale))
		}
		return s
	}
	return err.Error()
}

func refs[T interface {
	GetUsername() string
	GetDeviceId() uint32
}](rs []T) []string {
	out := make([]string, len(rs))
	for i, r := range rs {
		out[i] = fmt.Sprintf("%s.%d", r.GetUsername(), r.GetDeviceId())
	}
	return out
}

func defaultHome() string {
	if h := os.Getenv("FERRY_HOME"); h != "" {
		return h
	}
	if h, err := os.UserHomeDir(); err == nil {
		return filepath.Join(h, ".ferry")
	}
	return ".ferry"
}

func cmdRegister(ctx context.Context, c *client.Client, args []string, out io.Writer) error {
	if len(args) != 1 {
		return usageError("usage: ferry register NAME")
	}
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	if err := c.Register(ctx, args[0]); err != nil {
		return err
	}
	fmt.Fprintf(out, "registered %s (device %d) on %s\n", c.Username(), c.DeviceID(), c.Server())
	return nil
}

func cmdSend(ctx context.Context, c *client.Client, args []string, stdin io.Reader, out io.Writer) error {
	fs := flag.NewFlagSet("send", flag.ContinueOnError)
	timeout := fs.Duration("timeout", 60*time.Second, "give up if not accepted within this")
	pos, err := parseArgs(fs, args)
	if err != nil || len(pos) != 2 {
		return usageError("usage: ferry send [--timeout D] NAME TEXT|-")
	}
	text := pos[1]
	if text == "-" {
		b, err := io.ReadAll(stdin)
		if err != nil {
			return err
		}
		text = strings.TrimSuffix(string(b), "\n")
	}
	ctx, cancel := context.WithTimeout(ctx, *timeout)
	defer cancel()
	s, err := c.Send(ctx, pos[0], text)
	if err != nil {
		return err
	}
	fmt.Fprintf(out, "✓ sent to %s, seq %d\n", s.To, s.Seq)
	return nil
}

// jsonLine is one line of `recv --json` and `history --json`.
type jsonLine struct {
	Type        string `json:"type"` // "message" or "delivered"
	ID          uint64 `json:"id"`   // server envelope id (0 for own sends in history)
	From        string `json:"from"`
	FromDevice  uint32 `json:"from_device"`
	To          string `json:"to,omitempty"`
	Group       string `json:"group"`
	Seq         uint64 `json:"seq"`
	Text        string `json:"text"`
	ServerTime  string `json:"server_time"`
	ClientMsgID string `json:"client_msg_id"`
	Outgoing    bool   `json:"outgoing,omitempty"`
	Delivered   bool   `json:"delivered,omitempty"`
	Read        bool   `json:"read,omitempty"`
	Failed      bool   `json:"failed,omitempty"`
}

func messageLine(c *client.Client, m *localstore.Message) jsonLine {
	group := m.Group
	if group != "" {
		if n := c.GroupName(context.Background(), m.Group); n != "" {
			group = n
		}
	}
	return jsonLine{Type: "message", ID: m.EnvelopeID, From: m.Sender, FromDevice: m.SenderDevice, To: m.Peer,
		Group: group, Seq: m.Seq, Text: m.Text, ServerTime: m.ServerTime.UTC().Format(time.RFC3339Nano),
		ClientMsgID: m.ClientMsgID, Outgoing: m.Outgoing, Delivered: m.Delivered, Read: m.Read, Failed: m.Failed}
}

func cmdRecv(ctx context.Context, c *client.Client, args []string, out io.Writer) error {
	fs := flag.NewFlagSet("recv", flag.ContinueOnError)
	wait := fs.Duration("wait", 0, "keep receiving for this long (0: until the backlog is done)")
	asJSON := fs.Bool("json", false, "one JSON object per line")
	if pos, err := parseArgs(fs, args); err != nil || len(pos) != 0 {
		return usageError("usage: ferry recv [--wait D] [--json]")
	}
	opts := client.ReceiveOptions{UntilEmpty: *wait == 0}
	if *wait > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, *wait)
		defer cancel()
	} else {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, 5*time.Minute)
		defer cancel()
	}
	enc := json.NewEncoder(out)
	opts.Handle = func(ev client.Event) {
		switch {
		case ev.Imported > 0 && !*asJSON:
			fmt.Fprintf(out, "(imported %d messages of history from another device)\n", ev.Imported)
		case ev.Message != nil && *asJSON:
			_ = enc.Encode(messageLine(c, ev.Message))
		case ev.Message != nil:
			printMessage(out, c, ev.Message)
		case ev.Receipt != nil && *asJSON:
			r := ev.Receipt
			kind := "delivered"
			if r.Kind == wirepb.ReceiptKind_READ {
				kind = "read"
			}
			group := ""
			if r.GroupId != "" {
				if group = c.GroupName(ctx, r.GroupId); group == "" {
					group = r.GroupId
				}
			}
			_ = enc.Encode(jsonLine{Type: kind, From: r.Username, FromDevice: r.DeviceId, To: r.To,
				Group: group, Seq: r.Seq})
		case ev.Typing != nil && *asJSON:
			tp := ev.Typing
			kind := "typing"
			if !tp.Typing {
				kind = "typing_stopped"
			}
			group := ""
			if tp.GroupId != "" {
				if group = c.GroupName(ctx, tp.GroupId); group == "" {
					group = tp.GroupId
				}
			}
			_ = enc.Encode(jsonLine{Type: kind, From: tp.Username, FromDevice: tp.DeviceId, Group: group})
		case ev.Typing != nil && ev.Typing.Typing:
			fmt.Fprintf(out, "(%s is typing)\n", ev.Typing.Username)
		}
	}
	return c.Receive(ctx, opts)
}

func printMessage(out io.Writer, c *client.Client, m *localstore.Message) {
	who := m.Sender
	if m.Outgoing {
		who = "me → " + m.Peer
	}
	if m.Group != "" {
		name := c.GroupName(context.Background(), m.Group)
		if name == "" {
			name = m.Group[:8]
		}
		who = "[" + name + "] " + m.Sender
		if m.Outgoing {
			who = "[" + name + "] me"
		}
	}
	text := m.Text
	if m.Failed {
		text = "(could not decrypt)"
	}
	mark := ""
	if m.Outgoing {
		mark = " ✓"
		if m.Delivered {
			mark = " ✓✓"
		}
		if m.Read {
			mark = " ✓✓ read"
		}
	}
	fmt.Fprintf(out, "[%s #%d] %s: %s%s\n", m.ServerTime.Local().Format("2006-01-02 15:04:05"), m.Seq, who, text, mark)
}

func cmdHistory(ctx context.Context, c *client.Client, args []string, out io.Writer) error {
	fs := flag.NewFlagSet("history", flag.ContinueOnError)
	asJSON := fs.Bool("json", false, "one JSON object per line")
	pos, err := parseArgs(fs, args)
	if err != nil || len(pos) != 1 {
		return usageError("usage: ferry history NAME [--json]")
	}
	msgs, err := c.History(ctx, pos[0])
	if err != nil {
		return err
	}
	enc := json.NewEncoder(out)
	for i := range msgs {
		m := &msgs[i]
		if *asJSON {
			_ = enc.Encode(messageLine(c, m))
			continue
		}
		printMessage(out, c, m)
	}
	return nil
}

func cmdLink(ctx context.Context, c *client.Client, args []string, out io.Writer) error {
	fs := flag.NewFlagSet("link", flag.ContinueOnError)
	pos, err := parseArgs(fs, args)
	if err != nil || len(pos) > 1 {
		return usageError("usage: ferry --home DIR --server URL link [ACCOUNT]  (ACCOUNT: needed against a cluster)")
	}
	account := ""
	if len(pos) == 1 {
		account = pos[0]
	}
	l, err := c.StartLinkTo(ctx, account)
	if err != nil {
		return err
	}
	fmt.Fprintln(out, l.Code)
	if f, ok := out.(interface{ Sync() error }); ok {
		_ = f.Sync()
	}
	wctx, cancel := context.WithDeadline(ctx, l.Expires)
	defer cancel()
	if err := l.Wait(wctx); err != nil {
		if errors.Is(err, context.DeadlineExceeded) {
			return fmt.Errorf("the link code expired before it was approved")
		}
		return err
	}
	fmt.Fprintf(out, "linked as %s device %d\n", c.Username(), c.DeviceID())
	return nil
}

func cmdDevices(ctx context.Context, c *client.Client, args []string, out io.Writer) error {
	if len(args) == 0 {
		return usageError("usage: ferry devices list|approve CODE|remove ID")
	}
	ctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	switch args[0] {
	case "list":
		fs := flag.NewFlagSet("devices list", flag.ContinueOnError)
		asJSON := fs.Bool("json", false, "one JSON object per line")
		if pos, err := parseArgs(fs, args[1:]); err != nil || len(pos) != 0 {
			return usageError("usage: ferry devices list [--json]")
		}
		version, devs, err := c.Devices(ctx)
		if err != nil {
			return err
		}
		enc := json.NewEncoder(out)
		for _, d := range devs {
			fp := fingerprint(d.IdentityKey)
			if *asJSON {
				_ = enc.Encode(map[string]any{"id": d.ID, "identity": fp, "this": d.This, "primary": d.ID == 1, "list_version": version})
				continue
			}
			mark := ""
			if d.This {
				mark = " (this device)"
			}
			if d.ID == 1 {
				mark += " (primary)"
			}
			fmt.Fprintf(out, "%d  %s%s\n", d.ID, fp, mark)
		}
		return nil
	case "approve":
		if len(args) != 2 {
			return usageError("usage: ferry devices approve CODE")
		}
		id, err := c.ApproveLink(ctx, args[1])
		if err != nil {
			return err
		}
		fmt.Fprintf(out, "linked device %d\n", id)
		return nil
	case "remove":
		if len(args) != 2 {
			return usageError("usage: ferry devices remove ID")
		}
		id, err := strconv.ParseUint(args[1], 10, 32)
		if err != nil || id == 0 {
			return usageError("ferry devices remove: ID must be a device number")
		}
		if err := c.RemoveDevice(ctx, uint32(id)); err != nil {
			return err
		}
		fmt.Fprintf(out, "removed device %d\n", id)
		return nil
	default:
		return usageError("usage: ferry devices list|approve CODE|remove ID")
	}
}

// fingerprint is a short, readable form of an identity key for comparing
// devices by eye (not a safety number).
func fingerprint(key []byte) string {
	h := sha256.Sum256(key)
	s := hex.EncodeToString(h[:10])
	return s[0:5] + " " + s[5:10] + " " + s[10:15] + " " + s[15:20]
}

func cmdGroup(ctx context.Context, c *client.Client, args []string, stdin io.Reader, out io.Writer) error {
	const usage = "usage: ferry group create NAME MEMBER... | add NAME MEMBER | remove NAME MEMBER | leave NAME | send NAME TEXT | info NAME [--json] | history NAME [--json] | admin|unadmin NAME MEMBER | who-adds NAME admins|members"
	if len(args) < 2 {
		return usageError(usage)
	}
	ctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	op, name, rest := args[0], args[1], args[2:]
	switch op {
	case "create":
		g, err := c.CreateGroup(ctx, name, rest)
		if err != nil {
			return err
		}
		fmt.Fprintf(out, "created group %s (%s) with %d members\n", g.Name, g.GroupId, len(g.Members))
		return nil
	case "add", "remove", "admin", "unadmin":
		if len(rest) == 0 {
			return usageError(usage)
		}
		o := map[string]wirepb.GroupChange_Op{"add": wirepb.GroupChange_ADD, "remove": wirepb.GroupChange_REMOVE,
			"admin": wirepb.GroupChange_ADMIN, "unadmin": wirepb.GroupChange_UNADMIN}[op]
		g, err := c.ChangeGroup(ctx, name, o, rest)
		if err != nil {
			return err
		}
		fmt.Fprintf(out, "group %s: version %d, %d members\n", g.Name, g.Version, len(g.Members))
		return nil
	case "who-adds":
		if len(rest) != 1 || (rest[0] != "admins" && rest[0] != "members") {
			return usageError(usage)
		}
		o := wirepb.GroupChange_ADMINS_ONLY
		if rest[0] == "members" {
			o = wirepb.GroupChange_ANY_MEMBER
		}
		g, err := c.ChangeGroup(ctx, name, o, nil)
		if err != nil {
			return err
		}
		fmt.Fprintf(out, "group %s: version %d, members added and removed by %s\n", g.Name, g.Version, rest[0])
		return nil
	case "leave":
		if _, err := c.ChangeGroup(ctx, name, wirepb.GroupChange_LEAVE, nil); err != nil {
			return err
		}
		fmt.Fprintf(out, "left group %s\n", name)
		return nil
	case "send":
		if len(rest) != 1 {
			return usageError(usage)
		}
		text := rest[0]
		if text == "-" {
			b, err := io.ReadAll(stdin)
			if err != nil {
				return err
			}
			text = strings.TrimSuffix(string(b), "\n")
		}
		s, err := c.SendGroup(ctx, name, text)
		if err != nil {
			return err
		}
		fmt.Fprintf(out, "✓ sent to group %s, seq %d\n", s.To, s.Seq)
		return nil
	case "info", "history":
		fs := flag.NewFlagSet("group "+op, flag.ContinueOnError)
		asJSON := fs.Bool("json", false, "JSON output")
		if pos, err := parseArgs(fs, rest); err != nil || len(pos) != 0 {
			return usageError(usage)
		}
		if op == "history" {
			msgs, err := c.GroupHistory(ctx, name)
			if err != nil {
				return err
			}
			enc := json.NewEncoder(out)
			for i := range msgs {
				if *asJSON {
					_ = enc.Encode(messageLine(c, &msgs[i]))
				} else {
					printMessage(out, c, &msgs[i])
				}
			}
			return nil
		}
		g, err := c.GroupInfo(ctx, name)
		if err != nil {
			return err
		}
		if *asJSON {
			type member struct {
				Username string   `json:"username"`
				Admin    bool     `json:"admin"`
				Devices  []uint32 `json:"devices"`
			}
			v := struct {
				ID         string   `json:"id"`
				Name       string   `json:"name"`
				Version    uint64   `json:"version"`
				AdminsOnly bool     `json:"admins_only"`
				Members    []member `json:"members"`
			}{ID: g.GroupId, Name: g.Name, Version: g.Version, AdminsOnly: g.AdminsOnly}
			for _, m := range g.Members {
				mm := member{Username: m.Username, Admin: m.Admin}
				for _, d := range m.Devices {
					mm.Devices = append(mm.Devices, d.DeviceId)
				}
				v.Members = append(v.Members, mm)
			}
			return json.NewEncoder(out).Encode(v)
		}
		who := "admins"
		if !g.AdminsOnly {
			who = "any member"
		}
		fmt.Fprintf(out, "%s (%s), version %d, members added and removed by %s\n", g.Name, g.GroupId, g.Version, who)
		for _, m := range g.Members {
			role := ""
			if m.Admin {
				role = " (admin)"
			}
			var ids []string
			for _, d := range m.Devices {
				ids = append(ids, strconv.FormatUint(uint64(d.DeviceId), 10))
			}
			fmt.Fprintf(out, "  %s%s: devices %s\n", m.Username, role, strings.Join(ids, ","))
		}
		return nil
	default:
		return usageError(usage)
	}
}

func cmdRead(ctx context.Context, c *client.Client, args []string, out io.Writer) error {
	fs := flag.NewFlagSet("read", flag.ContinueOnError)
	group := fs.Bool("group", false, "NAME is a group")
	pos, err := parseArgs(fs, args)
	if err != nil || len(pos) != 1 {
		return usageError("usage: ferry read [--group] NAME")
	}
	ctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	if !*group && c.HasGroup(ctx, pos[0]) {
		// A group of that name, and no 1:1 conversation with it: the group.
		if h, err := c.History(ctx, pos[0]); err == nil && len(h) == 0 {
			*group = true
		}
	}
	seq, err := c.MarkRead(ctx, pos[0], *group)
	if err != nil {
		return err
	}
	if seq == 0 {
		fmt.Fprintf(out, "nothing to mark read with %s\n", pos[0])
		return nil
	}
	fmt.Fprintf(out, "read up to seq %d\n", seq)
	return nil
}

const pushUsage = "usage: ferry push set unifiedpush|webpush|apns|fcm URL|SUBSCRIPTION_JSON|TOKEN, or ferry push clear"

func cmdPush(ctx context.Context, c *client.Client, args []string, out io.Writer) error {
	ctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	switch {
	case len(args) == 1 && args[0] == "clear":
		if err := c.ClearPush(ctx); err != nil {
			return err
		}
		fmt.Fprintln(out, "push wake-ups off")
		return nil
	case len(args) == 3 && args[0] == "set":
	default:
		return usageError(pushUsage)
	}
	var reg *wirepb.PushRegistration
	switch args[1] {
	case "unifiedpush":
		reg = &wirepb.PushRegistration{Kind: wirepb.PushKind_UNIFIEDPUSH, Endpoint: args[2]}
	case "webpush":
		var err error
		if reg, err = client.ParseWebPushSubscription(args[2]); err != nil {
			return usageError(err.Error())
		}
	case "apns":
		reg = &wirepb.PushRegistration{Kind: wirepb.PushKind_APNS, Token: args[2]}
	case "fcm":
		reg = &wirepb.PushRegistration{Kind: wirepb.PushKind_FCM, Token: args[2]}
	default:
		return usageError(pushUsage)
	}
	if err := c.SetPush(ctx, reg); err != nil {
		return err
	}
	fmt.Fprintf(out, "push wake-ups on (%s)\n", args[1])
	return nil
}

// cmdVectors runs the auditors' test vectors (testvectors/) against this
// implementation. It needs no device.
func cmdVectors(args []string, out, errw io.Writer) int {
	if len(args) != 2 || (args[0] != "verify" && args[0] != "generate") {
		fmt.Fprintln(errw, "usage: ferry vectors verify|generate DIR")
		return 2
	}
	if args[0] == "generate" {
		n, err := testvectors.WriteDir(args[1])
		if err != nil {
			fmt.Fprintln(errw, "ferry:", err)
			return 1
		}
		fmt.Fprintf(out, "wrote %d vectors to %s\n", n, args[1])
		return 0
	}
	results, err := testvectors.VerifyDir(args[1])
	if err != nil {
		fmt.Fprintln(errw, "ferry:", err)
		return 1
	}
	failed := 0
	for _, r := range results {
		status := "ok  "
		if !r.OK {
			status = "FAIL"
			failed++
		}
		fmt.Fprintf(out, "%s %s: expect %s, got %s\n", status, r.Path, r.Expect, r.Got)
		if !r.OK && r.Detail != "" {
			fmt.Fprintf(out, "     %s\n", r.Detail)
		}
	}
	fmt.Fprintf(out, "%d vectors, %d failed\n", len(results), failed)
	if failed > 0 || len(results) == 0 {
		return 1
	}
	return 0
}
