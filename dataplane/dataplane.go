// Package dataplane turns the routes fabricd learns over BGP into kernel
// routes. Like Calico felix's route table it owns its routes by one route
// protocol number: every Apply recomputes the whole desired state from its
// input, lists the kernel routes carrying that protocol, and adds, replaces
// and deletes only the difference. There is no route cache that could bring a
// withdrawn route back, and the first Apply after a restart sweeps leftovers.
// Per peer it picks an encapsulation (ipip, vxlan or a direct route) and
// keeps each backend's tunnel state in step with the peers that use it.
package dataplane

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"net"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/fabricnet/fabric/backend"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// DefaultProtocol is the route protocol number fabricd marks its routes with
// (shown as "proto 93" by ip route). Protocols 0-4 belong to the kernel and
// to static configuration and are refused.
const DefaultProtocol = 93

// ipv6DefaultMetric is the metric the kernel gives an IPv6 route added
// without one; IPv4 routes keep 0.
const ipv6DefaultMetric = 1024

// Route kinds that are not an encapsulation, as reported by Choices and
// Owned beside the backends' names.
const (
	EncapDirect = "direct" // same L2 segment: plain route via the peer's underlay address
	EncapNone   = "none"   // next hop is not a fabric node (e.g. a top-of-rack router)
)

// Config configures a Manager.
type Config struct {
	Handle *netlink.Handle // nil = current namespace
	// Backends are the encapsulations this host runs, in order of
	// preference: each peer gets the first one usable for it (see
	// backend.Backend.Usable), or the last one when none is. With more
	// than one, every device stays up, since a peer may choose
	// differently about us.
	Backends     []backend.Backend
	CrossSubnet  bool // direct routes to peers inside the underlay's connected prefix
	Protocol     int  // default DefaultProtocol
	UnderlayDev  string
	UnderlayAddr netip.Addr
	UnderlayMTU  int // 0 = read from UnderlayDev
	Logger       *slog.Logger
}

// PeerInfo is what the node registry says about another fabric host.
type PeerInfo struct {
	Name    string
	Address netip.Addr       // underlay address
	VTEPMAC net.HardwareAddr // the peer's VXLAN device MAC
	Encaps  []string         // the encapsulations the peer runs
	Subnet  netip.Prefix     // the peer's container subnet
	// SubnetV6 is the peer's IPv6 subnet, invalid when it has none.
	SubnetV6 netip.Prefix
	// WireGuardKey is the peer's accepted WireGuard public key, or "".
	WireGuardKey string
}

// RemoteRoute is one route learned over BGP.
type RemoteRoute struct {
	Prefix   netip.Prefix
	NextHop  netip.Addr // BGP next hop
	PeerName string
	Peer     *PeerInfo // nil: the next hop is not a fabric node; install a plain via route
}

// OwnedRoute is a kernel route carrying our protocol.
type OwnedRoute struct {
	Prefix   netip.Prefix
	Via      netip.Addr
	Dev      string
	Encap    string
	PeerName string
}

// Choice is one peer's encapsulation and why it was chosen.
type Choice struct {
	Encap  string // a backend's name, or "direct"
	Reason string
	// EncapV6 carries the peer's IPv6 subnet when it is not Encap (a
	// direct route, or ipip): a backend's name, "" for Encap or no IPv6.
	EncapV6 string
}

// LocalRoute is a route to something on this host: a container endpoint's
// link (Dev), or, with no Dev, an unreachable route (addresses this host
// hands out but has not given: they must not follow the default route).
type LocalRoute struct {
	Prefix netip.Prefix
	Dev    string
	// KeepInside leaves the kernel's routes inside Prefix as they are,
	// instead of routing Prefix: while what they lead to is not known yet
	// (the endpoints, before dockerd has answered after a restart).
	KeepInside bool
}

// kernel is the part of netlink the data plane reads and writes through
// (*netlink.Handle): one seam, so what is decided above it (Plan) needs no
// kernel to be tested.
type kernel interface {
	RouteListFiltered(family int, filter *netlink.Route, filterMask uint64) ([]netlink.Route, error)
	RouteAdd(*netlink.Route) error
	RouteReplace(*netlink.Route) error
	RouteDel(*netlink.Route) error
	RouteGet(net.IP) ([]netlink.Route, error)
	LinkByName(string) (netlink.Link, error)
	LinkByIndex(int) (netlink.Link, error)
	AddrList(netlink.Link, int) ([]netlink.Addr, error)
}

