// Package e2e runs real fabricd processes on lab hosts (network namespaces on
// this machine) against a real etcd, and checks what an operator would see:
// leases, BGP sessions, kernel routes and packets between containers.
package e2e

import (
	"context"
	"flag"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/fabricnet/fabric/internal/testwait"
	"github.com/fabricnet/fabric/lab"
	"github.com/fabricnet/fabric/localapi"
)

var binDir string

func TestMain(m *testing.M) {
	// os.Exit skips deferred calls: the built binaries are removed in run.
	os.Exit(run(m))
}

func run(m *testing.M) int {
	flag.Parse()
	if testing.Short() {
		fmt.Println("short mode: the e2e tests run real fabricd in a lab, in make test")
		return 0
	}
	binDir = os.Getenv("FABRIC_BIN")
	if binDir == "" {
		dir, err := os.MkdirTemp("", "fabric-e2e-bin-")
		if err != nil {
			panic(err)
		}
		defer os.RemoveAll(dir)
		cmd := exec.Command("go", "build", "-o", dir+"/", "../cmd/fabricd", "../cmd/fabricctl", "./tcpprobe")
		cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
		if out, err := cmd.CombinedOutput(); err != nil {
			fmt.Fprintf(os.Stderr, "build: %v\n%s", err, out)
			return 1
		}
		binDir = dir
	} else if _, err := exec.LookPath("go"); err == nil {
		// Always rebuilt where Go is: `make build` does not build it, and a
		// stale copy lacks newer subcommands. (Inside the qemu guest there
		// is no Go; the lane puts a fresh tcpprobe in FABRIC_BIN.)
		cmd := exec.Command("go", "build", "-o", binDir+"/", "./tcpprobe")
		cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
		if out, err := cmd.CombinedOutput(); err != nil {
			fmt.Fprintf(os.Stderr, "build tcpprobe: %v\n%s", err, out)
			return 1
		}
	}
	return m.Run()
}

// fabric is a lab with fabricd on its hosts.
type fabric struct {
	t      *testing.T
	lab    *lab.Lab
	agents map[string]*agentProc
	extra  []string // flags for every fabricd
	// wireGuardKeys are the public keys each host reported after each
	// restartWith.
	wireGuardKeys map[string][]string
}

type agentProc struct {
	host   *lab.Host
	proc   *lab.Process
	runDir string
	args   []string
}

func newFabric(t *testing.T, spec lab.Spec, extra ...string) *fabric {
	t.Helper()
	l := lab.ForTest(t, spec)
	return &fabric{t: t, lab: l, agents: map[string]*agentProc{}, extra: extra}
}

func (f *fabric) fabricdArgs(h *lab.Host, runDir string, more ...string) []string {
	args := f.lab.FabricdArgs(binDir, h,
		"--run-dir", runDir,
		"--docker-opts-file", runDir+"/docker.env",
		"--resync", "5s",
		// BFD at the time scale: in the qemu guest under load 200 ms x 3
		// is missed by a live host (a flapping session, and routes dropped
		// when its echo is slow too); tests that set it win (later flags).
		"--bfd-interval", testwait.Scale(200*time.Millisecond).String(),
		// The IPIP probe too: a loaded guest that stalls for half a
		// second must not look like a blocked path.
		"--probe-interval", testwait.Scale(400*time.Millisecond).String(),
		"--log-level", "debug",
		"--metrics-address", netip.AddrPortFrom(h.Addr, 9815).String())
	args = append(args, f.extra...)
	return append(args, more...)
}

// start runs fabricd on h and waits until its local API answers.
func (f *fabric) start(h *lab.Host, more ...string) *agentProc {
	f.t.Helper()
	runDir := filepath.Join(f.lab.LogDir(), h.Name+"-run")
	args := f.fabricdArgs(h, runDir, more...)
	p, err := h.Start("fabricd", args...)
	if err != nil {
		f.t.Fatalf("start fabricd on %s: %v", h.Name, err)
	}
	a := &agentProc{host: h, proc: p, runDir: runDir, args: args}
	f.agents[h.Name] = a
	f.eventually(30*time.Second, "fabricd on "+h.Name+" answers on its socket", func() error {
		if p.Exited() {
			return fmt.Errorf("fabricd exited; log:\n%s", tail(p.LogPath()))
		}
		_, err := f.status(h)
		return err
	})
	return a
}

