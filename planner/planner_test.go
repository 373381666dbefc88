package planner

import (
	"bytes"
	"encoding/base64"
	"fmt"
	"maps"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/fabricnet/fabric/bgp"
	"github.com/fabricnet/fabric/config"
	"github.com/fabricnet/fabric/registry"
)

var (
	self = Host{
		Name:     "h1",
		ASN:      64512,
		Underlay: netip.MustParsePrefix("192.0.2.1/24"),
		Subnet:   netip.MustParsePrefix("10.244.1.0/24"),
		Pool:     netip.MustParsePrefix("10.244.0.0/16"),
	}
	h1 = node("h1", "192.0.2.1", "10.244.1.0/24")
	h2 = node("h2", "192.0.2.2", "10.244.2.0/24")
	h3 = node("h3", "198.51.100.3", "10.244.3.0/24")
	t0 = time.Date(2026, 12, 1, 12, 0, 0, 0, time.UTC)
)

func node(name, addr, subnet string) registry.Node {
	return registry.Node{Name: name, Address: netip.MustParseAddr(addr), ASN: 64512, Subnet: netip.MustParsePrefix(subnet),
		VTEPMAC: "0e:fa:c0:00:02:02", Encaps: []string{"vxlan"}}
}

func route(prefix, nextHop, peer string) bgp.Route {
	return bgp.Route{Prefix: netip.MustParsePrefix(prefix), NextHop: netip.MustParseAddr(nextHop), PeerName: peer}
}

// describe renders routes as "prefix via nexthop (node|plain)" for compact
// comparison.
func describe(t *testing.T, nodes []registry.Node, best []bgp.Route, g Grace) (string, []string) {
	t.Helper()
	return describeAs(t, self, nodes, best, g)
}

// withImports is self with the router "filtered" limited to a default route
// and 10.250.0.0/16 (and anything inside it).
var withImports = func() Host {
	h := self
	h.Imports = map[string][]netip.Prefix{"filtered": {netip.MustParsePrefix("0.0.0.0/0"), netip.MustParsePrefix("10.250.0.0/16")}}
	return h
}()

func describeAs(t *testing.T, h Host, nodes []registry.Node, best []bgp.Route, g Grace) (string, []string) {
	t.Helper()
	routes, refused := Routes(h, nodes, best, g, Networks{})
	var got []string
	for _, r := range routes {
		kind := "plain"
		if r.Peer != nil {
			kind = "node " + r.Peer.Name
		}
		got = append(got, r.Prefix.String()+" via "+r.NextHop.String()+" ("+kind+")")
	}
	var why []string
	for _, r := range refused {
		why = append(why, r.Why)
	}
	return strings.Join(got, "; "), why
}

var over = Grace{Over: true}

// checkRoutes compares what describeAs gave with the routes wanted and the
// one refusal whose reason contains refused ("" = nothing refused).
func checkRoutes(t *testing.T, got string, why []string, want, refused string) {
	t.Helper()
	if got != want {
		t.Errorf("routes = %q, want %q", got, want)
	}
	switch {
	case refused == "" && len(why) > 0:
		t.Errorf("refused %q, want nothing refused", why)
	case refused != "" && (len(why) != 1 || !strings.Contains(why[0], refused)):
		t.Errorf("refused %q, want one refusal containing %q", why, refused)
	}
}