// Manager owns the routes with its protocol number in the main table and the
// tunnel state of its backends.
type Manager struct {
	cfg         Config
	h           kernel
	log         *slog.Logger
	underlayMTU int
	mtu         int

	mu      sync.Mutex
	choices map[string]Choice       // peer name -> current encapsulation; for logging changes and status
	owners  map[netip.Prefix]string // prefix -> peer name of the last Apply; display only, never re-applied
	// view is the kernel's routes with our protocol as this Manager last
	// read or wrote them; nil: read the kernel at the next Apply.
	view map[netip.Prefix]*netlink.Route
}

// New checks cfg against the kernel (underlay device, MTU) and computes the
// container MTU once. It changes nothing in the kernel.
func New(cfg Config) (*Manager, error) {
	if cfg.Protocol == 0 {
		cfg.Protocol = DefaultProtocol
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	if cfg.Protocol <= unix.RTPROT_STATIC || cfg.Protocol > 255 {
		return nil, fmt.Errorf("route protocol %d: must be 5..255 (0-4 belong to the kernel and static routes)", cfg.Protocol)
	}
	if len(cfg.Backends) == 0 {
		return nil, errors.New("data plane needs at least one encapsulation")
	}
	if cfg.UnderlayDev == "" {
		return nil, errors.New("data plane needs the underlay device name")
	}
	h := backend.DefaultHandle(cfg.Handle)
	underlayMTU := cfg.UnderlayMTU
	if underlayMTU == 0 {
		link, err := h.LinkByName(cfg.UnderlayDev)
		if err != nil {
			return nil, fmt.Errorf("underlay device %s: %w", cfg.UnderlayDev, err)
		}
		underlayMTU = link.Attrs().MTU
	}
	m := &Manager{
		cfg:         cfg,
		h:           h,
		log:         cfg.Logger.With("component", "dataplane"),
		underlayMTU: underlayMTU,
		choices:     map[string]Choice{},
		owners:      map[netip.Prefix]string{},
	}
	// The one place an overhead is subtracted from the underlay MTU: the
	// largest overhead any peer might get in this mode. Containers, the
	// bridge and every tunnel device get this one MTU, so a sender told the
	// path MTU by a tunnel learns a size the far side's bridge also takes
	// (an IPIP device at underlay-20 would say 1480 where the far bridge
	// takes 1450 in auto mode: a second round of "fragmentation needed").
	m.mtu = underlayMTU - m.maxOverhead()
	if m.mtu < 576 {
		return nil, fmt.Errorf("underlay MTU %d leaves container MTU %d, below the IPv4 minimum 576", underlayMTU, m.mtu)
	}
	return m, nil
}

func (m *Manager) maxOverhead() int {
	most := 0
	for _, b := range m.cfg.Backends {
		most = max(most, b.Overhead())
	}
	return most
}

// MTU is the MTU for container interfaces and the bridge.
func (m *Manager) MTU() int { return m.mtu }

// Protocol is the route protocol number this manager owns.
func (m *Manager) Protocol() int { return m.cfg.Protocol }

// RouteCount is how many routes the last Apply wanted in the kernel, read
// from this Manager's own state: no kernel dump (systemd's status line asks
// every 10 s, and a router's table may hold 100,000 routes).
func (m *Manager) RouteCount() int {
	m.mu.Lock()
	defer m.mu.Unlock()
	return len(m.owners)
}

// Choices returns each peer's encapsulation and its reason, as chosen by
// the last Apply (for `fabricctl peers status`).
func (m *Manager) Choices() map[string]Choice {
	m.mu.Lock()
	defer m.mu.Unlock()
	return maps.Clone(m.choices)
}

// peerPlan is one peer's encapsulation for this Apply.
type peerPlan struct {
	peer    backend.Peer
	info    PeerInfo
	backend backend.Backend // nil for a direct route
	encap   string
	why     string
	err     error // no encapsulation can reach the peer
	// v6 is what carries the peer's IPv6 prefixes: the same choice, or,
	// when that is a direct route or a backend that carries only IPv4,
	// the first usable backend that carries IPv6.
	v6 *peerPlan
}

// Apply makes the kernel match routes, the complete set of remote routes,
// and local, the routes to this host's own endpoints. One bad route is
// logged and reported in the joined error; the others are still applied. A
// bad route (e.g. a peer without a VTEP MAC) is not installed; a route that
// cannot be built because of a transient failure (its tunnel device or the
// underlay device is missing) keeps its current kernel route rather than
// losing it.
func (m *Manager) Apply(ctx context.Context, routes []RemoteRoute, local ...LocalRoute) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	var errs []error
	fail := func(err error) {
		m.log.Error("data plane route failed", "err", err)
		errs = append(errs, err)
	}

	underlay, connected, err := m.underlay()
	if err != nil {
		fail(err) // direct routes cannot be built; tunnels may still work
	}
	peers := m.choosePeers(routes, connected)
	m.logChoices(peers)
	ready := m.syncBackends(ctx, peers, underlay != nil, fail)
	desired, keep := m.desiredRoutes(routes, local, peers, ready, underlay, fail)

	// Diff against the kernel's routes with our protocol: the view of them
	// this Manager keeps, or a fresh read of the kernel when it has none
	// (the first Apply, after Reread, after a failed write).
	have, err := m.kernelView()
	if err != nil {
		fail(err)
		return errors.Join(errs...)
	}
	for _, l := range local {
		for _, kr := range have {
			if p := prefixOf(kr.Dst); l.KeepInside && l.Prefix.Contains(p.Addr()) && p.Bits() > l.Prefix.Bits() {
				keep[p] = true
			}
		}
	}
	m.write(ctx, Plan(have, desired, keep), fail)
	return errors.Join(errs...)
}

