package main

// ferry chat: an interactive terminal UI on bubbletea (docs/decisions.md,
// issue 5). It is this device's receiving connection while it runs: it
// stores and acks everything, shows one conversation, the other side's
// presence and typing, and ✓ / ✓✓ / read marks on own messages.

import (
	"context"
	"flag"
	"fmt"
	"io"
	"sort"
	"strings"
	"time"

	"github.com/charmbracelet/bubbles/textinput"
	tea "github.com/charmbracelet/bubbletea"
	"github.com/ferryhq/ferry/client"
	"github.com/ferryhq/ferry/client/localstore"
	"github.com/ferryhq/ferry/wire/wirepb"
)

// typingRefresh is how often a typing device repeats "typing": well inside
// the receivers' TTL (the server's --typing-ttl, default 6 s).
const typingRefresh = 3 * time.Second

func cmdChat(ctx context.Context, c *client.Client, args []string, stdin io.Reader, out io.Writer) error {
	fs := flag.NewFlagSet("chat", flag.ContinueOnError)
	group := fs.Bool("group", false, "NAME is a group")
	pos, err := parseArgs(fs, args)
	if err != nil || len(pos) != 1 {
		return usageError("usage: ferry chat [--group] NAME")
	}
	if c.Username() == "" {
		return client.ErrNotRegistered
	}
	m := &chatModel{ctx: ctx, c: c, name: pos[0], presence: map[string]*wirepb.PresenceInfo{},
		typing: map[string]time.Time{}}
	var watch []string
	if *group {
		gctx, cancel := context.WithTimeout(ctx, time.Minute)
		g, err := c.GroupInfo(gctx, pos[0])
		cancel()
		if err != nil {
			return err
		}
		m.group = g
		for _, mem := range g.Members {
			if mem.Username != c.Username() && len(watch) < 256 {
				watch = append(watch, mem.Username)
			}
		}
	} else {
		watch = []string{pos[0]}
	}
	m.input = textinput.New()
	m.input.Placeholder = "type a message, Enter to send, Esc to quit"
	m.input.Prompt = "> "
	m.input.CharLimit = 4000
	m.input.Focus()
	m.reload()

	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	p := tea.NewProgram(m, tea.WithAltScreen(), tea.WithContext(ctx), tea.WithInput(stdin), tea.WithOutput(out))
	done := make(chan error, 1)
	go func() {
		done <- c.Receive(ctx, client.ReceiveOptions{
			Subscribe: watch,
			OnConn:    func(conn *client.Conn) { p.Send(connMsg{conn}) },
			Handle:    func(ev client.Event) { p.Send(eventMsg{ev}) },
		})
	}()
	go func() {
		if err := <-done; err != nil {
			p.Send(errMsg{err: err})
		}
	}()
	final, err := p.Run()
	if err != nil && ctx.Err() == nil {
		return err
	}
	if fm, ok := final.(*chatModel); ok && fm.fatal != nil {
		return fm.fatal
	}
	return nil
}

type (
	connMsg  struct{ conn *client.Conn }
	eventMsg struct{ ev client.Event }
	errMsg   struct {
		err  error
		soft bool // shown in the status line; the screen stays
	}
	sentMsg struct{ err error }
	tickMsg struct{}
)

type chatModel struct {
	ctx   context.Context
	c     *client.Client
	name  string
	group *wirepb.GroupInfo // nil: 1:1 with name

	msgs     []localstore.Message
	presence map[string]*wirepb.PresenceInfo
	typing   map[string]time.Time // who is typing, until when
	input    textinput.Model
	conn     *client.Conn // the receiving connection, nil while reconnecting
	status   string
	fatal    error
	width    int
	height   int

	typingSentAt time.Time // when "typing" was last sent; zero: not typing
}

func (m *chatModel) Init() tea.Cmd {
	return tea.Batch(textinput.Blink, m.markRead(), tick())
}

func tick() tea.Cmd {
	return tea.Tick(500*time.Millisecond, func(time.Time) tea.Msg { return tickMsg{} })
}

func (m *chatModel) reload() {
	var err error
	if m.group != nil {
		m.msgs, err = m.c.Store().History(m.ctx, "", m.group.GroupId)
	} else {
		m.msgs, err = m.c.History(m.ctx, m.name)
	}
	if err != nil {
		m.status = "history: " + err.Error()
	}
}

