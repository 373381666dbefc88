// Package planner holds fabricd's decisions about routes and peers as pure
// functions: given the same inputs (this host, node records, BGP best paths,
// session states, what the kernel held at start, the time) they return the
// same outputs, so every rule is a table test that needs no root, no kernel
// and no etcd. The agent feeds them from its watchers and hands their results
// to the appliers (bgp, dataplane, policy).
package planner

import (
	"cmp"
	"fmt"
	"maps"
	"net"
	"net/netip"
	"slices"
	"time"

	"github.com/fabricnet/fabric/bgp"
	"github.com/fabricnet/fabric/config"
	"github.com/fabricnet/fabric/dataplane"
	"github.com/fabricnet/fabric/ipam"
	"github.com/fabricnet/fabric/registry"
	"github.com/fabricnet/fabric/wireguard"
)

// Host is this host as the decisions need it.
type Host struct {
	Name     string
	ASN      uint32
	Underlay netip.Prefix // underlay address with its connected prefix length
	Subnet   netip.Prefix // this host's lease
	Pool     netip.Prefix // the whole fabric
	// SubnetV6 is this host's IPv6 subnet and PoolV6 the pool's IPv6
	// network and the pairing of subnets (invalid network: IPv4 only).
	SubnetV6 netip.Prefix
	PoolV6   ipam.Pool
	// UnderlayV6 is this host's IPv6 address on the underlay, if any (the
	// next hop of its IPv6 subnet), with its connected prefix length.
	UnderlayV6 netip.Prefix
	// Imports limits what external peers may send, by peer name: a route
	// from a listed peer must be one of its prefixes or lie inside one;
	// 0.0.0.0/0 in a list stands for the default route alone. Peers not
	// listed are limited only by the rules of refuseRoute.
	Imports map[string][]netip.Prefix
	// WireGuardKey is this host's WireGuard public key, "" when it does
	// not encrypt.
	WireGuardKey string
}

// Refusal is an input the planner will not act on, and why. Key identifies
// it, so a caller can log each refusal once.
type Refusal struct {
	Key  string
	What string // "node record" or "route"
	Name string // the node or prefix refused
	Why  string
}

// AcceptNodes drops node records that would break the mesh for everyone,
// one bad record must not stop this host from peering with the others, and
// records whose subnet is not leased to that node in etcd: a record claiming
// another host's subnet, or 0.0.0.0/0, would key tunnels and "from node"
// policy rules. held maps node names to the subnets leased to them. This
// host's own record is always kept.
func AcceptNodes(h Host, records []registry.Node, held map[string][]netip.Prefix) ([]registry.Node, []Refusal) {
	owner := map[netip.Addr]string{}
	var out []registry.Node
	var refused []Refusal
	for _, n := range records {
		if n.Name == h.Name {
			out = append(out, n)
			continue
		}
		var why string
		switch {
		case n.ASN != h.ASN:
			why = fmt.Sprintf("its ASN %d differs from this host's %d; mesh peers share one ASN", n.ASN, h.ASN)
		case n.Address.Is4In6() || !n.Address.IsGlobalUnicast() || n.Address.Zone() != "":
			why = fmt.Sprintf("its address %v cannot be a peer", n.Address)
		case h.Pool.Contains(n.Address) || h.PoolV6.NetworkV6.Contains(n.Address):
			why = fmt.Sprintf("its address %v is inside the pool: a container's, not a host's", n.Address)
		case n.Address == h.Underlay.Addr():
			why = fmt.Sprintf("it claims this host's underlay address %s", n.Address)
		case owner[n.Address] != "":
			why = fmt.Sprintf("node %s already has address %s", owner[n.Address], n.Address)
		case !slices.Contains(held[n.Name], n.Subnet):
			why = fmt.Sprintf("its subnet %s is not leased to it (etcd leases it %v)", n.Subnet, held[n.Name])
		}
		if why != "" {
			refused = append(refused, Refusal{Key: "node/" + n.Name + "/" + why, What: "node record", Name: n.Name, Why: why})
			continue
		}
		owner[n.Address] = n.Name
		out = append(out, n)
	}
	return out, refuseKeys(h, out, refuseAddressesV6(h, out, refuseSubnetsV6(h, out, refused)))
}

