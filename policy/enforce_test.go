package policy

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os/exec"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/fabricnet/fabric/internal/etcdtest"
	"github.com/fabricnet/fabric/internal/ipsets"
	"github.com/fabricnet/fabric/iptables"
	"github.com/fabricnet/fabric/lab"

	"github.com/fabricnet/fabric/internal/testreq"
	"github.com/fabricnet/fabric/internal/testwait"
)

// nsLab is one host network namespace with a bridge (10.244.2.1/24) and two
// container namespaces on it, plus a "remote" namespace standing in for a
// container on another host, routed to the host over a veth. The remote
// has addresses in two subnets (10.244.1.2 and 10.244.3.2) so a node's
// lease can move between them.
type nsLab struct {
	t                    *testing.T
	host, c1, c2, remote string
}

const (
	c1Addr      = "10.244.2.2"
	c2Addr      = "10.244.2.3"
	remoteAddr  = "10.244.1.2"
	remoteAddr2 = "10.244.3.2"
)

var (
	localSubnet = netip.MustParsePrefix("10.244.2.0/24")
	nodeB       = netip.MustParsePrefix("10.244.1.0/24")
	nodeBMoved  = netip.MustParsePrefix("10.244.3.0/24")
)

func newLab(t *testing.T) *nsLab {
	lab.RequireRoot(t, "iptables-restore", "iptables-save", "ipset", "ping")
	prefix := lab.Prefix("pt")
	l := &nsLab{t: t, host: prefix + "h", c1: prefix + "c1", c2: prefix + "c2", remote: prefix + "r"}
	for _, ns := range []string{l.host, l.c1, l.c2, l.remote} {
		lab.AddNS(t, ns)
	}
	h := l.host
	lab.Bridge(t, h, "br0")
	lab.Addr(t, h, "br0", "10.244.2.1/24")
	for _, c := range []struct{ ns, port, addr string }{{l.c1, "vc1", c1Addr}, {l.c2, "vc2", c2Addr}} {
		lab.Veth(t, h, c.port, c.ns, "eth0")
		lab.AddToBridge(t, h, "br0", c.port)
		lab.Addr(t, c.ns, "eth0", c.addr+"/24")
		lab.Run(t, "ip", "-n", c.ns, "route", "add", "default", "via", "10.244.2.1")
	}
	lab.Veth(t, h, "vremote", l.remote, "eth0")
	lab.Addr(t, h, "vremote", "10.244.1.1/24")
	lab.Addr(t, h, "vremote", "10.244.3.1/24")
	lab.Addr(t, l.remote, "eth0", remoteAddr+"/24")
	lab.Addr(t, l.remote, "eth0", remoteAddr2+"/24")
	lab.Run(t, "ip", "-n", l.remote, "route", "add", "default", "via", "10.244.1.1")
	lab.Exec(t, h, "sysctl", "-qw", "net.ipv4.ip_forward=1")
	return l
}

// inHost runs a command in the host namespace.
func (l *nsLab) inHost(name string, args ...string) string {
	l.t.Helper()
	return lab.Exec(l.t, l.host, append([]string{name}, args...)...)
}

// bridgeNetfilterOff turns off iptables for bridged traffic in the host
// namespace (so the enforcer must turn it on) and reports whether the
// kernel offers it at all.
func (l *nsLab) bridgeNetfilterOff() bool {
	err := lab.Command(context.Background(), l.host, "sysctl", "-qw", "net.bridge.bridge-nf-call-iptables=0").Run()
	return err == nil
}

// execRecorder runs commands in the host namespace and remembers them.
type execRecorder struct {
	ns   string
	mu   sync.Mutex
	cmds []string
}

func (r *execRecorder) exec(ctx context.Context, name string, args ...string) *exec.Cmd {
	r.mu.Lock()
	r.cmds = append(r.cmds, name+" "+strings.Join(args, " "))
	r.mu.Unlock()
	return lab.Command(ctx, r.ns, name, args...)
}

func (r *execRecorder) take() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	c := r.cmds
	r.cmds = nil
	return c
}

