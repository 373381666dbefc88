// Package vxlanfallback is the VXLAN encapsulation: one VXLAN device with
// learning off, and per peer a permanent neighbour entry (peer gateway address
// -> peer VTEP MAC) and an FDB entry (VTEP MAC -> peer underlay address), the
// way flannel's vxlan backend does it. It works on kernels without ipip.
package vxlanfallback

import (
	"bytes"
	"context"
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
	Name          = "vxlan"
	DefaultDevice = "fabric.vxlan"
	DefaultVNI    = 4096
	DefaultPort   = 4789
	// Overhead is outer IPv4 (20) + UDP (8) + VXLAN (8) + inner Ethernet
	// (14); over an IPv6 underlay the outer header is 40 bytes (Overhead6).
	Overhead  = 50
	Overhead6 = Overhead + 20
)

// Config describes the VXLAN device of this host.
type Config struct {
	Handle       *netlink.Handle // nil = current namespace
	Device       string          // default DefaultDevice
	VNI          int             // default DefaultVNI
	Port         int             // UDP port, default DefaultPort (flannel uses 8472)
	UnderlayAddr netip.Addr      // local VTEP address
	UnderlayDev  string          // device the VXLAN packets leave by
	Subnet       netip.Prefix    // own container subnet; its network address goes on the device as /32
	Logger       *slog.Logger
}

// Backend owns the VXLAN device and its neighbour and FDB entries.
type Backend struct {
	cfg    Config
	handle *netlink.Handle
	log    *slog.Logger
	mac    net.HardwareAddr

	mu        sync.Mutex
	linkIndex int
	// view is the neighbour and FDB entries as last written or read; nil
	// means read the kernel at the next SyncPeers (the first, after
	// Reread, after a failed write). A dump of the neighbour table walks
	// every entry of every namespace, so on each peer change it would cost
	// in proportion to the whole machine, not to this host.
	view *peerView
}

// peerView is the per-peer state on the device.
type peerView struct {
	link  int
	neigh map[netip.Addr]string   // peer gateway address -> VTEP MAC
	fdb   map[string][]netip.Addr // VTEP MAC -> peer underlay address (more than one only if appended by hand)
}

var (
	_ backend.Backend  = (*Backend)(nil)
	_ backend.Rereader = (*Backend)(nil)
)

