package main

import (
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/ferryhq/ferry/client"
	"github.com/ferryhq/ferry/wire"
	"github.com/ferryhq/ferry/wire/wirepb"
)

var (
	faultyOnce sync.Once
	faultyBin  string
	faultyErr  error
)

// faultyFerryd builds (once) a ferryd with -tags faultfs: WAL writes and
// syncs fail while DATA/FAULT exists (store/faultfs.go).
func faultyFerryd(t *testing.T) string {
	t.Helper()
	faultyOnce.Do(func() {
		faultyBin = filepath.Join(binDir, "faulty-ferryd")
		out, err := exec.Command("go", "build", "-tags", "faultfs", "-o", faultyBin, "github.com/ferryhq/ferry/cmd/ferryd").CombinedOutput()
		if err != nil {
			faultyErr = errors.New(string(out))
		}
	})
	if faultyErr != nil {
		t.Fatalf("build faulty ferryd: %v", faultyErr)
	}
	return faultyBin
}

// TestBlackBoxFsyncFailureExits: when the WAL's fsync starts failing, the
// send in flight gets no ✓ (a retryable UNAVAILABLE, or the connection
// closing), ferryd exits 1 saying why, and after a restart on a healthy
// disk the ✓'d message is delivered, the failed one is not until the
// sender retries it, and the retry is stored once.
func TestBlackBoxFsyncFailureExits(t *testing.T) {
	data := t.TempDir()
	srv := startServerBin(t, faultyFerryd(t), data)
	sender := newCrashDevice(t, srv, "fsender")
	rcpt := newCrashDevice(t, srv, "frcpt")
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	send := func(conn *client.Conn, id string) (*wirepb.Response, error) {
		return conn.Do(ctx, &wirepb.ClientFrame{Body: &wirepb.ClientFrame_Send{Send: &wirepb.Send{
			ClientMsgId: id, To: rcpt.name, Ciphertexts: []*wirepb.DeviceCiphertext{{Username: rcpt.name, DeviceId: 1,
				RegistrationId: rcpt.reg, Type: wirepb.EnvelopeType_SIGNAL_MESSAGE, Content: []byte("ciphertext " + id)}}}}})
	}
	sc, err := sender.connect(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := send(sc, "ok-1"); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(data, "FAULT"), nil, 0o644); err != nil {
		t.Fatal(err)
	}
	r, err := send(sc, "lost-2")
	if err == nil {
		t.Fatalf("a send during the fsync failure was ✓'d: %v", r)
	}
	var we *wire.Error
	if errors.As(err, &we) && (we.Code != wirepb.ErrorCode_UNAVAILABLE || !we.Retryable) {
		t.Errorf("send during the fault: %v, want a retryable UNAVAILABLE", err)
	}
	sc.Close()
	select {
	case <-srv.done:
	case <-time.After(30 * time.Second):
		t.Fatalf("ferryd kept running after a failed fsync:\n%s", srv.log.String())
	}
	if strings.Contains(srv.log.String(), "panic:") {
		t.Errorf("ferryd panicked instead of exiting cleanly:\n%s", srv.log.String())
	}
	if code := srv.cmd.ProcessState.ExitCode(); code != 1 {
		t.Errorf("exit status %d, want 1", code)
	}
	if !strings.Contains(srv.log.String(), "storage failed; exiting so a supervisor restarts the node") {
		t.Errorf("ferryd did not say why it exited:\n%s", srv.log.String())
	}

	// The disk recovers; the supervisor restarts ferryd.
	if err := os.Remove(filepath.Join(data, "FAULT")); err != nil {
		t.Fatal(err)
	}
	srv.restart()
	rc, err := rcpt.connect(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer rc.Close()
	next := func() *wirepb.Envelope {
		t.Helper()
		for {
			select {
			case ev, ok := <-rc.Events():
				if !ok {
					t.Fatalf("receiver closed: %v", rc.Err())
				}
				if env := ev.GetEnvelope(); env != nil && env.Type == wirepb.EnvelopeType_SIGNAL_MESSAGE {
					go rc.Do(ctx, &wirepb.ClientFrame{Body: &wirepb.ClientFrame_Ack{Ack: &wirepb.Ack{EnvelopeIds: []uint64{env.Id}}}})
					return env
				}
			case <-ctx.Done():
				t.Fatal("no envelope")
			}
		}
	}
	if env := next(); env.ClientMsgId != "ok-1" {
		t.Fatalf("first delivered %q, want the ✓'d ok-1", env.ClientMsgId)
	}
	sc, err = sender.connect(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer sc.Close()
	if _, err := send(sc, "lost-2"); err != nil { // the client's retry
		t.Fatal(err)
	}
	if env := next(); env.ClientMsgId != "lost-2" {
		t.Fatalf("then delivered %q, want the retried lost-2", env.ClientMsgId)
	}
}
