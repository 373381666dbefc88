package nat

import (
	"context"
	"net"
	"net/netip"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/fabricnet/fabric/bridge"
	"github.com/fabricnet/fabric/internal/nsthread"
	"github.com/fabricnet/fabric/iptables"
	"github.com/fabricnet/fabric/lab"

	"github.com/fabricnet/fabric/internal/testreq"
	"github.com/fabricnet/fabric/internal/testwait"
)

func testContext(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	t.Cleanup(cancel)
	return ctx
}

func hostState(node, subnet string, publishes ...PublishedPort) State {
	return State{
		Pool:   netip.MustParsePrefix(labPool),
		Subnet: netip.MustParsePrefix(subnet),
		Bridge: labBridge,
		// The hosts' direct link plays the tunnel; eu is the underlay
		// toward the outside.
		Tunnels:     []string{"et"},
		UnderlayDev: "eu",
		Node:        node,
		Publishes:   publishes,
	}
}

func publish(proto string, hostPort uint16, target string, hosts ...string) PublishedPort {
	return PublishedPort{Proto: proto, HostPort: hostPort, Target: netip.MustParseAddrPort(target), Hosts: hosts}
}

// addDockerStyleRules gives ns rules like dockerd's (without --ip-masq=false)
// so the tests see fabric coexist with them.
func addDockerStyleRules(l *testLab, ns, subnet string) {
	l.in(ns, "iptables", "-t", "nat", "-A", "POSTROUTING", "-s", subnet, "!", "-o", labBridge, "-j", "MASQUERADE")
	l.in(ns, "iptables", "-N", "DOCKER")
	l.in(ns, "iptables", "-A", "FORWARD", "-o", labBridge, "-m", "conntrack", "--ctstate", "RELATED,ESTABLISHED", "-j", "ACCEPT")
	l.in(ns, "iptables", "-A", "FORWARD", "-o", labBridge, "-j", "DOCKER")
	l.in(ns, "iptables", "-A", "FORWARD", "-i", labBridge, "!", "-o", labBridge, "-j", "ACCEPT")
	l.in(ns, "iptables", "-P", "FORWARD", "DROP")
}

func firstRule(l *testLab, ns, table, chain string) string {
	out := l.in(ns, "iptables", "-t", table, "-S", chain)
	for _, line := range strings.Split(out, "\n") {
		if strings.HasPrefix(line, "-A ") {
			return line
		}
	}
	return ""
}

func TestMasqueradeOnlyTrafficLeavingTheFabric(t *testing.T) {
	l := newTestLab(t)
	ctx := testContext(t)
	addDockerStyleRules(l, "h1", h1Subnet)
	addDockerStyleRules(l, "h2", h2Subnet)
	l.serveSource("out", outAddr+":9000")
	l.serveSource("c2", "0.0.0.0:80")

	for _, h := range []struct{ ns, subnet string }{{"h1", h1Subnet}, {"h2", h2Subnet}} {
		if err := l.manager(h.ns).Apply(ctx, hostState(h.ns, h.subnet)); err != nil {
			t.Fatal(err)
		}
	}

	l.expectSource("c1", outAddr+":9000", h1Underlay)
	// Docker's own MASQUERADE (! -o bridge) would hide 10.244.1.2 here; the
	// fabric chain runs first and keeps it.
	l.expectSource("c1", "10.244.2.2:80", "10.244.1.2")

	// Other owners' rules and policy are kept, our jumps come first.
	for _, want := range []struct{ table, chain, jump string }{
		{"nat", "POSTROUTING", PostroutingChain},
		{"nat", "PREROUTING", PreroutingChain},
		{"nat", "OUTPUT", OutputChain},
		{"filter", "FORWARD", EstablishedChain},
	} {
		if got := firstRule(l, "h1", want.table, want.chain); !strings.HasSuffix(got, "-j "+want.jump) {
			t.Errorf("first rule of %s %s is %q, want the jump to %s", want.table, want.chain, got, want.jump)
		}
	}
	save := l.save("h1")
	for _, kept := range []string{
		"-A POSTROUTING -s 10.244.1.0/24 ! -o fbr0 -j MASQUERADE",
		"-A FORWARD -o fbr0 -j DOCKER",
		"-A FORWARD -i fbr0 ! -o fbr0 -j ACCEPT",
		":FORWARD DROP",
	} {
		if !strings.Contains(save, kept) {
			t.Errorf("rule %q of another owner is gone:\n%s", kept, save)
		}
	}
}