// choosePeers picks each peer's encapsulation for this Apply.
func (m *Manager) choosePeers(routes []RemoteRoute, connected []netip.Prefix) map[string]*peerPlan {
	peers := map[string]*peerPlan{}
	for _, r := range routes {
		if r.Peer == nil {
			continue
		}
		name := cmp.Or(r.Peer.Name, r.PeerName)
		if p, seen := peers[name]; seen {
			p.peer.Routed = append(p.peer.Routed, r.Prefix.Masked())
			continue
		}
		p := &peerPlan{info: *r.Peer, peer: backend.Peer{
			Name: name, Address: r.Peer.Address, VTEPMAC: r.Peer.VTEPMAC, Subnet: r.Peer.Subnet, SubnetV6: r.Peer.SubnetV6, Encaps: r.Peer.Encaps,
			WireGuardKey: r.Peer.WireGuardKey, Routed: []netip.Prefix{r.Prefix.Masked()},
		}}
		if !p.peer.Address.IsValid() {
			p.peer.Address = r.NextHop
		}
		if !p.peer.Subnet.IsValid() {
			p.peer.Subnet = r.Prefix.Masked()
		}
		p.backend, p.encap, p.why = m.choose(p.peer, connected, false)
		switch {
		case !p.peer.Address.IsValid() || p.peer.Address.Is4In6():
			p.err = fmt.Errorf("peer %s: underlay address %v is neither IPv4 nor IPv6", name, p.peer.Address)
		case p.encap == "":
			p.err = fmt.Errorf("peer %s: no encapsulation can reach it: %s", name, p.why)
		}
		p.v6 = p
		if p.err == nil && p.peer.SubnetV6.IsValid() && (p.encap == EncapDirect || !carriesIPv6(p.backend)) {
			v6 := *p
			v6.v6 = nil
			v6.backend, v6.encap, v6.why = m.choose(p.peer, connected, true)
			if v6.encap == "" {
				v6.err = fmt.Errorf("peer %s: no encapsulation can carry IPv6 to it: %s", name, v6.why)
			}
			p.v6 = &v6
		}
		peers[name] = p
	}
	return peers
}