func TestRoutes(t *testing.T) {
	nodes := []registry.Node{h1, h2, h3}
	for _, c := range []struct {
		name    string
		best    []bgp.Route
		want    string
		refused string // part of the refusal's reason; "" = none
	}{
		{"a host's subnet from its owner", []bgp.Route{route("10.244.2.0/24", "192.0.2.2", "h2")}, "10.244.2.0/24 via 192.0.2.2 (node h2)", ""},
		{"a host's subnet from another host", []bgp.Route{route("10.244.2.0/24", "198.51.100.3", "h3")}, "",
			"10.244.2.0/24 belongs to host h2 (192.0.2.2), but the next hop is 198.51.100.3"},
		{"a /25 inside a host's subnet", []bgp.Route{route("10.244.2.0/25", "198.51.100.3", "h3")}, "",
			"10.244.2.0/25 is not the subnet 10.244.2.0/24 that host h2 holds"},
		{"a /32 inside a host's subnet, even from its owner", []bgp.Route{route("10.244.2.7/32", "192.0.2.2", "h2")}, "",
			"10.244.2.7/32 is not the subnet 10.244.2.0/24"},
		{"an unleased pool prefix from an outside router", []bgp.Route{route("10.244.9.0/24", "192.0.2.254", "tor")}, "",
			"10.244.9.0/24 is inside the pool 10.244.0.0/16 but no fabric host holds it"},
		{"a host's subnet via a router", []bgp.Route{route("10.244.3.0/24", "192.0.2.254", "tor")}, "",
			"10.244.3.0/24 belongs to host h3 (198.51.100.3), but the next hop is 192.0.2.254"},
		{"a default route from a top-of-rack router", []bgp.Route{route("0.0.0.0/0", "192.0.2.254", "tor")}, "0.0.0.0/0 via 192.0.2.254 (plain)", ""},
		{"an aggregate covering the pool", []bgp.Route{route("10.0.0.0/8", "192.0.2.254", "tor")}, "10.0.0.0/8 via 192.0.2.254 (plain)", ""},
		{"outside the pool via a fabric host", []bgp.Route{route("172.16.0.0/16", "192.0.2.2", "h2")}, "",
			"would be tunnelled, but 172.16.0.0/16 is outside the pool"},
		{"the underlay segment", []bgp.Route{route("192.0.2.0/25", "198.51.100.254", "tor")}, "",
			"it would take over this host's underlay segment 192.0.2.0/24"},
		{"our own subnet is skipped silently", []bgp.Route{route("10.244.1.0/24", "198.51.100.3", "h3")}, "", ""},
		{"our own path is skipped", []bgp.Route{route("10.244.5.0/24", "192.0.2.1", "h1")}, "", ""},
		{"inside the router's import prefixes", []bgp.Route{route("10.250.0.0/16", "192.0.2.254", "filtered")}, "10.250.0.0/16 via 192.0.2.254 (plain)", ""},
		{"outside the router's import prefixes", []bgp.Route{route("172.16.0.0/12", "192.0.2.254", "filtered")}, "",
			"peer filtered may only send routes inside [0.0.0.0/0 10.250.0.0/16]"},
		{"a longer prefix inside an allowed one", []bgp.Route{route("10.250.7.0/24", "192.0.2.254", "filtered")}, "10.250.7.0/24 via 192.0.2.254 (plain)", ""},
		{"the default route from a filtered router", []bgp.Route{route("0.0.0.0/0", "192.0.2.254", "filtered")}, "0.0.0.0/0 via 192.0.2.254 (plain)", ""},
	} {
		t.Run(c.name, func(t *testing.T) {
			got, why := describeAs(t, withImports, nodes, c.best, over)
			checkRoutes(t, got, why, c.want, c.refused)
		})
	}
}

