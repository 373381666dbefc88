// Package ipip is the IP-in-IP encapsulation (IP protocol 4, 20 bytes): one
// remote-less ipip device, like Calico's tunl0, and per peer a route
// "<peer subnet> via <peer underlay address> dev fabric.ipip onlink".
// The kernel needs the ipip module; Supported tells whether it has it.
package ipip

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"slices"
	"sync"

	"github.com/fabricnet/fabric/backend"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

const (
	// Name is the encapsulation's name in config and node records.
	Name          = "ipip"
	DefaultDevice = "fabric.ipip"
	// Overhead is the outer IPv4 header.
	Overhead = 20
)

// Config describes the ipip device of this host.
type Config struct {
	Handle       *netlink.Handle // nil = current namespace
	Device       string          // default DefaultDevice
	UnderlayAddr netip.Addr      // outer source address
	Subnet       netip.Prefix    // own container subnet; its network address goes on the device as /32
	// PathWorks tells whether IP protocol 4 passes between this host and a
	// peer (the probe's verdict). Nil: assume it does.
	PathWorks func(peer netip.Addr) bool
	Logger    *slog.Logger
}

// Backend owns the ipip device. It has no per-peer state besides routes.
type Backend struct {
	cfg    Config
	handle *netlink.Handle
	log    *slog.Logger

	mu        sync.Mutex
	linkIndex int
}

var _ backend.Backend = (*Backend)(nil)