func TestPublishedPorts(t *testing.T) {
	l := newTestLab(t)
	ctx := testContext(t)
	addDockerStyleRules(l, "h1", h1Subnet)
	addDockerStyleRules(l, "h2", h2Subnet)
	l.serveSource("c2", "0.0.0.0:80")
	l.serveSource("c1", "0.0.0.0:80")
	l.serveUDPSource("c2", "0.0.0.0:53")

	remote := publish("tcp", 8080, "10.244.2.2:80")
	local := publish("tcp", 8081, "10.244.1.2:80")
	elsewhere := publish("tcp", 8082, "10.244.2.2:80", "h2") // not on h1
	udp := publish("udp", 5353, "10.244.2.2:53")
	all := []PublishedPort{remote, local, elsewhere, udp}
	m1, m2 := l.manager("h1"), l.manager("h2")
	if err := m1.Apply(ctx, hostState("h1", h1Subnet, all...)); err != nil {
		t.Fatal(err)
	}
	if err := m2.Apply(ctx, hostState("h2", h2Subnet, all...)); err != nil {
		t.Fatal(err)
	}
	// A container reaching its own published port needs hairpin on the
	// bridge, which the bridge package (its owner) sets when NAT says so.
	if !NeedsHairpin(hostState("h1", h1Subnet, all...)) {
		t.Fatal("h1 publishes a port of its own container, but NeedsHairpin says no")
	}
	if err := bridge.Hairpin(lab.Handle(t, l.ns("h1")), labBridge); err != nil {
		t.Fatal(err)
	}
	h1 := func(port string) string { return h1Underlay + ":" + port }

	// Remote target: the reply must come back through h1, so the target sees
	// h1's gateway address.
	l.expectSource("out", h1("8080"), "10.244.1.1")
	l.expectSource("h1", h1("8080"), "10.244.1.1")
	l.expectSource("c1", h1("8080"), "10.244.1.1")
	// Local target: clients from elsewhere keep their address; the host and
	// containers of the same bridge (hairpin) work too.
	l.expectSource("out", h1("8081"), outAddr)
	l.expectSource("h1", h1("8081"), h1Underlay)
	l.expectSource("c1b", h1("8081"), "10.244.1.1")
	l.expectSource("c1", h1("8081"), "10.244.1.1") // a container reaching itself
	// UDP to a remote target, answered through h1.
	if got, err := l.dialUDP("out", h1("5353")); err != nil || got != "10.244.1.1" {
		t.Errorf("out -> udp %s: server saw %q (%v), want 10.244.1.1", h1("5353"), got, err)
	}
	// Published on h2 only.
	l.expectClosed("out", h1("8082"))
	l.expectSource("h1", "192.168.200.2:8082", "192.168.200.1")

	// Deleting a publish closes it; the others stay.
	if err := m1.Apply(ctx, hostState("h1", h1Subnet, local, elsewhere)); err != nil {
		t.Fatal(err)
	}
	l.expectClosed("out", h1("8080"))
	l.expectClosed("h1", h1("8080"))
	l.expectSource("out", h1("8081"), outAddr)

	if rules, err := m1.Rules(ctx); err != nil {
		t.Fatal(err)
	} else {
		joined := strings.Join(rules, "\n")
		if !strings.Contains(joined, "--dport 8081") || strings.Contains(joined, "--dport 8080") {
			t.Errorf("Rules() after deleting 8080 =\n%s", joined)
		}
	}
}

