package nat

import (
	"bufio"
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"regexp"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/vishvananda/netns"
)

// testLab is two fabric hosts, their containers and an outside machine, each
// in its own network namespace:
//
//	c1 10.244.1.2 ─┐                                   ┌─ c2 10.244.2.2
//	c1b 10.244.1.3 ┴ br h1 192.168.200.1 ── 192.168.200.2 h2 br
//	                    h1 192.168.100.11 ── 192.168.100.250 out
//
// The h1-h2 link with plain routes stands in for a tunnel.
type testLab struct {
	t      *testing.T
	prefix string
}

const (
	labPool    = "10.244.0.0/16"
	h1Subnet   = "10.244.1.0/24"
	h2Subnet   = "10.244.2.0/24"
	h1Underlay = "192.168.100.11"
	outAddr    = "192.168.100.250"
	labBridge  = "fbr0"
)

func needRoot(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root for network namespaces and iptables")
	}
	for _, tool := range []string{"ip", "nsenter", "iptables", "iptables-save", "iptables-restore"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Skipf("%s not found: %v", tool, err)
		}
	}
}

func newTestLab(t *testing.T) *testLab {
	t.Helper()
	needRoot(t)
	b := make([]byte, 2)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	l := &testLab{t: t, prefix: "nt" + hex.EncodeToString(b)}
	for _, ns := range []string{"h1", "c1", "c1b", "h2", "c2", "out"} {
		name := l.ns(ns)
		l.must("ip", "netns", "add", name)
		t.Cleanup(func() {
			if out, err := exec.Command("ip", "netns", "del", name).CombinedOutput(); err != nil {
				t.Errorf("removing namespace %s: %v: %s", name, err, out)
			}
		})
		l.in(ns, "ip", "link", "set", "lo", "up")
	}
	// Routers forward, and bridged frames pass iptables as dockerd sets it.
	for _, h := range []string{"h1", "h2"} {
		l.in(h, "sysctl", "-qw", "net.ipv4.ip_forward=1")
		l.in(h, "ip", "link", "add", labBridge, "type", "bridge")
		l.in(h, "ip", "link", "set", labBridge, "up")
	}
	l.in("h1", "sysctl", "-qw", "net.bridge.bridge-nf-call-iptables=1")
	l.in("h1", "ip", "addr", "add", "10.244.1.1/24", "dev", labBridge)
	l.in("h2", "ip", "addr", "add", "10.244.2.1/24", "dev", labBridge)
	l.container("c1", "h1", "10.244.1.2/24", "10.244.1.1")
	l.container("c1b", "h1", "10.244.1.3/24", "10.244.1.1")
	l.container("c2", "h2", "10.244.2.2/24", "10.244.2.1")

	l.link("h1", "eu", h1Underlay+"/24", "out", "eu", outAddr+"/24")
	l.link("h1", "et", "192.168.200.1/30", "h2", "et", "192.168.200.2/30")
	l.in("h1", "ip", "route", "add", h2Subnet, "via", "192.168.200.2")
	l.in("h2", "ip", "route", "add", h1Subnet, "via", "192.168.200.1")
	return l
}

func (l *testLab) ns(short string) string { return l.prefix + "-" + short }

// container puts namespace c on host's bridge with addr and a default route.
func (l *testLab) container(c, host, addr, gw string) {
	port := l.prefix + c // host side of the veth, unique per run
	l.in(host, "ip", "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", l.ns(c))
	l.in(host, "ip", "link", "set", port, "master", labBridge, "up")
	l.in(c, "ip", "addr", "add", addr, "dev", "eth0")
	l.in(c, "ip", "link", "set", "eth0", "up")
	l.in(c, "ip", "route", "add", "default", "via", gw)
}

// link joins namespaces a and b with a veth pair created inside a, never in
// the root namespace.
func (l *testLab) link(a, devA, addrA, b, devB, addrB string) {
	l.in(a, "ip", "link", "add", devA, "type", "veth", "peer", "name", devB, "netns", l.ns(b))
	l.in(a, "ip", "addr", "add", addrA, "dev", devA)
	l.in(a, "ip", "link", "set", devA, "up")
	l.in(b, "ip", "addr", "add", addrB, "dev", devB)
	l.in(b, "ip", "link", "set", devB, "up")
}

func (l *testLab) must(name string, args ...string) string {
	l.t.Helper()
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		l.t.Fatalf("%s %s: %v: %s", name, strings.Join(args, " "), err, out)
	}
	return string(out)
}

// in runs a command in namespace ns and fails the test if it fails.
func (l *testLab) in(ns string, name string, args ...string) string {
	l.t.Helper()
	return l.must("nsenter", append([]string{"--net=/var/run/netns/" + l.ns(ns), "--", name}, args...)...)
}

func (l *testLab) exec(ns string) func(ctx context.Context, name string, args ...string) *exec.Cmd {
	path := "/var/run/netns/" + l.ns(ns)
	return func(ctx context.Context, name string, args ...string) *exec.Cmd {
		return exec.CommandContext(ctx, "nsenter", append([]string{"--net=" + path, "--", name}, args...)...)
	}
}