// refuseAddressesV6 clears IPv6 underlay addresses that may not be a next
// hop: in a fabric without IPv6, inside the IPv6 pool (a container's, not
// a host's), this host's own, or claimed by two records (which host is
// behind it cannot be told). The host's IPv6 routes then need its IPv4
// (mapped) next hop.
func refuseAddressesV6(h Host, nodes []registry.Node, refused []Refusal) []Refusal {
	claims := map[netip.Addr]int{}
	for _, n := range nodes {
		if n.Name != h.Name && n.AddressV6.IsValid() {
			claims[n.AddressV6]++
		}
	}
	for i := range nodes {
		n := &nodes[i]
		if n.Name == h.Name || !n.AddressV6.IsValid() {
			continue
		}
		var why string
		switch {
		case !h.PoolV6.NetworkV6.IsValid():
			why = fmt.Sprintf("its IPv6 address %s is refused: the fabric has no IPv6 pool", n.AddressV6)
		case h.PoolV6.NetworkV6.Contains(n.AddressV6):
			why = fmt.Sprintf("its IPv6 address %s is inside the IPv6 pool %s", n.AddressV6, h.PoolV6.NetworkV6)
		case n.AddressV6 == h.UnderlayV6.Addr():
			why = fmt.Sprintf("it claims this host's IPv6 address %s", n.AddressV6)
		case claims[n.AddressV6] > 1:
			why = fmt.Sprintf("its IPv6 address %s is claimed by another record too", n.AddressV6)
		}
		if why != "" {
			refused = append(refused, Refusal{Key: "node/" + n.Name + "/" + why, What: "node record", Name: n.Name, Why: why + "; its IPv6 routes need its IPv4 next hop"})
			n.AddressV6 = netip.Addr{}
		}
	}
	return refused
}

// refuseSubnetsV6 clears IPv6 subnets that are not the one paired with the
// record's (checked) IPv4 subnet: a record cannot claim another host's
// IPv6 containers. The host then counts as IPv4 only.
func refuseSubnetsV6(h Host, nodes []registry.Node, refused []Refusal) []Refusal {
	for i := range nodes {
		n := &nodes[i]
		if n.Name == h.Name || !n.SubnetV6.IsValid() {
			continue
		}
		want, ok := h.PoolV6.SubnetV6(n.Subnet)
		var why string
		switch {
		case !ok:
			why = fmt.Sprintf("its IPv6 subnet %s is refused: the fabric has no IPv6 pool", n.SubnetV6)
		case want != n.SubnetV6:
			why = fmt.Sprintf("its IPv6 subnet %s is not %s, the one paired with its subnet %s", n.SubnetV6, want, n.Subnet)
		}
		if why != "" {
			refused = append(refused, Refusal{Key: "node/" + n.Name + "/" + why, What: "node record", Name: n.Name, Why: why + "; no IPv6 to it"})
			n.SubnetV6 = netip.Prefix{}
		}
	}
	return refused
}

// refuseKeys clears WireGuard keys that may not be used, in the accepted
// records (a record that fails the lease check above never gives a key):
// one that is not a key, this host's own, or one that two records claim
// (a key is one host's; which of them holds the private half cannot be
// told). The host then counts as one that cannot encrypt.
func refuseKeys(h Host, nodes []registry.Node, refused []Refusal) []Refusal {
	claims := map[string]int{}
	for _, n := range nodes {
		if n.Name != h.Name && n.WireGuardKey != "" {
			claims[n.WireGuardKey]++
		}
	}
	for i := range nodes {
		n := &nodes[i]
		if n.Name == h.Name || n.WireGuardKey == "" {
			continue
		}
		var why string
		if _, err := wireguard.ParsePublicKey(n.WireGuardKey); err != nil {
			why = fmt.Sprintf("its WireGuard key is refused: %v", err)
		} else if n.WireGuardKey == h.WireGuardKey {
			why = "its WireGuard key is this host's own"
		} else if claims[n.WireGuardKey] > 1 {
			why = fmt.Sprintf("its WireGuard key %s is in %d node records", n.WireGuardKey, claims[n.WireGuardKey])
		}
		if why != "" {
			refused = append(refused, Refusal{Key: "node/" + n.Name + "/" + why, What: "node record", Name: n.Name, Why: why + "; no encrypted traffic to it"})
			n.WireGuardKey = ""
		}
	}
	return refused
}