func (f *fabric) restart(h *lab.Host) {
	a := f.agents[h.Name]
	if err := a.proc.Stop(); err != nil {
		f.t.Fatalf("stop fabricd on %s: %v", h.Name, err)
	}
	p, err := h.Start("fabricd", a.args...)
	if err != nil {
		f.t.Fatal(err)
	}
	a.proc = p
}

func (f *fabric) runDir(h *lab.Host) string {
	if a := f.agents[h.Name]; a != nil {
		return a.runDir
	}
	return filepath.Join(f.lab.LogDir(), h.Name+"-run")
}

func (f *fabric) fabricctl(h *lab.Host, args ...string) (string, error) {
	full := append([]string{filepath.Join(binDir, "fabricctl"), "--run-dir", f.runDir(h), "--etcd-endpoints", strings.Join(f.lab.EtcdEndpoints(), ","),
		"--timeout", testwait.Scale(5 * time.Second).String()}, args...)
	ctx, cancel := context.WithTimeout(context.Background(), testwait.Scale(15*time.Second))
	defer cancel()
	return h.Run(ctx, full[0], full[1:]...)
}

// status and peers ask h's fabricd what `fabricctl status --json` and
// `fabricctl peers status --json` print (the same structs, from the same
// local API), without starting a process: the tests' waits poll them, and
// in the TCG guest the two execs of each check (nsenter, fabricctl) were a
// good share of the CPU. fabricctl's own output is checked where a test
// reads it as an operator would.
func (f *fabric) status(h *lab.Host) (localapi.Status, error) {
	ctx, cancel := context.WithTimeout(context.Background(), testwait.Scale(5*time.Second))
	defer cancel()
	return f.api(h).Status(ctx)
}

func (f *fabric) peers(h *lab.Host) ([]localapi.Peer, error) {
	ctx, cancel := context.WithTimeout(context.Background(), testwait.Scale(5*time.Second))
	defer cancel()
	return f.api(h).Peers(ctx)
}

func (f *fabric) api(h *lab.Host) *localapi.Client {
	return localapi.NewClient(filepath.Join(f.runDir(h), "fabricd.sock"))
}

func (f *fabric) subnet(h *lab.Host) netip.Prefix {
	f.t.Helper()
	s, err := f.status(h)
	if err != nil {
		f.t.Fatalf("status of %s: %v", h.Name, err)
	}
	return netip.MustParsePrefix(s.Subnet)
}

// ownedRoutes lists the kernel routes with fabricd's protocol on h, as the
// kernel reports them (not as fabricd thinks they are).
func (f *fabric) ownedRoutes(h *lab.Host) map[string]string {
	ctx, cancel := context.WithTimeout(context.Background(), testwait.Scale(5*time.Second))
	defer cancel()
	// ip -n, not h.Run: one process per family instead of two (nsenter, ip),
	// for a check the waits repeat.
	var out string
	for _, family := range []string{"-4", "-6"} {
		cmd := exec.CommandContext(ctx, "ip", "-n", h.Netns, family, "route", "show", "proto", "93")
		var stderr strings.Builder
		cmd.Stderr = &stderr
		b, err := cmd.Output()
		if err != nil {
			f.t.Fatalf("ip %s route on %s: %v: %s", family, h.Name, err, stderr.String())
		}
		out += string(b) + "\n"
	}
	routes := map[string]string{}
	for _, line := range strings.Split(strings.TrimSpace(out), "\n") {
		if line == "" {
			continue
		}
		dst, rest, _ := strings.Cut(line, " ")
		if dst == "unreachable" { // "unreachable 10.244.2.0/24 proto 93"
			dst, rest, _ = strings.Cut(rest, " ")
			rest = "unreachable " + rest
		}
		routes[dst] = rest
	}
	return routes
}

func (f *fabric) eventually(timeout time.Duration, what string, cond func() error) time.Duration {
	f.t.Helper()
	timeout = testwait.Scale(timeout)
	start := time.Now()
	var err error
	for time.Since(start) < timeout {
		if err = cond(); err == nil {
			return time.Since(start)
		}
		time.Sleep(testwait.Interval(100 * time.Millisecond))
	}
	f.t.Fatalf("%s: not within %s: %v", what, timeout, err)
	return 0
}

