// Package backend is the seam between the data plane and one encapsulation.
// Each encapsulation (ipip, vxlanfallback, wireguard) is a small package that implements
// Backend; the dataplane package chooses one per peer and owns the routes.
package backend

import (
	"context"
	"net"
	"net/netip"

	"github.com/vishvananda/netlink"
)

// Peer is another fabric host as an encapsulation sees it.
type Peer struct {
	Name    string
	Address netip.Addr       // underlay address (tunnel endpoint)
	VTEPMAC net.HardwareAddr // VXLAN only: the peer's VTEP device MAC
	Subnet  netip.Prefix     // the peer's container subnet
	// SubnetV6 is the peer's IPv6 subnet (invalid: none). Its network
	// address is the peer's IPv6 gateway on a device that needs one, as
	// Subnet's is for IPv4.
	SubnetV6 netip.Prefix
	Encaps   []string // the encapsulations the peer runs (Backend.Name values)
	// WireGuardKey is the peer's WireGuard public key (base64) from its
	// node record, once the planner accepted it; "" when it has none.
	WireGuardKey string
	// Routed are the prefixes routed to the peer in this Apply (its subnet
	// and its Docker networks' blocks): what WireGuard lets it send.
	Routed []netip.Prefix
}

// Backend is one encapsulation. Implementations own exactly one tunnel device
// and the per-peer neighbour/FDB state on it; they never touch routes other
// than through RouteFor, so the dataplane can diff all routes in one place.
type Backend interface {
	// Name is the encapsulation's name ("ipip", "vxlan"), as in config and
	// node records.
	Name() string
	// Device is the name of the tunnel device the backend owns.
	Device() string
	// Ensure creates or repairs the tunnel device with the given MTU and returns
	// its link index. It is idempotent. The MTU is used as given: the caller
	// subtracts the overhead, exactly once (dataplane gives every device the
	// fabric MTU).
	Ensure(ctx context.Context, mtu int) (linkIndex int, err error)
	// SyncPeers makes the per-peer state (neighbour, FDB) exactly match peers:
	// entries for peers not in the list are removed. With no peers and no
	// device it does nothing.
	SyncPeers(peers []Peer) error
	// RouteFor returns the kernel route that sends dst to peer over this
	// encapsulation. The caller sets the protocol and table. Ensure must have
	// succeeded first.
	RouteFor(dst netip.Prefix, peer Peer) (*netlink.Route, error)
	// Usable tells whether this encapsulation can carry traffic to peer now,
	// and why or why not: the peer runs it too, its record has what it
	// needs, the path passes its packets. The data plane gives each peer the
	// first usable backend in order of preference.
	Usable(peer Peer) (ok bool, why string)
	// Ingress is the iptables match of this encapsulation's packets
	// arriving at this host (e.g. "-p udp -m udp --dport 4789"), written as
	// iptables-save prints it; only fabric hosts may send them.
	Ingress() string
	// Overhead is the number of bytes the encapsulation adds (20 IPIP, 50 VXLAN).
	Overhead() int
}

// Rereader is a Backend that keeps a view of its per-peer kernel state and
// diffs SyncPeers against it; Reread makes the next SyncPeers read the
// kernel instead (the data plane's resync timer, which repairs drift).
type Rereader interface {
	Reread()
}

// MACAdvertiser is a Backend whose peers need this host's device MAC, which
// travels in the node record (VXLAN's VTEP MAC).
type MACAdvertiser interface {
	MAC() net.HardwareAddr
}

// IPv6Limited is a Backend that may not carry IPv6 (ipip, IPv4 in IPv4):
// when CarriesIPv6 is false, a peer's IPv6 prefixes go over the first
// usable backend that does. Backends without it carry both families.
type IPv6Limited interface {
	CarriesIPv6() bool
}

// KeyAdvertiser is a Backend whose peers need this host's public key, which
// travels in the node record (WireGuard's).
type KeyAdvertiser interface {
	PublicKey() string
}

// IPNet converts a prefix to the form netlink wants.
func IPNet(p netip.Prefix) *net.IPNet {
	p = p.Masked()
	return &net.IPNet{IP: p.Addr().AsSlice(), Mask: net.CIDRMask(p.Bits(), p.Addr().BitLen())}
}
