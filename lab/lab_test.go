package lab

import (
	"context"
	"flag"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/fabricnet/fabric/internal/testreq"
)

func testContext(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 45*time.Second)
	t.Cleanup(cancel)
	return ctx
}

func TestSingleSubnetHostsPingAndEtcd(t *testing.T) {
	t.Parallel()
	l := ForTest(t, Spec{Hosts: 3})
	ctx := testContext(t)

	hosts := l.Hosts()
	if len(hosts) != 3 {
		t.Fatalf("want 3 hosts, got %d", len(hosts))
	}
	for i, h := range hosts {
		wantAddr := netip.MustParseAddr(fmt.Sprintf("192.168.100.%d", 11+i))
		if h.Addr != wantAddr || h.Name != fmt.Sprintf("host%d", i+1) || h.Netns != l.Prefix()+"-"+h.Name {
			t.Errorf("host %d: got %+v, want addr %v", i, h, wantAddr)
		}
		// ip_forward on, rp_filter off: tunnels depend on both.
		out, err := h.Run(ctx, "cat", "/proc/sys/net/ipv4/ip_forward", "/proc/sys/net/ipv4/conf/all/rp_filter")
		if err != nil || strings.Fields(out)[0] != "1" || strings.Fields(out)[1] != "0" {
			t.Errorf("%s sysctls: %q %v", h.Name, out, err)
		}
	}
	for _, a := range hosts {
		for _, b := range hosts {
			if a != b {
				if err := a.Ping(ctx, b.Addr, 3*time.Second); err != nil {
					t.Errorf("%s -> %s: %v", a.Name, b.Name, err)
				}
			}
		}
	}
	// An address nobody has must not answer: proves Ping can fail.
	if err := hosts[0].Ping(ctx, netip.MustParseAddr("192.168.100.99"), 500*time.Millisecond); err == nil {
		t.Error("ping to an unused address succeeded")
	}

	// The test process reaches etcd over the unix socket.
	cli, err := l.EtcdClient()
	if err != nil {
		t.Fatal(err)
	}
	defer cli.Close()
	if _, err := cli.Put(ctx, "/lab-test/key", "value-1"); err != nil {
		t.Fatalf("put via %v: %v", l.EtcdClientEndpoints(), err)
	}
	resp, err := cli.Get(ctx, "/lab-test/key")
	if err != nil || len(resp.Kvs) != 1 || string(resp.Kvs[0].Value) != "value-1" {
		t.Fatalf("get: %v %v", resp, err)
	}

	// A host reaches etcd's TCP endpoint through the underlay.
	if got := l.EtcdEndpoints(); len(got) != 1 || got[0] != "http://192.168.100.200:2379" {
		t.Fatalf("EtcdEndpoints = %v", got)
	}
	if out, err := hosts[2].Run(ctx, "bash", "-c", "exec 3<>/dev/tcp/192.168.100.200/2379 && printf 'GET /version HTTP/1.0\\r\\n\\r\\n' >&3 && cat <&3"); err != nil || !strings.Contains(out, "etcdserver") {
		t.Fatalf("host3 -> etcd over TCP: %q %v", out, err)
	}
	// The root namespace has no route into the lab (the rule says never).
	if out, err := exec.Command("ip", "route", "get", "192.168.100.200").CombinedOutput(); err == nil && strings.Contains(string(out), "dev "+l.Prefix()) {
		t.Errorf("root namespace routes into the lab: %s", out)
	}
}

