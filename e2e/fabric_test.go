package e2e

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/fabricnet/fabric/flowoffload"
	"github.com/fabricnet/fabric/lab"
)

// expectRoutes checks that h's kernel holds exactly one owned route per other
// host's subnet.
func (f *fabric) routesTo(h *lab.Host, want []netip.Prefix) error {
	got := f.ownedRoutes(h)
	for _, p := range want {
		if _, ok := got[p.String()]; !ok {
			return fmt.Errorf("%s has no route to %s (owned routes: %v)", h.Name, p, got)
		}
	}
	if len(got) != len(want) {
		return fmt.Errorf("%s owns %d routes, want %d: %v", h.Name, len(got), len(want), got)
	}
	return nil
}

// otherSubnets are the subnets of every host but self: each one's IPv4
// subnet, and its IPv6 one when the fabric has an IPv6 pool.
func (f *fabric) otherSubnets(self *lab.Host, hosts []*lab.Host) []netip.Prefix {
	f.t.Helper()
	var out []netip.Prefix
	for _, h := range hosts {
		if h == self {
			continue
		}
		st, err := f.status(h)
		if err != nil {
			f.t.Fatalf("status of %s: %v", h.Name, err)
		}
		out = append(out, netip.MustParsePrefix(st.Subnet))
		if st.SubnetV6 != "" {
			out = append(out, netip.MustParsePrefix(st.SubnetV6))
		}
	}
	return out
}

func (f *fabric) allEstablished(h *lab.Host, n int) error {
	ps, err := f.peers(h)
	if err != nil {
		return err
	}
	est := 0
	for _, p := range ps {
		if p.State == "established" {
			est++
		}
	}
	if est != n || len(ps) != n {
		return fmt.Errorf("%s: %d of %d peers established, want %d: %+v", h.Name, est, len(ps), n, ps)
	}
	return nil
}