// Departed is a host whose node record is gone from etcd while its BGP
// session is still up. Its record may only have expired because that host,
// or etcd, is cut off from etcd for a while; its data plane still works, so
// the mesh keeps it until its session drops.
type Departed struct {
	Node  registry.Node
	Since time.Time
}

// NodeSet is the node set the agent works with and the departed hosts kept.
type NodeSet struct {
	Nodes    []registry.Node // accepted records plus departed hosts still in session, by name
	Departed map[string]Departed
	Events   []string // what changed among the departed, for the log
	// Recheck is when a departed host kept now has been away for maxAway
	// and goes; zero when none is kept. Nothing else in the set changes
	// with time alone.
	Recheck time.Time
}

// Nodes computes the node set: the accepted records, plus hosts that left
// the registry while their sessions are up, for at most maxAway. prev is the
// last set, departed the hosts kept so far, established the peers whose
// sessions are up, by name.
func Nodes(h Host, accepted, prev []registry.Node, departed map[string]Departed, established map[string]bool, maxAway time.Duration, now time.Time) NodeSet {
	inRegistry := map[string]bool{}
	for _, n := range accepted {
		inRegistry[n.Name] = true
	}
	out := NodeSet{Departed: map[string]Departed{}}
	for name, d := range departed {
		out.Departed[name] = d
	}
	for _, n := range prev {
		if _, kept := out.Departed[n.Name]; !inRegistry[n.Name] && !kept && n.Name != h.Name && established[n.Name] {
			out.Departed[n.Name] = Departed{Node: n, Since: now}
			out.Events = append(out.Events, fmt.Sprintf("node %s: record gone from etcd; keeping the peer while its BGP session is up", n.Name))
		}
	}
	nodes := slices.Clone(accepted)
	for _, name := range slices.Sorted(maps.Keys(out.Departed)) {
		d := out.Departed[name]
		switch {
		case inRegistry[name]:
			delete(out.Departed, name)
		case !established[name] || now.Sub(d.Since) > maxAway:
			delete(out.Departed, name)
			out.Events = append(out.Events, fmt.Sprintf("node %s: departed and its session is down; removing the peer", name))
		default:
			nodes = append(nodes, d.Node)
			if due := d.Since.Add(maxAway + time.Nanosecond); out.Recheck.IsZero() || due.Before(out.Recheck) {
				out.Recheck = due // "> maxAway" holds from then
			}
		}
	}
	slices.SortFunc(nodes, func(a, b registry.Node) int { return cmp.Compare(a.Name, b.Name) })
	out.Nodes = nodes
	return out
}

// SessionSettle is how long a session without graceful restart must have
// been up before the start-up grace stops keeping its peer's routes: such a
// peer sends no End-of-RIB, and a session just established may not have sent
// its UPDATEs yet.
const SessionSettle = 3 * time.Second

// PeerSync is what the grace needs to know of one BGP peer.
type PeerSync struct {
	Name            string
	Established     bool
	GracefulRestart bool // negotiated: the peer sends End-of-RIB
	EndOfRIB        bool // the peer has sent all its routes
}

// Grace is the start-up grace: a restarted fabricd keeps the routes that were
// in the kernel when it started (KeptAtStart, prefix -> next hop) until the
// peers they came from have sent all their routes again (End-of-RIB), so a
// restart changes nothing in the kernel: a host's subnet stays until that
// host's session has synced, a route from a router (a top-of-rack default)
// until every peer has. The grace ends when every peer has synced, or at
// Until. A new or dead peer gains nothing: it only keeps what was there.
type Grace struct {
	Over          bool
	Until         time.Time
	KeptAtStart   map[netip.Prefix]netip.Addr
	EstablishedAt map[string]time.Time // peer name -> first seen established
	Synced        map[string]bool      // peer name -> has sent all its routes
}

