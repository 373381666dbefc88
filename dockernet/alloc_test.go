package dockernet

import (
	"fmt"
	"net/netip"
	"strings"
	"testing"
)

// TestPick: which address a host gives, and which block it claims with it.
func TestPick(t *testing.T) {
	n := Network{Name: "net1", Subnet: netip.MustParsePrefix("172.16.1.0/24"), Gateway: netip.MustParseAddr("172.16.1.1")}
	addr := netip.MustParseAddr
	prefix := netip.MustParsePrefix
	state := func(blocks []Block, grants ...Grant) State { return stateOf(n, blocks, grants...) }
	block := func(p, node string) Block { return Block{Network: "net1", Prefix: prefix(p), Node: node} }
	grant := func(a, node string) Grant { return Grant{Network: "net1", Address: addr(a), Node: node} }
	// Every block of net1 held by h2 but the last, fully given.
	var nearlyFull []Block
	var nearlyFullGrants []Grant
	for i := range 16 {
		p := blockAt(n.Subnet, 28, i)
		node := "h2"
		if i == 15 {
			node = "h1"
			for a := p.Addr(); p.Contains(a); a = a.Next() {
				nearlyFullGrants = append(nearlyFullGrants, grant(a.String(), "h1"))
			}
		}
		nearlyFull = append(nearlyFull, Block{Network: "net1", Prefix: p, Node: node})
	}

	for _, c := range []pickCase{
		{name: "the first address of a fresh network skips the network address and the gateway, with its block", s: state(nil), addr: "172.16.1.2", claim: "172.16.1.0/28"},
		{name: "a host takes from its own block before claiming another", s: state([]Block{block("172.16.1.0/28", "h2"), block("172.16.1.16/28", "h1")}, grant("172.16.1.16", "h1")), addr: "172.16.1.17"},
		{name: "another host's block is skipped for a free one", s: state([]Block{block("172.16.1.0/28", "h2")}), addr: "172.16.1.16", claim: "172.16.1.16/28"},
		{name: "with every block held, an address from another host's block (a /32)", s: state(nearlyFull, nearlyFullGrants...), addr: "172.16.1.2"},
		{name: "a wanted address in another host's block is given without its block", s: state([]Block{block("172.16.1.48/28", "h2")}), want: "172.16.1.50", addr: "172.16.1.50"},
		{name: "a wanted address in a free block claims the block", s: state(nil), want: "172.16.1.200", addr: "172.16.1.200", claim: "172.16.1.192/28"},
		{name: "a wanted address in use is refused, naming the host", s: state([]Block{block("172.16.1.48/28", "h3")}, grant("172.16.1.50", "h3")), want: "172.16.1.50", errSaying: "in use by a container on host h3"},
		{name: "the gateway is refused", s: state(nil), want: "172.16.1.1", errSaying: "gateway"},
		{name: "the broadcast address is refused", s: state(nil), want: "172.16.1.255", errSaying: "broadcast"},
		{name: "an address outside the subnet is refused", s: state(nil), want: "172.16.2.5", errSaying: "not in network net1's subnet"},
		{name: "a full network says so", s: state(nearlyFull, append(nearlyFullGrants, fill(n, "h2")...)...), errSaying: "no free address"},
	} {
		t.Run(c.name, func(t *testing.T) { c.check(t, n, false) })
	}
}

// stateOf is the fabric's state with network n alone, its blocks and grants.
func stateOf(n Network, blocks []Block, grants ...Grant) State {
	s := State{Networks: map[string]Network{n.Name: n}, Blocks: map[string][]Block{n.Name: blocks}, Grants: map[string]map[netip.Addr]Grant{n.Name: {}}}
	for _, g := range grants {
		s.Grants[n.Name][g.Address] = g
	}
	return s
}

// pickCase is one case of TestPick and TestPickIPv6: what h1 is given.
type pickCase struct {
	name      string
	s         State
	want      string // the address wanted, or ""
	addr      string
	claim     string // "" when no block is claimed
	errSaying string
}