// TestMeshLifecycle is the BGP issue's story on a 3-host lab: sessions come
// up, routes appear, a 4th host joins, a killed host's route goes within the
// hold time, a stopped host's route goes at once, and a restarted agent keeps
// its lease and its routes.
func TestMeshLifecycle(t *testing.T) {
	t.Parallel()
	// A short graceful-restart time, so a host that stays down is seen to go.
	const restartTime = 5 * time.Second
	f := newFabric(t, lab.Spec{Hosts: 3}, "--bgp-hold-time", "3s", "--bgp-keepalive", "1s", "--vxlan-port", "8472",
		"--graceful-restart-time", restartTime.String())
	hosts := f.lab.Hosts()
	for _, h := range hosts {
		f.start(h)
	}

	// Three distinct leases, as the operator sees them.
	out, err := f.fabricctl(hosts[0], "ipam", "show")
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("fabricctl ipam show:\n%s", out)
	// Publishing a port fabric hosts need for themselves is refused.
	if out, err := f.fabricctl(hosts[0], "publish", "add", "179/tcp", "10.244.0.2:80"); err == nil || !strings.Contains(out, "tcp/179 is reserved for BGP") {
		t.Errorf("fabricctl publish add 179/tcp: %v: %s; want a refusal naming BGP", err, out)
	}
	seen := map[netip.Prefix]string{}
	for _, h := range hosts {
		s := f.subnet(h)
		if other, dup := seen[s]; dup {
			t.Fatalf("%s and %s share subnet %s", h.Name, other, s)
		}
		seen[s] = h.Name
		if !strings.Contains(out, s.String()) || !strings.Contains(out, h.Name) {
			t.Errorf("ipam show lacks %s of %s", s, h.Name)
		}
	}

	encap := f.autoEncap(hosts[0])
	for _, h := range hosts {
		f.eventually(20*time.Second, h.Name+" sessions established", func() error { return f.allEstablished(h, 2) })
		f.eventually(10*time.Second, h.Name+" routes", func() error { return f.routesTo(h, f.otherSubnets(h, hosts)) })
	}
	// Auto mode moves a peer to IPIP once the probe has seen it pass.
	f.eventually(20*time.Second, "host1's peers on "+encap, func() error {
		ps, err := f.peers(hosts[0])
		if err != nil {
			return err
		}
		for _, p := range ps {
			if p.Encap != encap {
				return fmt.Errorf("peer %s on %q (%s)", p.Name, p.Encap, p.EncapReason)
			}
		}
		return nil
	})
	out, _ = f.fabricctl(hosts[0], "peers", "status")
	t.Logf("fabricctl peers status on host1:\n%s", out)
	for _, h := range hosts[1:] {
		if !strings.Contains(out, h.Name) || !strings.Contains(out, "established") || !strings.Contains(out, encap) {
			t.Errorf("peers status lacks an established %s row for %s", encap, h.Name)
		}
	}

	// On a kernel without IPIP, auto mode says so and why, once, at start.
	for _, h := range hosts {
		log, _ := os.ReadFile(f.agents[h.Name].proc.LogPath())
		if said := strings.Contains(string(log), "this kernel has no ipip support"); said != (encap == "vxlan") {
			t.Errorf("%s: fabricd's log says the kernel lacks ipip: %v; auto mode uses %s here", h.Name, said, encap)
		}
	}

	// Containers on every host reach each other (VXLAN on port 8472 here: this
	// kernel has no IPIP, so auto falls back).
	ctrs := f.containersTalk(hosts)

	// A 4th host joins: every host has its route within a couple of seconds.
	ctx := context.Background()
	h4, err := f.lab.AddHost(ctx)
	if err != nil {
		t.Fatal(err)
	}
	// A long graceful-restart time for host4 alone: its leave below must
	// withdraw its route at once, not when a vanished host's time ends.
	f.start(h4, "--graceful-restart-time", "60s")
	s4 := f.subnet(h4)
	for _, h := range hosts {
		d := f.eventually(10*time.Second, h.Name+" learns "+s4.String(), func() error {
			if _, ok := f.ownedRoutes(h)[s4.String()]; !ok {
				return fmt.Errorf("no route")
			}
			return nil
		})
		t.Logf("%s installed the route to the new host %s %.1fs after its agent answered", h.Name, h4.Name, d.Seconds())
	}

	// SIGKILL host3, which stays down: peers keep its route (graceful
	// restart) until the restart time ends, then it goes everywhere.
	h3 := hosts[2]
	s3 := f.subnet(h3)
	f.agents[h3.Name].proc.Kill()
	killed := time.Now()
	kept := map[string]time.Duration{}
	for _, h := range []*lab.Host{hosts[0], hosts[1], h4} {
		f.eventually(restartTime+3*time.Second, h.Name+" drops killed "+h3.Name, func() error {
			if _, ok := f.ownedRoutes(h)[s3.String()]; ok {
				return fmt.Errorf("route to %s still there", s3)
			}
			return nil
		})
		kept[h.Name] = time.Since(killed)
	}
	for name, d := range kept {
		if d < restartTime-time.Second {
			t.Errorf("%s dropped the killed host's route after %.1fs, before the restart time %s", name, d.Seconds(), restartTime)
		}
	}
	t.Logf("killed host that stays down: its route gone everywhere %.1fs after SIGKILL (graceful-restart time %s)", time.Since(killed).Seconds(), restartTime)
	// Nothing of the departed peer is left in the VXLAN state either (the
	// device is up in auto mode whatever the peers use).
	f.eventually(5*time.Second, "host1 forgets host3's VXLAN neighbour and FDB entries", func() error {
		ctx := context.Background()
		neigh, _ := hosts[0].Run(ctx, "ip", "neigh", "show", "dev", "fabric.vxlan")
		fdb, _ := hosts[0].Run(ctx, "bridge", "fdb", "show", "dev", "fabric.vxlan")
		if strings.Contains(neigh, s3.Addr().String()+" ") || strings.Contains(fdb, h3.Addr.String()) {
			return fmt.Errorf("neigh:\n%s\nfdb:\n%s", neigh, fdb)
		}
		if encap == "vxlan" && !strings.Contains(fdb, hosts[1].Addr.String()) {
			return fmt.Errorf("host2's FDB entry is missing too:\n%s", fdb)
		}
		return nil
	})

	// host4 leaves the fabric (decommission): withdrawn everywhere at once,
	// not 60 s later (make bench measures how fast).
	out, err = f.fabricctl(h4, "leave")
	if err != nil {
		t.Fatalf("fabricctl leave: %v: %s", err, out)
	}
	t.Logf("fabricctl leave on host4: %s", strings.TrimSpace(out))
	left := time.Now()
	for _, h := range hosts[:2] {
		f.eventually(20*time.Second, h.Name+" drops "+h4.Name+" after it left", func() error {
			if _, ok := f.ownedRoutes(h)[s4.String()]; ok {
				return fmt.Errorf("route to %s still there", s4)
			}
			return nil
		})
	}
	t.Logf("host that left: its route gone everywhere %.2fs after fabricctl leave", time.Since(left).Seconds())
	select {
	case <-f.agents[h4.Name].proc.Done():
	case <-time.After(5 * time.Second):
		t.Errorf("fabricd on host4 still runs 5s after fabricctl leave")
	}

	// Restart host1's agent: same subnet, and its routes never leave the kernel.
	h1 := hosts[0]
	before := f.subnet(h1)
	want := f.ownedRoutes(h1)
	f.restart(h1)
	deadline := time.Now().Add(6 * time.Second)
	for time.Now().Before(deadline) {
		got := f.ownedRoutes(h1)
		for p := range want {
			if _, ok := got[p]; !ok && p == f.subnetOrZero(hosts[1]).String() {
				t.Fatalf("route %s vanished from %s during an agent restart", p, h1.Name)
			}
		}
		time.Sleep(50 * time.Millisecond)
	}
	f.eventually(15*time.Second, "restarted host1 answers", func() error { _, err := f.status(h1); return err })
	if after := f.subnet(h1); after != before {
		t.Fatalf("restart changed host1's subnet from %s to %s", before, after)
	}
	f.eventually(15*time.Second, "host2 relearns host1", func() error {
		if _, ok := f.ownedRoutes(hosts[1])[before.String()]; !ok {
			return fmt.Errorf("no route")
		}
		return ping(ctrs[hosts[1].Name], ctrs[h1.Name].Addr)
	})
}

