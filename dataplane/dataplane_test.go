package dataplane

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"os/exec"
	"strings"
	"testing"

	"github.com/fabricnet/fabric/backend"
	"github.com/fabricnet/fabric/internal/testlog"
	"github.com/fabricnet/fabric/ipip"
	"github.com/fabricnet/fabric/lab"
	"github.com/fabricnet/fabric/vxlanfallback"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

const testVXLANPort = 8472 // not the default, on purpose

// Test modes: which backends a manager gets, as fabricd's encaps.Select
// would pick them.
const (
	modeVXLAN = "vxlan" // vxlan only
	modeAuto  = "auto"  // ipip (with testOpts.ipip) then vxlan
)

type testOpts struct {
	mode        string
	crossSubnet bool
	logs        *testlog.Buffer
	ipip        bool
}

// manager builds the vxlan backend and a Manager for host h, as fabricd would.
func (l *nsLab) manager(h *labHost, o testOpts) *Manager {
	l.t.Helper()
	logger := lab.Logger(l.t)
	if o.logs != nil {
		logger = slog.New(slog.NewTextHandler(o.logs, nil))
	}
	logger = logger.With("host", h.ns)
	vx, err := vxlanfallback.New(vxlanfallback.Config{
		Handle: h.handle, Port: testVXLANPort, UnderlayAddr: h.addr, UnderlayDev: h.underlayDev,
		Subnet: h.subnet, Logger: logger,
	})
	if err != nil {
		l.t.Fatal(err)
	}
	cfg := Config{
		Handle: h.handle, CrossSubnet: o.crossSubnet, UnderlayDev: h.underlayDev,
		UnderlayAddr: h.addr, Logger: logger,
	}
	if o.ipip && o.mode == modeAuto {
		ip, err := ipip.New(ipip.Config{Handle: h.handle, UnderlayAddr: h.addr, Subnet: h.subnet, Logger: logger})
		if err != nil {
			l.t.Fatal(err)
		}
		cfg.Backends = append(cfg.Backends, ip)
	}
	cfg.Backends = append(cfg.Backends, vx)
	m, err := New(cfg)
	if err != nil {
		l.t.Fatal(err)
	}
	l.setContainerMTU(h, m.MTU())
	return m
}

func ownedRoutes(t *testing.T, h *netlink.Handle, proto int) map[netip.Prefix]netlink.Route {
	t.Helper()
	routes, err := h.RouteListFiltered(unix.AF_INET, &netlink.Route{Protocol: netlink.RouteProtocol(proto), Table: unix.RT_TABLE_MAIN},
		netlink.RT_FILTER_PROTOCOL|netlink.RT_FILTER_TABLE)
	if err != nil {
		t.Fatal(err)
	}
	out := map[netip.Prefix]netlink.Route{}
	for _, r := range routes {
		out[prefixOf(r.Dst)] = r
	}
	return out
}

func linkName(t *testing.T, h *netlink.Handle, index int) string {
	t.Helper()
	l, err := h.LinkByIndex(index)
	if err != nil {
		t.Fatalf("link %d: %v", index, err)
	}
	return l.Attrs().Name
}

// Apply works from its view of the kernel; a route removed behind its back
// comes back at the next Reread (the agent's resync timer), and a route
// withdrawn from the input leaves the kernel without one.
func TestDriftRepairAndWithdrawalWithTheView(t *testing.T) {
	t.Parallel() // each test has its own namespaces: in the TCG guest, 7 min one after another
	l := newLab(t, 3)
	ctx := context.Background()
	h := l.hosts[0]
	m := l.manager(h, testOpts{mode: modeVXLAN})
	routes := l.routesFor(h)
	if err := m.Apply(ctx, routes); err != nil {
		t.Fatal(err)
	}
	gone := routes[0].Prefix
	r := ownedRoutes(t, h.handle, DefaultProtocol)[gone]
	if err := h.handle.RouteDel(&r); err != nil {
		t.Fatal(err)
	}
	m.Reread()
	if err := m.Apply(ctx, routes); err != nil {
		t.Fatal(err)
	}
	if _, ok := ownedRoutes(t, h.handle, DefaultProtocol)[gone]; !ok {
		t.Fatalf("route %s deleted by hand is still missing after Reread and Apply", gone)
	}
	// Withdrawn from the input: gone from the kernel at once.
	if err := m.Apply(ctx, routes[1:]); err != nil {
		t.Fatal(err)
	}
	if got := ownedRoutes(t, h.handle, DefaultProtocol); len(got) != len(routes)-1 {
		t.Fatalf("after withdrawing %s the kernel holds %d routes, want %d", gone, len(got), len(routes)-1)
	} else if _, ok := got[gone]; ok {
		t.Fatalf("withdrawn route %s still in the kernel", gone)
	}
}