func (c pickCase) check(t *testing.T, n Network, v6 bool) {
	t.Helper()
	var want netip.Addr
	if c.want != "" {
		want = netip.MustParseAddr(c.want)
	}
	got, claim, err := Pick(c.s, n, v6, "h1", want)
	if c.errSaying != "" {
		if err == nil || !strings.Contains(err.Error(), c.errSaying) {
			t.Fatalf("got %s, %v; want an error saying %q", got, err, c.errSaying)
		}
		return
	}
	if err != nil {
		t.Fatal(err)
	}
	if got.String() != c.addr {
		t.Errorf("address %s, want %s", got, c.addr)
	}
	if (c.claim == "") != !claim.IsValid() || (c.claim != "" && claim.String() != c.claim) {
		t.Errorf("claims %v, want %q", claim, c.claim)
	}
}

// fill gives node every address of net1 not otherwise reserved.
func fill(n Network, node string) []Grant {
	var out []Grant
	for a := n.Subnet.Addr(); n.Subnet.Contains(a); a = a.Next() {
		if !n.space(false).reserved(a) && a.As4()[3] < 240 {
			out = append(out, Grant{Network: n.Name, Address: a, Node: node})
		}
	}
	return out
}

// TestPickIPv6: a network's IPv6 addresses come from the IPv6 block that
// goes with the host's IPv4 block (same place in the subnet), claimed
// through the IPv4 block's record.
func TestPickIPv6(t *testing.T) {
	n := Network{Name: "net6", Subnet: netip.MustParsePrefix("172.16.1.0/24"), Gateway: netip.MustParseAddr("172.16.1.1"),
		SubnetV6: netip.MustParsePrefix("fd00:16:1::/64"), GatewayV6: netip.MustParseAddr("fd00:16:1::1")}
	if err := n.Validate(); err != nil {
		t.Fatal(err)
	}
	addr := netip.MustParseAddr
	state := func(blocks []Block, grants ...Grant) State { return stateOf(n, blocks, grants...) }
	block := func(p, node string) Block {
		return Block{Network: "net6", Prefix: netip.MustParsePrefix(p), Node: node}
	}
	for _, c := range []pickCase{
		{name: "a fresh network: the first IPv6 block's first host address, claiming IPv4 block 0", s: state(nil), addr: "fd00:16:1::2", claim: "172.16.1.0/28"},
		{name: "the IPv6 block of the host's IPv4 block 3", s: state([]Block{block("172.16.1.0/28", "h2"), block("172.16.1.48/28", "h1")}), addr: "fd00:16:1:0:3000::", claim: ""},
		{name: "another host's blocks are skipped", s: state([]Block{block("172.16.1.0/28", "h2")}), addr: "fd00:16:1:0:1000::", claim: "172.16.1.16/28"},
		{name: "a wanted address claims the IPv4 block of its place", s: state(nil), want: "fd00:16:1:0:f000::9", addr: "fd00:16:1:0:f000::9", claim: "172.16.1.240/28"},
		{name: "a wanted address in use names the host", s: state([]Block{block("172.16.1.0/28", "h3")}, Grant{Network: "net6", Address: addr("fd00:16:1::5"), Node: "h3"}), want: "fd00:16:1::5", errSaying: "in use by a container on host h3"},
		{name: "the IPv6 gateway is refused", s: state(nil), want: "fd00:16:1::1", errSaying: "gateway"},
		{name: "an IPv4 address asked of the IPv6 side is refused", s: state(nil), want: "172.16.1.9", errSaying: "not in network net6's subnet fd00:16:1::/64"},
	} {
		t.Run(c.name, func(t *testing.T) { c.check(t, n, true) })
	}
	if _, _, err := Pick(state(nil), Network{Name: "v4only", Subnet: n.Subnet, Gateway: n.Gateway}, true, "h1", netip.Addr{}); err == nil {
		t.Error("an IPv6 address from a network without IPv6 was given")
	}
}