// listen starts a TCP server in ns at addr that greets with the source
// address it sees and then echoes.
func (l *nsLab) listen(ns, addr string) {
	l.t.Helper()
	ln, err := lab.ServeTCP(ns, addr)
	if err != nil {
		l.t.Fatalf("listen %s in %s: %v", addr, ns, err)
	}
	l.t.Cleanup(func() { ln.Close() })
}

// dial connects from ns with source address src and reads the greeting, so
// a connection counts only once the server itself has answered.
func dial(ns, src, dst string) (net.Conn, error) {
	conn, _, err := lab.DialTCP(ns, src, dst, 2*time.Second)
	return conn, err
}

func (l *nsLab) expectTCP(ns, src, dst string, open bool) {
	l.t.Helper()
	start := time.Now()
	conn, err := dial(ns, src, dst)
	switch {
	case open && err != nil:
		l.t.Errorf("TCP %s -> %s: want open, got %v", src, dst, err)
	case !open && err == nil:
		conn.Close()
		l.t.Errorf("TCP %s -> %s: want blocked, but it connected", src, dst)
	case !open && time.Since(start) > time.Second:
		l.t.Errorf("TCP %s -> %s: blocked, but took %s: want a fast reject", src, dst, time.Since(start))
	case open:
		conn.Close()
	}
}

func (l *nsLab) expectPing(ns, src, dst string, open bool) {
	l.t.Helper()
	err := lab.Command(context.Background(), ns, "ping", "-n", "-q", "-c1", "-W1", "-I", src, dst).Run()
	if open && err != nil {
		l.t.Errorf("ping %s -> %s: want reply, got %v", src, dst, err)
	}
	if !open && err == nil {
		l.t.Errorf("ping %s -> %s: want blocked, got a reply", src, dst)
	}
}

