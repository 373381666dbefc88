// Package backend is the seam between the data plane and one encapsulation.
// Each encapsulation (ipip, vxlanfallback) is a small package that implements
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
}

// Backend is one encapsulation. Implementations own exactly one tunnel device
// and the per-peer neighbour/FDB state on it; they never touch routes other
// than through RouteFor, so the dataplane can diff all routes in one place.
type Backend interface {
	// Name is "ipip" or "vxlan".
	Name() string
	// Device is the name of the tunnel device the backend owns.
	Device() string
	// Ensure creates or repairs the tunnel device with the given MTU and returns
	// its link index. It is idempotent. The MTU is used as given: the caller
	// subtracts the overhead, exactly once.
	Ensure(ctx context.Context, mtu int) (linkIndex int, err error)
	// SyncPeers makes the per-peer state (neighbour, FDB) exactly match peers:
	// entries for peers not in the list are removed. With no peers and no
	// device it does nothing.
	SyncPeers(peers []Peer) error
	// RouteFor returns the kernel route that sends dst to peer over this
	// encapsulation. The caller sets the protocol and table. Ensure must have
	// succeeded first.
	RouteFor(dst netip.Prefix, peer Peer) (*netlink.Route, error)
	// Overhead is the number of bytes the encapsulation adds (20 IPIP, 50 VXLAN).
	Overhead() int
	// Cleanup removes the device and everything on it.
	Cleanup() error
}

// IPNet converts a prefix to the form netlink wants.
func IPNet(p netip.Prefix) *net.IPNet {
	p = p.Masked()
	return &net.IPNet{IP: p.Addr().AsSlice(), Mask: net.CIDRMask(p.Bits(), p.Addr().BitLen())}
}