func TestStartupGrace(t *testing.T) {
	nodes := []registry.Node{h1, h2, h3}
	tor := netip.MustParseAddr("192.0.2.254")
	g := Grace{Until: t0.Add(120 * time.Second), KeptAtStart: map[netip.Prefix]netip.Addr{
		h2.Subnet:                          h2.Address,
		netip.MustParsePrefix("0.0.0.0/0"): tor, // from the top-of-rack router
	}}
	keptBoth := "0.0.0.0/0 via 192.0.2.254 (plain); 10.244.2.0/24 via 192.0.2.2 (node h2)"
	peer := func(name string, established, eor bool) PeerSync {
		return PeerSync{Name: name, Established: established, GracefulRestart: true, EndOfRIB: eor}
	}

	// Right after a restart: no BGP route yet, but h2's subnet and the
	// router's default were in the kernel: both kept. h3's was not: a new
	// or dead peer gains nothing.
	if got, _ := describe(t, nodes, nil, g); got != keptBoth {
		t.Errorf("at start: %q, want %q", got, keptBoth)
	}
	// h2's session is up but has not sent End-of-RIB: still kept, however
	// long that takes (no timer but Until).
	g = g.Observe([]PeerSync{peer("h2", true, false), peer("h3", false, false), peer("tor", true, false)}, true, t0.Add(time.Second))
	g = g.Observe([]PeerSync{peer("h2", true, false), peer("h3", false, false), peer("tor", true, false)}, true, t0.Add(60*time.Second))
	if got, _ := describe(t, nodes, nil, g); got != keptBoth {
		t.Errorf("sessions up without End-of-RIB: %q, want %q", got, keptBoth)
	}
	// h2 has sent End-of-RIB without its subnet: it withdrew it, so it goes.
	// The router's default stays while any peer has not synced.
	g = g.Observe([]PeerSync{peer("h2", true, true), peer("h3", false, false), peer("tor", true, true)}, true, t0.Add(61*time.Second))
	if got, _ := describe(t, nodes, nil, g); got != "0.0.0.0/0 via 192.0.2.254 (plain)" {
		t.Errorf("h2 synced: %q, want only the router's default", got)
	}
	if g.Over {
		t.Fatal("grace over although h3 has not synced")
	}
	// A BGP route replaces a kept one.
	if got, _ := describe(t, nodes, []bgp.Route{route("0.0.0.0/0", "192.0.2.253", "tor2")}, g); got != "0.0.0.0/0 via 192.0.2.253 (plain)" {
		t.Errorf("BGP default next to a kept one: %q", got)
	}
	// Every peer synced: over; BGP alone decides.
	g = g.Observe([]PeerSync{peer("h2", true, true), peer("h3", true, true), peer("tor", true, true)}, true, t0.Add(62*time.Second))
	if !g.Over {
		t.Fatal("grace not over after every peer synced")
	}
	if got, _ := describe(t, nodes, nil, g); got != "" {
		t.Errorf("after the grace without BGP routes: %q, want nothing", got)
	}

	// A peer without graceful restart sends no End-of-RIB: settled after
	// SessionSettle instead.
	plain := Grace{Until: t0.Add(time.Hour), KeptAtStart: map[netip.Prefix]netip.Addr{h2.Subnet: h2.Address}}
	noGR := []PeerSync{{Name: "h2", Established: true}}
	plain = plain.Observe(noGR, true, t0)
	if got, _ := describe(t, nodes, nil, plain); got == "" {
		t.Error("a just-established peer without graceful restart lost its kept route")
	}
	plain = plain.Observe(noGR, true, t0.Add(SessionSettle))
	if !plain.Over {
		t.Error("grace not over after the only peer settled")
	}

	// Until passed: over whatever the sessions.
	late := Grace{Until: t0, KeptAtStart: map[netip.Prefix]netip.Addr{h2.Subnet: h2.Address}}.Observe(nil, false, t0.Add(time.Millisecond))
	if !late.Over {
		t.Error("grace not over after Until")
	}
}