func tail(path string) string {
	b, _ := os.ReadFile(path)
	lines := strings.Split(string(b), "\n")
	if len(lines) > 40 {
		lines = lines[len(lines)-40:]
	}
	return strings.Join(lines, "\n")
}

// container adds a container namespace on h's bridge with the n-th address
// of h's subnet.
func (f *fabric) container(h *lab.Host, name string, n int) *lab.Container {
	f.t.Helper()
	sub := f.subnet(h)
	s, _ := f.status(h)
	addr := sub.Addr()
	for i := 0; i < n; i++ {
		addr = addr.Next()
	}
	ctx, cancel := context.WithTimeout(context.Background(), testwait.Scale(20*time.Second))
	defer cancel()
	c, err := f.lab.AddContainer(ctx, h, name, netip.PrefixFrom(addr, sub.Bits()), netip.MustParseAddr(s.Gateway), s.Bridge, s.MTU)
	if err != nil {
		f.t.Fatalf("container %s on %s: %v", name, h.Name, err)
	}
	return c
}

func ping(c *lab.Container, dst netip.Addr, extra ...string) error {
	ctx, cancel := context.WithTimeout(context.Background(), testwait.Scale(10*time.Second))
	defer cancel()
	args := append([]string{"-c", "1", "-W", "2"}, extra...)
	args = append(args, dst.String())
	_, err := c.Run(ctx, "ping", args...)
	return err
}

// tcpExchange opens a TCP connection from client to server:port and returns
// the source address the server saw.
func tcpExchange(server, client *lab.Container, port int) (seenFrom string, err error) {
	ctx, cancel := context.WithTimeout(context.Background(), testwait.Scale(15*time.Second))
	defer cancel()
	srv := server.Command(ctx, filepath.Join(binDir, "tcpprobe"), "serve", fmt.Sprintf("%s:%d", server.Addr, port), "1")
	var out strings.Builder
	srv.Stdout = &out
	if err := srv.Start(); err != nil {
		return "", err
	}
	defer srv.Process.Kill()
	var got string
	var lastErr error
	for i := 0; i < 30; i++ {
		time.Sleep(100 * time.Millisecond)
		got, lastErr = client.Run(ctx, filepath.Join(binDir, "tcpprobe"), "dial", fmt.Sprintf("%s:%d", server.Addr, port))
		if lastErr == nil {
			break
		}
	}
	if lastErr != nil {
		return "", lastErr
	}
	seen, ok := strings.CutPrefix(strings.TrimSpace(got), "seen-from ")
	if !ok {
		return "", fmt.Errorf("client read %q", got)
	}
	return seen, nil
}

// containersTalk puts a container on every host's bridge and checks, for
// every ordered pair, a ping and a TCP connection whose receiver sees the
// sender's container address (no NAT between containers).
func (f *fabric) containersTalk(hosts []*lab.Host) map[string]*lab.Container {
	f.t.Helper()
	ctrs := map[string]*lab.Container{}
	for _, h := range hosts {
		ctrs[h.Name] = f.container(h, "c1", 2)
	}
	f.pairsTalk(hosts, ctrs)
	return ctrs
}

// autoEncap is what auto mode gives two hosts of this lab that reach each
// other: ipip where this kernel has it, vxlan where it does not. The tests
// hold on either kernel.
func (f *fabric) autoEncap(h *lab.Host) string {
	f.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), testwait.Scale(5*time.Second))
	defer cancel()
	// With a local address of its own, so it does not collide with tunl0.
	if _, err := h.Run(ctx, "ip", "link", "add", "fbprobe", "type", "ipip", "local", "127.3.4.5"); err != nil {
		return "vxlan"
	}
	h.Run(ctx, "ip", "link", "del", "fbprobe")
	return "ipip"
}

// startMesh starts fabricd on every host of the lab and waits until each
// has a route to every other host's subnet.
func (f *fabric) startMesh(more ...string) []*lab.Host {
	f.t.Helper()
	hosts := f.lab.Hosts()
	for _, h := range hosts {
		f.start(h, more...)
	}
	for _, h := range hosts {
		f.eventually(20*time.Second, h.Name+" routes", func() error { return f.routesTo(h, f.otherSubnets(h, hosts)) })
	}
	return hosts
}

// sub is the fabric with t as the test to fail, for use in a subtest.
func (f *fabric) sub(t *testing.T) *fabric {
	g := *f
	g.t = t
	return &g
}