// markRead tells the other side this conversation is read (opening it,
// and each message that arrives while it is open).
func (m *chatModel) markRead() tea.Cmd {
	c, ctx, name, group := m.c, m.ctx, m.name, m.group != nil
	return func() tea.Msg {
		rctx, cancel := context.WithTimeout(ctx, 30*time.Second)
		defer cancel()
		if _, err := c.MarkRead(rctx, name, group); err != nil && ctx.Err() == nil {
			return errMsg{err: fmt.Errorf("mark read: %w", err), soft: true}
		}
		return nil
	}
}

// sendTyping sends a typing start or stop on the receiving connection;
// failures (rate limit, reconnecting) are ignored: typing is best-effort.
func (m *chatModel) sendTyping(on bool) tea.Cmd {
	conn := m.conn
	if conn == nil {
		return nil
	}
	peer, gid := m.name, ""
	if m.group != nil {
		peer, gid = "", m.group.GroupId
	}
	ctx := m.ctx
	return func() tea.Msg {
		tctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		defer cancel()
		_ = conn.Typing(tctx, peer, gid, on)
		return nil
	}
}

func (m *chatModel) send(text string) tea.Cmd {
	c, ctx, name, group := m.c, m.ctx, m.name, m.group != nil
	return func() tea.Msg {
		sctx, cancel := context.WithTimeout(ctx, time.Minute)
		defer cancel()
		var err error
		if group {
			_, err = c.SendGroup(sctx, name, text)
		} else {
			_, err = c.Send(sctx, name, text)
		}
		return sentMsg{err}
	}
}

// ours reports whether a message belongs to the open conversation.
func (m *chatModel) ours(msg *localstore.Message) bool {
	if m.group != nil {
		return msg.Group == m.group.GroupId
	}
	return msg.Group == "" && msg.Peer == m.name
}

func (m *chatModel) Update(msg tea.Msg) (tea.Model, tea.Cmd) {
	switch msg := msg.(type) {
	case tea.WindowSizeMsg:
		m.width, m.height = msg.Width, msg.Height
		m.input.Width = max(10, msg.Width-4)
		return m, nil
	case tea.KeyMsg:
		switch msg.Type {
		case tea.KeyEsc, tea.KeyCtrlC, tea.KeyCtrlD:
			return m, tea.Batch(m.stopTyping(), tea.Quit)
		case tea.KeyEnter:
			text := strings.TrimSpace(m.input.Value())
			if text == "" {
				return m, nil
			}
			m.input.Reset()
			m.status = "sending…"
			return m, tea.Batch(m.stopTyping(), m.send(text))
		}
		var cmd tea.Cmd
		before := m.input.Value()
		m.input, cmd = m.input.Update(msg)
		if v := m.input.Value(); v != before {
			if v == "" {
				return m, tea.Batch(cmd, m.stopTyping())
			}
			if time.Since(m.typingSentAt) >= typingRefresh {
				m.typingSentAt = time.Now()
				return m, tea.Batch(cmd, m.sendTyping(true))
			}
		}
		return m, cmd
	case connMsg:
		m.conn = msg.conn
		if m.conn == nil {
			m.status = "reconnecting…"
		} else if m.status == "reconnecting…" {
			m.status = ""
		}
		return m, nil
	case errMsg:
		if m.ctx.Err() != nil {
			return m, tea.Quit
		}
		if msg.soft {
			m.status = describe(msg.err)
			return m, nil
		}
		// Receive gave up: auth failed, replaced by another connection of
		// this device (4003), device removed.
		m.fatal = msg.err
		return m, tea.Quit
	case sentMsg:
		if msg.err != nil {
			m.status = "not sent: " + describe(msg.err)
		} else {
			m.status = ""
		}
		m.reload()
		return m, nil
	case tickMsg:
		now := time.Now()
		for who, until := range m.typing {
			if now.After(until) {
				delete(m.typing, who)
			}
		}
		return m, tick()
	case eventMsg:
		return m, m.event(msg.ev)
	}
	return m, nil
}

