package policy

import (
	"fmt"
	"net/netip"
	"reflect"
	"slices"
	"strings"
	"testing"
)

func TestCompileResolvesAndDrops(t *testing.T) {
	nodes := map[string]netip.Prefix{
		"host-a": netip.MustParsePrefix("10.244.2.0/24"),
		"host-b": netip.MustParsePrefix("10.244.1.0/24"),
	}
	local := nodes["host-a"]
	rules := []Rule{
		{Name: "z-late", Order: 5, Action: "deny"},
		{Name: "from-b", Order: 1, Action: "deny", From: []Selector{{Node: "host-b"}}, Protocol: "tcp", Ports: []PortRange{{80, 80}}},
		{Name: "to-b-only", Order: 2, Action: "deny", To: []Selector{{Node: "host-b"}}},
		{Name: "from-gone", Order: 3, Action: "deny", From: []Selector{{Node: "host-gone"}}},
		{Name: "to-wide", Order: 4, Action: "allow", To: []Selector{{CIDR: "10.0.0.0/8"}, {Address: "10.244.2.7"}}},
	}
	rs, err := Compile(rules, "", Directory{Nodes: nodes}, local, netip.Prefix{})
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, r := range rs.Rules {
		names = append(names, r.Name)
	}
	// to-b-only does not reach this host; from-gone matches nothing (and
	// must not become "from anywhere").
	if want := []string{"from-b", "to-wide", "z-late"}; !reflect.DeepEqual(names, want) {
		t.Fatalf("rules %v, want %v", names, want)
	}
	if rs.DefaultAction != "allow" {
		t.Fatalf("default %q", rs.DefaultAction)
	}
	if got := rs.Rules[0].Sources; !reflect.DeepEqual(got, []netip.Prefix{nodes["host-b"]}) {
		t.Fatalf("from-b sources %v", got)
	}
	// 10.0.0.0/8 covers the local subnet, which covers 10.244.2.7/32.
	if got := rs.Rules[1].Dests; !reflect.DeepEqual(got, []netip.Prefix{local}) {
		t.Fatalf("to-wide dests %v", got)
	}
	if len(rs.Warnings) != 1 || !strings.Contains(rs.Warnings[0], `node "host-gone" has no subnet`) {
		t.Fatalf("warnings %v", rs.Warnings)
	}

	// The node rule follows a new lease.
	nodes["host-b"] = netip.MustParsePrefix("10.244.3.0/24")
	rs2, err := Compile(rules, "", Directory{Nodes: nodes}, local, netip.Prefix{})
	if err != nil {
		t.Fatal(err)
	}
	if got := rs2.Rules[0].Sources[0].String(); got != "10.244.3.0/24" {
		t.Fatalf("after lease change from-b source %s", got)
	}
	if rs.Hash() == rs2.Hash() {
		t.Fatal("hash did not change with the lease")
	}
}

func TestCompileRefusesInvalid(t *testing.T) {
	local := netip.MustParsePrefix("10.244.2.0/24")
	if _, err := Compile(nil, "block", Directory{}, local, netip.Prefix{}); err == nil {
		t.Fatal("bad default accepted")
	}
	if _, err := Compile([]Rule{{Name: "x", Action: "maybe"}}, "", Directory{}, local, netip.Prefix{}); err == nil || !strings.Contains(err.Error(), `rule "x"`) {
		t.Fatalf("bad rule: %v", err)
	}
}

func TestProtoMatchesSplitsMultiport(t *testing.T) {
	var ports []PortRange
	for p := uint16(1); p <= 20; p++ {
		ports = append(ports, PortRange{p, p})
	}
	got := protoMatches("tcp", ports, ipv4)
	if len(got) != 2 || !strings.HasSuffix(got[1], "--dports 16,17,18,19,20") {
		t.Fatalf("got %q", got)
	}
}

