package planner

import (
	"net/netip"
	"strings"
	"testing"

	"github.com/fabricnet/fabric/bgp"
	"github.com/fabricnet/fabric/ipam"
	"github.com/fabricnet/fabric/registry"
)

var poolV6 = ipam.Pool{Network: netip.MustParsePrefix("10.244.0.0/16"), SubnetLen: 24, NetworkV6: netip.MustParsePrefix("fd00:10:244::/48")}

func dualStack(n registry.Node) registry.Node {
	n.SubnetV6, _ = poolV6.SubnetV6(n.Subnet)
	return n
}

// A host's IPv6 subnet is the /64 paired with its IPv4 one: a record
// claiming another is kept for IPv4 with its IPv6 subnet cleared, and
// only the owner's exact /64 with the owner's address as next hop is
// routed (a rogue /80 inside it is refused, as a /25 is for IPv4).
func TestIPv6Subnets(t *testing.T) {
	h := self
	h.PoolV6, h.SubnetV6 = poolV6, netip.MustParsePrefix("fd00:10:244:1::/64")
	if got := dualStack(h2).SubnetV6.String(); got != "fd00:10:244:2::/64" {
		t.Fatalf("h2's IPv6 subnet %s, want fd00:10:244:2::/64", got)
	}
	thief := dualStack(h3)
	thief.SubnetV6 = dualStack(h2).SubnetV6
	held := map[string][]netip.Prefix{"h2": {h2.Subnet}, "h3": {h3.Subnet}}
	nodes, refused := AcceptNodes(h, []registry.Node{dualStack(h1), dualStack(h2), thief}, held)
	if len(nodes) != 3 || nodes[2].SubnetV6.IsValid() || len(refused) != 1 || !strings.Contains(refused[0].Why, "is not fd00:10:244:3::/64, the one paired with its subnet 10.244.3.0/24") {
		t.Fatalf("a record claiming another host's IPv6 subnet: nodes %+v, refused %+v", nodes, refused)
	}
	nodes = []registry.Node{dualStack(h1), dualStack(h2), dualStack(h3)}
	checkRouteCases(t, h, nodes, []routeCase{
		{"a host's IPv6 subnet from its owner", "fd00:10:244:2::/64", "192.0.2.2", "h2", "fd00:10:244:2::/64 via 192.0.2.2 (node h2)", ""},
		{"a rogue /80 inside a host's /64", "fd00:10:244:2::/80", "198.51.100.3", "h3", "", "fd00:10:244:2::/80 is not the subnet fd00:10:244:2::/64 that host h2 holds"},
		{"a host's /64 from another host", "fd00:10:244:2::/64", "198.51.100.3", "h3", "", "belongs to host h2 (192.0.2.2), but the next hop is 198.51.100.3"},
		{"an unleased /64 of the pool", "fd00:10:244:9::/64", "192.0.2.2", "h2", "", "is inside the pool fd00:10:244::/48 but no fabric host holds it"},
		{"IPv6 outside the pool via a fabric host", "2001:db8::/64", "192.0.2.2", "h2", "", "would be tunnelled, but 2001:db8::/64 is outside the pool fd00:10:244::/48"},
		{"our own IPv6 subnet is skipped", "fd00:10:244:1::/64", "198.51.100.3", "h3", "", ""},
	})
	// A fabric without an IPv6 pool routes no IPv6 subnet of a host.
	got, why := describeAs(t, self, []registry.Node{h1, h2}, []bgp.Route{route("fd00:10:244:2::/64", "192.0.2.2", "h2")}, over)
	if got != "" || len(why) != 1 || !strings.Contains(why[0], "the fabric has no IPv6 pool") {
		t.Errorf("IPv6 without a pool: routes %q, refused %q", got, why)
	}
	// A restart keeps a host's IPv6 subnet like its IPv4 one until its
	// session has synced.
	g := Grace{KeptAtStart: map[netip.Prefix]netip.Addr{h2.Subnet: {}, dualStack(h2).SubnetV6: {}}}
	got, _ = describeAs(t, h, nodes, nil, g)
	if got != "10.244.2.0/24 via 192.0.2.2 (node h2); fd00:10:244:2::/64 via 192.0.2.2 (node h2)" {
		t.Errorf("kept through the start-up grace: %q", got)
	}
}

