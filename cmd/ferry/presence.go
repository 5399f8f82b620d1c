package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"time"

	"github.com/ferryhq/ferry/client"
	"github.com/ferryhq/ferry/wire/wirepb"
)

// presenceText is how the CLI shows a presence: "online", "last seen
// RFC3339" or "unknown" (hidden, or never seen).
func presenceText(p *wirepb.PresenceInfo) string {
	switch p.GetState() {
	case wirepb.PresenceState_ONLINE:
		return "online"
	case wirepb.PresenceState_OFFLINE:
		return "last seen " + time.UnixMilli(p.LastSeenMs).UTC().Format(time.RFC3339)
	default:
		return "unknown"
	}
}

func cmdPresence(ctx context.Context, c *client.Client, args []string, out io.Writer) error {
	fs := flag.NewFlagSet("presence", flag.ContinueOnError)
	asJSON := fs.Bool("json", false, "JSON output")
	pos, err := parseArgs(fs, args)
	if err != nil || len(pos) != 1 {
		return usageError("usage: ferry presence NAME [--json]")
	}
	ctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	ps, err := c.Presence(ctx, pos)
	if err != nil {
		return err
	}
	for _, p := range ps {
		if !*asJSON {
			fmt.Fprintln(out, presenceText(p))
			continue
		}
		v := struct {
			Username string `json:"username"`
			State    string `json:"state"` // online, offline, unknown
			LastSeen string `json:"last_seen,omitempty"`
		}{Username: p.Username, State: "unknown"}
		switch p.State {
		case wirepb.PresenceState_ONLINE:
			v.State = "online"
		case wirepb.PresenceState_OFFLINE:
			v.State = "offline"
			v.LastSeen = time.UnixMilli(p.LastSeenMs).UTC().Format(time.RFC3339Nano)
		}
		if err := json.NewEncoder(out).Encode(v); err != nil {
			return err
		}
	}
	return nil
}

func cmdPrivacy(ctx context.Context, c *client.Client, args []string, out io.Writer) error {
	const usage = "usage: ferry privacy presence [everyone|nobody|allow NAME...]"
	if len(args) == 0 || args[0] != "presence" {
		return usageError(usage)
	}
	args = args[1:]
	vis := wirepb.PresenceVisibility_VISIBILITY_UNSPECIFIED
	var allow []string
	if len(args) > 0 {
		switch args[0] {
		case "everyone":
			vis = wirepb.PresenceVisibility_EVERYONE
		case "nobody":
			vis = wirepb.PresenceVisibility_NOBODY
		case "allow":
			vis, allow = wirepb.PresenceVisibility_ALLOWLIST, args[1:]
			if len(allow) == 0 {
				return usageError(usage)
			}
		default:
			return usageError(usage)
		}
		if vis != wirepb.PresenceVisibility_ALLOWLIST && len(args) > 1 {
			return usageError(usage)
		}
	}
	ctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	p, err := c.SetPresencePrivacy(ctx, vis, allow)
	if err != nil {
		return err
	}
	switch p.Visibility {
	case wirepb.PresenceVisibility_NOBODY:
		fmt.Fprintln(out, "presence visible to nobody")
	case wirepb.PresenceVisibility_ALLOWLIST:
		fmt.Fprintf(out, "presence visible to %v\n", p.Allow)
	default:
		fmt.Fprintln(out, "presence visible to everyone")
	}
	return nil
}

func cmdTyping(ctx context.Context, c *client.Client, args []string, out io.Writer) error {
	fs := flag.NewFlagSet("typing", flag.ContinueOnError)
	group := fs.Bool("group", false, "NAME is a group")
	stop := fs.Bool("stop", false, "say typing stopped")
	pos, err := parseArgs(fs, args)
	if err != nil || len(pos) != 1 {
		return usageError("usage: ferry typing [--group] [--stop] NAME")
	}
	ctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	return c.SendTyping(ctx, pos[0], *group, !*stop)
}