// New validates cfg and fills defaults. It does not touch the kernel: the
// device is made by Ensure, only when some peer needs it.
func New(cfg Config) (*Backend, error) {
	if cfg.Device == "" {
		cfg.Device = DefaultDevice
	}
	if cfg.VNI == 0 {
		cfg.VNI = DefaultVNI
	}
	if cfg.Port == 0 {
		cfg.Port = DefaultPort
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	switch {
	case len(cfg.Device) > 15:
		return nil, fmt.Errorf("vxlan device name %q is longer than 15 bytes", cfg.Device)
	case cfg.VNI < 1 || cfg.VNI > 1<<24-1:
		return nil, fmt.Errorf("vxlan VNI %d out of range 1..16777215", cfg.VNI)
	case cfg.Port < 1 || cfg.Port > 65535:
		return nil, fmt.Errorf("vxlan port %d out of range 1..65535", cfg.Port)
	case !cfg.UnderlayAddr.IsGlobalUnicast() || cfg.UnderlayAddr.Is4In6() || cfg.UnderlayAddr.Zone() != "":
		return nil, fmt.Errorf("vxlan underlay address %v is not a global IPv4 or IPv6 address", cfg.UnderlayAddr)
	case cfg.UnderlayDev == "":
		return nil, errors.New("vxlan needs the underlay device name")
	case !cfg.Subnet.IsValid() || !cfg.Subnet.Addr().Is4():
		return nil, fmt.Errorf("vxlan subnet %v is not an IPv4 prefix", cfg.Subnet)
	}
	cfg.Subnet = cfg.Subnet.Masked()
	return &Backend{
		cfg:    cfg,
		handle: backend.DefaultHandle(cfg.Handle),
		log:    cfg.Logger.With("backend", "vxlan", "device", cfg.Device),
		mac:    MACFor(cfg.UnderlayAddr, cfg.Subnet),
	}, nil
}

// MACFor is the VTEP MAC of the host with underlay address addr and
// container subnet subnet: 0e:fa: and the four bytes of an IPv4 address;
// with an IPv6 underlay (sixteen bytes, whose last four two hosts may
// share) 0e:fb: and the subnet's network address, which the pool leases to
// one host. Locally administered and unicast, and the same after a restart,
// so the MAC published in the node registry stays true.
func MACFor(addr netip.Addr, subnet netip.Prefix) net.HardwareAddr {
	if addr.Is4() {
		a := addr.As4()
		return net.HardwareAddr{0x0e, 0xfa, a[0], a[1], a[2], a[3]}
	}
	a := subnet.Masked().Addr().As4()
	return net.HardwareAddr{0x0e, 0xfb, a[0], a[1], a[2], a[3]}
}

func (b *Backend) Name() string   { return Name }
func (b *Backend) Device() string { return b.cfg.Device }
func (b *Backend) Overhead() int {
	if b.cfg.UnderlayAddr.Is4() {
		return Overhead
	}
	return Overhead6
}
func (b *Backend) Port() int             { return b.cfg.Port }
func (b *Backend) VNI() int              { return b.cfg.VNI }
func (b *Backend) MAC() net.HardwareAddr { return bytes.Clone(b.mac) }

// Usable: the peer runs vxlan and its record carries its VTEP MAC.
func (b *Backend) Usable(peer backend.Peer) (bool, string) {
	switch {
	case !slices.Contains(peer.Encaps, Name):
		return false, "the peer does not run vxlan"
	case len(peer.VTEPMAC) != 6:
		return false, "the peer's node record has no VTEP MAC"
	case peer.Address.Is4() != b.cfg.UnderlayAddr.Is4():
		return false, fmt.Sprintf("the peer's underlay address %s and this host's %s are of different families", peer.Address, b.cfg.UnderlayAddr)
	}
	return true, "the peer runs vxlan"
}

// Ingress matches VXLAN packets to this host's port.
func (b *Backend) Ingress() string { return fmt.Sprintf("-p udp -m udp --dport %d", b.cfg.Port) }

// Ensure creates the device, or repairs it. A device with the wrong VNI, port,
// local address, underlay device or learning on is deleted and recreated,
// because the kernel cannot change those in place.
func (b *Backend) Ensure(ctx context.Context, mtu int) (int, error) {
	if err := ctx.Err(); err != nil {
		return 0, err
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	h := b.handle
	underlay, err := h.LinkByName(b.cfg.UnderlayDev)
	if err != nil {
		return 0, fmt.Errorf("vxlan: underlay device %s: %w", b.cfg.UnderlayDev, err)
	}
	want := &netlink.Vxlan{
		LinkAttrs:    netlink.LinkAttrs{Name: b.cfg.Device, MTU: mtu, HardwareAddr: b.mac},
		VxlanId:      b.cfg.VNI,
		VtepDevIndex: underlay.Attrs().Index,
		SrcAddr:      b.cfg.UnderlayAddr.AsSlice(),
		Port:         b.cfg.Port,
		Learning:     false,
	}

	link, created, err := backend.EnsureLink(h, "vxlan", want, func(have netlink.Link) string { return mismatch(have, want) }, b.log)
	if err != nil {
		return 0, fmt.Errorf("%w (vni %d, port %d, local %s, dev %s)", err, b.cfg.VNI, b.cfg.Port, b.cfg.UnderlayAddr, b.cfg.UnderlayDev)
	}
	if created {
		b.log.Info("created vxlan device", "device", b.cfg.Device, "vni", b.cfg.VNI, "port", b.cfg.Port,
			"local", b.cfg.UnderlayAddr, "underlay", b.cfg.UnderlayDev, "mtu", mtu, "mac", b.mac.String())
	}
	// The MAC travels in the node registry: keep it stable.
	if !bytes.Equal(link.Attrs().HardwareAddr, b.mac) {
		if err := h.LinkSetHardwareAddr(link, b.mac); err != nil {
			return 0, fmt.Errorf("vxlan: set MAC %s on %s: %w", b.mac, b.cfg.Device, err)
		}
	}
	if err := backend.FinishLink(h, "vxlan", link, mtu, b.cfg.Subnet.Addr()); err != nil {
		return 0, err
	}
	b.linkIndex = link.Attrs().Index
	return b.linkIndex, nil
}

// mismatch names the first attribute of have that differs from want, or "".
func mismatch(have netlink.Link, want *netlink.Vxlan) string {
	v, ok := have.(*netlink.Vxlan)
	switch {
	case !ok:
		return fmt.Sprintf("device is of type %s, not vxlan", have.Type())
	case v.VxlanId != want.VxlanId:
		return fmt.Sprintf("vni %d, want %d", v.VxlanId, want.VxlanId)
	case v.Port != want.Port:
		return fmt.Sprintf("port %d, want %d", v.Port, want.Port)
	case !v.SrcAddr.Equal(want.SrcAddr):
		return fmt.Sprintf("local %v, want %v", v.SrcAddr, want.SrcAddr)
	case v.VtepDevIndex != want.VtepDevIndex:
		return fmt.Sprintf("underlay ifindex %d, want %d", v.VtepDevIndex, want.VtepDevIndex)
	case v.Learning:
		return "learning is on"
	}
	return ""
}

// SyncPeers makes the neighbour and FDB entries on the device exactly those
// of peers, against the view of them, or the kernel's entries when there is
// no view. One bad peer does not stop the others.
func (b *Backend) SyncPeers(peers []backend.Peer) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	h := b.handle
	link, err := h.LinkByName(b.cfg.Device)
	if err != nil {
		if backend.IsLinkNotFound(err) && len(peers) == 0 {
			return nil // nothing to sync and nothing to clean up
		}
		return fmt.Errorf("vxlan: sync peers: device %s: %w", b.cfg.Device, err)
	}
	idx := link.Attrs().Index

	var errs []error
	want := &peerView{link: idx, neigh: map[netip.Addr]string{}, fdb: map[string][]netip.Addr{}}
	for _, p := range peers {
		if len(p.VTEPMAC) != 6 || !p.Address.IsValid() || p.Address.Is4() != b.cfg.UnderlayAddr.Is4() || !p.Subnet.IsValid() {
			errs = append(errs, fmt.Errorf("vxlan: peer %s: needs a VTEP MAC, an underlay address of this host's family (%s) and a subnet (mac %q, address %v, subnet %v)",
				p.Name, b.cfg.UnderlayAddr, p.VTEPMAC, p.Address, p.Subnet))
			continue
		}
		want.neigh[p.Subnet.Masked().Addr()] = p.VTEPMAC.String()
		if p.SubnetV6.IsValid() {
			want.neigh[p.SubnetV6.Masked().Addr()] = p.VTEPMAC.String()
		}
		want.fdb[p.VTEPMAC.String()] = []netip.Addr{p.Address}
	}
	have := b.view
	if have == nil || have.link != idx { // a recreated device starts empty
		if have, err = b.readPeers(idx); err != nil {
			return errors.Join(append(errs, err)...)
		}
	}
	b.view = nil // until every write below succeeded
	var writeErrs []error
	for ip, mac := range have.neigh {
		if want.neigh[ip] == mac {
			continue
		}
		hw, _ := net.ParseMAC(mac)
		n := &netlink.Neigh{LinkIndex: idx, Family: family(ip), IP: ip.AsSlice(), HardwareAddr: hw}
		if err := h.NeighDel(n); err != nil && !errors.Is(err, unix.ENOENT) {
			writeErrs = append(writeErrs, fmt.Errorf("vxlan: delete neighbour %s on %s: %w", ip, b.cfg.Device, err))
		} else {
			b.log.Debug("removed neighbour entry", "ip", ip, "mac", mac)
		}
	}
	for ip, mac := range want.neigh {
		if have.neigh[ip] == mac {
			continue
		}
		hw, _ := net.ParseMAC(mac)
		err := h.NeighSet(&netlink.Neigh{LinkIndex: idx, Family: family(ip), State: netlink.NUD_PERMANENT,
			IP: ip.AsSlice(), HardwareAddr: hw})
		if err != nil {
			writeErrs = append(writeErrs, fmt.Errorf("vxlan: set neighbour %s -> %s on %s: %w", ip, mac, b.cfg.Device, err))
		}
	}
	for mac, ips := range have.fdb {
		for _, ip := range ips {
			if slices.Contains(want.fdb[mac], ip) {
				continue
			}
			hw, _ := net.ParseMAC(mac)
			del := &netlink.Neigh{LinkIndex: idx, Family: unix.AF_BRIDGE, Flags: netlink.NTF_SELF,
				State: netlink.NUD_PERMANENT, IP: ip.AsSlice(), HardwareAddr: hw}
			if err := h.NeighDel(del); err != nil && !errors.Is(err, unix.ENOENT) {
				writeErrs = append(writeErrs, fmt.Errorf("vxlan: delete FDB entry %s -> %s on %s: %w", mac, ip, b.cfg.Device, err))
			} else {
				b.log.Debug("removed FDB entry", "mac", mac, "dst", ip)
			}
		}
	}
	for mac, ips := range want.fdb {
		if slices.Contains(have.fdb[mac], ips[0]) {
			continue
		}
		hw, _ := net.ParseMAC(mac)
		err := h.NeighSet(&netlink.Neigh{LinkIndex: idx, Family: unix.AF_BRIDGE, Flags: netlink.NTF_SELF,
			State: netlink.NUD_PERMANENT, IP: ips[0].AsSlice(), HardwareAddr: hw})
		if err != nil {
			writeErrs = append(writeErrs, fmt.Errorf("vxlan: set FDB entry %s -> %s on %s: %w", mac, ips[0], b.cfg.Device, err))
		}
	}
	if len(writeErrs) == 0 {
		b.view = want
	}
	return errors.Join(append(errs, writeErrs...)...)
}

// Reread makes the next SyncPeers read the device's entries from the kernel
// instead of trusting the view: the resync timer's drift repair (an entry
// deleted or added by hand is put right).
func (b *Backend) Reread() {
	b.mu.Lock()
	b.view = nil
	b.mu.Unlock()
}

// readPeers reads the device's neighbour and FDB entries. Only a permanent
// neighbour entry counts as present: any other is replaced.
func (b *Backend) readPeers(idx int) (*peerView, error) {
	v := &peerView{link: idx, neigh: map[netip.Addr]string{}, fdb: map[string][]netip.Addr{}}
	neighs, err := b.handle.NeighList(idx, unix.AF_INET)
	if err != nil {
		return nil, fmt.Errorf("vxlan: list neighbours on %s: %w", b.cfg.Device, err)
	}
	for _, n := range neighs {
		ip, _ := netip.AddrFromSlice(n.IP)
		mac := n.HardwareAddr.String()
		if n.State&netlink.NUD_PERMANENT == 0 {
			mac = "not permanent: " + mac // never equal to a wanted MAC
		}
		v.neigh[ip.Unmap()] = mac
	}
	// IPv6 entries: only the permanent ones are fabric's; the kernel's
	// own (neighbour discovery on the device) are left alone.
	neighs6, err := b.handle.NeighList(idx, unix.AF_INET6)
	if err != nil {
		return nil, fmt.Errorf("vxlan: list IPv6 neighbours on %s: %w", b.cfg.Device, err)
	}
	for _, n := range neighs6 {
		if ip, ok := netip.AddrFromSlice(n.IP); ok && n.State&netlink.NUD_PERMANENT != 0 {
			v.neigh[ip] = n.HardwareAddr.String()
		}
	}
	fdb, err := b.handle.NeighList(idx, unix.AF_BRIDGE)
	if err != nil {
		return nil, fmt.Errorf("vxlan: list FDB on %s: %w", b.cfg.Device, err)
	}
	for _, n := range fdb {
		ip, _ := netip.AddrFromSlice(n.IP)
		mac := n.HardwareAddr.String()
		v.fdb[mac] = append(v.fdb[mac], ip.Unmap())
	}
	return v, nil
}

func family(ip netip.Addr) int {
	if ip.Is4() {
		return unix.AF_INET
	}
	return unix.AF_INET6
}

// RouteFor is "<dst> via <peer gateway address> dev <device> onlink": the
// neighbour entry resolves the gateway to the peer's VTEP MAC, the FDB entry
// that MAC to the peer's underlay address.
func (b *Backend) RouteFor(dst netip.Prefix, peer backend.Peer) (*netlink.Route, error) {
	b.mu.Lock()
	idx := b.linkIndex
	b.mu.Unlock()
	if idx == 0 {
		return nil, fmt.Errorf("vxlan: route %s to peer %s: device %s not ensured", dst, peer.Name, b.cfg.Device)
	}
	if !peer.Subnet.IsValid() || !peer.Subnet.Addr().Is4() {
		return nil, fmt.Errorf("vxlan: route %s to peer %s: peer has no IPv4 subnet", dst, peer.Name)
	}
	gw := peer.Subnet.Masked().Addr()
	if dst.Addr().Is6() {
		// The kernel has no IPv6 route through an IPv4 gateway: IPv6 goes
		// via the peer's IPv6 gateway address, with its own neighbour entry.
		if !peer.SubnetV6.IsValid() {
			return nil, fmt.Errorf("vxlan: route %s to peer %s: peer has no IPv6 subnet", dst, peer.Name)
		}
		gw = peer.SubnetV6.Masked().Addr()
	}
	return &netlink.Route{
		LinkIndex: idx,
		Dst:       backend.IPNet(dst),
		Gw:        gw.AsSlice(),
		Flags:     int(netlink.FLAG_ONLINK),
		Scope:     netlink.SCOPE_UNIVERSE,
	}, nil
}