// New validates cfg and fills defaults. It does not touch the kernel.
func New(cfg Config) (*Backend, error) {
	if cfg.Device == "" {
		cfg.Device = DefaultDevice
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	switch {
	case len(cfg.Device) > 15:
		return nil, fmt.Errorf("ipip device name %q is longer than 15 bytes", cfg.Device)
	case cfg.Device == "tunl0":
		return nil, errors.New("ipip device name tunl0 is the kernel's fallback device; choose another")
	case !cfg.UnderlayAddr.Is4():
		return nil, fmt.Errorf("ipip underlay address %v is not an IPv4 address", cfg.UnderlayAddr)
	case !cfg.Subnet.IsValid() || !cfg.Subnet.Addr().Is4():
		return nil, fmt.Errorf("ipip subnet %v is not an IPv4 prefix", cfg.Subnet)
	}
	cfg.Subnet = cfg.Subnet.Masked()
	return &Backend{
		cfg:    cfg,
		handle: backend.DefaultHandle(cfg.Handle),
		log:    cfg.Logger.With("backend", "ipip", "device", cfg.Device),
	}, nil
}

func (b *Backend) Name() string   { return Name }
func (b *Backend) Device() string { return b.cfg.Device }
func (b *Backend) Overhead() int  { return Overhead }

// Usable: the peer runs ipip and IP protocol 4 passes between us.
func (b *Backend) Usable(peer backend.Peer) (bool, string) {
	switch {
	case !slices.Contains(peer.Encaps, Name):
		return false, "the peer does not run ipip"
	case b.cfg.PathWorks != nil && !b.cfg.PathWorks(peer.Address):
		return false, "IP protocol 4 does not pass between us and the peer"
	}
	return true, "both hosts run ipip and IP protocol 4 passes"
}

// Ingress matches IP protocol 4 by the name iptables-save prints for it:
// the /etc/protocols name where the host has one ("ipencap" on Debian),
// else the number.
func (b *Backend) Ingress() string { return "-p " + backend.ProtocolName(unix.IPPROTO_IPIP) }

// Ensure creates or repairs the device: type ipip, local = underlay address,
// no remote (one device serves all peers), path MTU discovery on so inner
// packets too large for the path get an ICMP error instead of fragmentation.
func (b *Backend) Ensure(ctx context.Context, mtu int) (int, error) {
	if err := ctx.Err(); err != nil {
		return 0, err
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	h := b.handle
	want := b.device(mtu)

	link, created, err := backend.EnsureLink(h, "ipip", want, func(have netlink.Link) string { return mismatch(have, want) }, b.log)
	if err != nil {
		return 0, err
	}
	if created {
		b.log.Info("created ipip device", "device", b.cfg.Device, "local", b.cfg.UnderlayAddr, "mtu", mtu)
	}
	if err := backend.FinishLink(h, "ipip", link, mtu, b.cfg.Subnet.Addr()); err != nil {
		return 0, err
	}
	b.linkIndex = link.Attrs().Index
	return b.linkIndex, nil
}

func (b *Backend) device(mtu int) *netlink.Iptun {
	return &netlink.Iptun{
		LinkAttrs: netlink.LinkAttrs{Name: b.cfg.Device, MTU: mtu},
		Local:     b.cfg.UnderlayAddr.AsSlice(),
		PMtuDisc:  1,
	}
}

func mismatch(have netlink.Link, want *netlink.Iptun) string {
	t, ok := have.(*netlink.Iptun)
	switch {
	case !ok:
		return fmt.Sprintf("device is of type %s, not ipip", have.Type())
	case !t.Local.Equal(want.Local):
		return fmt.Sprintf("local %v, want %v", t.Local, want.Local)
	case len(t.Remote) != 0 && !t.Remote.IsUnspecified():
		return fmt.Sprintf("remote %v, want none", t.Remote)
	case t.Link != 0:
		return fmt.Sprintf("bound to ifindex %d, want unbound", t.Link)
	case t.PMtuDisc != 1:
		return "path MTU discovery is off"
	case t.FlowBased:
		return "device is flow based (external)"
	}
	return ""
}

// SyncPeers has nothing to do: ipip keeps no per-peer state besides the route.
func (b *Backend) SyncPeers([]backend.Peer) error { return nil }

// RouteFor is "<dst> via <peer underlay address> dev <device> onlink": the
// route's gateway becomes the outer destination address.
func (b *Backend) RouteFor(dst netip.Prefix, peer backend.Peer) (*netlink.Route, error) {
	b.mu.Lock()
	idx := b.linkIndex
	b.mu.Unlock()
	if idx == 0 {
		return nil, fmt.Errorf("ipip: route %s to peer %s: device %s not ensured", dst, peer.Name, b.cfg.Device)
	}
	return routeFor(idx, dst, peer)
}

// CarriesIPv6: an ipip device carries IPv4 alone (IPv6 in IPv4 is sit, a
// device of its own); peers' IPv6 subnets go over vxlan or wireguard.
func (b *Backend) CarriesIPv6() bool { return false }

func routeFor(linkIndex int, dst netip.Prefix, peer backend.Peer) (*netlink.Route, error) {
	if !peer.Address.Is4() {
		return nil, fmt.Errorf("ipip: route %s to peer %s: underlay address %v is not IPv4", dst, peer.Name, peer.Address)
	}
	if !dst.IsValid() || !dst.Addr().Is4() {
		return nil, fmt.Errorf("ipip: route to peer %s: destination %v is not an IPv4 prefix", peer.Name, dst)
	}
	return &netlink.Route{
		LinkIndex: linkIndex,
		Dst:       backend.IPNet(dst),
		Gw:        net.IP(peer.Address.AsSlice()),
		Flags:     int(netlink.FLAG_ONLINK),
		Scope:     netlink.SCOPE_UNIVERSE,
	}, nil
}

// Supported reports whether the kernel behind h can create ipip devices, by
// creating a throwaway one and deleting it. A kernel without ipip answers
// EOPNOTSUPP ("Unknown device type"): that is (false, nil). Note that loading
// the module makes the kernel add its fallback device tunl0 to every
// namespace; fabric leaves tunl0 alone.
func Supported(h *netlink.Handle) (bool, error) {
	h = backend.DefaultHandle(h)
	var suffix [3]byte
	if _, err := rand.Read(suffix[:]); err != nil {
		return false, err
	}
	name := "fabprobe" + hex.EncodeToString(suffix[:])
	// A tunnel with no local and no remote address is what the kernel's own
	// fallback device tunl0 is: once the ipip module is loaded, creating a
	// second one fails with EEXIST. Give the probe device a loopback local
	// address of its own, and read EEXIST as "the kernel knows ipip" anyway,
	// since the type lookup succeeded before the tunnel lookup clashed.
	local := netip.AddrFrom4([4]byte{127, suffix[0], suffix[1], suffix[2] | 1})
	err := h.LinkAdd(&netlink.Iptun{LinkAttrs: netlink.LinkAttrs{Name: name}, Local: local.AsSlice()})
	if errors.Is(err, unix.EOPNOTSUPP) || errors.Is(err, unix.EAFNOSUPPORT) || errors.Is(err, unix.EPROTONOSUPPORT) {
		return false, nil
	}
	if errors.Is(err, unix.EEXIST) {
		return true, nil
	}
	if err != nil {
		return false, fmt.Errorf("probe ipip support by creating %s: %w", name, err)
	}
	if err := backend.DeleteLink(h, name); err != nil {
		return true, fmt.Errorf("remove ipip probe device: %w", err)
	}
	return true, nil
}