func TestVXLANMeshPingAndTCP(t *testing.T) {
	t.Parallel() // each test has its own namespaces: in the TCG guest, 7 min one after another
	l := newLab(t, 3)
	ctx := context.Background()
	for _, h := range l.hosts {
		m := l.manager(h, testOpts{mode: modeVXLAN})
		if m.MTU() != 1450 {
			t.Fatalf("container MTU = %d, want 1450 for a 1500 underlay with vxlan", m.MTU())
		}
		if err := m.Apply(ctx, l.routesFor(h)); err != nil {
			t.Fatalf("apply on %s: %v", h.ns, err)
		}
		// The device is what the peers expect: non-default port, stable MAC, MTU subtracted once.
		link, err := h.handle.LinkByName(vxlanfallback.DefaultDevice)
		if err != nil {
			t.Fatal(err)
		}
		vx := link.(*netlink.Vxlan)
		if vx.Port != testVXLANPort || vx.VxlanId != vxlanfallback.DefaultVNI || vx.Learning || vx.MTU != 1450 {
			t.Fatalf("vxlan device on %s: port %d vni %d learning %v mtu %d", h.ns, vx.Port, vx.VxlanId, vx.Learning, vx.MTU)
		}
		if vx.HardwareAddr.String() != vxlanfallback.MACFor(h.addr, netip.Prefix{}).String() {
			t.Fatalf("vxlan MAC %s, want %s", vx.HardwareAddr, vxlanfallback.MACFor(h.addr, netip.Prefix{}))
		}
		// Idempotent: a second Apply changes nothing.
		before := ownedRoutes(t, h.handle, DefaultProtocol)
		if err := m.Apply(ctx, l.routesFor(h)); err != nil {
			t.Fatal(err)
		}
		if after := ownedRoutes(t, h.handle, DefaultProtocol); fmt.Sprint(after) != fmt.Sprint(before) || len(after) != 2 {
			t.Fatalf("second apply changed routes:\n%v\n%v", before, after)
		}
		owned, err := m.Owned()
		if err != nil || len(owned) != 2 || owned[0].Encap != vxlanfallback.Name || owned[0].Dev != vxlanfallback.DefaultDevice || owned[0].PeerName == "" {
			t.Fatalf("Owned() = %+v, %v", owned, err)
		}
	}
	for _, a := range l.hosts {
		for _, b := range l.hosts {
			if a == b {
				continue
			}
			if err := lab.Ping(a.ctr, b.ctrAddr, 56, false); err != nil {
				t.Errorf("ping %s -> %s: %v", a.ctr, b.ctrAddr, err)
			}
			if err := tcpExchange(a.ctr, b.ctr, b.ctrAddr); err != nil {
				t.Errorf("tcp %s -> %s: %v", a.ctr, b.ctrAddr, err)
			}
		}
	}

	// MTU: the largest unfragmented ping fits the tunnel; one byte more fails
	// at the sender with EMSGSIZE instead of vanishing on the way.
	a, b := l.hosts[0], l.hosts[1]
	if err := lab.Ping(a.ctr, b.ctrAddr, 1450-28, true); err != nil {
		t.Errorf("DF ping with 1422 bytes: %v", err)
	}
	if err := lab.Ping(a.ctr, b.ctrAddr, 1450-28+1, true); !errors.Is(err, unix.EMSGSIZE) {
		t.Errorf("DF ping with 1423 bytes: got %v, want message too long", err)
	}
	// Host-originated traffic to a remote container takes the tunnel address as source.
	if err := lab.Ping(a.ns, b.ctrAddr, 56, false); err != nil {
		t.Errorf("ping from host %s to remote container: %v", a.ns, err)
	}
}