func TestAcceptNodes(t *testing.T) {
	otherASN := node("asn", "192.0.2.9", "10.244.9.0/24")
	otherASN.ASN = 65000
	loop := node("loop", "127.0.0.1", "10.244.10.0/24")
	mine := node("mine", "192.0.2.1", "10.244.11.0/24")
	dup := node("dup", "192.0.2.2", "10.244.12.0/24")
	everything := node("everything", "192.0.2.20", "0.0.0.0/0")
	stolen := node("stolen", "192.0.2.21", "10.244.2.0/24") // h2's subnet
	held := map[string][]netip.Prefix{
		"h2": {h2.Subnet}, "h3": {h3.Subnet}, "asn": {otherASN.Subnet}, "loop": {loop.Subnet},
		"mine": {mine.Subnet}, "dup": {dup.Subnet}, "everything": {netip.MustParsePrefix("10.244.20.0/24")},
		"stolen": {netip.MustParsePrefix("10.244.21.0/24")},
	}
	got, refused := AcceptNodes(self, []registry.Node{h1, h2, otherASN, loop, mine, dup, h3, everything, stolen}, held)
	var names []string
	for _, n := range got {
		names = append(names, n.Name)
	}
	if strings.Join(names, ",") != "h1,h2,h3" {
		t.Errorf("accepted %v, want h1,h2,h3", names)
	}
	want := map[string]string{
		"asn":        "its ASN 65000 differs from this host's 64512",
		"loop":       "its address 127.0.0.1 cannot be a peer",
		"mine":       "it claims this host's underlay address 192.0.2.1",
		"dup":        "node h2 already has address 192.0.2.2",
		"everything": "its subnet 0.0.0.0/0 is not leased to it (etcd leases it [10.244.20.0/24])",
		"stolen":     "its subnet 10.244.2.0/24 is not leased to it (etcd leases it [10.244.21.0/24])",
	}
	if len(refused) != len(want) {
		t.Errorf("refused %+v", refused)
	}
	for _, r := range refused {
		if !strings.Contains(r.Why, want[r.Name]) || want[r.Name] == "" {
			t.Errorf("refusal of %s: %q, want %q", r.Name, r.Why, want[r.Name])
		}
	}
}

// A WireGuard key is used only from a record that passes the lease check,
// only when it is a key, not this host's and claimed by one record alone;
// a refused key leaves the host in the mesh as one that cannot encrypt.
func TestAcceptNodesWireGuardKeys(t *testing.T) {
	key := func(b byte) string { return base64.StdEncoding.EncodeToString(bytes.Repeat([]byte{b}, 32)) }
	me := self
	me.WireGuardKey = key(1)
	with := func(n registry.Node, k string) registry.Node { n.WireGuardKey = k; return n }
	good := with(h2, key(2))
	h3own := with(h3, key(1))                                            // this host's key
	a := with(node("a", "192.0.2.30", "10.244.30.0/24"), key(3))         // one key,
	b := with(node("b", "192.0.2.31", "10.244.31.0/24"), key(3))         // two records
	bad := with(node("bad", "192.0.2.32", "10.244.32.0/24"), "c2hvcnQ=") // 5 bytes
	zero := with(node("zero", "192.0.2.33", "10.244.33.0/24"), key(0))
	// A forged record for a subnet not leased to it gives no key at all.
	forged := with(node("forged", "192.0.2.34", "10.244.2.0/24"), key(4))
	held := map[string][]netip.Prefix{"h2": {h2.Subnet}, "h3": {h3.Subnet}, "a": {a.Subnet}, "b": {b.Subnet},
		"bad": {bad.Subnet}, "zero": {zero.Subnet}, "forged": {netip.MustParsePrefix("10.244.34.0/24")}}
	got, refused := AcceptNodes(me, []registry.Node{with(h1, key(1)), good, h3own, a, b, bad, zero, forged}, held)
	keys := map[string]string{}
	for _, n := range got {
		keys[n.Name] = n.WireGuardKey
	}
	want := map[string]string{"h1": key(1), "h2": key(2), "h3": "", "a": "", "b": "", "bad": "", "zero": ""}
	if !maps.Equal(keys, want) {
		t.Errorf("accepted keys %v, want %v", keys, want)
	}
	why := map[string]string{}
	for _, r := range refused {
		why[r.Name] = r.Why
	}
	for name, w := range map[string]string{
		"h3": "its WireGuard key is this host's own", "a": "is in 2 node records", "b": "is in 2 node records",
		"bad": "is not a base64 WireGuard key", "zero": "the all-zero key", "forged": "is not leased to it",
	} {
		if !strings.Contains(why[name], w) {
			t.Errorf("refusal of %s: %q, want %q", name, why[name], w)
		}
	}
}

