package main

// Black-box test harness: real ferryd and ferry processes built from this
// tree, driven like a user would, killed with SIGKILL where it matters.

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

var binDir string

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "ferry-bin-")
	if err != nil {
		panic(err)
	}
	binDir = dir
	out, err := exec.Command("go", "build", "-o", dir+"/", "github.com/ferryhq/ferry/cmd/ferryd", "github.com/ferryhq/ferry/cmd/ferry", "github.com/ferryhq/ferry/cmd/ferry-bench").CombinedOutput()
	if err == nil {
		// The privacy audit's broken variant (inbox_leak.go).
		out, err = exec.Command("go", "build", "-tags", "auditleak", "-o", filepath.Join(dir, "leaky-ferryd"), "github.com/ferryhq/ferry/cmd/ferryd").CombinedOutput()
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "building binaries: %v\n%s", err, out)
		os.Exit(1)
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// server is one ferryd process.
type server struct {
	t    *testing.T
	bin  string // the ferryd binary; "" is binDir/ferryd
	data string
	addr string
	args []string // the flags of startServer, given again on restart
	cmd  *exec.Cmd
	log  *syncBuffer // everything ferryd wrote to stderr, across restarts
	done chan struct{}
}

type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

var servingRE = regexp.MustCompile(`ferryd: serving"? addr=(\S+)`)

// startServer starts ferryd on a free loopback port with data in dir and
// waits until it logs that it is serving.
func startServer(t *testing.T, data string, args ...string) *server {
	t.Helper()
	return startServerBin(t, "", data, args...)
}

// startServerBin is startServer with another ferryd binary ("" for the
// normal one).
func startServerBin(t *testing.T, bin, data string, args ...string) *server {
	t.Helper()
	s := &server{t: t, bin: bin, data: data, args: args, log: &syncBuffer{}}
	s.start("127.0.0.1:0", args...)
	t.Cleanup(s.stop)
	return s
}

func (s *server) start(listen string, args ...string) {
	s.t.Helper()
	all := append([]string{"--listen", listen, "--data", s.data, "--log-level", "debug"}, args...)
	bin := s.bin
	if bin == "" {
		bin = filepath.Join(binDir, "ferryd")
	}
	cmd := exec.Command(bin, all...)
	pr, pw := io.Pipe()
	cmd.Stderr = pw
	cmd.Stdout = s.log
	if err := cmd.Start(); err != nil {
		s.t.Fatalf("start ferryd: %v", err)
	}
	s.cmd = cmd
	s.done = make(chan struct{})
	addrc := make(chan string, 1)
	go func() {
		sc := bufio.NewScanner(pr)
		for sc.Scan() {
			line := sc.Text()
			fmt.Fprintln(s.log, line)
			if m := servingRE.FindStringSubmatch(line); m != nil {
				select {
				case addrc <- m[1]:
				default:
				}
			}
		}
		_, _ = io.Copy(s.log, pr)
	}()
	go func() {
		_ = cmd.Wait()
		pw.Close()
		close(s.done)
	}()
	select {
	case s.addr = <-addrc:
	case <-s.done:
		s.t.Fatalf("ferryd exited before serving:\n%s", s.log.String())
	case <-time.After(30 * time.Second):
		s.t.Fatalf("ferryd did not start:\n%s", s.log.String())
	}
}

func (s *server) url() string { return "ws://" + s.addr }

// kill9 kills ferryd with SIGKILL and waits for it to be gone.
func (s *server) kill9() {
	s.t.Helper()
	_ = s.cmd.Process.Kill()
	<-s.done
}

// term stops ferryd with SIGTERM (graceful: the store is closed cleanly)
// and fails the test unless it exits 0.
func (s *server) term() {
	s.t.Helper()
	_ = s.cmd.Process.Signal(syscall.SIGTERM)
	<-s.done
	if !s.cmd.ProcessState.Success() {
		s.t.Fatalf("ferryd did not stop cleanly: %v\n%s", s.cmd.ProcessState, s.log.String())
	}
}

// restart starts ferryd again on the same address, data and flags.
func (s *server) restart() {
	s.t.Helper()
	s.start(s.addr, s.args...)
}

func (s *server) stop() {
	if s.cmd != nil && s.cmd.ProcessState == nil {
		_ = s.cmd.Process.Kill()
		<-s.done
	}
}

// ferry runs the CLI with a home directory and returns stdout, stderr and
// the exit code.
func ferry(t *testing.T, home string, args ...string) (string, string, int) {
	t.Helper()
	return ferryStdin(t, home, "", args...)
}

// ferryStdin is ferry with stdin as the CLI's standard input.
func ferryStdin(t *testing.T, home, stdin string, args ...string) (string, string, int) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, filepath.Join(binDir, "ferry"), append([]string{"--home", home}, args...)...)
	cmd.Stdin = strings.NewReader(stdin)
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	err := cmd.Run()
	code := 0
	if ee, ok := err.(*exec.ExitError); ok {
		code = ee.ExitCode()
	} else if err != nil {
		t.Fatalf("run ferry %v: %v", args, err)
	}
	return out.String(), errb.String(), code
}

// mustFerry runs the CLI and fails the test unless it exits 0.
func mustFerry(t *testing.T, home string, args ...string) string {
	t.Helper()
	out, errs, code := ferry(t, home, args...)
	if code != 0 {
		t.Fatalf("ferry %s: exit %d\nstdout: %s\nstderr: %s", strings.Join(args, " "), code, out, errs)
	}
	return out
}

// proxy is a TCP proxy whose connections the test can cut at any moment.
type proxy struct {
	ln     net.Listener
	target string
	mu     sync.Mutex
	conns  []net.Conn
	cuts   int
}

func newProxy(t *testing.T, target string) *proxy {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &proxy{ln: ln, target: target}
	go p.accept()
	t.Cleanup(func() { ln.Close(); p.cut() })
	return p
}

func (p *proxy) url() string { return "ws://" + p.ln.Addr().String() }

func (p *proxy) accept() {
	for {
		c, err := p.ln.Accept()
		if err != nil {
			return
		}
		u, err := net.Dial("tcp", p.target)
		if err != nil {
			c.Close()
			continue
		}
		p.mu.Lock()
		p.conns = append(p.conns, c, u)
		p.mu.Unlock()
		go func() { _, _ = io.Copy(u, c); u.Close() }()
		go func() { _, _ = io.Copy(c, u); c.Close() }()
	}
}

// cut closes every proxied connection (both sides) at once.
func (p *proxy) cut() {
	p.mu.Lock()
	defer p.mu.Unlock()
	if len(p.conns) > 0 {
		p.cuts++
	}
	for _, c := range p.conns {
		c.Close()
	}
	p.conns = nil
}