func TestStaleRoutesSweptForeignRoutesKept(t *testing.T) {
	t.Parallel() // each test has its own namespaces: in the TCG guest, 7 min one after another
	l := newLab(t, 2)
	h1 := l.hosts[0]
	// Leftovers of an earlier run (ours) and routes of others, planted before the first Apply.
	lab.Run(t, "ip", "-n", h1.ns, "route", "add", "10.244.9.0/24", "via", "192.168.100.12", "proto", "93")
	lab.Run(t, "ip", "-n", h1.ns, "route", "add", "10.244.8.0/24", "via", "192.168.100.12", "proto", "static")
	lab.Run(t, "ip", "-n", h1.ns, "route", "add", "10.244.7.0/24", "via", "192.168.100.12", "proto", "12")
	lab.Run(t, "ip", "-n", h1.ns, "route", "add", "10.251.0.0/16", "via", "192.168.100.12", "proto", "static")
	m := l.manager(h1, testOpts{mode: modeVXLAN})

	routes := l.routesFor(h1)
	// A route fabric wants but another protocol already holds: reported, not taken over.
	routes = append(routes, RemoteRoute{Prefix: netip.MustParsePrefix("10.251.0.0/16"), NextHop: netip.MustParseAddr("192.168.100.13")})
	err := m.Apply(context.Background(), routes)
	if err == nil || !strings.Contains(err.Error(), "10.251.0.0/16") {
		t.Errorf("apply: got %v, want an error naming 10.251.0.0/16", err)
	}

	out := lab.Run(t, "ip", "-n", h1.ns, "route", "show")
	if strings.Contains(out, "10.244.9.0/24") {
		t.Errorf("stale proto 93 route survived:\n%s", out)
	}
	for _, want := range []string{
		"10.244.8.0/24 via 192.168.100.12 dev " + h1.underlayDev + " proto static",
		"10.251.0.0/16 via 192.168.100.12 dev " + h1.underlayDev + " proto static",
		"10.244.2.0/24 via 10.244.2.0 dev fabric.vxlan proto 93 onlink",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("missing %q in:\n%s", want, out)
		}
	}
	if _, ok := ownedRoutes(t, h1.handle, 12)[netip.MustParsePrefix("10.244.7.0/24")]; !ok {
		t.Errorf("route with protocol 12 was removed:\n%s", out)
	}
	// The one failed route did not stop the good one from working.
	l.manager(l.hosts[1], testOpts{mode: modeVXLAN}).Apply(context.Background(), l.routesFor(l.hosts[1]))
	if err := lab.Ping(h1.ctr, l.hosts[1].ctrAddr, 56, false); err != nil {
		t.Error(err)
	}
}