func TestDepartedNodes(t *testing.T) {
	names := func(ns []registry.Node) string {
		var out []string
		for _, n := range ns {
			out = append(out, n.Name)
		}
		return strings.Join(out, ",")
	}
	prev := []registry.Node{h1, h2, h3}
	// h2's record is gone while its session is up: kept.
	set := Nodes(self, []registry.Node{h1, h3}, prev, nil, map[string]bool{"h2": true, "h3": true}, time.Hour, t0)
	if names(set.Nodes) != "h1,h2,h3" || len(set.Departed) != 1 {
		t.Fatalf("record gone, session up: nodes %s, departed %v", names(set.Nodes), set.Departed)
	}
	// h3's record goes while its session is down: gone at once.
	set = Nodes(self, []registry.Node{h1}, set.Nodes, set.Departed, map[string]bool{"h2": true}, time.Hour, t0.Add(time.Second))
	if names(set.Nodes) != "h1,h2" {
		t.Errorf("record and session gone: nodes %s, want h1,h2", names(set.Nodes))
	}
	// h2 kept no longer than maxAway, even in session: the set says when
	// to look again, and at that moment h2 goes, not a moment earlier.
	if set.Recheck.IsZero() {
		t.Fatal("h2 kept, but no time to look again")
	}
	before := Nodes(self, []registry.Node{h1}, set.Nodes, set.Departed, map[string]bool{"h2": true}, time.Hour, set.Recheck.Add(-time.Nanosecond))
	if names(before.Nodes) != "h1,h2" || !before.Recheck.Equal(set.Recheck) {
		t.Errorf("just before the recheck time %s: nodes %s, recheck %s", set.Recheck, names(before.Nodes), before.Recheck)
	}
	kept := Nodes(self, []registry.Node{h1}, set.Nodes, set.Departed, map[string]bool{"h2": true}, time.Hour, set.Recheck)
	if names(kept.Nodes) != "h1" || len(kept.Departed) != 0 || !kept.Recheck.IsZero() {
		t.Errorf("at the recheck time %s (maxAway after it left): nodes %s, departed %v, next recheck %s", set.Recheck, names(kept.Nodes), kept.Departed, kept.Recheck)
	}
	if set.Recheck.After(t0.Add(time.Hour + time.Second)) {
		t.Errorf("recheck at %s, later than maxAway after h2 left (%s)", set.Recheck, t0)
	}
	// h2's session drops: gone.
	down := Nodes(self, []registry.Node{h1}, set.Nodes, set.Departed, map[string]bool{}, time.Hour, t0.Add(3*time.Second))
	if names(down.Nodes) != "h1" || !slices.ContainsFunc(down.Events, func(e string) bool { return strings.Contains(e, "node h2: departed and its session is down") }) {
		t.Errorf("session down: nodes %s, events %q", names(down.Nodes), down.Events)
	}
	// Its record comes back: a plain member again.
	back := Nodes(self, []registry.Node{h1, h2}, set.Nodes, set.Departed, map[string]bool{"h2": true}, time.Hour, t0.Add(4*time.Second))
	if names(back.Nodes) != "h1,h2" || len(back.Departed) != 0 {
		t.Errorf("record back: nodes %s, departed %v", names(back.Nodes), back.Departed)
	}
	// A departed host's subnet is still routed while it is kept.
	got, _ := describe(t, set.Nodes, []bgp.Route{route("10.244.2.0/24", "192.0.2.2", "h2")}, over)
	if got != "10.244.2.0/24 via 192.0.2.2 (node h2)" {
		t.Errorf("departed host's route: %q", got)
	}
}

// A host with no peers at all has nothing to wait for once the registry has
// been read; before that, no peers means none known yet.
func TestGraceWithoutPeers(t *testing.T) {
	g := Grace{Until: t0.Add(time.Hour), KeptAtStart: map[netip.Prefix]netip.Addr{netip.MustParsePrefix("10.99.1.0/24"): tor()}}
	if g.Observe(nil, false, t0).Over {
		t.Error("grace over before the peer set is known")
	}
	if !g.Observe(nil, true, t0).Over {
		t.Error("grace not over for a host with no peers")
	}
}