// syncBackends keeps each backend's device and per-peer state exactly for
// the peers using it, and says which encapsulations can carry routes now.
func (m *Manager) syncBackends(ctx context.Context, peers map[string]*peerPlan, underlayUp bool, fail func(error)) map[string]bool {
	ready := map[string]bool{EncapDirect: underlayUp, EncapNone: true}
	for _, b := range m.cfg.Backends {
		var users []backend.Peer
		for _, p := range peers {
			if (p.backend == b && p.err == nil) || (p.v6 != p && p.v6.backend == b && p.v6.err == nil) {
				users = append(users, p.peer)
			}
		}
		slices.SortFunc(users, func(a, b backend.Peer) int { return cmp.Compare(a.Name, b.Name) })
		// In auto mode every device stays up even with no peer using it: a
		// peer may decide differently about us (its probe of the path runs
		// separately), and its packets must find a device to land on.
		if len(users) > 0 || len(m.cfg.Backends) > 1 {
			if _, err := b.Ensure(ctx, m.mtu); err != nil {
				fail(fmt.Errorf("%s device %s: %w", b.Name(), b.Device(), err))
				continue
			}
			ready[b.Name()] = true
		}
		if err := b.SyncPeers(users); err != nil {
			fail(err)
		}
	}
	return ready
}

// desiredRoutes builds the kernel route for every remote and local route;
// keep holds the prefixes that could not be built for a passing reason,
// whose kernel route stays as it is.
func (m *Manager) desiredRoutes(routes []RemoteRoute, local []LocalRoute, peers map[string]*peerPlan, ready map[string]bool, underlay netlink.Link, fail func(error)) (desired map[netip.Prefix]*netlink.Route, keep map[netip.Prefix]bool) {
	desired = map[netip.Prefix]*netlink.Route{}
	keep = map[netip.Prefix]bool{}
	gateways := map[netip.Addr]nextHop{} // next hops resolved in this Apply: a router sends many routes
	owners := map[netip.Prefix]string{}
	add := func(prefix netip.Prefix, route *netlink.Route, owner string) {
		route.Protocol = netlink.RouteProtocol(m.cfg.Protocol)
		route.Table = unix.RT_TABLE_MAIN
		if prefix.Addr().Is6() && route.Priority == 0 {
			route.Priority = ipv6DefaultMetric // what the kernel reads back
		}
		desired[prefix] = route
		owners[prefix] = owner
	}
	for _, r := range routes {
		prefix := r.Prefix.Masked()
		if !prefix.IsValid() {
			fail(fmt.Errorf("route %v (peer %q): not a prefix", r.Prefix, r.PeerName))
			continue
		}
		if _, dup := desired[prefix]; dup {
			fail(fmt.Errorf("route %s (peer %q): duplicate prefix; keeping the first", prefix, r.PeerName))
			continue
		}
		route, owner, err := m.routeFor(r, prefix, peers, ready, underlay, gateways)
		if err != nil {
			fail(err)
			var unavailable errUnavailable
			if errors.As(err, &unavailable) {
				keep[prefix] = true // transient: do not take the working route away
			}
			if route == nil {
				continue
			}
		}
		add(prefix, route, owner)
	}
	for _, l := range local {
		prefix := l.Prefix.Masked()
		if l.KeepInside {
			continue // see Apply
		}
		if _, dup := desired[prefix]; dup {
			fail(fmt.Errorf("local route %s: duplicate", l.Prefix))
			continue
		}
		if l.Dev == "" {
			add(prefix, &netlink.Route{Dst: backend.IPNet(prefix), Type: unix.RTN_UNREACHABLE}, "this host")
			continue
		}
		link, err := m.h.LinkByName(l.Dev)
		if err != nil {
			fail(fmt.Errorf("local route %s: device %s: %w", prefix, l.Dev, err))
			keep[prefix] = true
			continue
		}
		route := &netlink.Route{Dst: backend.IPNet(prefix), LinkIndex: link.Attrs().Index, Scope: netlink.SCOPE_LINK}
		if prefix.Addr().Is6() {
			route.Scope = netlink.SCOPE_UNIVERSE // IPv6 routes have no scope: the kernel reads back universe
		}
		add(prefix, route, "this host")
	}
	m.owners = owners
	return desired, keep
}

// RouteChanges is what one Apply writes.
type RouteChanges struct {
	Add, Replace, Delete []*netlink.Route
}