// Observe records the peers' states and ends the grace when every peer has
// synced, or Until passed. peersKnown says the peer set is complete (the
// node registry has been read and its peers given to the speaker): before
// that, no peers means none known yet, after it, a host with no peers has
// nothing to wait for.
func (g Grace) Observe(peers []PeerSync, peersKnown bool, now time.Time) Grace {
	if g.Over {
		return g
	}
	next := g
	next.EstablishedAt = map[string]time.Time{}
	next.Synced = map[string]bool{}
	all := peersKnown
	for _, p := range peers {
		if !p.Established {
			all = false
			continue
		}
		at, ok := g.EstablishedAt[p.Name]
		if !ok {
			at = now
		}
		next.EstablishedAt[p.Name] = at
		synced := g.Synced[p.Name] || p.EndOfRIB || (!p.GracefulRestart && now.Sub(at) >= SessionSettle)
		next.Synced[p.Name] = synced
		all = all && synced
	}
	if all || now.After(g.Until) {
		next.Over = true
	}
	return next
}

// keeps reports whether the grace keeps the route to subnet s of node n
// (its subnet, or its IPv6 one).
func (g Grace) keeps(n registry.Node, s netip.Prefix) bool {
	_, kept := g.KeptAtStart[s]
	return !g.Over && kept && !g.Synced[n.Name]
}

// inside reports whether p lies in pool (valid) and is no shorter.
func inside(p, pool netip.Prefix) bool {
	return pool.IsValid() && p.Addr().BitLen() == pool.Addr().BitLen() && pool.Contains(p.Addr()) && p.Bits() >= pool.Bits()
}

// Networks is what route decisions need of the fabric's Docker networks.
type Networks struct {
	Subnets []netip.Prefix
	// Owners maps each block and each /32 given outside its host's
	// blocks to the host that hands it out: the only host a route for it
	// is accepted from (dockernet.State.Owners).
	Owners map[netip.Prefix]string
}

// inSubnet returns the network subnet holding p, if any.
func (n Networks) inSubnet(p netip.Prefix) (netip.Prefix, bool) {
	for _, s := range n.Subnets {
		if s.Contains(p.Addr()) && p.Bits() >= s.Bits() {
			return s, true
		}
	}
	return netip.Prefix{}, false
}