func tor() netip.Addr { return netip.MustParseAddr("192.0.2.254") }

func TestFabricPeers(t *testing.T) {
	rr := func(n registry.Node) registry.Node { n.RouteReflector = true; return n }
	h4 := node("h4", "192.0.2.4", "10.244.4.0/24")
	describe := func(peers []bgp.Peer) string {
		var out []string
		for _, p := range peers {
			dial := "dials"
			if p.Passive {
				dial = "waits"
			}
			out = append(out, p.Name+":"+string(p.Type)+":"+dial)
		}
		return strings.Join(out, " ")
	}
	for _, c := range []struct {
		name     string
		reflects bool
		nodes    []registry.Node
		want     string
	}{
		{"full mesh without reflectors", false, []registry.Node{h1, h2, h3, h4}, "h2:mesh:dials h3:mesh:dials h4:mesh:dials"},
		{"a client peers only with the reflectors", false, []registry.Node{h1, rr(h2), rr(h3), h4}, "h2:route-reflector:dials h3:route-reflector:dials"},
		{"a reflector peers with everyone", true, []registry.Node{rr(h1), rr(h2), h3, h4}, "h2:mesh:dials h3:rr-client:dials h4:rr-client:dials"},
		{"the only reflector", true, []registry.Node{rr(h1), h2, h4}, "h2:rr-client:dials h4:rr-client:dials"},
	} {
		if got := describe(FabricPeers(self, c.reflects, c.nodes, 179)); got != c.want {
			t.Errorf("%s: %s, want %s", c.name, got, c.want)
		}
	}
	// The higher address waits for the lower one to dial.
	high := self
	high.Underlay = netip.MustParsePrefix("192.0.2.200/24")
	if got := describe(FabricPeers(high, false, []registry.Node{h2}, 179)); got != "h2:mesh:waits" {
		t.Errorf("higher address: %s, want h2:mesh:waits", got)
	}
}

// Routes inside a Docker network's subnet: a host's block and an address it
// gives outside its blocks are accepted from that host only; anything else
// inside the subnet is refused; this host's own blocks are not routed to a
// peer.
func TestRoutesInNetworks(t *testing.T) {
	nets := Networks{
		Subnets: []netip.Prefix{netip.MustParsePrefix("172.16.1.0/24"), netip.MustParsePrefix("fd00:16:1::/64")},
		Owners: map[netip.Prefix]string{
			netip.MustParsePrefix("172.16.1.0/28"):         "h2",
			netip.MustParsePrefix("172.16.1.16/28"):        "h1",
			netip.MustParsePrefix("172.16.1.20/32"):        "h3", // --ip inside h1's block
			netip.MustParsePrefix("fd00:16:1::/68"):        "h2", // the IPv6 block of h2's
			netip.MustParsePrefix("fd00:16:1:0:1000::/68"): "h1",
		},
	}
	h2v6 := h2
	h2v6.AddressV6 = netip.MustParseAddr("fd99::2") // its IPv6 next hop for routers
	nodes := []registry.Node{h1, h2v6, h3}
	for _, c := range []struct {
		name, route, want, refused string
	}{
		{"h2's block from h2", "172.16.1.0/28 via 192.0.2.2", "172.16.1.0/28 via 192.0.2.2 (node h2)", ""},
		{"h2's IPv6 block via h2's IPv6 address, through its tunnel", "fd00:16:1::/68 via fd99::2", "fd00:16:1::/68 via 192.0.2.2 (node h2)", ""},
		{"h2's block from h3 is refused", "172.16.1.0/28 via 198.51.100.3", "", "held by host h2"},
		{"h3's address inside h1's block, from h3", "172.16.1.20/32 via 198.51.100.3", "172.16.1.20/32 via 198.51.100.3 (node h3)", ""},
		{"a /32 inside h2's block from h3 is refused", "172.16.1.3/32 via 198.51.100.3", "", "no block or address"},
		{"a wider prefix over the network is refused", "172.16.1.0/25 via 192.0.2.2", "", "no block or address"},
		{"this host's own block is not routed to a peer", "172.16.1.16/28 via 192.0.2.2", "", ""},
		{"h2's IPv6 block from h2, through its tunnel", "fd00:16:1::/68 via 192.0.2.2", "fd00:16:1::/68 via 192.0.2.2 (node h2)", ""},
		{"h2's IPv6 block from h3 is refused", "fd00:16:1::/68 via 198.51.100.3", "", "held by host h2"},
		{"a /80 inside h2's IPv6 block is refused", "fd00:16:1::/80 via 192.0.2.2", "", "no block or address"},
	} {
		t.Run(c.name, func(t *testing.T) {
			prefix, nh, _ := strings.Cut(c.route, " via ")
			got, why := func() (string, []string) {
				routes, refused := Routes(self, nodes, []bgp.Route{route(prefix, nh, "peer")}, over, nets)
				var out []string
				for _, r := range routes {
					kind := "plain"
					if r.Peer != nil {
						kind = "node " + r.Peer.Name
					}
					out = append(out, r.Prefix.String()+" via "+r.NextHop.String()+" ("+kind+")")
				}
				var ws []string
				for _, r := range refused {
					ws = append(ws, r.Why)
				}
				return strings.Join(out, "; "), ws
			}()
			if got != c.want {
				t.Errorf("routes %q, want %q", got, c.want)
			}
			if (c.refused == "") != (len(why) == 0) || (c.refused != "" && !strings.Contains(why[0], c.refused)) {
				t.Errorf("refused %q, want one saying %q", why, c.refused)
			}
		})
	}
}