func TestTwoSubnetsRouterAndDropIPProto(t *testing.T) {
	t.Parallel()
	l := ForTest(t, Spec{Hosts: 3, Subnets: 2})
	ctx := testContext(t)

	h1, h2, h3 := l.Host("host1"), l.Host("host2"), l.Host("host3")
	if h1.SubnetIndex != 0 || h2.SubnetIndex != 1 || h3.SubnetIndex != 0 {
		t.Fatalf("round-robin subnets: %d %d %d", h1.SubnetIndex, h2.SubnetIndex, h3.SubnetIndex)
	}
	if h2.Addr != netip.MustParseAddr("192.168.101.11") || h3.Addr != netip.MustParseAddr("192.168.100.12") {
		t.Fatalf("addresses: %v %v", h2.Addr, h3.Addr)
	}
	if l.Router() == nil {
		t.Fatal("no router with 2 subnets")
	}
	if err := h1.Ping(ctx, h2.Addr, 3*time.Second); err != nil {
		t.Fatalf("across the router: %v", err)
	}
	// Hosts on subnet 1 reach etcd on subnet 0 through the router.
	if _, err := h2.Run(ctx, "bash", "-c", "echo > /dev/tcp/192.168.100.200/2379"); err != nil {
		t.Fatalf("host2 -> etcd: %v", err)
	}

	undo, err := l.DropIPProto(ctx, 1, 0, 1)
	if err != nil {
		t.Fatal(err)
	}
	if err := h1.Ping(ctx, h2.Addr, time.Second); err == nil {
		t.Error("ICMP crossed the router although it is dropped")
	}
	if err := h2.Ping(ctx, h1.Addr, time.Second); err == nil {
		t.Error("ICMP crossed the router in the other direction although it is dropped")
	}
	// Same-subnet traffic never touches the router.
	if err := h1.Ping(ctx, h3.Addr, 3*time.Second); err != nil {
		t.Errorf("same subnet while dropping: %v", err)
	}
	// Other protocols still pass.
	if _, err := h2.Run(ctx, "bash", "-c", "echo > /dev/tcp/192.168.100.200/2379"); err != nil {
		t.Errorf("TCP while dropping ICMP: %v", err)
	}
	if err := undo(); err != nil {
		t.Fatal(err)
	}
	if err := h1.Ping(ctx, h2.Addr, 3*time.Second); err != nil {
		t.Errorf("after undo: %v", err)
	}
}

func TestThreeEtcdMembersSurviveOneStopped(t *testing.T) {
	t.Parallel()
	began := time.Now()
	l := ForTest(t, Spec{Hosts: 1, EtcdMembers: 3})
	ctx := testContext(t)
	t.Logf("3-member lab up after %s", time.Since(began))
	if n := len(l.EtcdEndpoints()); n != 3 {
		t.Fatalf("want 3 endpoints, got %d", n)
	}
	if err := l.StopEtcdMember(0); err != nil {
		t.Fatal(err)
	}
	stopped := l.etcd[0].proc
	if !stopped.Exited() {
		t.Fatal("member 0 still running after StopEtcdMember")
	}
	// The host sees member 0 gone...
	h := l.Hosts()[0]
	if _, err := h.Run(ctx, "bash", "-c", "echo > /dev/tcp/192.168.100.200/2379"); err == nil {
		t.Error("stopped member still accepts connections")
	}
	// ...but the remaining quorum serves writes.
	cli, err := l.EtcdClient()
	if err != nil {
		t.Fatal(err)
	}
	defer cli.Close()
	putCtx, cancel := context.WithTimeout(ctx, 15*time.Second)
	defer cancel()
	if _, err := cli.Put(putCtx, "/lab-test/quorum", "still-writable"); err != nil {
		t.Fatalf("write with one member down: %v", err)
	}
	t.Logf("write with member 0 stopped done after %s", time.Since(began))
	if err := l.StartEtcdMember(0); err != nil {
		t.Fatal(err)
	}
	t.Logf("member 0 back after %s", time.Since(began))
	// The restarted member has caught up with the write made while it was down.
	one, err := clientFor(l.etcd[0].clientEndpoint())
	if err != nil {
		t.Fatal(err)
	}
	defer one.Close()
	resp, err := one.Get(ctx, "/lab-test/quorum")
	if err != nil || len(resp.Kvs) != 1 || string(resp.Kvs[0].Value) != "still-writable" {
		t.Fatalf("restarted member: %v %v", resp, err)
	}
}

func TestContainerPingsItsHost(t *testing.T) {
	t.Parallel()
	l := ForTest(t, Spec{Hosts: 1})
	ctx := testContext(t)
	h := l.Hosts()[0]
	gw := netip.MustParsePrefix("10.244.1.1/24")
	if err := h.EnsureBridge(ctx, "fabric0", gw, 1450); err != nil {
		t.Fatal(err)
	}
	// Idempotent.
	if err := h.EnsureBridge(ctx, "fabric0", gw, 1450); err != nil {
		t.Fatal(err)
	}
	c, err := l.AddContainer(ctx, h, "c1", netip.MustParsePrefix("10.244.1.2/24"), gw.Addr(), "fabric0", 1450)
	if err != nil {
		t.Fatal(err)
	}
	if err := c.Ping(ctx, gw.Addr(), 3*time.Second); err != nil {
		t.Fatalf("container -> host bridge: %v", err)
	}
	// Through the default route to the host's underlay address.
	if err := c.Ping(ctx, h.Addr, 3*time.Second); err != nil {
		t.Fatalf("container -> host underlay address: %v", err)
	}
	if err := h.Ping(ctx, c.Addr, 3*time.Second); err != nil {
		t.Fatalf("host -> container: %v", err)
	}
	// MTU 1450: 1422 bytes of ICMP data + 28 header bytes fit, one more does
	// not (don't-fragment is set).
	if err := c.PingSize(ctx, gw.Addr(), 1422, 3*time.Second); err != nil {
		t.Errorf("full-MTU ping: %v", err)
	}
	if err := c.PingSize(ctx, gw.Addr(), 1423, time.Second); err == nil {
		t.Error("ping one byte over the MTU with don't-fragment succeeded")
	}
	out, err := c.Run(ctx, "ip", "-o", "link", "show", "eth0")
	if err != nil || !strings.Contains(out, "mtu 1450") {
		t.Fatalf("container eth0: %q %v", out, err)
	}
}