func (l *nsLab) apply(e *IptablesEnforcer, rules []Rule, def string, nodes map[string]netip.Prefix) Ruleset {
	l.t.Helper()
	rs, err := Compile(rules, def, Directory{Nodes: nodes}, localSubnet, netip.Prefix{})
	if err != nil {
		l.t.Fatalf("compile: %v", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := e.Apply(ctx, rs); err != nil {
		l.t.Fatalf("apply: %v", err)
	}
	return rs
}

// otherCIDRs returns n /24s in 172.16.0.0/12, where no host of the lab is.
func otherCIDRs(n int) []Selector {
	var out []Selector
	for i := range n {
		out = append(out, Selector{CIDR: fmt.Sprintf("172.%d.%d.0/24", 16+i/256, i%256)})
	}
	return out
}

func TestIptablesEnforcement(t *testing.T) {
	l := newLab(t)
	l.listen(l.c1, c1Addr+":80")
	l.listen(l.c1, c1Addr+":81")
	c1web, c1alt := c1Addr+":80", c1Addr+":81"
	rec := &execRecorder{ns: l.host}
	e := newEnforcer(t, l.host, IptablesConfig{Exec: rec.exec, Bridge: "br0", Logger: lab.Logger(t)})
	t.Cleanup(func() { e.Cleanup(context.Background()) })
	nodes := map[string]netip.Prefix{"host-a": localSubnet, "host-b": nodeB}

	// Without policy everything passes.
	l.expectTCP(l.remote, remoteAddr, c1web, true)
	l.expectPing(l.remote, remoteAddr, c1Addr, true)

	deny80 := Rule{Name: "deny-web-from-b", Action: "deny", Protocol: "tcp", Ports: []PortRange{{80, 80}},
		From: []Selector{{CIDR: "10.244.1.0/24"}}, To: []Selector{{CIDR: "10.244.2.0/24"}}}

	t.Run("deny tcp 80 from remote subnet", func(t *testing.T) {
		l.t = t
		l.apply(e, []Rule{deny80}, "", nodes)
		l.expectTCP(l.remote, remoteAddr, c1web, false)
		l.expectTCP(l.remote, remoteAddr, c1alt, true)
		l.expectPing(l.remote, remoteAddr, c1Addr, true)
		l.expectTCP(l.remote, remoteAddr2, c1web, true) // not in 10.244.1.0/24
		saved := l.inHost("iptables-save", "-t", "filter")
		if !strings.Contains(saved, `--comment "fabric policy: deny-web-from-b"`) {
			t.Errorf("rule comment missing:\n%s", saved)
		}

		// Unchanged: nothing is rewritten.
		rec.take()
		l.apply(e, []Rule{deny80}, "", nodes)
		for _, c := range rec.take() {
			if strings.Contains(c, "restore") || strings.Contains(c, "destroy") {
				t.Errorf("unchanged Apply ran %q", c)
			}
		}

		// Someone inserts an ACCEPT above our jump: Apply puts the jump
		// back at position 1.
		l.inHost("iptables", "-I", "FORWARD", "1", "-j", "ACCEPT")
		l.apply(e, []Rule{deny80}, "", nodes)
		first := l.inHost("iptables", "-S", "FORWARD", "1")
		if !strings.Contains(first, "-j "+ChainName) {
			t.Errorf("FORWARD rule 1 is %q, want the jump to %s", first, ChainName)
		}
		l.expectTCP(l.remote, remoteAddr, c1web, false)
		l.inHost("iptables", "-D", "FORWARD", "-j", "ACCEPT")
	})

	t.Run("removing the rule restores port 80", func(t *testing.T) {
		l.t = t
		l.apply(e, nil, "", nodes)
		l.expectTCP(l.remote, remoteAddr, c1web, true)
	})

	t.Run("default deny with explicit allow", func(t *testing.T) {
		l.t = t
		// A connection opened while allowed keeps working: replies of
		// allowed connections always pass.
		before, err := dial(l.remote, remoteAddr, c1web)
		if err != nil {
			t.Fatalf("open connection before default deny: %v", err)
		}
		defer before.Close()

		allow81 := Rule{Name: "allow-alt", Action: "allow", Protocol: "tcp", Ports: []PortRange{{81, 81}},
			From: []Selector{{Node: "host-b"}}}
		l.apply(e, []Rule{allow81}, "deny", nodes)
		l.expectTCP(l.remote, remoteAddr, c1alt, true)
		l.expectTCP(l.remote, remoteAddr, c1web, false)
		l.expectTCP(l.remote, remoteAddr2, c1alt, false) // not host-b's subnet
		l.expectPing(l.remote, remoteAddr, c1Addr, false)

		before.SetDeadline(time.Now().Add(2 * time.Second))
		if _, err := io.WriteString(before, "still here\n"); err != nil {
			t.Fatalf("write on established connection: %v", err)
		}
		line, err := bufio.NewReader(before).ReadString('\n')
		if err != nil || line != "still here\n" {
			t.Errorf("established connection after default deny: %q, %v", line, err)
		}
	})

	t.Run("node rule follows the node's subnet", func(t *testing.T) {
		l.t = t
		denyB := Rule{Name: "deny-web-from-node-b", Action: "deny", Protocol: "tcp", Ports: []PortRange{{80, 80}},
			From: []Selector{{Node: "host-b"}}}
		l.apply(e, []Rule{denyB}, "", nodes)
		l.expectTCP(l.remote, remoteAddr, c1web, false)
		l.expectTCP(l.remote, remoteAddr2, c1web, true)

		moved := map[string]netip.Prefix{"host-a": localSubnet, "host-b": nodeBMoved}
		l.apply(e, []Rule{denyB}, "", moved)
		l.expectTCP(l.remote, remoteAddr, c1web, true)
		l.expectTCP(l.remote, remoteAddr2, c1web, false)
	})

	t.Run("200 CIDRs go into an ipset", func(t *testing.T) {
		l.t = t
		from := append(otherCIDRs(199), Selector{CIDR: "10.244.1.0/24"})
		big := Rule{Name: "deny-many", Action: "deny", Protocol: "tcp", Ports: []PortRange{{80, 80}}, From: from}
		l.apply(e, []Rule{big}, "", nodes)
		l.expectTCP(l.remote, remoteAddr, c1web, false)
		l.expectTCP(l.remote, remoteAddr2, c1web, true)

		sets := strings.Fields(l.inHost("ipset", "list", "-n"))
		if len(sets) != 1 || !policySetName.MatchString(sets[0]) {
			t.Fatalf("ipsets %v, want one fabric-<hash>", sets)
		}
		if n := strings.Count(l.inHost("ipset", "list", sets[0]), "\n172."); n != 199 {
			t.Errorf("set %s has %d 172.x entries, want 199", sets[0], n)
		}
		saved := l.inHost("iptables-save", "-t", "filter")
		if !strings.Contains(saved, "--match-set "+sets[0]+" src") {
			t.Errorf("no rule uses set %s:\n%s", sets[0], saved)
		}
		if n := strings.Count(saved, "-A "+ChainName); n > 10 {
			t.Errorf("%d rules in %s: the CIDRs were not folded into a set", n, ChainName)
		}

		// A new list replaces the set; the old one is destroyed.
		l.apply(e, []Rule{{Name: big.Name, Action: "deny", Protocol: "tcp", Ports: big.Ports, From: from[1:]}}, "", nodes)
		l.expectTCP(l.remote, remoteAddr, c1web, false)
		after := strings.Fields(l.inHost("ipset", "list", "-n"))
		if len(after) != 1 || after[0] == sets[0] {
			t.Errorf("ipsets after change %v (before %v): want exactly one new set", after, sets)
		}
	})

	t.Run("a repair tick runs no ipset; a chain and set removed by hand come back", func(t *testing.T) {
		l.t = t
		from := append(otherCIDRs(20), Selector{CIDR: "10.244.1.0/24"})
		deny := []Rule{{Name: "deny-some", Action: "deny", Protocol: "tcp", Ports: []PortRange{{80, 80}}, From: from}}
		l.apply(e, deny, "", nodes)
		l.expectTCP(l.remote, remoteAddr, c1web, false)
		rec.take()
		l.apply(e, deny, "", nodes) // what the 5-s tick does
		for _, c := range rec.take() {
			if strings.HasPrefix(c, "ipset") {
				t.Errorf("an unchanged policy ran %q", c)
			}
		}

		sets := strings.Fields(l.inHost("ipset", "list", "-n"))
		if len(sets) != 1 {
			t.Fatalf("ipsets %v, want one", sets)
		}
		l.inHost("iptables", "-F", "FORWARD")
		for _, chain := range []string{ChainName, InChain} {
			l.inHost("iptables", "-F", chain)
			l.inHost("iptables", "-X", chain)
		}
		l.inHost("ipset", "destroy", sets[0])
		l.expectTCP(l.remote, remoteAddr, c1web, true) // the deny is gone
		l.apply(e, deny, "", nodes)                    // the next tick
		l.expectTCP(l.remote, remoteAddr, c1web, false)
		l.expectTCP(l.remote, remoteAddr2, c1web, true)
	})

	t.Run("same-bridge traffic is enforced", func(t *testing.T) {
		l.t = t
		if !l.bridgeNetfilterOff() {
			testreq.Missing(t, "net.bridge.bridge-nf-call-iptables unavailable: same-bridge traffic bypasses iptables")
		}
		denyC2 := Rule{Name: "deny-web-from-c2", Action: "deny", Protocol: "tcp", Ports: []PortRange{{80, 80}},
			From: []Selector{{Address: c2Addr}}, To: []Selector{{Address: c1Addr}}}
		l.apply(e, []Rule{denyC2}, "", nodes)
		l.expectTCP(l.c2, c2Addr, c1web, false)
		l.expectTCP(l.c2, c2Addr, c1alt, true)
		l.expectPing(l.c2, c2Addr, c1Addr, true)
		l.expectTCP(l.remote, remoteAddr, c1web, true)
	})

	t.Run("cleanup removes chain, jump and sets", func(t *testing.T) {
		l.t = t
		var from []Selector
		for i := 0; i < 5; i++ {
			from = append(from, Selector{CIDR: fmt.Sprintf("10.244.%d.0/24", 10+i)})
		}
		l.apply(e, []Rule{deny80, {Name: "with-set", Action: "deny", From: from}}, "deny", nodes)
		if sets := l.inHost("ipset", "list", "-n"); strings.TrimSpace(sets) == "" {
			t.Fatal("expected a set before cleanup")
		}
		ctx := context.Background()
		if err := e.Cleanup(ctx); err != nil {
			t.Fatal(err)
		}
		if err := e.Cleanup(ctx); err != nil {
			t.Fatalf("second cleanup: %v", err)
		}
		saved := l.inHost("iptables-save")
		if strings.Contains(saved, ChainName) {
			t.Errorf("chain or jump left:\n%s", saved)
		}
		if sets := strings.TrimSpace(l.inHost("ipset", "list", "-n")); sets != "" {
			t.Errorf("sets left: %s", sets)
		}
		l.expectTCP(l.remote, remoteAddr, c1web, true)
		l.expectPing(l.remote, remoteAddr, c1Addr, true)
	})
}

// TestApplyIsAtomic swaps between two rule sets that both deny port 80
// while a prober keeps connecting: a gap between old and new rules would let
// a connection through.
func TestApplyIsAtomic(t *testing.T) {
	l := newLab(t)
	l.listen(l.c1, c1Addr+":80")
	e := newEnforcer(t, l.host, IptablesConfig{Exec: (&execRecorder{ns: l.host}).exec, Bridge: "br0", Logger: slog.New(slog.DiscardHandler)})
	t.Cleanup(func() { e.Cleanup(context.Background()) })
	nodes := map[string]netip.Prefix{"host-b": nodeB}
	var many []Selector
	for i := 0; i < 50; i++ {
		many = append(many, Selector{CIDR: fmt.Sprintf("172.16.%d.0/24", i)})
	}
	variants := [][]Rule{
		{{Name: "deny-a", Action: "deny", Protocol: "tcp", Ports: []PortRange{{80, 80}}, From: []Selector{{CIDR: "10.244.1.0/24"}}}},
		{{Name: "deny-b", Action: "deny", Protocol: "tcp", Ports: []PortRange{{80, 80}}, From: append([]Selector{{Node: "host-b"}}, many...)},
			{Name: "other", Order: 1, Action: "allow", Protocol: "udp"}},
	}
	l.apply(e, variants[0], "", nodes)

	stop := make(chan struct{})
	var attempts, leaks int
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			select {
			case <-stop:
				return
			default:
			}
			attempts++
			if conn, err := dial(l.remote, remoteAddr, c1Addr+":80"); err == nil {
				conn.Close()
				leaks++
			}
		}
	}()
	for i := 0; i < 30; i++ {
		l.apply(e, variants[i%2], "", nodes)
	}
	close(stop)
	<-done
	if leaks > 0 {
		t.Errorf("%d of %d connections got through while rules were swapped", leaks, attempts)
	}
	if attempts < 10 {
		t.Errorf("only %d probe connections during the swaps", attempts)
	}
	t.Logf("%d probes during 30 swaps, %d got through", attempts, leaks)
}