// Container and label selectors resolve to the addresses of the matching
// containers on every host; "to" keeps only this host's.
func TestCompileContainerSelectors(t *testing.T) {
	local := netip.MustParsePrefix("10.244.2.0/24")
	dir := Directory{Containers: []Container{
		{Name: "fe1", Address: netip.MustParseAddr("10.244.1.5"), Labels: map[string]string{"role": "frontend"}},
		{Name: "fe2", Address: netip.MustParseAddr("10.244.3.5"), Labels: map[string]string{"role": "frontend", "tier": "a"}},
		{Name: "be", Address: netip.MustParseAddr("10.244.2.9"), Labels: map[string]string{"role": "backend"}},
		{Name: "be", Address: netip.MustParseAddr("10.244.4.9"), Labels: map[string]string{"role": "backend"}},
		{Name: "other", Address: netip.MustParseAddr("10.244.1.6"), Labels: map[string]string{"role": "frontendish"}},
	}}
	rules := []Rule{
		{Name: "fe-to-be", Order: 1, Action: "allow", From: []Selector{{Label: "role=frontend"}}, To: []Selector{{Label: "role=backend"}}, Protocol: "tcp", Ports: []PortRange{{80, 80}}},
		{Name: "by-name", Order: 2, Action: "deny", From: []Selector{{Container: "be"}}},
		{Name: "nobody", Order: 3, Action: "allow", From: []Selector{{Label: "role=none"}}},
		{Name: "to-remote-only", Order: 4, Action: "deny", To: []Selector{{Container: "fe1"}}},
	}
	if !UsesContainers(rules) || UsesContainers([]Rule{{Name: "n", Action: "deny", From: []Selector{{Node: "x"}}}}) {
		t.Fatal("UsesContainers is wrong")
	}
	rs, err := Compile(rules, "deny", dir, local, netip.Prefix{})
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]string{}
	for _, r := range rs.Rules {
		got[r.Name] = fmt.Sprint(r.Sources, " -> ", r.Dests)
	}
	want := map[string]string{
		"fe-to-be": "[10.244.1.5/32 10.244.3.5/32] -> [10.244.2.9/32]",
		"by-name":  "[10.244.2.9/32 10.244.4.9/32] -> [10.244.2.0/24]",
	}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("compiled %v, want %v (a label selector matching nothing drops the rule, a to-selector of other hosts' containers too)", got, want)
	}
	if len(rs.Warnings) != 0 {
		t.Errorf("warnings for selectors of containers not started: %v", rs.Warnings)
	}
	// A new frontend container changes the ruleset.
	dir.Containers = append(dir.Containers, Container{Name: "fe3", Address: netip.MustParseAddr("10.244.5.5"), Labels: map[string]string{"role": "frontend"}})
	rs2, _ := Compile(rules, "deny", dir, local, netip.Prefix{})
	if rs.Hash() == rs2.Hash() || len(rs2.Rules[0].Sources) != 3 {
		t.Errorf("a new frontend container did not change the rule: %v", rs2.Rules[0].Sources)
	}
}