func TestPeerDepartureAndCleanup(t *testing.T) {
	t.Parallel() // each test has its own namespaces: in the TCG guest, 7 min one after another
	l := newLab(t, 3)
	ctx := context.Background()
	var h1Manager *Manager
	for _, h := range l.hosts {
		m := l.manager(h, testOpts{mode: modeVXLAN})
		if err := m.Apply(ctx, l.routesFor(h)); err != nil {
			t.Fatal(err)
		}
		if h == l.hosts[0] {
			h1Manager = m
		}
	}
	h1, h2, h3 := l.hosts[0], l.hosts[1], l.hosts[2]
	if err := lab.Ping(h1.ctr, h3.ctrAddr, 56, false); err != nil {
		t.Fatal(err)
	}
	state := func() (neigh, fdb string) {
		neigh = lab.Run(t, "ip", "-n", h1.ns, "neigh", "show", "dev", vxlanfallback.DefaultDevice)
		fdb = lab.Run(t, "bridge", "-n", h1.ns, "fdb", "show", "dev", vxlanfallback.DefaultDevice)
		return
	}
	mac3 := vxlanfallback.MACFor(h3.addr, netip.Prefix{}).String()
	neigh, fdb := state()
	if !strings.Contains(neigh, "10.244.3.0 lladdr "+mac3+" PERMANENT") || !strings.Contains(fdb, mac3+" dst 192.168.100.13") {
		t.Fatalf("peer state for h3 missing:\n%s\n%s", neigh, fdb)
	}

	// h3 leaves: BGP withdraws its route.
	if err := h1Manager.Apply(ctx, l.routesFor(h1, h3)); err != nil {
		t.Fatal(err)
	}
	if _, ok := ownedRoutes(t, h1.handle, DefaultProtocol)[h3.subnet]; ok {
		t.Error("route to departed peer h3 still installed")
	}
	neigh, fdb = state()
	if strings.Contains(neigh, "10.244.3.0") || strings.Contains(fdb, mac3) {
		t.Errorf("tunnel state of departed peer h3 left behind:\n%s\n%s", neigh, fdb)
	}
	// Stays withdrawn: nothing remembers it and puts it back.
	if err := h1Manager.Apply(ctx, l.routesFor(h1, h3)); err != nil {
		t.Fatal(err)
	}
	if _, ok := ownedRoutes(t, h1.handle, DefaultProtocol)[h3.subnet]; ok {
		t.Error("withdrawn route came back on the next Apply")
	}
	if _, ok := h1Manager.Choices()[h3.ns]; ok {
		t.Error("Encapsulations still lists departed peer")
	}
	if err := lab.Ping(h1.ctr, h3.ctrAddr, 56, false); err == nil {
		t.Error("departed peer's containers still reachable")
	}
	if err := lab.Ping(h1.ctr, h2.ctrAddr, 56, false); err != nil {
		t.Errorf("remaining peer h2 unreachable after h3 left: %v", err)
	}

	// fabricd --cleanup
	lab.Run(t, "ip", "-n", h1.ns, "route", "add", "10.244.8.0/24", "via", "192.168.100.12", "proto", "static")
	if err := Cleanup(h1.handle, DefaultProtocol); err != nil {
		t.Fatal(err)
	}
	if err := backend.DeleteLink(h1.handle, vxlanfallback.DefaultDevice); err != nil { // the backend's own cleanup (encaps.Kind.Cleanup)
		t.Fatal(err)
	}
	if owned := ownedRoutes(t, h1.handle, DefaultProtocol); len(owned) != 0 {
		t.Errorf("routes with our protocol after Cleanup: %v", owned)
	}
	if _, err := h1.handle.LinkByName(vxlanfallback.DefaultDevice); err == nil {
		t.Error("vxlan device still exists after Cleanup")
	}
	if !strings.Contains(lab.Run(t, "ip", "-n", h1.ns, "route", "show"), "10.244.8.0/24 via 192.168.100.12") {
		t.Error("Cleanup removed a static route")
	}
}