// Plan is the difference between have (the kernel's routes with our
// protocol) and desired: a route is replaced when it differs, added when
// missing, deleted when not desired (withdrawn, left by an earlier run, or
// a second route for a prefix), and left alone when its prefix is in keep.
func Plan(have []*netlink.Route, desired map[netip.Prefix]*netlink.Route, keep map[netip.Prefix]bool) RouteChanges {
	var c RouteChanges
	done := map[netip.Prefix]bool{}
	for _, kr := range have {
		prefix := prefixOf(kr.Dst)
		want, ok := desired[prefix]
		switch {
		case done[prefix]:
			c.Delete = append(c.Delete, kr) // a duplicate of a prefix already handled
			continue
		case ok && sameRoute(kr, want):
		case ok:
			c.Replace = append(c.Replace, want)
		case keep[prefix]:
		default:
			c.Delete = append(c.Delete, kr)
			continue
		}
		done[prefix] = true
	}
	for _, prefix := range sortedPrefixes(desired) {
		if !done[prefix] {
			c.Add = append(c.Add, desired[prefix])
		}
	}
	return c
}

// write applies the changes and keeps the view in step. Route by route at
// info level when a few change, else one summary: a router's full table is
// not 100,000 lines.
func (m *Manager) write(ctx context.Context, c RouteChanges, fail func(error)) {
	adds, replaces, dels := c.Add, c.Replace, c.Delete
	level := slog.LevelInfo
	if len(adds)+len(replaces)+len(dels) > routesLoggedOneByOne {
		level = slog.LevelDebug
	}
	logRoutes := m.log.Enabled(ctx, level) // describing 100,000 routes nobody reads costs
	start, failed := time.Now(), 0
	for _, kr := range dels {
		if err := m.h.RouteDel(kr); err != nil && !errors.Is(err, unix.ESRCH) {
			fail(fmt.Errorf("delete route %s: %w", describe(kr), err))
			failed++
			continue
		}
		if prefix := prefixOf(kr.Dst); m.view[prefix] == kr { // not a duplicate of the route that stays
			delete(m.view, prefix)
		}
		if logRoutes {
			m.log.Log(ctx, level, "deleted route", "route", describe(kr))
		}
	}
	for _, want := range replaces {
		prefix := prefixOf(want.Dst)
		if err := m.h.RouteReplace(want); err != nil {
			fail(fmt.Errorf("replace route %s: %w", describe(want), err))
			failed++
			continue
		}
		if logRoutes {
			m.log.Log(ctx, level, "replaced route", "prefix", prefix, "old", describe(m.view[prefix]), "new", describe(want))
		}
		m.view[prefix] = want
	}
	for _, want := range adds {
		prefix := prefixOf(want.Dst)
		// Add, not replace: replace would overwrite another protocol's route for
		// the same prefix, and those are never ours to change.
		err := m.h.RouteAdd(want)
		switch {
		case errors.Is(err, unix.EEXIST):
			fail(fmt.Errorf("add route %s: a route for %s that fabric does not own exists; leaving it", describe(want), prefix))
			failed++
		case err != nil:
			fail(fmt.Errorf("add route %s: %w", describe(want), err))
			failed++
		default:
			m.view[prefix] = want
			if logRoutes {
				m.log.Log(ctx, level, "added route", "route", describe(want), "peer", m.owners[prefix])
			}
		}
	}
	if len(adds)+len(replaces)+len(dels) > routesLoggedOneByOne {
		m.log.Info("routes changed", "added", len(adds), "replaced", len(replaces), "deleted", len(dels),
			"failed", failed, "owned", len(m.view), "took", time.Since(start).Round(time.Millisecond))
	}
	if failed > 0 {
		m.view = nil // the kernel may differ from what was asked: read it next time
	}
}

// routesLoggedOneByOne is how many route changes one Apply logs one by one
// at info level; more are logged at debug level and summed up.
const routesLoggedOneByOne = 20

// Reread makes the next Apply read the kernel's routes, and each backend's
// per-peer entries, instead of trusting the views of them: the resync
// timer's drift repair (a route or entry deleted or changed by hand is put
// back).
func (m *Manager) Reread() {
	m.mu.Lock()
	m.view = nil
	m.mu.Unlock()
	for _, b := range m.cfg.Backends {
		if r, ok := b.(backend.Rereader); ok {
			r.Reread()
		}
	}
}

// kernelView returns the routes with our protocol as this Manager last
// wrote or read them, reading the kernel when it has no view. A duplicate
// of a prefix (left by an earlier run) only shows in a read.
func (m *Manager) kernelView() ([]*netlink.Route, error) {
	if m.view != nil {
		return slices.Collect(maps.Values(m.view)), nil
	}
	read, err := m.ownedKernelRoutes()
	if err != nil {
		return nil, err
	}
	have := make([]*netlink.Route, len(read))
	m.view = make(map[netip.Prefix]*netlink.Route, len(read))
	for i := range read {
		have[i] = &read[i]
		prefix := prefixOf(read[i].Dst)
		if _, dup := m.view[prefix]; !dup {
			m.view[prefix] = have[i]
		}
	}
	return have, nil
}