func (f *fabric) subnetOrZero(h *lab.Host) netip.Prefix {
	s, err := f.status(h)
	if err != nil {
		return netip.Prefix{}
	}
	return netip.MustParsePrefix(s.Subnet)
}

// TestStaleRoutesSweptOthersKept plants a route with fabricd's protocol and
// one of another protocol before the agent starts.
func TestStaleRoutesSweptOthersKept(t *testing.T) {
	t.Parallel()
	f := newFabric(t, lab.Spec{Hosts: 1})
	h := f.lab.Hosts()[0]
	ctx := context.Background()
	for _, args := range [][]string{
		{"route", "add", "10.99.1.0/24", "via", h.Addr.Next().String(), "proto", "93"},
		{"route", "add", "10.99.2.0/24", "via", h.Addr.Next().String(), "proto", "static"},
		{"route", "add", "10.99.3.0/24", "via", h.Addr.Next().String(), "proto", "12"},
	} {
		if out, err := h.Run(ctx, "ip", args...); err != nil {
			t.Fatalf("plant: %v %s", err, out)
		}
	}
	f.start(h)
	f.eventually(15*time.Second, "stale owned route removed", func() error {
		if _, ok := f.ownedRoutes(h)["10.99.1.0/24"]; ok {
			return fmt.Errorf("10.99.1.0/24 proto 93 still there")
		}
		return nil
	})
	out, _ := h.Run(ctx, "ip", "route")
	for _, p := range []string{"10.99.2.0/24", "10.99.3.0/24"} {
		if !strings.Contains(out, p) {
			t.Errorf("route %s of another protocol was removed:\n%s", p, out)
		}
	}
}

