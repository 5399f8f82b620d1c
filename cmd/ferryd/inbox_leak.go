//go:build auditleak

package main

// A deliberately broken ferryd for the privacy audit's test
// (TestBlackBoxAuditDetectsKeptBytes): it keeps a copy of every envelope's
// content in a side file of the data directory, as a buggy store or a
// careless debug feature would. Built only with -tags auditleak.

import (
	"context"
	"os"
	"path/filepath"
	"sync"

	"github.com/ferryhq/ferry/inbox"
	"github.com/ferryhq/ferry/relay"
)

type leakyInbox struct {
	relay.Inbox
	mu   sync.Mutex
	path string
}

func wrapInbox(ib relay.Inbox, data string) relay.Inbox {
	return &leakyInbox{Inbox: ib, path: filepath.Join(data, "kept-content.bin")}
}

func (l *leakyInbox) keep(b []byte) {
	l.mu.Lock()
	defer l.mu.Unlock()
	f, err := os.OpenFile(l.path, os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o600)
	if err != nil {
		return
	}
	_, _ = f.Write(b)
	_ = f.Close()
}

func (l *leakyInbox) Append(ctx context.Context, m inbox.Send) (inbox.Accepted, error) {
	for _, e := range m.Entries {
		l.keep(e.Env.GetContent())
	}
	return l.Inbox.Append(ctx, m)
}

func (l *leakyInbox) AppendGroup(ctx context.Context, m inbox.GroupAppend) (inbox.Accepted, error) {
	l.keep(m.Body)
	return l.Inbox.AppendGroup(ctx, m)
}