func TestCrossSubnetDirectRoute(t *testing.T) {
	t.Parallel() // each test has its own namespaces: in the TCG guest, 7 min one after another
	l := newLab(t, 2)
	ctx := context.Background()
	for _, h := range l.hosts {
		m := l.manager(h, testOpts{mode: modeVXLAN, crossSubnet: true})
		if err := m.Apply(ctx, l.routesFor(h)); err != nil {
			t.Fatal(err)
		}
		peer := l.hosts[2-h.n]
		r, ok := ownedRoutes(t, h.handle, DefaultProtocol)[peer.subnet]
		if !ok || linkName(t, h.handle, r.LinkIndex) != h.underlayDev || !r.Gw.Equal(peer.addr.AsSlice()) {
			t.Fatalf("route to %s on %s: %+v, want via %s dev %s", peer.subnet, h.ns, r, peer.addr, h.underlayDev)
		}
		if got := m.Choices()[peer.ns].Encap; got != EncapDirect {
			t.Errorf("encapsulation of %s = %q, want direct", peer.ns, got)
		}
		if _, err := h.handle.LinkByName(vxlanfallback.DefaultDevice); err == nil {
			t.Error("vxlan device created though no peer uses it")
		}
		owned, _ := m.Owned()
		if len(owned) != 1 || owned[0].Encap != EncapDirect || owned[0].PeerName != peer.ns {
			t.Errorf("Owned() = %+v", owned)
		}
	}
	if err := lab.Ping(l.hosts[0].ctr, l.hosts[1].ctrAddr, 56, false); err != nil {
		t.Error(err)
	}
	if err := tcpExchange(l.hosts[1].ctr, l.hosts[0].ctr, l.hosts[0].ctrAddr); err != nil {
		t.Error(err)
	}
}

func TestTopOfRackRouteIsPlain(t *testing.T) {
	t.Parallel() // each test has its own namespaces: in the TCG guest, 7 min one after another
	l := newLab(t, 2)
	h1, router := l.hosts[0], l.hosts[1]
	// h2 plays a top-of-rack router that owns 10.250.0.0/16.
	lab.Run(t, "ip", "-n", router.ns, "addr", "add", "10.250.0.1/32", "dev", "lo")
	m := l.manager(h1, testOpts{mode: modeVXLAN})
	tor := netip.MustParsePrefix("10.250.0.0/16")
	if err := m.Apply(context.Background(), []RemoteRoute{{Prefix: tor, NextHop: router.addr, PeerName: "tor"}}); err != nil {
		t.Fatal(err)
	}
	r, ok := ownedRoutes(t, h1.handle, DefaultProtocol)[tor]
	if !ok || !r.Gw.Equal(router.addr.AsSlice()) || linkName(t, h1.handle, r.LinkIndex) != h1.underlayDev || r.Flags&int(netlink.FLAG_ONLINK) != 0 {
		t.Fatalf("ToR route = %+v, want plain 10.250.0.0/16 via %s", r, router.addr)
	}
	if _, err := h1.handle.LinkByName(vxlanfallback.DefaultDevice); err == nil {
		t.Error("vxlan device created for a non-fabric next hop")
	}
	if owned, _ := m.Owned(); len(owned) != 1 || owned[0].Encap != EncapNone {
		t.Errorf("Owned() = %+v", owned)
	}
	if err := lab.Ping(h1.ns, netip.MustParseAddr("10.250.0.1"), 56, false); err != nil {
		t.Error(err)
	}
}

