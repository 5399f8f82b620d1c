package main

import (
	"context"
	"encoding/json"
	"os/exec"
	"path/filepath"
	"strconv"
	"testing"
	"time"
)

// A group of 1,024 members with 2 devices each (client SDK devices in two
// worker processes of ferry-bench, as the 20,000-file limit would require
// for more) plus the sender: every device gets every message exactly once.
// The group is over the inline threshold, so each send is queued durably
// before its ✓ and expanded after it. With -short: 64 members.
func TestBlackBoxGroupFanout1024x2(t *testing.T) {
	members := 1024
	if testing.Short() {
		members = 64
	}
	// One process plays 1,024 users from one address: the per-IP and
	// per-device abuse limits are off (they have their own tests).
	srv := startServer(t, t.TempDir(), "--link-start-rate", "1000000", "--link-start-burst", "100000",
		"--register-rate", "inf", "--max-conns-per-ip", "0", "--conn-rate", "inf", "--send-rate", "inf",
		"--max-group-members", strconv.Itoa(members+1), "--group-fanout-inline", "256")
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	const messages = 3
	cmd := exec.CommandContext(ctx, filepath.Join(binDir, "ferry-bench"), "--server", srv.url(), "group",
		"--members", strconv.Itoa(members), "--devices", "2", "--messages", strconv.Itoa(messages),
		"--procs", "2", "--timeout", "4m", "--json")
	out, err := cmd.Output()
	if err != nil {
		var stderr []byte
		if ee, ok := err.(*exec.ExitError); ok {
			stderr = ee.Stderr
		}
		t.Fatalf("ferry-bench group: %v\n%s\n%s\nserver log:\n%s", err, out, stderr, srv.log.String())
	}
	var res struct {
		Recipients     int     `json:"recipient_devices"`
		Delivered      int     `json:"delivered"`
		Lost           int     `json:"lost"`
		Duplicates     int     `json:"duplicates"`
		Procs          int     `json:"procs"`
		AckMs          float64 `json:"ack_ms"`
		LastDeliveryMs float64 `json:"last_delivery_ms"`
	}
	if err := json.Unmarshal(out, &res); err != nil {
		t.Fatalf("ferry-bench printed %q: %v", out, err)
	}
	if res.Recipients != 2*members || res.Procs != 2 {
		t.Fatalf("ran %d recipient devices over %d processes, want %d over 2", res.Recipients, res.Procs, 2*members)
	}
	if res.Delivered != messages*2*members || res.Lost != 0 || res.Duplicates != 0 {
		t.Fatalf("delivered %d (want %d), lost %d, duplicates %d", res.Delivered, messages*2*members, res.Lost, res.Duplicates)
	}
	// Figures are reported, never asserted on (shared, noisy machine).
	t.Logf("%d recipient devices: send→✓ median %.1f ms, send→last delivery median %.1f ms", res.Recipients, res.AckMs, res.LastDeliveryMs)
}
