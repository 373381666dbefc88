package nat

import (
	"context"
	"errors"
	"io"
	"net"
	"os/exec"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/fabricnet/fabric/internal/nsthread"
	"github.com/fabricnet/fabric/iptables"
	"github.com/fabricnet/fabric/lab"
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
	lab.RequireRoot(t, "iptables", "iptables-save", "iptables-restore")
}

func newTestLab(t *testing.T) *testLab {
	t.Helper()
	needRoot(t)
	l := &testLab{t: t, prefix: lab.Prefix("nt")}
	for _, ns := range []string{"h1", "c1", "c1b", "h2", "c2", "out"} {
		lab.AddNS(t, l.ns(ns))
	}
	// Routers forward, and bridged frames pass iptables as dockerd sets it.
	for _, h := range []string{"h1", "h2"} {
		l.in(h, "sysctl", "-qw", "net.ipv4.ip_forward=1")
		lab.Bridge(t, l.ns(h), labBridge)
	}
	l.in("h1", "sysctl", "-qw", "net.bridge.bridge-nf-call-iptables=1")
	lab.Addr(t, l.ns("h1"), labBridge, "10.244.1.1/24")
	lab.Addr(t, l.ns("h2"), labBridge, "10.244.2.1/24")
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
	lab.Veth(l.t, l.ns(host), port, l.ns(c), "eth0")
	lab.AddToBridge(l.t, l.ns(host), labBridge, port)
	lab.Addr(l.t, l.ns(c), "eth0", addr)
	l.in(c, "ip", "route", "add", "default", "via", gw)
}

// link joins namespaces a and b with a veth pair and gives each end its
// address.
func (l *testLab) link(a, devA, addrA, b, devB, addrB string) {
	lab.Veth(l.t, l.ns(a), devA, l.ns(b), devB)
	lab.Addr(l.t, l.ns(a), devA, addrA)
	lab.Addr(l.t, l.ns(b), devB, addrB)
}

// in runs a command in namespace ns and fails the test if it fails.
func (l *testLab) in(ns string, name string, args ...string) string {
	l.t.Helper()
	return lab.Exec(l.t, l.ns(ns), append([]string{name}, args...)...)
}

func (l *testLab) exec(ns string) func(ctx context.Context, name string, args ...string) *exec.Cmd {
	return func(ctx context.Context, name string, args ...string) *exec.Cmd {
		return lab.Command(ctx, l.ns(ns), name, args...)
	}
}

func (l *testLab) manager(ns string) *Manager {
	l.t.Helper()
	m, err := New(Config{Exec: l.exec(ns), Tables: ownTables(l.t, l.exec(ns)), Logger: lab.Logger(l.t).With("ns", ns)})
	if err != nil {
		l.t.Fatal(err)
	}
	return m
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

// serveSource listens on addr in ns and tells every client the source
// address it sees.
func (l *testLab) serveSource(ns, addr string) {
	l.t.Helper()
	ln, err := lab.ServeTCP(l.ns(ns), addr)
	if err != nil {
		l.t.Fatalf("listening on %s in %s: %v", addr, ns, err)
	}
	l.t.Cleanup(func() { ln.Close() })
}

// dial connects from ns to addr and returns the source address the server
// reports.
func (l *testLab) dial(ns, addr string) (string, error) {
	conn, seen, err := lab.DialTCP(l.ns(ns), "", addr, 2*time.Second)
	if errors.Is(err, io.EOF) {
		return "", nil // connected, but the server hung up without a word
	}
	if err != nil {
		return "", err
	}
	conn.Close()
	return seen, nil
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
	err := nsthread.Do(l.ns(ns), func() (err error) {
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
	err := nsthread.Do(l.ns(ns), func() (err error) {
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

// ownTables is an iptables owner of nat's section alone, for a test that
// runs nat without policy.
func ownTables(t testing.TB, exec func(ctx context.Context, name string, args ...string) *exec.Cmd) *iptables.Manager {
	t.Helper()
	m, err := iptables.New(iptables.Config{Exec: exec, Sections: []string{Section}, Logger: lab.Logger(t)})
	if err != nil {
		t.Fatal(err)
	}
	return m
}