func TestAddHostAndOutside(t *testing.T) {
	t.Parallel()
	l := ForTest(t, Spec{Hosts: 2, Subnets: 2})
	ctx := testContext(t)
	h3, err := l.AddHost(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if h3.Name != "host3" || h3.Addr != netip.MustParseAddr("192.168.100.12") || len(l.Hosts()) != 3 {
		t.Fatalf("added host: %+v", h3)
	}
	out, err := l.AddOutside(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if out.Addr != netip.MustParseAddr("192.168.100.250") || l.Host("outside") != out {
		t.Fatalf("outside: %+v", out)
	}
	for _, h := range l.Hosts() {
		if err := h.Ping(ctx, out.Addr, 3*time.Second); err != nil {
			t.Errorf("%s -> outside: %v", h.Name, err)
		}
	}
}

// TestCloseRemovesEverything builds a lab with every kind of part, closes it
// and checks nothing with its prefix is left in the root namespace's view.
func TestCloseRemovesEverything(t *testing.T) {
	t.Parallel()
	if reason := cannotRun(); reason != "" {
		testreq.Missing(t, "%s", reason)
	}
	ctx := testContext(t)
	l, err := New(ctx, Spec{Hosts: 2, Subnets: 2})
	if err != nil {
		t.Fatal(err)
	}
	closed := false
	t.Cleanup(func() {
		if !closed {
			l.Close()
		}
	})
	h := l.Hosts()[0]
	if err := h.EnsureBridge(ctx, "br0", netip.MustParsePrefix("10.9.0.1/24"), 0); err != nil {
		t.Fatal(err)
	}
	if _, err := l.AddContainer(ctx, h, "c", netip.MustParsePrefix("10.9.0.2/24"), netip.MustParseAddr("10.9.0.1"), "br0", 0); err != nil {
		t.Fatal(err)
	}
	if _, err := l.AddOutside(ctx); err != nil {
		t.Fatal(err)
	}
	sleeper, err := h.Start("sleeper", "sleep", "1000")
	if err != nil {
		t.Fatal(err)
	}
	// A process that ignores SIGTERM must still be gone after Close.
	stubborn, err := h.Start("stubborn", "bash", "-c", "trap '' TERM; echo trap-$((40+2)); while :; do sleep 0.1; done")
	if err != nil {
		t.Fatal(err)
	}
	waitForLog(t, stubborn, "trap-42")
	pids := []int{sleeper.Pid(), stubborn.Pid(), l.etcd[0].proc.Pid()}
	logDir, runDir, prefix := l.LogDir(), l.RunDir(), l.Prefix()
	if ns, _ := namespacesWithPrefix(prefix); len(ns) < 6 {
		t.Fatalf("expected underlay, router, etcd, 2 hosts, container, outside; got %v", ns)
	}
	// Shorten the SIGTERM grace period so the test stays fast.
	l.stopGrace = 2 * time.Second

	closeStart := time.Now()
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	closed = true
	if took := time.Since(closeStart); took < 2*time.Second {
		t.Errorf("Close took %s: the SIGTERM-ignoring process cannot have needed SIGKILL", took)
	}
	if err := l.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}

	out, err := exec.Command("ip", "netns", "list").CombinedOutput()
	if err != nil || strings.Contains(string(out), prefix+"-") {
		t.Errorf("namespaces left: %s %v", out, err)
	}
	out, err = exec.Command("ip", "-o", "link").CombinedOutput()
	if err != nil || strings.Contains(string(out), prefix) {
		t.Errorf("links left in root: %s %v", out, err)
	}
	for _, pid := range pids {
		if err := syscall.Kill(pid, 0); err == nil {
			t.Errorf("process %d still alive", pid)
		}
	}
	for _, dir := range []string{logDir, runDir} {
		if _, err := os.Stat(dir); !os.IsNotExist(err) {
			t.Errorf("%s not removed: %v", dir, err)
		}
	}
}

func TestProcessStopAndLogs(t *testing.T) {
	t.Parallel()
	l := ForTest(t, Spec{Hosts: 1, LogDir: t.TempDir()})
	h := l.Hosts()[0]
	p, err := h.StartEnv("echo", []string{"LAB_TEST_VALUE=hello-from-env"}, "bash", "-c", "echo $LAB_TEST_VALUE; ip -o addr show eth0; exec sleep 1000")
	if err != nil {
		t.Fatal(err)
	}
	if want := l.LogDir() + "/host1-echo.log"; p.LogPath() != want {
		t.Errorf("log path %s, want %s", p.LogPath(), want)
	}
	waitForLog(t, p, "hello-from-env")
	waitForLog(t, p, h.Addr.String()+"/24")
	if p.Exited() {
		t.Fatal("exited early")
	}
	if err := p.Stop(); err != nil {
		t.Fatalf("stop: %v", err)
	}
	if !p.Exited() || syscall.Kill(p.Pid(), 0) == nil {
		t.Fatal("still running after Stop")
	}
	// A caller-supplied LogDir survives Close.
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(p.LogPath()); err != nil {
		t.Errorf("log gone after Close: %v", err)
	}
}

func waitForLog(t *testing.T, p *Process, want string) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		b, _ := os.ReadFile(p.LogPath())
		if strings.Contains(string(b), want) {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("log %s does not show %q: %q", p.LogPath(), want, b)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// TestHelperLab is not a test on its own: the tests below run the test binary
// again with FABRICLAB_HELPER=1 to get a lab owned by another process, which
// they then interrupt or kill.
func TestHelperLab(t *testing.T) {
	if os.Getenv("FABRICLAB_HELPER") != "1" {
		t.Skip("helper process for TestInterruptRemovesLab and TestSweepAfterCrash")
	}
	CloseOnInterrupt()
	l, err := New(context.Background(), Spec{Hosts: 1})
	if err != nil {
		t.Fatal(err)
	}
	p, err := l.Hosts()[0].Start("sleeper", "sleep", "1000")
	if err != nil {
		t.Fatal(err)
	}
	fmt.Printf("LAB %s %d %d\n", l.Prefix(), l.etcd[0].proc.Pid(), p.Pid())
	time.Sleep(time.Minute)
}

// startHelperLab starts TestHelperLab in a child process and returns it with
// the lab's prefix and the pids of the processes the lab started.
func startHelperLab(t *testing.T) (*exec.Cmd, string, []int) {
	t.Helper()
	if reason := cannotRun(); reason != "" {
		testreq.Missing(t, "%s", reason)
	}
	cmd := exec.Command(os.Args[0], "-test.run=^TestHelperLab$", "-test.v")
	cmd.Env = append(os.Environ(), "FABRICLAB_HELPER=1")
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = cmd.Process.Kill(); _ = cmd.Wait() })
	lines := make(chan string)
	go func() {
		buf := make([]byte, 4096)
		var acc string
		for {
			n, err := stdout.Read(buf)
			acc += string(buf[:n])
			if i := strings.Index(acc, "LAB "); i >= 0 && strings.Contains(acc[i:], "\n") {
				lines <- acc[i : i+strings.Index(acc[i:], "\n")]
				return
			}
			if err != nil {
				close(lines)
				return
			}
		}
	}()
	select {
	case line, ok := <-lines:
		if !ok {
			t.Fatal("helper ended without building a lab")
		}
		var prefix string
		var etcdPid, sleeperPid int
		if _, err := fmt.Sscanf(line, "LAB %s %d %d", &prefix, &etcdPid, &sleeperPid); err != nil {
			t.Fatalf("helper said %q: %v", line, err)
		}
		// Whatever happens in the test, leave nothing behind.
		t.Cleanup(func() { _ = Sweep(prefix) })
		return cmd, prefix, []int{etcdPid, sleeperPid}
	case <-time.After(30 * time.Second):
		t.Fatal("helper did not build a lab within 30s")
	}
	return nil, "", nil
}