// underlay returns the underlay link and its connected IPv4 prefixes.
func (m *Manager) underlay() (netlink.Link, []netip.Prefix, error) {
	link, err := m.h.LinkByName(m.cfg.UnderlayDev)
	if err != nil {
		return nil, nil, fmt.Errorf("underlay device %s: %w", m.cfg.UnderlayDev, err)
	}
	if !m.cfg.CrossSubnet {
		return link, nil, nil
	}
	addrs, err := m.h.AddrList(link, unix.AF_INET)
	if err != nil {
		return link, nil, fmt.Errorf("addresses of underlay device %s: %w", m.cfg.UnderlayDev, err)
	}
	var connected []netip.Prefix
	for _, a := range addrs {
		p, ok := prefixFromIPNet(a.IPNet)
		if !ok || p.Bits() >= 32 {
			continue
		}
		// With several addresses on the underlay, only our underlay address's prefix counts.
		if m.cfg.UnderlayAddr.IsValid() && !p.Masked().Contains(m.cfg.UnderlayAddr) {
			continue
		}
		connected = append(connected, p.Masked())
	}
	return link, connected, nil
}

// choose picks a peer's encapsulation and says why: a direct route on our
// own L2 segment, else the first backend usable for the peer. A backend
// chosen after others says why they were passed over. No backend at all:
// encap is "" and why lists every refusal.
func (m *Manager) choose(peer backend.Peer, connected []netip.Prefix, ipv6 bool) (backend.Backend, string, string) {
	for _, p := range connected {
		// A direct route needs a gateway of the route's family: the other
		// family goes through a tunnel even on one segment.
		if p.Contains(peer.Address) && peer.Address.Is6() == ipv6 {
			return nil, EncapDirect, fmt.Sprintf("cross-subnet: peer underlay address is inside the connected prefix %s", p)
		}
	}
	var refused []string
	for _, b := range m.cfg.Backends {
		if ipv6 && !carriesIPv6(b) {
			refused = append(refused, b.Name()+": carries only IPv4")
			continue
		}
		ok, why := b.Usable(peer)
		if !ok {
			refused = append(refused, b.Name()+": "+why)
			continue
		}
		if len(refused) > 0 {
			why = strings.Join(refused, "; ")
		}
		return b, b.Name(), why
	}
	return nil, "", strings.Join(refused, "; ")
}

func carriesIPv6(b backend.Backend) bool {
	limited, ok := b.(backend.IPv6Limited)
	return !ok || limited.CarriesIPv6()
}

// logChoices logs each peer whose encapsulation is new or changed, and each
// peer that is gone, once, not on every Apply.
func (m *Manager) logChoices(peers map[string]*peerPlan) {
	next := make(map[string]Choice, len(peers))
	for name, p := range peers {
		c := Choice{Encap: p.encap, Reason: p.why}
		if p.v6 != p {
			c.EncapV6 = cmp.Or(p.v6.encap, "none")
		}
		next[name] = c
		old, had := m.choices[name]
		switch {
		case !had:
			m.log.Info("peer encapsulation", "peer", name, "address", p.peer.Address, "encap", c.Encap, "reason", c.Reason, "encapIPv6", c.EncapV6)
		case old != c:
			m.log.Info("peer encapsulation changed", "peer", name, "address", p.peer.Address,
				"encap", c.Encap, "was", old.Encap, "reason", c.Reason, "encapIPv6", c.EncapV6, "wasIPv6", old.EncapV6)
		}
	}
	for name, old := range m.choices {
		if _, ok := next[name]; !ok {
			m.log.Info("peer gone; removing its routes and tunnel state", "peer", name, "encap", old.Encap)
		}
	}
	m.choices = next
}

// nextHop is how the kernel reaches a BGP next hop: directly (no gateway)
// or through a gateway on a link.
type nextHop struct {
	gw   net.IP
	link int
	err  error
}

