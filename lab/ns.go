package lab

// Bare namespaces for package tests that check real kernel state without a
// whole lab (no etcd, no hosts): namespaces named with a random per-run
// prefix and removed when the test ends (also when it fails), veth pairs and
// bridges created inside those namespaces (never in the root namespace),
// commands and Go code run inside a namespace, and TCP and ICMP probes
// between them.

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"log/slog"
	"os"
	"os/exec"
	"strings"
	"sync"
	"testing"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/fabricnet/fabric/internal/testreq"
)

// RequireRoot skips the test unless it runs as root and ip, nsenter and the
// given tools are installed.
func RequireRoot(t testing.TB, tools ...string) {
	t.Helper()
	testreq.Lab(t, "a test in network namespaces")
	if os.Geteuid() != 0 {
		testreq.Missing(t, "needs root to create network namespaces")
	}
	for _, tool := range append([]string{"ip", "nsenter"}, tools...) {
		if _, err := exec.LookPath(tool); err != nil {
			testreq.Missing(t, "needs %s: %v", tool, err)
		}
	}
}

// Prefix returns tag followed by four random hex digits. Names built on it
// do not collide with a parallel run or the leftovers of a killed one, and
// stay short enough for interface names (15 bytes).
// Within one test binary no prefix is given twice (its tests run in
// parallel, where a repeat would be two tests on one namespace).
func Prefix(tag string) string {
	prefixesGiven.Lock()
	defer prefixesGiven.Unlock()
	for {
		b := make([]byte, 2)
		rand.Read(b)
		p := tag + hex.EncodeToString(b)
		if !prefixesGiven.m[p] {
			prefixesGiven.m[p] = true
			return p
		}
	}
}

var prefixesGiven = struct {
	sync.Mutex
	m map[string]bool
}{m: map[string]bool{}}

// Run runs a command and fails the test if it fails; it returns the
// combined output.
func Run(t testing.TB, args ...string) string {
	t.Helper()
	out, err := exec.Command(args[0], args[1:]...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return string(out)
}

// Path is where ip netns keeps the namespace called name.
func Path(name string) string { return "/var/run/netns/" + name }

// AddNS creates namespace name with loopback up and deletes it when the test
// ends; links inside it go with it.
func AddNS(t testing.TB, name string) string {
	t.Helper()
	Run(t, "ip", "netns", "add", name)
	t.Cleanup(func() {
		if out, err := exec.Command("ip", "netns", "del", name).CombinedOutput(); err != nil {
			t.Errorf("removing namespace %s: %v: %s", name, err, out)
		}
	})
	Run(t, "ip", "-n", name, "link", "set", "lo", "up")
	return name
}

// Command returns a command that runs name in namespace ns, in the shape of
// the Exec hooks the packages under test take.
func Command(ctx context.Context, ns, name string, args ...string) *exec.Cmd {
	return exec.CommandContext(ctx, "nsenter", append([]string{"--net=" + Path(ns), "--", name}, args...)...)
}

// Exec runs a command in namespace ns and fails the test if it fails; it
// returns the combined output.
func Exec(t testing.TB, ns string, args ...string) string {
	t.Helper()
	return Run(t, append([]string{"nsenter", "--net=" + Path(ns), "--"}, args...)...)
}

// Veth links devA in nsA with devB in nsB and brings both up. The pair is
// created inside nsA, so nothing ever lands in the root namespace.
func Veth(t testing.TB, nsA, devA, nsB, devB string) {
	t.Helper()
	Run(t, "ip", "-n", nsA, "link", "add", devA, "type", "veth", "peer", "name", devB, "netns", nsB)
	Run(t, "ip", "-n", nsA, "link", "set", devA, "up")
	Run(t, "ip", "-n", nsB, "link", "set", devB, "up")
}

// Bridge creates bridge name in ns and brings it up.
func Bridge(t testing.TB, ns, name string) {
	t.Helper()
	Run(t, "ip", "-n", ns, "link", "add", name, "type", "bridge")
	Run(t, "ip", "-n", ns, "link", "set", name, "up")
}

// AddToBridge makes dev in ns a port of bridge.
func AddToBridge(t testing.TB, ns, bridge, dev string) {
	t.Helper()
	Run(t, "ip", "-n", ns, "link", "set", dev, "master", bridge)
}

// Addr adds prefix (address/length) to dev in ns.
func Addr(t testing.TB, ns, dev, prefix string) {
	t.Helper()
	Run(t, "ip", "-n", ns, "addr", "add", prefix, "dev", dev)
}

// Handle returns a netlink handle into namespace name, closed when the test
// ends.
func Handle(t testing.TB, name string) *netlink.Handle {
	t.Helper()
	ns, err := netns.GetFromName(name)
	if err != nil {
		t.Fatalf("open namespace %s: %v", name, err)
	}
	// Route netlink only: the default also opens XFRM, which a kernel
	// without the xfrm module (the qemu guest's) refuses.
	h, err := netlink.NewHandleAt(ns, unix.NETLINK_ROUTE)
	ns.Close()
	if err != nil {
		t.Fatalf("netlink handle for %s: %v", name, err)
	}
	t.Cleanup(h.Close)
	return h
}

// Logger returns a debug-level text logger that writes to t.Log, so the
// code under test explains itself next to the failure.
func Logger(t testing.TB) *slog.Logger {
	return slog.New(slog.NewTextHandler(logWriter{t}, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

type logWriter struct{ t testing.TB }

func (w logWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimRight(string(p), "\n"))
	return len(p), nil
}