func assertLabGone(t *testing.T, prefix string, pids []int) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for _, pid := range pids {
		for syscall.Kill(pid, 0) == nil && time.Now().Before(deadline) {
			time.Sleep(20 * time.Millisecond)
		}
		if syscall.Kill(pid, 0) == nil {
			t.Errorf("process %d of lab %s still alive", pid, prefix)
		}
	}
	if ns, _ := namespacesWithPrefix(prefix); len(ns) > 0 {
		t.Errorf("namespaces left: %v", ns)
	}
	if _, err := os.Stat(runBase + "/" + prefix); !os.IsNotExist(err) {
		t.Errorf("run dir of %s left: %v", prefix, err)
	}
	if dirs, _ := filepath.Glob(filepath.Join(os.TempDir(), prefix+"-logs-*")); len(dirs) > 0 {
		t.Errorf("log dirs of %s left: %v", prefix, dirs)
	}
}

// Ctrl-C skips t.Cleanup; CloseOnInterrupt must still remove the lab.
func TestInterruptRemovesLab(t *testing.T) {
	t.Parallel()
	cmd, prefix, pids := startHelperLab(t)
	if err := cmd.Process.Signal(os.Interrupt); err != nil {
		t.Fatal(err)
	}
	err := cmd.Wait()
	if exitErr, ok := err.(*exec.ExitError); !ok || exitErr.ExitCode() != 130 {
		t.Errorf("helper exit: %v, want status 130", err)
	}
	assertLabGone(t, prefix, pids)
}