// TestStoredRuleIsEnforced wires store, compiler and enforcer the way
// fabricd does and measures the time from etcd write to a blocked
// connection.
func TestStoredRuleIsEnforced(t *testing.T) {
	l := newLab(t)
	l.listen(l.c1, c1Addr+":80")
	cli := etcdtest.Start(t).Client(t)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	e := newEnforcer(t, l.host, IptablesConfig{Exec: (&execRecorder{ns: l.host}).exec, Bridge: "br0", Logger: slog.New(slog.DiscardHandler)})
	t.Cleanup(func() { e.Cleanup(context.Background()) })
	nodes := map[string]netip.Prefix{"host-a": localSubnet, "host-b": nodeB}

	applied := make(chan string, 16)
	go func() {
		for p := range WatchPolicy(ctx, cli, "/fabric", slog.New(slog.DiscardHandler)) {
			rs, err := Compile(p.Rules, p.DefaultAction, Directory{Nodes: nodes}, localSubnet, netip.Prefix{})
			if err == nil {
				err = e.Apply(ctx, rs)
			}
			if err != nil {
				applied <- "error: " + err.Error()
				continue
			}
			applied <- fmt.Sprintf("%d rules", len(p.Rules))
		}
	}()
	waitApplied := func(want string) {
		t.Helper()
		select {
		case got := <-applied:
			if got != want {
				t.Fatalf("applied %q, want %q", got, want)
			}
		case <-time.After(5 * time.Second):
			t.Fatalf("nothing applied, want %q", want)
		}
	}
	waitApplied("0 rules")
	l.expectTCP(l.remote, remoteAddr, c1Addr+":80", true)

	rules, err := ParseFile("policy.yaml", []byte(`
- name: no-web-from-b
  action: deny
  from: [{node: host-b}]
  protocol: tcp
  ports: [80]
`))
	if err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	if err := Put(ctx, cli, "/fabric", rules); err != nil {
		t.Fatal(err)
	}
	for {
		conn, err := dial(l.remote, remoteAddr, c1Addr+":80")
		if err != nil {
			break
		}
		conn.Close()
		if time.Since(start) > 5*time.Second {
			t.Fatal("stored rule not enforced after 5s")
		}
	}
	t.Logf("etcd write to enforced: %s", time.Since(start))
	waitApplied("1 rules")

	if err := Delete(ctx, cli, "/fabric", "no-web-from-b"); err != nil {
		t.Fatal(err)
	}
	waitApplied("0 rules")
	l.expectTCP(l.remote, remoteAddr, c1Addr+":80", true)
}