// TestSubnetV6Sizes: an IPv6 subnet is cut into as many blocks as the IPv4
// one, each of 256 addresses or more.
func TestSubnetV6Sizes(t *testing.T) {
	for _, c := range []struct{ v4, v6, errSaying string }{
		{"172.16.1.0/24", "fd00:1::/64", ""},
		{"172.16.1.0/24", "fd00:1::/116", ""}, // 16 blocks of /120
		{"172.16.1.0/24", "fd00:1::/117", "at most /116"},
		{"10.50.0.0/16", "fd00:1::/48", ""},
		{"10.50.0.0/16", "fd00:1::/112", "at most /110"},
		{"172.16.1.0/24", "fd00:1::1/64", "host bits"},
		{"172.16.1.0/24", "fe80::/64", "link-local"},
		{"172.16.1.0/24", "10.1.0.0/16", "not an IPv6 prefix"},
	} {
		err := CheckSubnetV6(netip.MustParsePrefix(c.v6), netip.MustParsePrefix(c.v4))
		if (c.errSaying == "") != (err == nil) || (err != nil && !strings.Contains(err.Error(), c.errSaying)) {
			t.Errorf("%s beside %s: %v, want an error saying %q", c.v6, c.v4, err, c.errSaying)
		}
	}
}

// TestOwnership: what each host advertises and the planner accepts from it.
func TestOwnership(t *testing.T) {
	s := State{
		Networks: map[string]Network{"net1": {Name: "net1", Subnet: netip.MustParsePrefix("172.16.1.0/24")}},
		Blocks:   map[string][]Block{"net1": {{Network: "net1", Prefix: netip.MustParsePrefix("172.16.1.0/28"), Node: "h1"}, {Network: "net1", Prefix: netip.MustParsePrefix("172.16.1.16/28"), Node: "h2"}}},
		Grants: map[string]map[netip.Addr]Grant{"net1": {
			netip.MustParseAddr("172.16.1.2"):  {Network: "net1", Address: netip.MustParseAddr("172.16.1.2"), Node: "h1"},
			netip.MustParseAddr("172.16.1.20"): {Network: "net1", Address: netip.MustParseAddr("172.16.1.20"), Node: "h1"}, // --ip in h2's block
		}},
	}
	if got := s.Routes("h1"); len(got) != 2 || got[0].String() != "172.16.1.0/28" || got[1].String() != "172.16.1.20/32" {
		t.Errorf("h1 advertises %v, want its block and the /32 it gives in h2's", got)
	}
	if got := s.Routes("h2"); len(got) != 1 || got[0].String() != "172.16.1.16/28" {
		t.Errorf("h2 advertises %v, want its block", got)
	}
	owners := s.Owners()
	if owners[netip.MustParsePrefix("172.16.1.20/32")] != "h1" || owners[netip.MustParsePrefix("172.16.1.16/28")] != "h2" {
		t.Errorf("owners %v", owners)
	}
	if !s.Owns("net1", "h1", netip.MustParseAddr("172.16.1.20")) || s.Owns("net1", "h2", netip.MustParseAddr("172.16.1.20")) {
		t.Error("Owns does not follow the grants")
	}

	// With IPv6, each block's IPv6 pair is its holder's, and an IPv6
	// address outside the holder's blocks is a /128.
	n := s.Networks["net1"]
	n.SubnetV6, n.GatewayV6 = netip.MustParsePrefix("fd00:16:1::/64"), netip.MustParseAddr("fd00:16:1::1")
	s.Networks["net1"] = n
	s.Grants["net1"][netip.MustParseAddr("fd00:16:1:0:1000::7")] = Grant{Network: "net1", Address: netip.MustParseAddr("fd00:16:1:0:1000::7"), Node: "h1"} // in h2's
	s.Grants["net1"][netip.MustParseAddr("fd00:16:1::7")] = Grant{Network: "net1", Address: netip.MustParseAddr("fd00:16:1::7"), Node: "h1"}               // in its own
	if got := fmt.Sprint(s.Routes("h1")); got != "[172.16.1.0/28 172.16.1.20/32 fd00:16:1::/68 fd00:16:1:0:1000::7/128]" {
		t.Errorf("h1 advertises %s", got)
	}
	if got := fmt.Sprint(s.Routes("h2")); got != "[172.16.1.16/28 fd00:16:1:0:1000::/68]" {
		t.Errorf("h2 advertises %s", got)
	}
	if got := fmt.Sprint(s.Subnets()); got != "[172.16.1.0/24 fd00:16:1::/64]" {
		t.Errorf("subnets %s", got)
	}
}