func TestApplyIsIdempotentAndRestoresDeletedRules(t *testing.T) {
	l := newTestLab(t)
	ctx := testContext(t)
	addDockerStyleRules(l, "h1", h1Subnet)
	l.serveSource("out", outAddr+":9000")
	m := l.manager("h1")
	st := hostState("h1", h1Subnet, publish("tcp", 8080, "10.244.2.2:80"), publish("udp", 5353, "10.244.1.2:53"))
	if err := m.Apply(ctx, st); err != nil {
		t.Fatal(err)
	}
	want := l.save("h1")
	writes := m.Writes()
	if err := m.Apply(ctx, st); err != nil {
		t.Fatal(err)
	}
	if m.Writes() != writes {
		t.Errorf("second Apply wrote %d times, want no write", m.Writes()-writes)
	}
	if got := l.save("h1"); got != want {
		t.Errorf("second Apply changed iptables:\nbefore:\n%s\nafter:\n%s", want, got)
	}

	breakages := []struct {
		name string
		args []string
	}{
		{"flush FABRIC-POSTROUTING", []string{"-t", "nat", "-F", PostroutingChain}},
		{"delete the POSTROUTING jump", []string{"-t", "nat", "-D", "POSTROUTING", "-m", "comment", "--comment", "fabric: masquerade and published replies", "-j", PostroutingChain}},
		{"delete one rule of FABRIC-FORWARD", []string{"-D", ForwardChain, "1"}},
		{"insert a foreign rule before our FORWARD jump", []string{"-I", "FORWARD", "1", "-j", "DOCKER"}},
		{"duplicate our FORWARD jump", []string{"-A", "FORWARD", "-j", ForwardChain}},
	}
	for _, b := range breakages {
		l.in("h1", "iptables", b.args...)
		if l.save("h1") == want {
			t.Fatalf("%s: changed nothing", b.name)
		}
		if err := m.Apply(ctx, st); err != nil {
			t.Fatalf("%s: %v", b.name, err)
		}
		got := l.save("h1")
		if b.name == "insert a foreign rule before our FORWARD jump" {
			// The foreign rule stays, after our jumps.
			if first := firstRule(l, "h1", "filter", "FORWARD"); !strings.HasSuffix(first, "-j "+EstablishedChain) {
				t.Errorf("%s: first FORWARD rule is %q", b.name, first)
			}
			l.in("h1", "iptables", "-D", "FORWARD", "-j", "DOCKER") // back to the reference state
			got = l.save("h1")
		}
		if got != want {
			t.Errorf("%s: Apply did not restore the rules:\nwant:\n%s\ngot:\n%s", b.name, want, got)
		}
	}
	l.expectSource("c1", outAddr+":9000", h1Underlay)

	// A FABRIC- chain no section wants (left by an older fabricd) is
	// fabric's all the same: it goes with its jump, and ours stays first.
	l.in("h1", "iptables", "-N", "FABRIC-OLD")
	l.in("h1", "iptables", "-I", "FORWARD", "1", "-j", "FABRIC-OLD")
	if err := m.Apply(ctx, st); err != nil {
		t.Fatal(err)
	}
	if got := l.save("h1"); strings.Contains(got, "FABRIC-OLD") {
		t.Errorf("leftover chain FABRIC-OLD survived Apply:\n%s", got)
	}
	if first := firstRule(l, "h1", "filter", "FORWARD"); !strings.HasSuffix(first, "-j "+EstablishedChain) {
		t.Errorf("first FORWARD rule is %q, want our jump", first)
	}
}