// Auto mode runs ipip where the kernel has it and vxlan where it does not;
// the same test passes on both (the qemu guest lane runs it on a stock kernel).
func TestAutoModeFollowsTheKernel(t *testing.T) {
	t.Parallel() // each test has its own namespaces: in the TCG guest, 7 min one after another
	l := newLab(t, 2)
	h1, h2 := l.hosts[0], l.hosts[1]
	supported, err := ipip.Supported(h1.handle)
	if err != nil {
		t.Fatalf("ipip.Supported: %v", err)
	}
	// Ask the kernel independently.
	probe := l.prefix + "ipip"
	// A local address of its own keeps it from colliding with tunl0.
	kernelHas := exec.Command("ip", "-n", h1.ns, "link", "add", probe, "type", "ipip", "local", "127.3.4.5").Run() == nil
	exec.Command("ip", "-n", h1.ns, "link", "del", probe).Run()
	if supported != kernelHas {
		t.Fatalf("ipip.Supported = %v, but ip link add type ipip works: %v", supported, kernelHas)
	}
	if links, _ := h1.handle.LinkList(); strings.Contains(fmt.Sprint(links), "fabprobe") {
		t.Error("Supported left its probe device behind")
	}

	// What the agent does in auto mode: ipip first where the kernel has it.
	want, why, encaps := vxlanfallback.Name, "the peer runs vxlan", []string{"vxlan"}
	if supported {
		want, why, encaps = ipip.Name, "both hosts run ipip and IP protocol 4 passes", []string{"ipip", "vxlan"}
	}
	logs := &testlog.Buffer{}
	m := l.manager(h1, testOpts{mode: modeAuto, ipip: supported, logs: logs})
	l.manager(h2, testOpts{mode: modeAuto, ipip: supported}).Apply(context.Background(), []RemoteRoute{
		{Prefix: h1.subnet, NextHop: h1.addr, PeerName: h1.ns, Peer: h1.peerInfo(encaps...)}})
	routes := []RemoteRoute{{Prefix: h2.subnet, NextHop: h2.addr, PeerName: h2.ns, Peer: h2.peerInfo("ipip", "vxlan")}}
	for range 3 {
		if err := m.Apply(context.Background(), routes); err != nil {
			t.Fatal(err)
		}
	}
	if got := m.Choices()[h2.ns].Encap; got != want {
		t.Errorf("auto mode chose %q on a kernel with ipip=%v, want %q", got, supported, want)
	}
	text := logs.String()
	if n := strings.Count(text, `msg="peer encapsulation"`); n != 1 || !strings.Contains(text, fmt.Sprintf(`encap=%s reason="%s"`, want, why)) {
		t.Errorf("want one log line naming %s and why, got %d in:\n%s", want, n, text)
	}
	if err := lab.Ping(h1.ctr, h2.ctrAddr, 56, false); err != nil {
		t.Error(err)
	}
	t.Logf("kernel has ipip: %v; auto mode chose %s", supported, want)
}

// A restart with a changed configuration (vxlan -> cross-subnet direct) turns
// the existing kernel state into the new one: route replaced, tunnel entries gone.
func TestRestartWithChangedConfig(t *testing.T) {
	t.Parallel() // each test has its own namespaces: in the TCG guest, 7 min one after another
	l := newLab(t, 2)
	ctx := context.Background()
	h1, h2 := l.hosts[0], l.hosts[1]
	if err := l.manager(h1, testOpts{mode: modeVXLAN}).Apply(ctx, l.routesFor(h1)); err != nil {
		t.Fatal(err)
	}
	if err := l.manager(h2, testOpts{mode: modeVXLAN, crossSubnet: true}).Apply(ctx, l.routesFor(h2)); err != nil {
		t.Fatal(err)
	}
	before := ownedRoutes(t, h1.handle, DefaultProtocol)[h2.subnet]
	if linkName(t, h1.handle, before.LinkIndex) != vxlanfallback.DefaultDevice {
		t.Fatalf("first run: route %+v not over vxlan", before)
	}

	restarted := l.manager(h1, testOpts{mode: modeVXLAN, crossSubnet: true})
	if err := restarted.Apply(ctx, l.routesFor(h1)); err != nil {
		t.Fatal(err)
	}
	owned := ownedRoutes(t, h1.handle, DefaultProtocol)
	after := owned[h2.subnet]
	if len(owned) != 1 || linkName(t, h1.handle, after.LinkIndex) != h1.underlayDev || !after.Gw.Equal(h2.addr.AsSlice()) {
		t.Fatalf("after restart: %v, want one direct route via %s", owned, h2.addr)
	}
	if out := lab.Run(t, "ip", "-n", h1.ns, "neigh", "show", "dev", vxlanfallback.DefaultDevice); strings.Contains(out, "10.244.2.0") {
		t.Errorf("vxlan neighbour entry of a peer now reached directly:\n%s", out)
	}
	if err := lab.Ping(h1.ctr, h2.ctrAddr, 56, false); err != nil {
		t.Error(err)
	}
}