// A host's IPv6 underlay address (addressV6) is a next hop of its /64, the
// route still going through its tunnel; the address is refused where it
// could point at someone else: inside the IPv6 pool, this host's own, two
// records claiming it, or in a fabric without IPv6. A router's IPv6 route
// with an IPv6 next hop is routed as an IPv4 one is, under the same rules.
func TestIPv6NextHop(t *testing.T) {
	h := self
	h.PoolV6, h.SubnetV6, h.UnderlayV6 = poolV6, netip.MustParsePrefix("fd00:10:244:1::/64"), netip.MustParsePrefix("fd99::1/64")
	withV6 := func(n registry.Node, a string) registry.Node {
		n = dualStack(n)
		n.AddressV6 = netip.MustParseAddr(a)
		return n
	}
	held := map[string][]netip.Prefix{"h2": {h2.Subnet}, "h3": {h3.Subnet}}
	for _, c := range []struct {
		name    string
		h3      registry.Node
		refused string
	}{
		{"inside the IPv6 pool", withV6(h3, "fd00:10:244:2::5"), "is inside the IPv6 pool"},
		{"this host's", withV6(h3, "fd99::1"), "claims this host's IPv6 address fd99::1"},
		{"another record's too", withV6(h3, "fd99::2"), "claimed by another record too"},
	} {
		t.Run(c.name, func(t *testing.T) {
			nodes, refused := AcceptNodes(h, []registry.Node{dualStack(h1), withV6(h2, "fd99::2"), c.h3}, held)
			if nodes[2].AddressV6.IsValid() || len(refused) == 0 || !strings.Contains(refused[len(refused)-1].Why, c.refused) {
				t.Errorf("h3's addressV6 kept %v, refused %+v; want it cleared: %q", nodes[2].AddressV6, refused, c.refused)
			}
		})
	}
	if nodes, refused := AcceptNodes(self, []registry.Node{h1, withV6(h2, "fd99::2")}, held); nodes[1].AddressV6.IsValid() || len(refused) != 2 {
		t.Errorf("an IPv6 address in a fabric without IPv6: kept %v, refused %+v", nodes[1].AddressV6, refused)
	}

	nodes, refused := AcceptNodes(h, []registry.Node{dualStack(h1), withV6(h2, "fd99::2"), withV6(h3, "fd99::3")}, held)
	if len(refused) != 0 {
		t.Fatalf("refused %+v", refused)
	}
	checkRouteCases(t, h, nodes, []routeCase{
		{"a host's /64 via its IPv6 address goes through its tunnel", "fd00:10:244:2::/64", "fd99::2", "h2", "fd00:10:244:2::/64 via 192.0.2.2 (node h2)", ""},
		{"a host's /64 via another host's IPv6 address", "fd00:10:244:2::/64", "fd99::3", "h3", "", "belongs to host h2 (192.0.2.2), but the next hop is fd99::3"},
		{"a rogue /80 via the owner's IPv6 address", "fd00:10:244:2::/80", "fd99::2", "h2", "", "is not the subnet fd00:10:244:2::/64"},
		{"IPv6 outside the pool via a host's IPv6 address", "2001:db8::/64", "fd99::2", "h2", "", "is outside the pool fd00:10:244::/48"},
		{"via this host's IPv6 address: skipped", "2001:db8::/64", "fd99::1", "h2", "", ""},
		{"a router's IPv6 route via its IPv6 address", "2001:db8:250::/48", "fd99::250", "tor", "2001:db8:250::/48 via fd99::250 (plain)", ""},
		{"a router's IPv6 default route", "::/0", "fd99::250", "tor", "::/0 via fd99::250 (plain)", ""},
		{"a router's IPv6 route via an IPv4 next hop", "2001:db8:250::/48", "198.51.100.250", "tor", "", "routes from routers need an IPv6 next hop"},
		{"a router's route into this host's IPv6 underlay", "fd99::/80", "fd99::250", "tor", "", "would take over this host's underlay segment fd99::/64"},
		{"a router's route into the IPv6 pool", "fd00:10:244:7::/64", "fd99::250", "tor", "", "is inside the pool fd00:10:244::/48 but no fabric host holds it"},
	})
}

// routeCase is one learned route and what the planner must make of it.
type routeCase struct {
	name, prefix, nextHop, peer string
	want, refused               string
}

// checkRouteCases plans each case's route alone, as h with nodes.
func checkRouteCases(t *testing.T, h Host, nodes []registry.Node, cases []routeCase) {
	t.Helper()
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			got, why := describeAs(t, h, nodes, []bgp.Route{route(c.prefix, c.nextHop, c.peer)}, over)
			checkRoutes(t, got, why, c.want, c.refused)
		})
	}
}

// On an IPv6-only underlay a host's record carries an IPv6 address, and
// its IPv4 subnet travels with the subnet's network address as next hop
// (an IPv4 next hop is 32 bits): that next hop leads to that host alone,
// through its tunnel. A record with an address inside the pool is refused.
func TestIPv6OnlyUnderlay(t *testing.T) {
	h := self
	h.PoolV6, h.SubnetV6 = poolV6, netip.MustParsePrefix("fd00:10:244:1::/64")
	h.Underlay, h.UnderlayV6 = netip.MustParsePrefix("2001:db8:64::1/64"), netip.MustParsePrefix("2001:db8:64::1/64")
	v6 := func(n registry.Node, a string) registry.Node {
		n = dualStack(n)
		n.Address, n.AddressV6 = netip.MustParseAddr(a), netip.MustParseAddr(a)
		return n
	}
	held := map[string][]netip.Prefix{"h2": {h2.Subnet}, "h3": {h3.Subnet}}
	inPool := v6(h3, "fd00:10:244:2::7")
	nodes, refused := AcceptNodes(h, []registry.Node{v6(h1, "2001:db8:64::1"), v6(h2, "2001:db8:64::2"), inPool}, held)
	if len(nodes) != 2 || len(refused) != 1 || !strings.Contains(refused[0].Why, "inside the pool") {
		t.Fatalf("records with IPv6 addresses: kept %+v, refused %+v; want h2 kept and h3 (an address in the pool) refused", nodes, refused)
	}
	nodes = []registry.Node{v6(h1, "2001:db8:64::1"), v6(h2, "2001:db8:64::2"), v6(h3, "2001:db8:64::3")}
	checkRouteCases(t, h, nodes, []routeCase{
		{"a host's IPv4 subnet via its subnet's address", "10.244.2.0/24", "10.244.2.0", "h2", "10.244.2.0/24 via 2001:db8:64::2 (node h2)", ""},
		{"a host's IPv6 subnet via its address", "fd00:10:244:2::/64", "2001:db8:64::2", "h2", "fd00:10:244:2::/64 via 2001:db8:64::2 (node h2)", ""},
		{"a host's IPv4 subnet from another host's subnet address", "10.244.2.0/24", "10.244.3.0", "h3", "", "belongs to host h2 (2001:db8:64::2), but the next hop is 10.244.3.0"},
		{"a longer prefix inside a host's subnet", "10.244.2.0/25", "10.244.2.0", "h2", "", "is not the subnet 10.244.2.0/24 that host h2 holds"},
	})
}