// Routes turns the BGP best paths into the routes the kernel should hold,
// attaching what the registry knows about the host behind each next hop,
// and says why each refused route was refused. During the start-up grace it
// adds the routes kept from before the restart.
func Routes(h Host, nodes []registry.Node, best []bgp.Route, g Grace, nets Networks) ([]dataplane.RemoteRoute, []Refusal) {
	byAddr := map[netip.Addr]registry.Node{}
	bySubnet := map[netip.Prefix]*registry.Node{} // most routes are a host's whole subnet
	for i, n := range nodes {
		if n.Name != h.Name {
			byAddr[n.Address] = n
			if n.AddressV6.IsValid() {
				byAddr[n.AddressV6] = n // checked unique by AcceptNodes
			}
			if n.Address.Is6() && n.Subnet.IsValid() {
				byAddr[n.Subnet.Masked().Addr()] = n // its IPv4 next hop (leadsTo)
			}
		}
		for _, s := range []netip.Prefix{n.Subnet, n.SubnetV6} {
			if _, dup := bySubnet[s]; !dup && s.IsValid() {
				bySubnet[s] = &nodes[i]
			}
		}
	}
	var out []dataplane.RemoteRoute
	var refused []Refusal
	seen := map[netip.Prefix]bool{}
	for _, r := range best {
		// Our own subnet (or a piece of it) is on the bridge; a covering
		// route such as a top-of-rack default is fine, the kernel prefers
		// the connected /24.
		if inside(r.Prefix, h.Subnet) || inside(r.Prefix, h.SubnetV6) || r.NextHop == h.Underlay.Addr() || r.NextHop == h.UnderlayV6.Addr() || nets.Owners[r.Prefix] == h.Name {
			continue
		}
		n, toNode := byAddr[r.NextHop]
		if why := refuseRoute(h, nodes, bySubnet, nets, r, toNode); why != "" {
			refused = append(refused, Refusal{Key: "route/" + r.Prefix.String() + "/" + r.NextHop.String(), What: "route",
				Name: fmt.Sprintf("%s via %s from %s", r.Prefix, r.NextHop, r.PeerName), Why: why})
			continue
		}
		rr := dataplane.RemoteRoute{Prefix: r.Prefix, NextHop: r.NextHop, PeerName: r.PeerName}
		if toNode {
			// Through the host's tunnel, also when the next hop was its
			// IPv6 address.
			rr.NextHop = n.Address
			rr.PeerName = n.Name
			rr.Peer = PeerInfo(n)
		}
		seen[r.Prefix] = true
		out = append(out, rr)
	}
	nodeSubnets := map[netip.Prefix]bool{}
	for _, n := range nodes {
		for _, s := range []netip.Prefix{n.Subnet, n.SubnetV6} {
			nodeSubnets[s] = true
			if n.Name == h.Name || !s.IsValid() || seen[s] || !g.keeps(n, s) {
				continue
			}
			seen[s] = true
			out = append(out, dataplane.RemoteRoute{Prefix: s, NextHop: n.Address, PeerName: n.Name, Peer: PeerInfo(n)})
		}
	}
	if !g.Over {
		byName := map[string]registry.Node{}
		for _, n := range nodes {
			byName[n.Name] = n
		}
		for prefix, via := range g.KeptAtStart {
			inPool := inside(prefix, h.Pool) || inside(prefix, h.PoolV6.NetworkV6)
			if seen[prefix] || nodeSubnets[prefix] || inPool || !via.IsValid() {
				continue // a pool prefix is only ever a host's subnet, rebuilt from its record
			}
			if _, inNetwork := nets.inSubnet(prefix); inNetwork {
				// A host's network block: kept through that host's tunnel
				// until its session has synced, like its subnet.
				if n, ok := byName[nets.Owners[prefix]]; ok && n.Name != h.Name && g.keeps(n, n.Subnet) {
					out = append(out, dataplane.RemoteRoute{Prefix: prefix, NextHop: n.Address, PeerName: n.Name, Peer: PeerInfo(n)})
				}
				continue
			}
			// Routes from routers: which peer sent them is not in the
			// kernel, so they stay until the grace is over.
			out = append(out, dataplane.RemoteRoute{Prefix: prefix, NextHop: via, PeerName: "kept from before the restart"})
		}
	}
	slices.SortFunc(out, func(a, b dataplane.RemoteRoute) int {
		return cmp.Or(a.Prefix.Addr().Compare(b.Prefix.Addr()), cmp.Compare(a.Prefix.Bits(), b.Prefix.Bits()))
	})
	return out, refused
}