func (m *chatModel) stopTyping() tea.Cmd {
	if m.typingSentAt.IsZero() {
		return nil
	}
	m.typingSentAt = time.Time{}
	return m.sendTyping(false)
}

func (m *chatModel) event(ev client.Event) tea.Cmd {
	switch {
	case ev.Message != nil:
		if !m.ours(ev.Message) {
			if !ev.Message.Outgoing {
				m.status = "new message from " + ev.Message.Sender + " (elsewhere)"
			}
			return nil
		}
		delete(m.typing, ev.Message.Sender)
		m.reload()
		if !ev.Message.Outgoing {
			return m.markRead()
		}
	case ev.Receipt != nil:
		m.reload()
	case ev.Presence != nil:
		m.presence[ev.Presence.Username] = ev.Presence
	case ev.Typing != nil:
		t := ev.Typing
		mine := (m.group == nil && t.GroupId == "" && t.Username == m.name) ||
			(m.group != nil && t.GroupId == m.group.GroupId)
		if !mine || t.Username == m.c.Username() {
			return nil
		}
		if t.Typing {
			ttl := time.Duration(t.TtlMs) * time.Millisecond
			if ttl <= 0 {
				ttl = 6 * time.Second
			}
			m.typing[t.Username] = time.Now().Add(ttl)
		} else {
			delete(m.typing, t.Username)
		}
	case ev.Group != nil && m.group != nil && ev.Group.GroupId == m.group.GroupId:
		m.group = ev.Group
	}
	return nil
}

func (m *chatModel) header() string {
	if m.group == nil {
		return fmt.Sprintf("chat with %s · %s", m.name, presenceText(m.presence[m.name]))
	}
	var on []string
	for name, p := range m.presence {
		if p.GetState() == wirepb.PresenceState_ONLINE {
			on = append(on, name)
		}
	}
	sort.Strings(on)
	who := "nobody else online"
	if len(on) > 0 {
		who = "online: " + strings.Join(on, ", ")
	}
	return fmt.Sprintf("group %s (%d members) · %s", m.group.Name, len(m.group.Members), who)
}

func (m *chatModel) line(msg *localstore.Message) string {
	who := msg.Sender
	if msg.Outgoing {
		who = "me"
	}
	text := msg.Text
	if msg.Failed {
		text = "(could not decrypt)"
	}
	mark := ""
	if msg.Outgoing {
		switch {
		case msg.Read:
			mark = " ✓✓ read"
		case msg.Delivered:
			mark = " ✓✓"
		default:
			mark = " ✓"
		}
	}
	return fmt.Sprintf("[%s] %s: %s%s", msg.ServerTime.Local().Format("15:04:05"), who, text, mark)
}

func (m *chatModel) View() string {
	var b strings.Builder
	b.WriteString(m.header())
	b.WriteString("\n")
	rows := m.height - 4 // header, typing/status line, input, spare
	if rows < 1 {
		rows = 20
	}
	// The newest messages that fit, long ones wrapped at the width.
	var lines []string
	for i := len(m.msgs) - 1; i >= 0 && len(lines) < rows; i-- {
		lines = append(wrap(m.line(&m.msgs[i]), m.width), lines...)
	}
	if len(lines) > rows {
		lines = lines[len(lines)-rows:]
	}
	for _, l := range lines {
		b.WriteString(l)
		b.WriteString("\n")
	}
	for i := len(lines); i < rows; i++ {
		b.WriteString("\n")
	}
	var typers []string
	for who := range m.typing {
		typers = append(typers, who)
	}
	sort.Strings(typers)
	switch {
	case len(typers) == 1:
		b.WriteString(typers[0] + " is typing…")
	case len(typers) > 1:
		b.WriteString(strings.Join(typers, ", ") + " are typing…")
	default:
		b.WriteString(m.status)
	}
	b.WriteString("\n")
	b.WriteString(m.input.View())
	return b.String()
}

// wrap cuts s into lines of at most width runes (0: no limit).
func wrap(s string, width int) []string {
	r := []rune(s)
	if width <= 0 || len(r) <= width {
		return []string{s}
	}
	var out []string
	for len(r) > width {
		out = append(out, string(r[:width]))
		r = r[width:]
	}
	return append(out, string(r))
}