func (l *testLab) manager(ns string) *Manager {
	l.t.Helper()
	log := slog.New(slog.NewTextHandler(testWriter{l.t}, &slog.HandlerOptions{Level: slog.LevelDebug}))
	m, err := New(Config{Exec: l.exec(ns), Logger: log.With("ns", ns)})
	if err != nil {
		l.t.Fatal(err)
	}
	return m
}

type testWriter struct{ t *testing.T }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Helper()
	w.t.Log(strings.TrimRight(string(p), "\n"))
	return len(p), nil
}

// save returns iptables-save of ns without comments and packet counters, so
// two reads of an unchanged kernel compare equal.
func (l *testLab) save(ns string) string {
	l.t.Helper()
	out := l.in(ns, "iptables-save")
	counters := regexp.MustCompile(`\[\d+:\d+\]`)
	var keep []string
	for _, line := range strings.Split(out, "\n") {
		if strings.HasPrefix(line, "#") {
			continue
		}
		keep = append(keep, counters.ReplaceAllString(line, "[0:0]"))
	}
	return strings.Join(keep, "\n")
}

// inNetns runs f with the calling thread in namespace ns; sockets f creates
// stay in ns.
func (l *testLab) inNetns(ns string, f func() error) error {
	runtime.LockOSThread()
	orig, err := netns.Get()
	if err != nil {
		runtime.UnlockOSThread()
		return err
	}
	defer orig.Close()
	target, err := netns.GetFromPath("/var/run/netns/" + l.ns(ns))
	if err != nil {
		runtime.UnlockOSThread()
		return err
	}
	defer target.Close()
	if err := netns.Set(target); err != nil {
		runtime.UnlockOSThread()
		return err
	}
	ferr := f()
	if err := netns.Set(orig); err != nil {
		// Leave the thread locked: it dies with the goroutine instead of
		// running other goroutines in the wrong namespace.
		return fmt.Errorf("returning to the original namespace: %v", err)
	}
	runtime.UnlockOSThread()
	return ferr
}

// serveSource listens on addr in ns and tells every client the source
// address it sees, then closes the connection.
func (l *testLab) serveSource(ns, addr string) {
	l.t.Helper()
	var ln net.Listener
	err := l.inNetns(ns, func() (err error) {
		ln, err = net.Listen("tcp4", addr)
		return err
	})
	if err != nil {
		l.t.Fatalf("listening on %s in %s: %v", addr, ns, err)
	}
	l.t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			conn, err := ln.Accept()
			if err != nil {
				return
			}
			host, _, _ := net.SplitHostPort(conn.RemoteAddr().String())
			fmt.Fprintf(conn, "%s\n", host)
			conn.Close()
		}
	}()
}

// dial connects from ns to addr and returns the source address the server
// reports.
func (l *testLab) dial(ns, addr string) (string, error) {
	var conn net.Conn
	err := l.inNetns(ns, func() (err error) {
		conn, err = net.DialTimeout("tcp4", addr, 2*time.Second)
		return err
	})
	if err != nil {
		return "", err
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(3 * time.Second))
	line, err := bufio.NewReader(conn).ReadString('\n')
	if err != nil && err != io.EOF {
		return "", fmt.Errorf("reading from %s: %v", addr, err)
	}
	return strings.TrimSpace(line), nil
}

// expectSource dials addr from ns and checks the server saw want.
func (l *testLab) expectSource(ns, addr, want string) {
	l.t.Helper()
	got, err := l.dial(ns, addr)
	if err != nil {
		l.t.Errorf("%s -> %s: %v", ns, addr, err)
		return
	}
	if got != want {
		l.t.Errorf("%s -> %s: server saw source %s, want %s", ns, addr, got, want)
	}
}

// expectClosed checks that ns cannot connect to addr.
func (l *testLab) expectClosed(ns, addr string) {
	l.t.Helper()
	if got, err := l.dial(ns, addr); err == nil {
		l.t.Errorf("%s -> %s: connected (server saw %s), want no connection", ns, addr, got)
	}
}

// serveUDPSource answers every datagram to addr in ns with the source
// address it came from.
func (l *testLab) serveUDPSource(ns, addr string) {
	l.t.Helper()
	var pc net.PacketConn
	err := l.inNetns(ns, func() (err error) {
		pc, err = net.ListenPacket("udp4", addr)
		return err
	})
	if err != nil {
		l.t.Fatalf("listening on udp %s in %s: %v", addr, ns, err)
	}
	l.t.Cleanup(func() { pc.Close() })
	go func() {
		buf := make([]byte, 1500)
		for {
			_, from, err := pc.ReadFrom(buf)
			if err != nil {
				return
			}
			host, _, _ := net.SplitHostPort(from.String())
			pc.WriteTo([]byte(host), from)
		}
	}()
}

// dialUDP sends one datagram from ns to addr and returns the source address
// the server reports.
func (l *testLab) dialUDP(ns, addr string) (string, error) {
	var conn net.Conn
	err := l.inNetns(ns, func() (err error) {
		conn, err = net.Dial("udp4", addr)
		return err
	})
	if err != nil {
		return "", err
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(2 * time.Second))
	if _, err := conn.Write([]byte("who am i")); err != nil {
		return "", err
	}
	buf := make([]byte, 64)
	n, err := conn.Read(buf)
	if err != nil {
		return "", err
	}
	return string(buf[:n]), nil
}