func newEnforcer(t *testing.T, ns string, cfg IptablesConfig) *IptablesEnforcer {
	t.Helper()
	tables, err := iptables.New(iptables.Config{Exec: cfg.Exec, NetnsPath: lab.Path(ns), Sections: []string{Section}, Logger: cfg.Logger})
	if err != nil {
		t.Fatal(err)
	}
	cfg.Tables = tables
	cfg.Sets = ipsets.NewOwner(lab.Path(ns))
	e, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	return e
}

// IPv6 addresses of the lab (addIPv6): the host's /64 on the bridge, the
// remote's /64 (node host-b's), and an address outside both.
const (
	c1AddrV6      = "fd00:10:244:2::2"
	remoteAddrV6  = "fd00:10:244:1::2"
	remoteAddrV6b = "fd00:99::2"
)

var (
	localSubnetV6 = netip.MustParsePrefix("fd00:10:244:2::/64")
	nodeBV6       = netip.MustParsePrefix("fd00:10:244:1::/64")
)

// addIPv6 gives the lab's bridge, c1 and the remote IPv6 addresses (no
// duplicate address detection: usable at once).
func (l *nsLab) addIPv6() {
	l.t.Helper()
	lab.Exec(l.t, l.host, "sysctl", "-qw", "net.ipv6.conf.all.forwarding=1")
	for _, a := range []struct{ ns, dev, prefix string }{
		{l.host, "br0", "fd00:10:244:2::1/64"}, {l.c1, "eth0", c1AddrV6 + "/64"},
		{l.host, "vremote", "fd00:10:244:1::1/64"}, {l.host, "vremote", "fd00:99::1/64"},
		{l.remote, "eth0", remoteAddrV6 + "/64"}, {l.remote, "eth0", remoteAddrV6b + "/64"},
	} {
		lab.Run(l.t, "ip", "-n", a.ns, "addr", "add", a.prefix, "dev", a.dev, "nodad")
	}
	lab.Run(l.t, "ip", "-n", l.c1, "-6", "route", "add", "default", "via", "fd00:10:244:2::1")
	lab.Run(l.t, "ip", "-n", l.remote, "-6", "route", "add", "default", "via", "fd00:10:244:1::1")
	// The first neighbour solicitations on a new bridge can be lost: the
	// lab is ready when the remote reaches c1, before any rule is judged.
	testwait.For(l.t, 10*time.Second, "the remote reaches c1 over IPv6", func() error {
		return lab.Command(context.Background(), l.remote, "ping", "-6", "-n", "-q", "-c1", "-W1", c1AddrV6).Run()
	})
}