// resolve asks the kernel once per next hop and Apply.
func (m *Manager) resolve(addr netip.Addr, cache map[netip.Addr]nextHop) nextHop {
	if nh, ok := cache[addr]; ok {
		return nh
	}
	var nh nextHop
	via, err := m.h.RouteGet(addr.AsSlice())
	switch {
	case err != nil || len(via) == 0:
		nh.err = fmt.Errorf("next hop %s is not reachable through this host's routes: %v", addr, err)
	case via[0].Gw != nil:
		nh.gw, nh.link = via[0].Gw, via[0].LinkIndex
	}
	cache[addr] = nh
	return nh
}

func (m *Manager) routeFor(r RemoteRoute, prefix netip.Prefix, peers map[string]*peerPlan, ready map[string]bool, underlay netlink.Link, gateways map[netip.Addr]nextHop) (*netlink.Route, string, error) {
	if r.Peer == nil {
		if r.NextHop.Is4() != prefix.Addr().Is4() || r.NextHop.Is4In6() {
			return nil, "", fmt.Errorf("route %s: next hop %v is not of the prefix's family", prefix, r.NextHop)
		}
		// Not a fabric node: a plain route. A next hop on a connected
		// segment is used as it is (the kernel finds the device); one
		// further away (eBGP multihop, a reflected route) is resolved
		// through the kernel's routes to the gateway that reaches it.
		route := &netlink.Route{Dst: backend.IPNet(prefix), Gw: r.NextHop.AsSlice()}
		nh := m.resolve(r.NextHop, gateways)
		if nh.err != nil {
			return nil, "", fmt.Errorf("route %s: %w", prefix, nh.err)
		}
		if nh.gw != nil {
			route.Gw, route.LinkIndex = nh.gw, nh.link
		}
		return route, r.PeerName, nil
	}
	p := peers[cmp.Or(r.Peer.Name, r.PeerName)]
	if prefix.Addr().Is6() {
		p = p.v6
	}
	if p.err != nil {
		// Fail closed: without it the peer's prefixes would follow the
		// default route, in clear, where encryption refused the peer. The
		// refusal is logged once, with the choices.
		return &netlink.Route{Dst: backend.IPNet(prefix), Type: unix.RTN_UNREACHABLE}, p.peer.Name, fmt.Errorf("route %s: %w", prefix, p.err)
	}
	if !ready[p.encap] {
		return nil, "", errUnavailable{fmt.Errorf("route %s to peer %s: %s is not available", prefix, p.peer.Name, p.encap)}
	}
	if p.backend == nil { // direct
		return &netlink.Route{LinkIndex: underlay.Attrs().Index, Dst: backend.IPNet(prefix), Gw: p.peer.Address.AsSlice()}, p.peer.Name, nil
	}
	route, err := p.backend.RouteFor(prefix, p.peer)
	if err != nil {
		return nil, "", err
	}
	return route, p.peer.Name, nil
}

// errUnavailable marks a route that cannot be built right now because its
// device is missing; its kernel route, if any, is kept.
type errUnavailable struct{ error }

func (e errUnavailable) Unwrap() error { return e.error }

func (m *Manager) ownedKernelRoutes() ([]netlink.Route, error) {
	filter := &netlink.Route{Protocol: netlink.RouteProtocol(m.cfg.Protocol), Table: unix.RT_TABLE_MAIN}
	routes, err := m.h.RouteListFiltered(unix.AF_UNSPEC, filter, netlink.RT_FILTER_PROTOCOL|netlink.RT_FILTER_TABLE)
	if err != nil {
		return nil, fmt.Errorf("list routes with protocol %d: %w", m.cfg.Protocol, err)
	}
	return routes, nil
}