// refuseRoute says why a learned route must not reach the kernel, or "".
//   - A prefix inside the pool belongs to the host whose node record holds
//     it: only that exact prefix, with that host as next hop, is accepted,
//     so no speaker can take a host's containers by announcing its subnet or
//     a longer prefix inside it.
//   - A route through a tunnel (its next hop is a fabric host) may only lead
//     into the pool: anything else (the underlay, a peer's own address)
//     would send the tunnel's outer packets into the tunnel.
//   - No route may take over this host's own underlay segment.
//   - A prefix inside a Docker network's subnet must be a block or an
//     address that the host behind the next hop hands out.
func refuseRoute(h Host, nodes []registry.Node, bySubnet map[netip.Prefix]*registry.Node, nets Networks, r bgp.Route, toNode bool) string {
	if allowed, ok := h.Imports[r.PeerName]; ok && !slices.ContainsFunc(allowed, func(a netip.Prefix) bool {
		if a.Bits() == 0 {
			return r.Prefix.Bits() == 0
		}
		return a.Contains(r.Prefix.Addr()) && r.Prefix.Bits() >= a.Bits()
	}) {
		return fmt.Sprintf("peer %s may only send routes inside %v", r.PeerName, allowed)
	}
	// The pool and the node subnets of the route's family.
	pool, subnet := h.Pool, func(n *registry.Node) netip.Prefix { return n.Subnet }
	if r.Prefix.Addr().Is6() {
		pool, subnet = h.PoolV6.NetworkV6, func(n *registry.Node) netip.Prefix { return n.SubnetV6 }
	}
	if inside(r.Prefix, pool) {
		owner := bySubnet[r.Prefix]
		for i := 0; owner == nil && i < len(nodes); i++ {
			if s := subnet(&nodes[i]); s.IsValid() && s.Overlaps(r.Prefix) {
				owner = &nodes[i]
			}
		}
		switch {
		case owner == nil:
			return fmt.Sprintf("%s is inside the pool %s but no fabric host holds it", r.Prefix, pool)
		case subnet(owner) != r.Prefix:
			return fmt.Sprintf("%s is not the subnet %s that host %s holds; only the whole subnet is routed", r.Prefix, subnet(owner), owner.Name)
		case !leadsTo(r, owner):
			return fmt.Sprintf("%s belongs to host %s (%s), but the next hop is %s", r.Prefix, owner.Name, owner.Address, r.NextHop)
		}
	}
	network, inNetwork := nets.inSubnet(r.Prefix)
	if inNetwork {
		owner := nets.Owners[r.Prefix]
		var holder *registry.Node
		for i := range nodes {
			if nodes[i].Name == owner {
				holder = &nodes[i]
			}
		}
		switch {
		case owner == "":
			return fmt.Sprintf("%s is inside network subnet %s but is no block or address a fabric host holds", r.Prefix, network)
		case holder == nil:
			return fmt.Sprintf("%s is held by host %s, which is not in the fabric", r.Prefix, owner)
		case !leadsTo(r, holder):
			return fmt.Sprintf("%s is held by host %s (%s), but the next hop is %s", r.Prefix, owner, holder.Address, r.NextHop)
		}
	}
	if toNode && !inNetwork && !pool.IsValid() {
		return fmt.Sprintf("%s is IPv6, and the fabric has no IPv6 pool", r.Prefix)
	}
	if toNode && !inNetwork && !inside(r.Prefix, pool) {
		return fmt.Sprintf("its next hop is a fabric host, so it would be tunnelled, but %s is outside the pool %v", r.Prefix, pool)
	}
	for _, u := range []netip.Prefix{h.Underlay.Masked(), h.UnderlayV6.Masked()} {
		if u.IsValid() && r.Prefix.Overlaps(u) && r.Prefix.Bits() >= u.Bits() {
			return fmt.Sprintf("it would take over this host's underlay segment %s", u)
		}
	}
	if r.Prefix.Addr().Is6() && !toNode && !r.NextHop.Is6() {
		// A router's IPv6 route needs an IPv6 next hop: the kernel takes
		// no IPv4 gateway for it, and only fabric hosts are tunnelled to.
		return fmt.Sprintf("%s is IPv6, but its next hop %s is not: routes from routers need an IPv6 next hop (this host's underlay has IPv6?)", r.Prefix, r.NextHop)
	}
	return ""
}

// leadsTo reports whether route r's next hop is host n: its address, or
// for an IPv6 prefix its checked IPv6 address, or for an IPv4 prefix of a
// host on an IPv6-only underlay the network address of its (checked)
// IPv4 subnet, which it uses as its IPv4 next hop.
func leadsTo(r bgp.Route, n *registry.Node) bool {
	return r.NextHop == n.Address || (r.Prefix.Addr().Is6() && n.AddressV6.IsValid() && r.NextHop == n.AddressV6) ||
		(r.Prefix.Addr().Is4() && n.Address.Is6() && n.Subnet.IsValid() && r.NextHop == n.Subnet.Masked().Addr())
}

// PeerInfo is what the data plane needs to know about node n.
func PeerInfo(n registry.Node) *dataplane.PeerInfo {
	mac, _ := net.ParseMAC(n.VTEPMAC)
	return &dataplane.PeerInfo{Name: n.Name, Address: n.Address, VTEPMAC: mac, Encaps: slices.Clone(n.Encaps), Subnet: n.Subnet, SubnetV6: n.SubnetV6, WireGuardKey: n.WireGuardKey}
}