// TestCompileNetworks: the fabric's Docker networks are isolated from each
// other and from the bridge, after the rules (which may open them) and
// before the default; the hosts' gateways (which published connections
// come from) are not isolated; a network selector is its subnet.
func TestCompileNetworks(t *testing.T) {
	local := netip.MustParsePrefix("10.244.1.0/24")
	dir := Directory{
		Nodes:    map[string]netip.Prefix{"h2": netip.MustParsePrefix("10.244.2.0/24")},
		Pool:     netip.MustParsePrefix("10.244.0.0/16"),
		Networks: map[string]netip.Prefix{"front": netip.MustParsePrefix("172.16.1.0/24"), "back": netip.MustParsePrefix("172.16.2.0/24")},
	}
	rules := []Rule{{Name: "front-to-back-db", Action: ActionAllow, From: []Selector{{Network: "front"}}, To: []Selector{{Network: "back"}}, Protocol: "tcp", Ports: []PortRange{{5432, 5432}}}}
	rs, err := Compile(rules, ActionAllow, dir, local, netip.Prefix{})
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, r := range rs.Rules {
		got = append(got, fmt.Sprintf("%s %s %v -> %v", r.Name, r.Action, r.Sources, r.Dests))
	}
	want := []string{
		"front-to-back-db allow [172.16.1.0/24] -> [172.16.2.0/24]",
		"the hosts' gateways (published ports) as by default allow [10.244.2.1/32] -> [10.244.1.0/24 172.16.1.0/24 172.16.2.0/24]",
		"isolation of the bridge from the networks back, front deny [172.16.1.0/24 172.16.2.0/24] -> [10.244.1.0/24]",
		"isolation of network back deny [10.244.0.0/16 172.16.1.0/24] -> [172.16.2.0/24]",
		"isolation of network front deny [10.244.0.0/16 172.16.2.0/24] -> [172.16.1.0/24]",
	}
	if strings.Join(got, "\n") != strings.Join(want, "\n") {
		t.Errorf("compiled:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
	if len(rs.Networks) != 2 {
		t.Errorf("networks in the ruleset: %v", rs.Networks)
	}
	// A rule without "to" reaches every local space; one naming an unknown
	// network matches nothing and says so.
	rs, _ = Compile([]Rule{{Name: "all", Action: ActionDeny, From: []Selector{{CIDR: "192.0.2.0/24"}}}, {Name: "ghost", Action: ActionDeny, To: []Selector{{Network: "ghost"}}}}, ActionAllow, dir, local, netip.Prefix{})
	if r := rs.Rules[0]; r.Name != "all" || len(r.Dests) != 3 {
		t.Errorf("a rule without to: %+v, want it to reach the bridge and both networks", r)
	}
	if len(rs.Warnings) != 1 || !strings.Contains(rs.Warnings[0], `no fabric network "ghost"`) {
		t.Errorf("warnings %v", rs.Warnings)
	}
}

// A node, container or label selector covers both families; a CIDR or an
// address only its own. The IPv6 subnet is one of the host's spaces.
func TestCompileIPv6(t *testing.T) {
	local, localV6 := netip.MustParsePrefix("10.244.2.0/24"), netip.MustParsePrefix("fd00:10:244:2::/64")
	dir := Directory{
		Nodes:      map[string]netip.Prefix{"host-b": netip.MustParsePrefix("10.244.1.0/24"), "v4only": netip.MustParsePrefix("10.244.3.0/24")},
		NodesV6:    map[string]netip.Prefix{"host-b": netip.MustParsePrefix("fd00:10:244:1::/64")},
		Containers: []Container{{Name: "web", Address: netip.MustParseAddr("10.244.2.5"), AddressV6: netip.MustParseAddr("fd00:10:244:2::5"), Labels: map[string]string{"role": "web"}}},
	}
	p := func(s ...string) []netip.Prefix {
		var out []netip.Prefix
		for _, x := range s {
			out = append(out, netip.MustParsePrefix(x))
		}
		return out
	}
	for _, c := range []struct {
		name           string
		rule           Rule
		sources, dests []netip.Prefix
	}{
		{"node", Rule{From: []Selector{{Node: "host-b"}}}, p("10.244.1.0/24", "fd00:10:244:1::/64"), p("10.244.2.0/24", "fd00:10:244:2::/64")},
		{"node without IPv6", Rule{From: []Selector{{Node: "v4only"}}}, p("10.244.3.0/24"), p("10.244.2.0/24", "fd00:10:244:2::/64")},
		{"label", Rule{To: []Selector{{Label: "role=web"}}}, nil, p("10.244.2.5/32", "fd00:10:244:2::5/128")},
		{"container", Rule{To: []Selector{{Container: "web"}}}, nil, p("10.244.2.5/32", "fd00:10:244:2::5/128")},
		{"IPv6 cidr", Rule{From: []Selector{{CIDR: "fd00:99::/64"}}, To: []Selector{{CIDR: "fd00::/8"}}}, p("fd00:99::/64"), p("fd00:10:244:2::/64")},
		{"IPv4 address", Rule{To: []Selector{{Address: "10.244.2.7"}}}, nil, p("10.244.2.7/32")},
		{"IPv6 address", Rule{To: []Selector{{Address: "fd00:10:244:2::7"}}}, nil, p("fd00:10:244:2::7/128")},
	} {
		c.rule.Name, c.rule.Action = "r", ActionDeny
		rs, err := Compile([]Rule{c.rule}, "", dir, local, localV6)
		if err != nil {
			t.Fatalf("%s: %v", c.name, err)
		}
		if len(rs.Rules) != 1 || !reflect.DeepEqual(rs.Rules[0].Sources, c.sources) || !reflect.DeepEqual(rs.Rules[0].Dests, c.dests) {
			t.Errorf("%s: compiled %+v, want sources %v dests %v", c.name, rs.Rules, c.sources, c.dests)
		}
	}
	// Another host's /64 as destination is not about this host.
	if rs, _ := Compile([]Rule{{Name: "r", Action: ActionDeny, To: []Selector{{CIDR: "fd00:10:244:1::/64"}}}}, "", dir, local, localV6); len(rs.Rules) != 0 {
		t.Errorf("rule to another host's /64 kept: %+v", rs.Rules)
	}
	for _, bad := range []Selector{{CIDR: "::ffff:10.0.0.0/104"}, {CIDR: "fd00::1/64"}, {Address: "fe80::1%eth0"}} {
		if err := bad.Validate(); err == nil {
			t.Errorf("selector %+v accepted", bad)
		}
	}
}

// Each family's chain takes its own prefixes: a rule whose sources are
// all IPv4 matches no IPv6 packet and is left out of the IPv6 chain (not
// widened to "from anywhere"), ICMP is ICMPv6 there, and its rejects are
// ICMPv6's; neighbour discovery passes a default deny.
func TestRenderPerFamily(t *testing.T) {
	rs, err := Compile([]Rule{
		{Name: "from-v4", Action: ActionDeny, From: []Selector{{CIDR: "10.9.0.0/16"}}},
		{Name: "from-v6", Action: ActionDeny, From: []Selector{{CIDR: "fd00:99::/64"}}},
		{Name: "ping", Action: ActionAllow, Protocol: ProtocolICMP},
	}, ActionDeny, Directory{}, netip.MustParsePrefix("10.244.2.0/24"), netip.MustParsePrefix("fd00:10:244:2::/64"))
	if err != nil {
		t.Fatal(err)
	}
	e := &IptablesEnforcer{cfg: IptablesConfig{Bridge: "docker0"}}
	v4, _ := e.render(rs, ipv4)
	v6, _ := e.render(rs, ipv6)
	has := func(rules []string, s string) bool {
		return slices.ContainsFunc(rules, func(r string) bool { return strings.Contains(r, s) })
	}
	for _, c := range []struct {
		what  string
		rules []string
		sub   string
		want  bool
	}{
		{"IPv4 chain: from-v4", v4.rules, "-s 10.9.0.0/16", true},
		{"IPv4 chain: from-v6", v4.rules, "from-v6", false},
		{"IPv6 chain: from-v6", v6.rules, "-s fd00:99::/64", true},
		{"IPv6 chain: from-v4", v6.rules, "from-v4", false},
		{"IPv6 chain: ICMPv6", v6.rules, "-p ipv6-icmp " + comment("ping"), true},
		{"IPv6 chain: ICMPv6 rejects", v6.rules, "icmp6-port-unreachable", true},
		{"IPv6 chain: no ICMPv4 reject", v6.rules, "icmp-port-unreachable", false},
		{"IPv6 chain: neighbour discovery", v6.rules, "--icmpv6-type 136", true},
		{"IPv6 scope", v6.scope, "-d fd00:10:244:2::/64 -o docker0", true},
	} {
		if got := has(c.rules, c.sub); got != c.want {
			t.Errorf("%s: has %q = %v, want %v:\n%s", c.what, c.sub, got, c.want, strings.Join(c.rules, "\n"))
		}
	}
	// No IPv6 subnet here: no IPv6 chain.
	rs.LocalV6 = netip.Prefix{}
	if v6, _ := e.render(rs, ipv6); len(v6.section().Chains) != 0 {
		t.Errorf("IPv6 chains without an IPv6 subnet: %+v", v6.section())
	}
}