// Owned lists the kernel routes carrying our protocol, for `fabricctl routes`.
func (m *Manager) Owned() ([]OwnedRoute, error) {
	routes, err := m.ownedKernelRoutes()
	if err != nil {
		return nil, err
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	out := make([]OwnedRoute, 0, len(routes))
	for _, r := range routes {
		o := OwnedRoute{Prefix: prefixOf(r.Dst)}
		o.Via = gateway(&r)
		if link, err := m.h.LinkByIndex(r.LinkIndex); err == nil {
			o.Dev = link.Attrs().Name
		}
		o.PeerName = m.owners[o.Prefix]
		o.Encap = EncapNone
		if o.PeerName != "" && m.choices[o.PeerName].Encap == EncapDirect {
			o.Encap = EncapDirect
		}
		for _, b := range m.cfg.Backends {
			if o.Dev == b.Device() {
				o.Encap = b.Name()
			}
		}
		out = append(out, o)
	}
	slices.SortFunc(out, func(a, b OwnedRoute) int { return comparePrefix(a.Prefix, b.Prefix) })
	return out, nil
}

// Cleanup removes every route with protocol, in every table (`fabricd
// --cleanup`; each encapsulation removes its own device, encaps.Kind.Cleanup).
func Cleanup(h *netlink.Handle, protocol int) error {
	if protocol <= unix.RTPROT_STATIC || protocol > 255 {
		return fmt.Errorf("refusing to clean up route protocol %d: must be 5..255", protocol)
	}
	h = backend.DefaultHandle(h)
	var errs []error
	filter := &netlink.Route{Protocol: netlink.RouteProtocol(protocol), Table: unix.RT_TABLE_UNSPEC}
	routes, err := h.RouteListFiltered(unix.AF_UNSPEC, filter, netlink.RT_FILTER_PROTOCOL|netlink.RT_FILTER_TABLE)
	if err != nil {
		errs = append(errs, fmt.Errorf("list routes with protocol %d: %w", protocol, err))
	}
	for _, r := range routes {
		r := r
		if err := h.RouteDel(&r); err != nil && !errors.Is(err, unix.ESRCH) {
			errs = append(errs, fmt.Errorf("delete route %s: %w", describe(&r), err))
		}
	}
	return errors.Join(errs...)
}

func sameRoute(have, want *netlink.Route) bool {
	if want.LinkIndex != 0 && have.LinkIndex != want.LinkIndex {
		return false
	}
	if routeType(have) != routeType(want) {
		return false
	}
	return gateway(have) == gateway(want) &&
		have.Flags&int(netlink.FLAG_ONLINK) == want.Flags&int(netlink.FLAG_ONLINK) &&
		have.Priority == want.Priority && have.Scope == want.Scope
}

// gateway is a route's gateway, invalid when it has none.
func gateway(r *netlink.Route) netip.Addr {
	gw, _ := netip.AddrFromSlice(r.Gw)
	return gw.Unmap()
}

// routeType is a route's type, unicast when unset.
func routeType(r *netlink.Route) int {
	if r.Type == 0 {
		return unix.RTN_UNICAST
	}
	return r.Type
}

func describe(r *netlink.Route) string {
	if r == nil {
		return "none"
	}
	if routeType(r) == unix.RTN_UNREACHABLE {
		return fmt.Sprintf("unreachable %s proto %d", prefixOf(r.Dst), r.Protocol)
	}
	s := prefixOf(r.Dst).String()
	if gw := gateway(r); gw.IsValid() {
		s += " via " + gw.String()
	}
	if r.LinkIndex != 0 {
		s += fmt.Sprintf(" ifindex %d", r.LinkIndex)
	}
	if r.Flags&int(netlink.FLAG_ONLINK) != 0 {
		s += " onlink"
	}
	return s + fmt.Sprintf(" proto %d", r.Protocol)
}

func prefixFromIPNet(n *net.IPNet) (netip.Prefix, bool) {
	if n == nil {
		return netip.Prefix{}, false
	}
	addr, ok := netip.AddrFromSlice(n.IP)
	if !ok {
		return netip.Prefix{}, false
	}
	ones, _ := n.Mask.Size()
	return netip.PrefixFrom(addr.Unmap(), ones), true
}

// prefixOf converts a route's destination; nil means the default route.
func prefixOf(n *net.IPNet) netip.Prefix {
	if p, ok := prefixFromIPNet(n); ok {
		return p.Masked()
	}
	return netip.PrefixFrom(netip.IPv4Unspecified(), 0)
}

func comparePrefix(a, b netip.Prefix) int {
	return cmp.Or(a.Addr().Compare(b.Addr()), cmp.Compare(a.Bits(), b.Bits()))
}

func sortedPrefixes(m map[netip.Prefix]*netlink.Route) []netip.Prefix {
	out := make([]netip.Prefix, 0, len(m))
	for p := range m {
		out = append(out, p)
	}
	slices.SortFunc(out, comparePrefix)
	return out
}
