package probe

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"net/netip"
	"os/exec"
	"runtime"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// Helpers for tests on real network namespaces. Every namespace is named with
// a per-test prefix and deleted in t.Cleanup; links live inside namespaces and
// go with them.

func needRoot(t *testing.T) {
	t.Helper()
	if unix.Geteuid() != 0 {
		t.Skip("needs root to create network namespaces")
	}
	if _, err := exec.LookPath("ip"); err != nil {
		t.Skip("needs ip (iproute2)")
	}
}

func run(t *testing.T, args ...string) string {
	t.Helper()
	out, err := exec.Command(args[0], args[1:]...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return string(out)
}

// lab names namespaces "<prefix><role>", e.g. "pb1a2fA".
type lab struct {
	t      *testing.T
	prefix string
}

func newLab(t *testing.T) *lab {
	needRoot(t)
	b := make([]byte, 2)
	rand.Read(b)
	return &lab{t: t, prefix: "pb" + hex.EncodeToString(b)}
}

// ns creates namespace role with loopback up and returns its name.
func (l *lab) ns(role string) string {
	name := l.prefix + role
	run(l.t, "ip", "netns", "add", name)
	l.t.Cleanup(func() { exec.Command("ip", "netns", "del", name).Run() })
	run(l.t, "ip", "-n", name, "link", "set", "lo", "up")
	return name
}

// veth links devA in nsA with devB in nsB and brings both up. The pair is
// created inside nsA, never in the root namespace.
func (l *lab) veth(nsA, devA, nsB, devB string) {
	run(l.t, "ip", "-n", nsA, "link", "add", devA, "type", "veth", "peer", "name", devB, "netns", nsB)
	run(l.t, "ip", "-n", nsA, "link", "set", devA, "up")
	run(l.t, "ip", "-n", nsB, "link", "set", devB, "up")
}

func (l *lab) addr(ns, dev, prefix string) {
	run(l.t, "ip", "-n", ns, "addr", "add", prefix, "dev", dev)
}

func (l *lab) exec(ns string, args ...string) string {
	return run(l.t, append([]string{"ip", "netns", "exec", ns}, args...)...)
}

// inNS runs fn on a thread that is in namespace name, so sockets fn opens
// belong to that namespace (and stay there). The thread goes back to its
// namespace afterwards, or dies with its goroutine if it cannot.
func inNS(t *testing.T, name string, fn func()) {
	t.Helper()
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		orig, err := netns.Get()
		if err != nil {
			errc <- err
			return
		}
		defer orig.Close()
		target, err := netns.GetFromName(name)
		if err != nil {
			errc <- err
			return
		}
		defer target.Close()
		if err := netns.Set(target); err != nil {
			errc <- err
			return
		}
		fn()
		if netns.Set(orig) == nil {
			runtime.UnlockOSThread()
		}
		errc <- nil
	}()
	if err := <-errc; err != nil {
		t.Fatalf("entering namespace %s: %v", name, err)
	}
}

// startIn starts a Prober inside namespace name; it stops in t.Cleanup.
func startIn(t *testing.T, name string, cfg Config) *Prober {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	var p *Prober
	var err error
	inNS(t, name, func() { p, err = Start(ctx, cfg) })
	if err != nil {
		cancel()
		t.Fatalf("starting prober in %s: %v", name, err)
	}
	t.Cleanup(func() {
		cancel()
		select {
		case <-p.Done():
		case <-time.After(5 * time.Second):
			t.Errorf("prober in %s did not stop", name)
		}
	})
	return p
}

// waitFor polls cond until it holds or timeout passes; it returns how long
// that took and whether cond held.
func waitFor(timeout time.Duration, cond func() bool) (time.Duration, bool) {
	start := time.Now()
	for {
		if cond() {
			return time.Since(start), true
		}
		if time.Since(start) > timeout {
			return time.Since(start), false
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// icmpCounter reads one Icmp counter (e.g. "OutDestUnreachs") of namespace ns.
func (l *lab) icmpCounter(ns, name string) int {
	lines := strings.Split(l.exec(ns, "cat", "/proc/net/snmp"), "\n")
	for i := 0; i+1 < len(lines); i++ {
		if !strings.HasPrefix(lines[i], "Icmp: ") || !strings.HasPrefix(lines[i+1], "Icmp: ") {
			continue
		}
		keys, values := strings.Fields(lines[i]), strings.Fields(lines[i+1])
		for j := range keys {
			if keys[j] == name && j < len(values) {
				n, err := strconv.Atoi(values[j])
				if err != nil {
					l.t.Fatalf("Icmp %s in %s: %v", name, ns, err)
				}
				return n
			}
		}
	}
	l.t.Fatalf("no Icmp counter %s in %s", name, ns)
	return 0
}

func drain(c <-chan struct{}) {
	select {
	case <-c:
	default:
	}
}

func fired(c <-chan struct{}) bool {
	select {
	case <-c:
		return true
	default:
		return false
	}
}

func describe(p *Prober, peer netip.Addr) string {
	works, reason, since := p.State(peer)
	return fmt.Sprintf("works=%v reason=%q since=%s", works, reason, since.Format("15:04:05.000"))
}