func TestMaintainRestoresWithinSeconds(t *testing.T) {
	l := newTestLab(t)
	ctx := testContext(t)
	l.serveSource("out", outAddr+":9000")
	m := l.manager("h1")
	if err := m.Apply(ctx, hostState("h1", h1Subnet)); err != nil {
		t.Fatal(err)
	}
	mctx, stop := context.WithCancel(ctx)
	done := make(chan struct{})
	go func() { m.tables.Maintain(mctx, 200*time.Millisecond); close(done) }()
	t.Cleanup(func() { stop(); <-done })

	l.in("h1", "iptables", "-t", "nat", "-F", PostroutingChain)
	// Without masquerade the outside cannot answer the container.
	if _, err := l.dial("c1", outAddr+":9000"); err == nil {
		t.Log("connected before Maintain restored the rules (it was quick)")
	}
	deadline := time.Now().Add(5 * time.Second)
	for {
		got, err := l.dial("c1", outAddr+":9000")
		if err == nil && got == h1Underlay {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("masquerade not restored within 5s (last: %q, %v)", got, err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// TestMaintainReadsOnlyWhenRulesChange runs the repair loop with the
// nf_tables generation check, as fabricd does: an idle host runs no
// iptables-save, and a rule flushed by hand still comes back.
func TestMaintainReadsOnlyWhenRulesChange(t *testing.T) {
	l := newTestLab(t)
	ctx := testContext(t)
	l.serveSource("out", outAddr+":9000")
	tables, err := iptables.New(iptables.Config{Exec: l.exec("h1"), NetnsPath: "/var/run/netns/" + l.ns("h1"),
		Sections: []string{Section}, Logger: lab.Logger(t)})
	if err != nil {
		t.Fatal(err)
	}
	if tables.Backend() != "nf_tables" {
		testreq.Missing(t, "the nf_tables iptables backend (this test is about its ruleset generation)")
	}
	m, err := New(Config{Exec: l.exec("h1"), Tables: tables, Logger: lab.Logger(t)})
	if err != nil {
		t.Fatal(err)
	}
	if err := m.Apply(ctx, hostState("h1", h1Subnet)); err != nil {
		t.Fatal(err)
	}
	mctx, stop := context.WithCancel(ctx)
	done := make(chan struct{})
	go func() { tables.Maintain(mctx, 100*time.Millisecond); close(done) }()
	t.Cleanup(func() { stop(); <-done })

	// The first tick reads once to confirm what Apply wrote; then nothing.
	time.Sleep(300 * time.Millisecond)
	reads := tables.Reads()
	time.Sleep(time.Second)
	if n := tables.Reads() - reads; n != 0 {
		t.Errorf("%d iptables-save runs in 1 s of repair ticks with nothing changed, want 0", n)
	}

	// Another owner's change is read once and leaves fabric's rules alone.
	writes := tables.Writes()
	l.in("h1", "iptables", "-A", "FORWARD", "-o", "eu", "-j", "ACCEPT")
	testwait.Until(t, 5*time.Second, "a read after another owner's change", func() bool { return tables.Reads() > reads })
	time.Sleep(500 * time.Millisecond)
	if tables.Writes() != writes {
		t.Errorf("another owner's rule made fabric write its rules (%d writes)", tables.Writes()-writes)
	}

	l.in("h1", "iptables", "-t", "nat", "-F", PostroutingChain)
	testwait.Until(t, 5*time.Second, "masquerade restored after a flush by hand", func() bool {
		got, err := l.dial("c1", outAddr+":9000")
		return err == nil && got == h1Underlay
	})
}

// TestOperatorRulesStillCutConnectionsToTheWorld: the established fast path
// (FABRIC-ESTABLISHED, first in FORWARD) takes only connections between
// containers. A container's open connection to the world still meets the
// rules after fabric's, as DOCKER-USER's: an operator's DROP cuts it.
func TestOperatorRulesStillCutConnectionsToTheWorld(t *testing.T) {
	l := newTestLab(t)
	ctx := testContext(t)
	l.serveUDPSource("out", outAddr+":9001")
	m := l.manager("h1")
	if err := m.Apply(ctx, hostState("h1", h1Subnet)); err != nil {
		t.Fatal(err)
	}
	var conn net.Conn
	if err := nsthread.Do(l.ns("c1"), func() (err error) {
		conn, err = net.Dial("udp4", outAddr+":9001")
		return err
	}); err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	exchange := func() error {
		conn.SetDeadline(time.Now().Add(time.Second))
		if _, err := conn.Write([]byte("hello")); err != nil {
			return err
		}
		_, err := conn.Read(make([]byte, 64))
		return err
	}
	// Two exchanges: conntrack has seen the reply, the flow is ESTABLISHED.
	for range 2 {
		if err := exchange(); err != nil {
			t.Fatalf("c1 -> %s before the operator's rule: %v", outAddr, err)
		}
	}
	l.in("h1", "iptables", "-A", "FORWARD", "-i", labBridge, "-o", "eu", "-j", "DROP")
	if err := exchange(); err == nil {
		t.Errorf("c1's open connection to %s went on past the operator's DROP in FORWARD", outAddr)
	}
}

func TestCleanupRemovesEverythingOfFabricOnly(t *testing.T) {
	l := newTestLab(t)
	ctx := testContext(t)
	addDockerStyleRules(l, "h1", h1Subnet)
	before := l.save("h1")
	m := l.manager("h1")
	if err := m.Cleanup(ctx); err != nil {
		t.Fatalf("Cleanup with nothing there: %v", err)
	}
	if err := m.Apply(ctx, hostState("h1", h1Subnet, publish("tcp", 8080, "10.244.2.2:80"))); err != nil {
		t.Fatal(err)
	}
	// A leftover duplicate jump must go too.
	l.in("h1", "iptables", "-t", "nat", "-A", "POSTROUTING", "-j", PostroutingChain)
	if err := m.Cleanup(ctx); err != nil {
		t.Fatal(err)
	}
	after := l.save("h1")
	if n := strings.Count(after, "FABRIC"); n != 0 {
		t.Errorf("%d FABRIC mentions left after Cleanup:\n%s", n, after)
	}
	if after != before {
		t.Errorf("Cleanup changed other rules:\nbefore:\n%s\nafter:\n%s", before, after)
	}
	if rules, err := m.Rules(ctx); err != nil || len(rules) != 0 {
		t.Errorf("Rules() after Cleanup = %q, %v", rules, err)
	}
	writes := m.Writes()
	if err := m.Cleanup(ctx); err != nil {
		t.Fatalf("second Cleanup: %v", err)
	}
	if m.Writes() != writes {
		t.Errorf("second Cleanup wrote although nothing was there")
	}
}

// TestLegacyBackend runs fabric on a host whose `iptables` is the legacy
// backend: New must pick iptables-legacy-save/-restore to match.
func TestLegacyBackend(t *testing.T) {
	needRoot(t)
	for _, tool := range []string{"iptables-legacy", "iptables-legacy-save", "iptables-legacy-restore"} {
		if _, err := exec.LookPath(tool); err != nil {
			testreq.Missing(t, "%s not found: %v", tool, err)
		}
	}
	l := newTestLab(t)
	ctx := testContext(t)
	l.serveSource("out", outAddr+":9000")
	l.serveSource("c2", "0.0.0.0:80")
	inH1 := l.exec("h1")
	// Stand-in for a host where `iptables` is the legacy one.
	legacyExec := func(ctx context.Context, name string, args ...string) *exec.Cmd {
		if name == "iptables" {
			name = "iptables-legacy"
		}
		return inH1(ctx, name, args...)
	}
	m, err := New(Config{Exec: legacyExec, Tables: ownTables(t, legacyExec), Logger: lab.Logger(t)})
	if err != nil {
		t.Fatal(err)
	}
	if m.Backend() != "legacy" {
		t.Fatalf("backend %q, want legacy", m.Backend())
	}
	st := hostState("h1", h1Subnet, publish("tcp", 8080, "10.244.2.2:80"))
	for range 2 {
		if err := m.Apply(ctx, st); err != nil {
			t.Fatal(err)
		}
	}
	if m.Writes() != 2 { // one per table, the second Apply writes nothing
		t.Errorf("%d writes for two Applies, want 2", m.Writes())
	}
	l.expectSource("c1", outAddr+":9000", h1Underlay)
	l.expectSource("out", h1Underlay+":8080", "10.244.1.1")
	if strings.Contains(l.in("h1", "iptables-nft-save"), "FABRIC") {
		t.Errorf("legacy manager wrote nf_tables rules")
	}
	if err := m.Cleanup(ctx); err != nil {
		t.Fatal(err)
	}
	if n := strings.Count(l.in("h1", "iptables-legacy-save"), "FABRIC"); n != 0 {
		t.Errorf("%d FABRIC mentions left in legacy tables after Cleanup", n)
	}
}

// NAT66: with an IPv6 pool, a container's IPv6 traffic leaving the pool
// takes the host's address, as dockerd does for IPv6; to another host's
// container it keeps its own. Without the IPv6 rules the outside gets the
// container's own address, a unique local one it has no route back to.
func TestMasqueradeIPv6LeavingThePool(t *testing.T) {
	l := newTestLab(t)
	ctx := testContext(t)
	l.addIPv6()
	l.serveSource("out", "[fd99::250]:9000")
	l.serveSource("c2", "[fd00:10:244:2::2]:80")

	// No NAT66 yet: the outside has no route back to a container's address.
	l.expectClosed("c1", "[fd99::250]:9000")

	m := l.managerIPv6("h1")
	st := hostState("h1", h1Subnet)
	st.PoolV6, st.SubnetV6 = netip.MustParsePrefix("fd00:10:244::/48"), netip.MustParsePrefix("fd00:10:244:1::/64")
	if err := m.Apply(ctx, st); err != nil {
		t.Fatal(err)
	}
	l.expectSource("c1", "[fd99::250]:9000", "fd99::11")
	l.expectSource("c1", "[fd00:10:244:2::2]:80", "fd00:10:244:1::2")
	if err := m.Cleanup(ctx); err != nil {
		t.Fatal(err)
	}
	if out := l.in("h1", "ip6tables-save"); strings.Contains(out, "FABRIC-") {
		t.Errorf("IPv6 rules left after Cleanup:\n%s", out)
	}
}

// A publish to a container that has an IPv6 address answers on the hosts'
// IPv6 addresses too, forwarded to that container's IPv6 address with the
// IPv4 publish's rules: a remote target sees h1's IPv6 gateway (its reply
// returns through h1), a local one the client's own address. A target
// without a known IPv6 address is published over IPv4 only.
func TestPublishedPortsIPv6(t *testing.T) {
	l := newTestLab(t)
	ctx := testContext(t)
	l.addIPv6()
	l.serveSource("c2", "[fd00:10:244:2::2]:80")
	l.serveSource("c1", "[fd00:10:244:1::2]:80")
	m := l.managerIPv6("h1")
	st := hostState("h1", h1Subnet, publish("tcp", 8080, "10.244.2.2:80"), publish("tcp", 8081, "10.244.1.2:80"), publish("tcp", 8083, "10.244.2.9:80"))
	st.PoolV6, st.SubnetV6 = netip.MustParsePrefix("fd00:10:244::/48"), netip.MustParsePrefix("fd00:10:244:1::/64")
	st.AddressesV6 = map[netip.Addr]netip.Addr{
		netip.MustParseAddr("10.244.2.2"): netip.MustParseAddr("fd00:10:244:2::2"),
		netip.MustParseAddr("10.244.1.2"): netip.MustParseAddr("fd00:10:244:1::2"),
	}
	l.expectClosed("out", "[fd99::11]:8080")
	if err := m.Apply(ctx, st); err != nil {
		t.Fatal(err)
	}
	if err := bridge.Hairpin(lab.Handle(t, l.ns("h1")), labBridge); err != nil {
		t.Fatal(err)
	}
	l.expectSource("out", "[fd99::11]:8080", "fd00:10:244:1::1")
	l.expectSource("h1", "[fd99::11]:8080", "fd00:10:244:1::1")
	l.expectSource("out", "[fd99::11]:8081", "fd99::250")
	l.expectSource("c1b", "[fd99::11]:8081", "fd00:10:244:1::1") // hairpin
	rules := l.in("h1", "ip6tables-save", "-t", "nat")
	if strings.Contains(rules, "--dport 8083") {
		t.Errorf("a publish without an IPv6 target has IPv6 rules:\n%s", rules)
	}

	// The publish goes: closed over IPv6 too.
	st.Publishes = st.Publishes[1:]
	if err := m.Apply(ctx, st); err != nil {
		t.Fatal(err)
	}
	l.expectClosed("out", "[fd99::11]:8080")
	l.expectSource("out", "[fd99::11]:8081", "fd99::250")
}

// addIPv6 gives the lab IPv6 beside IPv4: the bridges' /64s with c1 and c2
// in them, h1's underlay toward the outside (h1 fd99::11, out fd99::250),
// and the h1-h2 link standing in for the tunnel.
func (l *testLab) addIPv6() {
	t := l.t
	t.Helper()
	lab.RequireRoot(t, "ip6tables", "ip6tables-save", "ip6tables-restore")
	for _, h := range []string{"h1", "h2"} {
		l.in(h, "sysctl", "-qw", "net.ipv6.conf.all.forwarding=1")
	}
	// No duplicate address detection: a tentative address answers nothing.
	l.in("h1", "ip", "-6", "addr", "add", "fd00:10:244:1::1/64", "dev", labBridge, "nodad")
	l.in("h2", "ip", "-6", "addr", "add", "fd00:10:244:2::1/64", "dev", labBridge, "nodad")
	for _, c := range []struct{ ns, addr, gw string }{{"c1", "fd00:10:244:1::2/64", "fd00:10:244:1::1"}, {"c1b", "fd00:10:244:1::3/64", "fd00:10:244:1::1"}, {"c2", "fd00:10:244:2::2/64", "fd00:10:244:2::1"}} {
		l.in(c.ns, "ip", "-6", "addr", "add", c.addr, "dev", "eth0", "nodad")
		l.in(c.ns, "ip", "-6", "route", "add", "default", "via", c.gw)
	}
	l.in("h1", "ip", "-6", "addr", "add", "fd99::11/64", "dev", "eu", "nodad")
	l.in("out", "ip", "-6", "addr", "add", "fd99::250/64", "dev", "eu", "nodad")
	l.in("h1", "ip", "-6", "addr", "add", "fd98::1/64", "dev", "et", "nodad")
	l.in("h2", "ip", "-6", "addr", "add", "fd98::2/64", "dev", "et", "nodad")
	l.in("h1", "ip", "-6", "route", "add", "fd00:10:244:2::/64", "via", "fd98::2")
	l.in("h2", "ip", "-6", "route", "add", "default", "via", "fd98::1")
	// Neighbours on a new bridge take a moment: ready once c1 reaches c2.
	testwait.For(t, 10*time.Second, "c1 reaches c2 over IPv6", func() error {
		return lab.Command(context.Background(), l.ns("c1"), "ping", "-6", "-n", "-q", "-c1", "-W1", "fd00:10:244:2::2").Run()
	})
}

// managerIPv6 is a Manager for ns with owners of both families' tables.
func (l *testLab) managerIPv6(ns string) *Manager {
	t := l.t
	t.Helper()
	tables6, err := iptables.New(iptables.Config{Exec: l.exec(ns), IPv6: true, Sections: []string{Section}, Logger: lab.Logger(t)})
	if err != nil {
		t.Fatal(err)
	}
	m, err := New(Config{Exec: l.exec(ns), Tables: ownTables(t, l.exec(ns)), Tables6: tables6, Logger: lab.Logger(t)})
	if err != nil {
		t.Fatal(err)
	}
	return m
}
