package main

import (
	"fmt"
	"os"
	"testing"
	"time"
)

// TestBlackBoxCrashLoop: senders keep sending (one message in flight each,
// retrying with the same client message id after a failure) while ferryd is
// SIGKILLed at random points and restarted, 20 times (FERRY_SOAK=1: 200).
// Every ✓'d message is delivered to its receiver exactly once (one stored
// envelope; redeliveries of that envelope are dropped by id), and each
// conversation's messages arrive in seq order.
func TestBlackBoxCrashLoop(t *testing.T) {
	cycles := 20
	if os.Getenv("FERRY_SOAK") != "" {
		cycles = 200
	}
	srv := startServer(t, t.TempDir(), "--send-rate", "inf") // the send limit is limits_test.go's
	l := startLoad(t, srv, 4, 5*time.Minute)
	for cycle := range cycles {
		l.awaitRandomAcks(fmt.Sprint("cycle ", cycle))
		srv.kill9()
		srv.restart()
	}
	n := l.finish(fmt.Sprint(cycles, " crashes"))
	t.Logf("%d SIGKILL/restart cycles, %d messages ✓'d, every one delivered once, in order", cycles, n)
}