// TestCleanupLeavesNothing: --cleanup removes every route, link and file
// fabricd created.
func TestCleanupLeavesNothing(t *testing.T) {
	t.Parallel()
	f := newFabric(t, lab.Spec{Hosts: 2})
	hosts := f.lab.Hosts()
	for _, h := range hosts {
		f.start(h)
	}
	h := hosts[0]
	f.eventually(20*time.Second, "route installed", func() error { return f.routesTo(h, f.otherSubnets(h, hosts)) })
	ctx := context.Background()
	// Everything fabricd can own: a policy with a long address list (an
	// ipset), a published port, the node set (the ingress ipset), and a rule
	// of another owner that must survive.
	policyFile := filepath.Join(f.lab.LogDir(), "cleanup-policy.yaml")
	if err := os.WriteFile(policyFile, []byte("rules:\n  - name: many\n    action: deny\n    from: [{cidr: 10.1.0.0/24}, {cidr: 10.2.0.0/24}, {cidr: 10.3.0.0/24}]\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if out, err := f.fabricctl(h, "policy", "apply", "-f", policyFile); err != nil {
		t.Fatalf("policy apply: %v: %s", err, out)
	}
	if out, err := f.fabricctl(h, "publish", "add", "8080/tcp", f.subnet(hosts[1]).Addr().Next().Next().String()+":80"); err != nil {
		t.Fatalf("publish add: %v: %s", err, out)
	}
	if out, err := h.Run(ctx, "iptables", "-A", "FORWARD", "-i", "other0", "-j", "ACCEPT"); err != nil {
		t.Fatalf("foreign rule: %v %s", err, out)
	}
	offload := flowoffload.New(lab.Path(h.Netns), nil).Supported() == nil // the qemu guest's kernel
	f.eventually(10*time.Second, "policy ipset, ingress ipset, publish rules and (where the kernel has them) the flowtable in place", func() error {
		sets, _ := h.Run(ctx, "ipset", "list", "-n")
		rules, _ := h.Run(ctx, "iptables-save")
		if !strings.Contains(sets, "fabric-nodes") || strings.Count(sets, "fabric-") < 2 || !strings.Contains(rules, "8080") {
			return fmt.Errorf("ipsets %q; publish rule present: %v", sets, strings.Contains(rules, "8080"))
		}
		if _, ok, err := flowoffload.Read(lab.Path(h.Netns)); offload && !ok {
			return fmt.Errorf("no flowtable: %v", err)
		}
		return nil
	})
	a := f.agents[h.Name]
	// On a live host --cleanup refuses and touches nothing.
	before := f.ownedRoutes(h)
	if out, err := h.Run(ctx, a.args[0], append(a.args[1:], "--cleanup")...); err == nil || !strings.Contains(out, "another fabricd is running") {
		t.Errorf("fabricd --cleanup beside a running fabricd: %v\n%s\nwant it refused", err, out)
	}
	if after := f.ownedRoutes(h); len(after) != len(before) || len(after) == 0 {
		t.Errorf("routes after a refused --cleanup: %v, before %v", after, before)
	}
	if _, err := f.status(h); err != nil {
		t.Errorf("fabricd after a refused --cleanup: %v", err)
	}
	if err := a.proc.Stop(); err != nil {
		t.Fatal(err)
	}
	// A chain an older fabricd left, jumped to from a built-in chain: the
	// cleanup finds it by its FABRIC- prefix.
	for _, args := range [][]string{
		{"-t", "mangle", "-N", "FABRIC-OLD"},
		{"-t", "mangle", "-A", "FABRIC-OLD", "-j", "RETURN"},
		{"-t", "mangle", "-I", "PREROUTING", "-m", "comment", "--comment", "fabric: old version", "-j", "FABRIC-OLD"},
	} {
		if out, err := h.Run(ctx, "iptables", args...); err != nil {
			t.Fatalf("plant old chain: %v %s", err, out)
		}
	}
	if out, err := h.Run(ctx, a.args[0], append(a.args[1:], "--cleanup")...); err != nil {
		t.Fatalf("fabricd --cleanup: %v\n%s", err, out)
	}
	if r := f.ownedRoutes(h); len(r) != 0 {
		t.Errorf("owned routes left after --cleanup: %v", r)
	}
	rules, _ := h.Run(ctx, "iptables-save")
	if strings.Contains(rules, "FABRIC") {
		t.Errorf("iptables rules or chains left after --cleanup:\n%s", rules)
	}
	if !strings.Contains(rules, "-A FORWARD -i other0 -j ACCEPT") {
		t.Errorf("another owner's FORWARD rule was removed by --cleanup:\n%s", rules)
	}
	links, _ := h.Run(ctx, "ip", "-o", "link")
	for _, name := range []string{"fabric.vxlan", "fabric.ipip", "docker0"} {
		if strings.Contains(links, name) {
			t.Errorf("link %s left after --cleanup", name)
		}
	}
	if sets, _ := h.Run(ctx, "ipset", "list", "-n"); strings.Contains(sets, "fabric-") {
		t.Errorf("ipsets left after --cleanup: %q", sets)
	}
	if cs, ok, err := flowoffload.Read(lab.Path(h.Netns)); ok || err != nil {
		t.Errorf("nftables table inet %s left after --cleanup (flowtable on %v), or unreadable: %v", flowoffload.TableName, cs.Devices, err)
	}
	for _, file := range []string{"docker.env", "fabricd.sock", "gobgp.sock", "probe-verdicts.json"} {
		if _, err := os.Stat(filepath.Join(a.runDir, file)); err == nil {
			t.Errorf("%s left in the run directory after --cleanup", file)
		}
	}
}

// TestBadConfigClearError: a malformed setting stops fabricd at once with an
// error naming it.
func TestBadConfigClearError(t *testing.T) {
	t.Parallel()
	f := newFabric(t, lab.Spec{Hosts: 1})
	h := f.lab.Hosts()[0]
	runDir := f.lab.LogDir() + "/bad-run"
	args := f.fabricdArgs(h, runDir, "--encapsulation", "gre")
	out, err := h.Run(context.Background(), args[0], args[1:]...)
	if err == nil || !strings.Contains(out, "encapsulation") || !strings.Contains(out, "want auto, ipip, vxlan") {
		t.Fatalf("want a clear encapsulation error, got %v: %s", err, out)
	}
	// Settings that used to hang or silently break: refused at once, exit 2.
	for _, c := range []struct {
		args []string
		want string
	}{
		{[]string{"--etcd-timeout", "0s"}, "etcdTimeout: 0s"},
		{[]string{"--node-name", "host1\nevil"}, "nodeName"},
		{[]string{"--bgp-hold-time", "100000h"}, "holdTime: 100000h0m0s"},
	} {
		args := f.fabricdArgs(h, runDir, c.args...)
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		out, err := h.Run(ctx, args[0], args[1:]...)
		cancel()
		var exit *exec.ExitError
		if !errors.As(err, &exit) || exit.ExitCode() != 2 || !strings.Contains(out, c.want) {
			t.Errorf("fabricd %v: %v: %s; want exit 2 naming %q", c.args, err, out, c.want)
		}
	}
	// Forcing ipip on a kernel without it is refused with the reason (on a
	// kernel with ipip the setting is valid: nothing to refuse).
	if f.autoEncap(h) == "vxlan" {
		args = f.fabricdArgs(h, runDir, "--encapsulation", "ipip")
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		out, err = h.Run(ctx, args[0], args[1:]...)
		cancel()
		if err == nil || !strings.Contains(out, "no ipip support") {
			t.Fatalf("want a clear 'no ipip support' error, got %v: %s", err, out)
		}
	}
}

// TestFabricctlWithoutAgent: fabricctl says clearly that fabricd is not
// running, and exits non-zero, instead of printing an empty table.
func TestFabricctlWithoutAgent(t *testing.T) {
	t.Parallel()
	f := newFabric(t, lab.Spec{Hosts: 1})
	h := f.lab.Hosts()[0]
	for _, args := range [][]string{{"peers", "status"}, {"routes"}, {"status"}} {
		out, err := f.fabricctl(h, args...)
		if err == nil || !strings.Contains(out, "fabricd is not running") {
			t.Errorf("fabricctl %v without fabricd: err=%v, output %q; want a non-zero exit saying fabricd is not running", args, err, out)
		}
	}
}

// TestKilledAgentComesBack: an agent killed with SIGKILL and started again at
// once (its node record has not even expired) gets its subnet back, and the
// other host learns its route again.
func TestKilledAgentComesBack(t *testing.T) {
	t.Parallel()
	f := newFabric(t, lab.Spec{Hosts: 2}, "--bgp-hold-time", "3s", "--bgp-keepalive", "1s")
	hosts := f.lab.Hosts()
	for _, h := range hosts {
		f.start(h)
	}
	h1, h2 := hosts[0], hosts[1]
	s1 := f.subnet(h1)
	f.eventually(20*time.Second, "host2 routes to host1", func() error { return f.routesTo(h2, []netip.Prefix{s1}) })
	a := f.agents[h1.Name]
	a.proc.Kill()
	p, err := h1.Start("fabricd", a.args...)
	if err != nil {
		t.Fatal(err)
	}
	a.proc = p
	restarted := time.Now()
	f.eventually(30*time.Second, "killed host1 answers again", func() error { _, err := f.status(h1); return err })
	if got := f.subnet(h1); got != s1 {
		t.Fatalf("host1's subnet changed from %s to %s across a crash", s1, got)
	}
	f.eventually(30*time.Second, "host2 relearns host1 after its crash", func() error {
		if err := f.allEstablished(h2, 1); err != nil {
			return err
		}
		return f.routesTo(h2, []netip.Prefix{s1})
	})
	t.Logf("host2 routes to host1 again %.1fs after host1's agent was killed and restarted", time.Since(restarted).Seconds())
}

// TestSystemdNotify: started as systemd starts a Type=notify unit, fabricd
// says READY=1 only once the docker options file exists (dockerd, ordered
// after it, reads that file), and STOPPING=1 when it stops.
func TestSystemdNotify(t *testing.T) {
	t.Parallel()
	f := newFabric(t, lab.Spec{Hosts: 1})
	h := f.lab.Hosts()[0]
	sock := filepath.Join(t.TempDir(), "notify.sock")
	conn, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: sock, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	runDir := filepath.Join(f.lab.LogDir(), h.Name+"-notify-run")
	args := f.fabricdArgs(h, runDir)
	p, err := h.Start("fabricd", append([]string{"env", "NOTIFY_SOCKET=" + sock}, args...)...)
	if err != nil {
		t.Fatal(err)
	}
	conn.SetReadDeadline(time.Now().Add(30 * time.Second))
	buf := make([]byte, 256)
	n, err := conn.Read(buf)
	if err != nil {
		t.Fatalf("no notification within 30s: %v; log:\n%s", err, tail(p.LogPath()))
	}
	if got := string(buf[:n]); got != "READY=1" {
		t.Fatalf("first notification %q, want READY=1", got)
	}
	if _, err := os.Stat(filepath.Join(runDir, "docker.env")); err != nil {
		t.Errorf("READY=1 sent before the docker options file exists: %v", err)
	}
	// Stopped right after READY=1, still starting its BGP speaker: a clean
	// stop all the same (exit 0), announced with STOPPING=1.
	if err := p.Stop(); err != nil {
		t.Fatal(err)
	}
	conn.SetReadDeadline(time.Now().Add(10 * time.Second))
	for {
		n, err = conn.Read(buf)
		if err == nil && strings.HasPrefix(string(buf[:n]), "STATUS=") {
			continue // said while it was starting
		}
		if err != nil || string(buf[:n]) != "STOPPING=1" {
			t.Errorf("at stop: %q, %v; want STOPPING=1", buf[:n], err)
		}
		break
	}
}

// TestClonedMachinesRefused: two machines with the same node name and
// machine id (a cloned VM) would take the same subnet and overwrite each
// other's node record. Both notice and stop, each naming the other.
func TestClonedMachinesRefused(t *testing.T) {
	t.Parallel()
	f := newFabric(t, lab.Spec{Hosts: 2})
	var procs []*lab.Process
	for _, h := range f.lab.Hosts() {
		args := f.fabricdArgs(h, filepath.Join(f.lab.LogDir(), h.Name+"-run"), "--node-name", "twin", "--machine-id", "cloned-id")
		p, err := h.Start("fabricd", args...)
		if err != nil {
			t.Fatal(err)
		}
		procs = append(procs, p)
	}
	for i, p := range procs {
		select {
		case <-p.Done():
		case <-time.After(45 * time.Second):
			t.Fatalf("%s: fabricd still runs 45s after its clone started", f.lab.Hosts()[i].Name)
		}
		log, _ := os.ReadFile(p.LogPath())
		other := f.lab.Hosts()[1-i].Addr.String()
		if !strings.Contains(string(log), "cloned machines") || !strings.Contains(string(log), other) {
			t.Errorf("%s: log does not name the clone at %s:\n%s", f.lab.Hosts()[i].Name, other, tail(p.LogPath()))
		}
	}
}

// TestSubnetTakenStopsTheAgent: when etcd leases a host's subnet to another
// host (its lease ran out while it was cut off, or an operator released it
// and another host took it), fabricd withdraws the subnet from every peer and
// exits with the reason, instead of two hosts advertising one subnet; the
// kernel state it made stays until `fabricd --cleanup`.
func TestSubnetTakenStopsTheAgent(t *testing.T) {
	t.Parallel()
	f := newFabric(t, lab.Spec{Hosts: 2})
	hosts := f.startMesh()
	h1, h2 := hosts[0], hosts[1]
	sub := f.subnet(h1)
	f.eventually(20*time.Second, "host2 has host1's route", func() error { return f.routesTo(h2, []netip.Prefix{sub}) })

	cli, err := f.lab.EtcdClient()
	if err != nil {
		t.Fatal(err)
	}
	defer cli.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	key := fmt.Sprintf("/fabric/v1/subnets/%s-%d", sub.Addr(), sub.Bits())
	resp, err := cli.Get(ctx, key)
	if err != nil || len(resp.Kvs) != 1 {
		t.Fatalf("host1's subnet key %s: %v", key, err)
	}
	// The lease goes (as after a long outage), and another host takes the
	// subnet under a lease of its own.
	if _, err := cli.Revoke(ctx, clientv3.LeaseID(resp.Kvs[0].Lease)); err != nil {
		t.Fatal(err)
	}
	grant, err := cli.Grant(ctx, 600)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := cli.Put(ctx, key, fmt.Sprintf(`{"node":"newhost","machineID":"m-new","hostAddr":"192.168.100.99","leaseID":%d}`, grant.ID), clientv3.WithLease(grant.ID)); err != nil {
		t.Fatal(err)
	}
	taken := time.Now()

	p := f.agents[h1.Name].proc
	select {
	case <-p.Done():
	case <-time.After(30 * time.Second):
		t.Fatal("fabricd on host1 still runs 30s after another host took its subnet")
	}
	t.Logf("fabricd on host1 exited %.1fs after its subnet went to another host", time.Since(taken).Seconds())
	if err := p.Wait(context.Background()); err == nil {
		t.Error("fabricd exited 0; want a failure a supervisor restarts")
	}
	if log := tail(p.LogPath()); !strings.Contains(log, "subnet lease lost") || !strings.Contains(log, "newhost") {
		t.Errorf("fabricd's log does not say why it stopped:\n%s", log)
	}
	// Withdrawn at once, not after the graceful-restart time.
	f.eventually(10*time.Second, "host2 dropped host1's route", func() error {
		if _, ok := f.ownedRoutes(h2)[sub.String()]; ok {
			return fmt.Errorf("host2 still routes %s", sub)
		}
		return nil
	})
	// What fabricd made on host1 stays until --cleanup: the bridge with its
	// address, so containers keep their addresses for a restart.
	out, err := h1.Run(ctx, "ip", "-4", "-o", "addr", "show", "dev", "docker0")
	if err != nil || !strings.Contains(out, sub.Addr().Next().String()) {
		t.Errorf("host1's bridge after the exit: %v %q", err, out)
	}
}