// TestIPv6Enforcement: the rules hold for IPv6 as for IPv4 in the
// ip6tables owner. A node selector covers the node's /64, an IPv6 CIDR
// is enforced, an IPv4-only rule leaves IPv6 alone (it names no IPv6
// address), and a denied connection is refused at once, not timed out.
func TestIPv6Enforcement(t *testing.T) {
	lab.RequireRoot(t, "ip6tables-restore", "ip6tables-save")
	l := newLab(t)
	l.addIPv6()
	web, webV6 := c1Addr+":80", "["+c1AddrV6+"]:80"
	l.listen(l.c1, web)
	l.listen(l.c1, webV6)
	inHost := (&execRecorder{ns: l.host}).exec
	tables6, err := iptables.New(iptables.Config{Exec: inHost, NetnsPath: lab.Path(l.host), Sections: []string{Section}, IPv6: true, Logger: lab.Logger(t)})
	if err != nil {
		t.Fatal(err)
	}
	e := newEnforcer(t, l.host, IptablesConfig{Exec: inHost, Bridge: "br0", Tables6: tables6, Logger: lab.Logger(t)})
	t.Cleanup(func() { e.Cleanup(context.Background()) })
	dir := Directory{Nodes: map[string]netip.Prefix{"host-a": localSubnet, "host-b": nodeB},
		NodesV6: map[string]netip.Prefix{"host-a": localSubnetV6, "host-b": nodeBV6}}
	apply := func(t *testing.T, def string, rules ...Rule) {
		t.Helper()
		rs, err := Compile(rules, def, dir, localSubnet, localSubnetV6)
		if err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		if err := e.Apply(ctx, rs); err != nil {
			t.Fatal(err)
		}
	}
	l.expectTCP(l.remote, remoteAddrV6, webV6, true)

	for _, c := range []struct {
		name                  string
		def                   string
		rule                  Rule
		fromB, fromOther, ip4 bool // open from host-b's /64, from fd00:99::2, IPv4 from host-b
	}{
		{"a node covers its /64", "", Rule{Name: "deny-b", Action: "deny", From: []Selector{{Node: "host-b"}}, Protocol: "tcp"}, false, true, false},
		{"an IPv6 CIDR", "", Rule{Name: "deny-99", Action: "deny", From: []Selector{{CIDR: "fd00:99::/64"}}}, true, false, true},
		{"IPv6 CIDRs in an ipset", "", Rule{Name: "deny-set", Action: "deny", From: []Selector{{CIDR: "fd00:97::/64"}, {CIDR: "fd00:98::/64"}, {CIDR: "fd00:99::/64"}}}, true, false, true},
		{"an IPv4 CIDR leaves IPv6 alone", "", Rule{Name: "deny-v4", Action: "deny", From: []Selector{{CIDR: "10.244.1.0/24"}}}, true, true, false},
		{"an IPv6 address as destination", "", Rule{Name: "deny-to-c1", Action: "deny", To: []Selector{{Address: c1AddrV6}}, Protocol: "tcp", Ports: []PortRange{{80, 80}}}, false, false, true},
		{"default deny, the node allowed", "deny", Rule{Name: "allow-b", Action: "allow", From: []Selector{{Node: "host-b"}}}, true, false, true},
	} {
		t.Run(c.name, func(t *testing.T) {
			l.t = t
			apply(t, c.def, c.rule)
			l.expectTCP(l.remote, remoteAddrV6, webV6, c.fromB)
			l.expectTCP(l.remote, remoteAddrV6b, webV6, c.fromOther)
			l.expectTCP(l.remote, remoteAddr, web, c.ip4)
		})
	}
	t.Run("no rule", func(t *testing.T) {
		l.t = t
		apply(t, "")
		l.expectTCP(l.remote, remoteAddrV6b, webV6, true)
		// Cleanup removes the IPv6 chain and its jump too.
		if err := e.Cleanup(context.Background()); err != nil {
			t.Fatal(err)
		}
		if saved := l.inHost("ip6tables-save", "-t", "filter"); strings.Contains(saved, ChainName) {
			t.Errorf("ip6tables after Cleanup:\n%s", saved)
		}
	})
}
