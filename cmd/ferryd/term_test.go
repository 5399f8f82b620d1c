package main

import (
	"fmt"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/ferryhq/ferry/wire"
)

// TestBlackBoxSIGTERMUnderLoad: ferryd is stopped with SIGTERM at random
// points under load and started again, 5 times (FERRY_SOAK=1: 50). Each
// stop exits 0 (in-flight commits answered, Pebble closed cleanly: term
// checks the status); the connected receivers are told 4100 (reconnect with
// jitter) and come back to the restarted server; every ✓'d message is then
// delivered once, in order.
func TestBlackBoxSIGTERMUnderLoad(t *testing.T) {
	cycles := 5
	if os.Getenv("FERRY_SOAK") != "" {
		cycles = 50
	}
	srv := startServer(t, t.TempDir(), "--send-rate", "inf") // the send limit is limits_test.go's
	const pairs = 4
	l := startLoad(t, srv, pairs, 3*time.Minute)
	for cycle := range cycles {
		l.awaitRandomAcks(fmt.Sprint("cycle ", cycle))
		srv.term()
		srv.restart()
	}
	n := l.finish(fmt.Sprint(cycles, " SIGTERMs"))
	// Every stop found the receivers connected (they reconnect between
	// stops, or no ✓'d message could have reached them): most of their
	// connections must have ended with the shutdown code, not a broken socket.
	if got := l.closeCount(wire.CloseServerShutdown); got < cycles {
		t.Errorf("receivers saw close code %d %d times over %d stops, want at least %d",
			wire.CloseServerShutdown, got, cycles, cycles)
	}
	if !strings.Contains(srv.log.String(), "ferryd: stopped") {
		t.Errorf("ferryd never logged a clean stop:\n%s", srv.log.String())
	}
	t.Logf("%d SIGTERM/restart cycles, %d messages ✓'d, every one delivered once, in order; %d receiver closes with %d",
		cycles, n, l.closeCount(wire.CloseServerShutdown), wire.CloseServerShutdown)
}