// A run killed outright leaves namespaces behind; its processes die with it
// (Pdeathsig) and SweepStale removes the rest, because the owner is gone.
func TestSweepAfterCrash(t *testing.T) {
	t.Parallel()
	cmd, prefix, pids := startHelperLab(t)
	if err := cmd.Process.Kill(); err != nil {
		t.Fatal(err)
	}
	_ = cmd.Wait()
	if ns, _ := namespacesWithPrefix(prefix); len(ns) == 0 {
		t.Fatal("a killed run left no namespaces: nothing to sweep, test proves nothing")
	}
	// Pdeathsig: the processes the dead run started go on their own.
	deadline := time.Now().Add(5 * time.Second)
	for _, pid := range pids {
		for syscall.Kill(pid, 0) == nil && time.Now().Before(deadline) {
			time.Sleep(20 * time.Millisecond)
		}
		if syscall.Kill(pid, 0) == nil {
			t.Errorf("process %d outlived the run that started it", pid)
		}
	}
	if err := SweepStale(); err != nil {
		t.Fatal(err)
	}
	assertLabGone(t, prefix, pids)
}

// New cleans up after itself when it fails half way, and refuses a prefix
// that is in use.
func TestNewFailureLeavesNothing(t *testing.T) {
	t.Parallel()
	live := ForTest(t, Spec{Hosts: 1})
	if _, err := New(context.Background(), Spec{Hosts: 1, Prefix: live.Prefix()}); err == nil || !strings.Contains(err.Error(), "in use") {
		t.Errorf("second lab with prefix %s: %v", live.Prefix(), err)
	}
	if len(live.Hosts()) != 1 || live.Hosts()[0].Ping(testContext(t), live.Hosts()[0].Addr, time.Second) != nil {
		t.Error("refused lab damaged the live one")
	}

	prefix := "fbx" + live.Prefix()[2:]
	// Long enough to build some namespaces, too short for etcd to be healthy.
	ctx, cancel := context.WithTimeout(context.Background(), 400*time.Millisecond)
	defer cancel()
	l, err := New(ctx, Spec{Hosts: 3, Prefix: prefix})
	if err == nil {
		l.Close()
		t.Fatal("New succeeded within 400ms; cannot test cleanup after failure")
	}
	t.Logf("New failed as intended: %v", err)
	if ns, _ := namespacesWithPrefix(prefix); len(ns) > 0 {
		t.Errorf("namespaces left after failed New: %v", ns)
	}
	if _, err := os.Stat(runBase + "/" + prefix); !os.IsNotExist(err) {
		t.Errorf("run dir left after failed New: %v", err)
	}
	// No etcd of that run survives (its cluster token is the prefix).
	procs, _ := os.ReadDir("/proc")
	for _, p := range procs {
		cmdline, _ := os.ReadFile("/proc/" + p.Name() + "/cmdline")
		if strings.Contains(string(cmdline), "--initial-cluster-token\x00"+prefix+"\x00") {
			t.Errorf("etcd of failed lab still running: pid %s", p.Name())
		}
	}
}

func TestMain(m *testing.M) {
	flag.Parse()
	if testing.Short() {
		fmt.Println("short mode: the lab's tests need root and network namespaces, in make test")
		os.Exit(0)
	}
	os.Exit(m.Run())
}