// FabricPeers is whom this host peers with among the fabric's hosts. With no
// route reflector among them, every host peers with every other (the full
// mesh). Once hosts flagged as route reflectors exist, a reflector peers with
// every host (other reflectors as plain iBGP peers, the rest as its clients)
// and every other host peers only with the reflectors: sessions per host go
// from n-1 to the number of reflectors. Between two hosts only the one with
// the lower address dials: when both dial, GoBGP's fixed idle hold after a
// failure can keep each side refusing the other's attempt in turn.
func FabricPeers(h Host, selfReflects bool, nodes []registry.Node, port uint16) []bgp.Peer {
	reflectors := selfReflects
	for _, n := range nodes {
		if n.Name != h.Name && n.RouteReflector {
			reflectors = true
		}
	}
	var peers []bgp.Peer
	for _, n := range nodes {
		if n.Name == h.Name || n.Address == h.Underlay.Addr() {
			continue
		}
		typ := bgp.PeerMesh
		switch {
		case !reflectors:
		case selfReflects && !n.RouteReflector:
			typ = bgp.PeerRRClient
		case selfReflects && n.RouteReflector:
			typ = bgp.PeerMesh // reflectors peer with each other as usual
		case n.RouteReflector:
			typ = bgp.PeerRouteReflector
		default:
			continue // two clients: the reflectors carry their routes
		}
		peers = append(peers, bgp.Peer{Name: n.Name, Address: n.Address, ASN: n.ASN, Port: port, Type: typ,
			Passive: h.Underlay.Addr().Compare(n.Address) > 0})
	}
	return peers
}

// Peers is this host's whole BGP peer set: the configured external peers
// (top-of-rack routers, reflectors outside the fabric) and, with mesh on,
// the fabric's hosts (FabricPeers), leaving out a host at an external
// peer's address.
func Peers(h Host, external []config.ExternalPeer, mesh, selfReflects bool, nodes []registry.Node, port uint16) []bgp.Peer {
	var peers []bgp.Peer
	taken := map[netip.Addr]bool{}
	for _, p := range external {
		taken[p.Addr] = true
		typ := bgp.PeerExternal
		switch p.Type {
		case "route-reflector":
			typ = bgp.PeerRouteReflector
		case "rr-client":
			typ = bgp.PeerRRClient
		}
		peers = append(peers, bgp.Peer{Name: cmp.Or(p.Name, p.Address), Address: p.Addr, ASN: p.ASN, Port: p.Port, Password: p.Password,
			Multihop: p.Multihop, Type: typ, MaxPrefixes: p.RouteLimit()})
	}
	if !mesh {
		return peers
	}
	var fabric []registry.Node
	for _, n := range nodes {
		if !taken[n.Address] {
			fabric = append(fabric, n)
		}
	}
	return append(peers, FabricPeers(h, selfReflects, fabric, port)...)
}

// BFDPeer is a peer to run BFD with. FabricHost says what a failure means:
// a fabric host's kernel may still forward while its fabricd restarts (ask
// it before dropping its routes); a router with bfd: true is down.
type BFDPeer struct {
	Name       string
	Addr       netip.Addr
	FabricHost bool
}

// BFDPeers are the peers of the set that run BFD: every fabric host, and
// the external peers configured with bfd: true.
func BFDPeers(peers []bgp.Peer, external []config.ExternalPeer) []BFDPeer {
	ext := map[netip.Addr]config.ExternalPeer{}
	for _, p := range external {
		ext[p.Addr] = p
	}
	var out []BFDPeer
	for _, p := range peers {
		e, isExternal := ext[p.Address]
		if isExternal && !e.BFD {
			continue
		}
		out = append(out, BFDPeer{Name: p.Name, Addr: p.Address, FabricHost: !isExternal})
	}
	return out
}

// Imports are the external peers' import lists by peer name (Host.Imports).
func Imports(external []config.ExternalPeer) map[string][]netip.Prefix {
	out := map[string][]netip.Prefix{}
	for _, p := range external {
		if len(p.Imports) > 0 {
			out[cmp.Or(p.Name, p.Address)] = p.Imports
		}
	}
	return out
}
