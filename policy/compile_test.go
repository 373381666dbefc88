package policy

import (
	"fmt"
	"net/netip"
	"reflect"
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
	rs, err := Compile(rules, "", Directory{Nodes: nodes}, local)
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
	rs2, err := Compile(rules, "", Directory{Nodes: nodes}, local)
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
	if _, err := Compile(nil, "block", Directory{}, local); err == nil {
		t.Fatal("bad default accepted")
	}
	if _, err := Compile([]Rule{{Name: "x", Action: "maybe"}}, "", Directory{}, local); err == nil || !strings.Contains(err.Error(), `rule "x"`) {
		t.Fatalf("bad rule: %v", err)
	}
}

func TestProtoMatchesSplitsMultiport(t *testing.T) {
	var ports []PortRange
	for p := uint16(1); p <= 20; p++ {
		ports = append(ports, PortRange{p, p})
	}
	got := protoMatches("tcp", ports)
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
	rs, err := Compile(rules, "deny", dir, local)
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
	rs2, _ := Compile(rules, "deny", dir, local)
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
	rs, err := Compile(rules, ActionAllow, dir, local)
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
	rs, _ = Compile([]Rule{{Name: "all", Action: ActionDeny, From: []Selector{{CIDR: "192.0.2.0/24"}}}, {Name: "ghost", Action: ActionDeny, To: []Selector{{Network: "ghost"}}}}, ActionAllow, dir, local)
	if r := rs.Rules[0]; r.Name != "all" || len(r.Dests) != 3 {
		t.Errorf("a rule without to: %+v, want it to reach the bridge and both networks", r)
	}
	if len(rs.Warnings) != 1 || !strings.Contains(rs.Warnings[0], `no fabric network "ghost"`) {
		t.Errorf("warnings %v", rs.Warnings)
	}
}

// IPv6 into local containers opens only where the policy denies nothing:
// rules name IPv4 addresses, so any deny of the operator's (or deny by
// default) closes IPv6; allow rules and the networks' isolation do not.
func TestIPv6FailsClosed(t *testing.T) {
	allow := CompiledRule{Name: "allow-web", Action: ActionAllow}
	deny := CompiledRule{Name: "deny-web", Action: ActionDeny}
	isolation := CompiledRule{Name: "isolation of network n1", Action: ActionDeny, Isolation: true}
	for _, c := range []struct {
		name   string
		rs     Ruleset
		closed bool
	}{
		{"no policy", Ruleset{DefaultAction: ActionAllow}, false},
		{"allow rules only", Ruleset{DefaultAction: ActionAllow, Rules: []CompiledRule{allow}}, false},
		{"the networks' isolation", Ruleset{DefaultAction: ActionAllow, Rules: []CompiledRule{isolation}}, false},
		{"a deny rule", Ruleset{DefaultAction: ActionAllow, Rules: []CompiledRule{allow, deny, isolation}}, true},
		{"deny by default", Ruleset{DefaultAction: ActionDeny, Rules: []CompiledRule{allow}}, true},
	} {
		s := ipv6Section(c.rs, netip.MustParsePrefix("fd00:10:244:1::/64"), "docker0")
		rules := s.Chains[1].Rules
		closed := strings.Contains(rules[len(rules)-1], "REJECT")
		if closed != c.closed {
			t.Errorf("%s: IPv6 refused = %v, want %v (rules %q)", c.name, closed, c.closed, rules)
		}
	}
}