// A peer whose registry entry lacks a VTEP MAC gets an unreachable route
// (refused at once, not sent along the default route) and an error naming it; the other peers are unaffected.
func TestBadPeerDoesNotStopOthers(t *testing.T) {
	t.Parallel() // each test has its own namespaces: in the TCG guest, 7 min one after another
	l := newLab(t, 3)
	ctx := context.Background()
	h1, h2, h3 := l.hosts[0], l.hosts[1], l.hosts[2]
	for _, h := range l.hosts[1:] {
		if err := l.manager(h, testOpts{mode: modeVXLAN}).Apply(ctx, l.routesFor(h)); err != nil {
			t.Fatal(err)
		}
	}
	routes := l.routesFor(h1)
	routes[0].Peer.VTEPMAC = nil // h2
	err := l.manager(h1, testOpts{mode: modeVXLAN}).Apply(ctx, routes)
	if err == nil || !strings.Contains(err.Error(), h2.ns) || !strings.Contains(err.Error(), "10.244.2.0/24") {
		t.Errorf("apply: %v, want an error naming %s and its prefix", err, h2.ns)
	}
	owned := ownedRoutes(t, h1.handle, DefaultProtocol)
	if got := owned[h2.subnet]; got.Type != unix.RTN_UNREACHABLE {
		t.Errorf("route to a peer without VTEP MAC: %v, want unreachable (not the default route)", got)
	}
	if err := lab.Ping(h1.ctr, h2.ctrAddr, 56, false); err == nil {
		t.Error("a ping to the peer without VTEP MAC was answered")
	}
	if _, ok := owned[h3.subnet]; !ok {
		t.Fatal("route to the good peer missing")
	}
	if err := lab.Ping(h1.ctr, h3.ctrAddr, 56, false); err != nil {
		t.Error(err)
	}
}

// TestMultihopNextHopResolved: a route whose BGP next hop is not on a
// connected segment (an eBGP multihop peer, a reflected route) is installed
// via the gateway the kernel uses to reach that next hop.
func TestMultihopNextHopResolved(t *testing.T) {
	t.Parallel() // each test has its own namespaces: in the TCG guest, 7 min one after another
	l := newLab(t, 2)
	h1, router := l.hosts[0], l.hosts[1]
	// The multihop peer's address and the prefix it announces live behind
	// h2; h1 reaches the peer through a static route.
	lab.Run(t, "ip", "-n", router.ns, "addr", "add", "10.251.0.1/32", "dev", "lo")
	lab.Run(t, "ip", "-n", router.ns, "addr", "add", "10.250.0.1/32", "dev", "lo")
	lab.Run(t, "ip", "-n", h1.ns, "route", "add", "10.251.0.0/24", "via", router.addr.String())
	m := l.manager(h1, testOpts{mode: modeVXLAN})
	far := netip.MustParsePrefix("10.250.0.0/16")
	routes := []RemoteRoute{{Prefix: far, NextHop: netip.MustParseAddr("10.251.0.1"), PeerName: "multihop"}}
	if err := m.Apply(context.Background(), routes); err != nil {
		t.Fatal(err)
	}
	r, ok := ownedRoutes(t, h1.handle, DefaultProtocol)[far]
	if !ok || !r.Gw.Equal(router.addr.AsSlice()) {
		t.Fatalf("multihop route = %+v, want %s via the resolved gateway %s", r, far, router.addr)
	}
	if err := lab.Ping(h1.ns, netip.MustParseAddr("10.250.0.1"), 56, false); err != nil {
		t.Error(err)
	}
	// Applying again changes nothing (the resolved route is the desired one).
	if err := m.Apply(context.Background(), routes); err != nil {
		t.Fatal(err)
	}
	// A next hop nothing reaches is an error naming it, not a blackhole.
	err := m.Apply(context.Background(), []RemoteRoute{{Prefix: far, NextHop: netip.MustParseAddr("10.252.0.1"), PeerName: "lost"}})
	if err == nil || !strings.Contains(err.Error(), "next hop 10.252.0.1 is not reachable") {
		t.Errorf("unreachable next hop: %v", err)
	}
}