// TestPeers: external peers keep their kind and route limit; a fabric host
// at an external peer's address is not peered with twice; mesh off leaves
// only the external peers.
func TestPeers(t *testing.T) {
	ext := []config.ExternalPeer{
		{Name: "tor", Address: "192.0.2.254", Addr: netip.MustParseAddr("192.0.2.254"), ASN: 65000},
		{Address: "192.0.2.253", Addr: netip.MustParseAddr("192.0.2.253"), ASN: 64512, Type: "route-reflector"},
	}
	clash := node("h9", "192.0.2.254", "10.244.9.0/24")
	got := Peers(self, ext, true, false, []registry.Node{h1, h2, clash}, 179)
	var desc []string
	for _, p := range got {
		desc = append(desc, fmt.Sprintf("%s %s %s %d", p.Name, p.Address, p.Type, p.MaxPrefixes))
	}
	want := "tor 192.0.2.254 external 1000; 192.0.2.253 192.0.2.253 route-reflector 0; h2 192.0.2.2 mesh 0"
	if strings.Join(desc, "; ") != want {
		t.Errorf("peers %q, want %q", strings.Join(desc, "; "), want)
	}
	if got := Peers(self, ext, false, false, []registry.Node{h1, h2}, 179); len(got) != 2 {
		t.Errorf("mesh off: %d peers, want the 2 external ones", len(got))
	}
	// BFD: every fabric host; of the routers only the one with bfd: true,
	// and it is no fabric host even where a node record claims its address.
	ext[0].BFD = true
	var bfd []string
	for _, p := range BFDPeers(got, ext) {
		bfd = append(bfd, fmt.Sprintf("%s %s %v", p.Name, p.Addr, p.FabricHost))
	}
	if want := "tor 192.0.2.254 false; h2 192.0.2.2 true"; strings.Join(bfd, "; ") != want {
		t.Errorf("bfd peers %q, want %q", strings.Join(bfd, "; "), want)
	}
	if imp := Imports([]config.ExternalPeer{{Name: "tor", Imports: []netip.Prefix{netip.MustParsePrefix("0.0.0.0/0")}}, {Name: "open"}}); len(imp) != 1 || len(imp["tor"]) != 1 {
		t.Errorf("imports %v", imp)
	}
}
