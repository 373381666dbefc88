package vxlanfallback

import (
	"context"
	"net"
	"net/netip"
	"strings"
	"testing"

	"github.com/fabricnet/fabric/backend"
	"github.com/fabricnet/fabric/lab"
	"github.com/vishvananda/netlink"
)

// hostNS makes a namespace with an underlay device (a bridge: this kernel has
// no dummy) carrying 192.168.100.11/24, and returns its name, a netlink
// handle into it and the underlay device name.
func hostNS(t *testing.T) (string, *netlink.Handle, string) {
	t.Helper()
	lab.RequireRoot(t)
	name := lab.AddNS(t, lab.Prefix("vx"))
	dev := name + "u"
	lab.Bridge(t, name, dev)
	lab.Addr(t, name, dev, "192.168.100.11/24")
	return name, lab.Handle(t, name), dev
}

func newBackend(t *testing.T, h *netlink.Handle, dev string) *Backend {
	t.Helper()
	b, err := New(Config{Handle: h, Port: 8472, UnderlayAddr: netip.MustParseAddr("192.168.100.11"),
		UnderlayDev: dev, Subnet: netip.MustParsePrefix("10.244.1.0/24")})
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func TestEnsureCreatesAndRepairsDevice(t *testing.T) {
	ns, h, dev := hostNS(t)
	// A device of an earlier configuration: wrong VNI, default port, learning on.
	lab.Run(t, "ip", "-n", ns, "link", "add", DefaultDevice, "type", "vxlan", "id", "7", "dstport", "4789",
		"local", "192.168.100.11", "dev", dev)
	b := newBackend(t, h, dev)
	idx, err := b.Ensure(context.Background(), 1450)
	if err != nil {
		t.Fatal(err)
	}
	link, err := h.LinkByName(DefaultDevice)
	if err != nil {
		t.Fatal(err)
	}
	vx := link.(*netlink.Vxlan)
	if vx.VxlanId != DefaultVNI || vx.Port != 8472 || vx.Learning || vx.MTU != 1450 || vx.Index != idx ||
		vx.HardwareAddr.String() != "0e:fa:c0:a8:64:0b" || vx.Flags&net.FlagUp == 0 {
		t.Fatalf("device after Ensure: vni %d port %d learning %v mtu %d mac %s flags %v",
			vx.VxlanId, vx.Port, vx.Learning, vx.MTU, vx.HardwareAddr, vx.Flags)
	}
	if out := lab.Run(t, "ip", "-n", ns, "-4", "addr", "show", "dev", DefaultDevice); !strings.Contains(out, "inet 10.244.1.0/32") {
		t.Errorf("gateway address missing:\n%s", out)
	}

	// Somebody changes the MAC and MTU; Ensure puts them back without recreating.
	lab.Run(t, "ip", "-n", ns, "link", "set", DefaultDevice, "address", "02:00:00:00:00:01", "mtu", "1300")
	idx2, err := b.Ensure(context.Background(), 1450)
	if err != nil {
		t.Fatal(err)
	}
	link, _ = h.LinkByName(DefaultDevice)
	if idx2 != idx || link.Attrs().MTU != 1450 || link.Attrs().HardwareAddr.String() != b.MAC().String() {
		t.Errorf("repair: index %d->%d, mtu %d, mac %s", idx, idx2, link.Attrs().MTU, link.Attrs().HardwareAddr)
	}

	// The MAC is the same for a new Backend (a restart) with the same address.
	if again := newBackend(t, h, dev); again.MAC().String() != b.MAC().String() {
		t.Errorf("MAC not stable across restarts: %s vs %s", again.MAC(), b.MAC())
	}

	if err := backend.DeleteLink(h, b.Device()); err != nil { // encaps.Kind.Cleanup
		t.Fatal(err)
	}
	if _, err := h.LinkByName(DefaultDevice); err == nil {
		t.Error("device survives Cleanup")
	}
}

func TestSyncPeersExactState(t *testing.T) {
	ns, h, dev := hostNS(t)
	b := newBackend(t, h, dev)
	if err := b.SyncPeers(nil); err != nil {
		t.Fatalf("SyncPeers(nil) without a device: %v", err)
	}
	if _, err := b.Ensure(context.Background(), 1450); err != nil {
		t.Fatal(err)
	}
	peer := func(n byte) backend.Peer {
		addr := netip.AddrFrom4([4]byte{192, 168, 100, 10 + n})
		return backend.Peer{Name: "h" + string('0'+n), Address: addr, VTEPMAC: MACFor(addr, netip.Prefix{}),
			Subnet: netip.PrefixFrom(netip.AddrFrom4([4]byte{10, 244, n, 0}), 24)}
	}
	if err := b.SyncPeers([]backend.Peer{peer(2), peer(3)}); err != nil {
		t.Fatal(err)
	}
	// Against the view: peer 3 leaves and comes back.
	if err := b.SyncPeers([]backend.Peer{peer(2)}); err != nil {
		t.Fatal(err)
	}
	if all := lab.Run(t, "ip", "-n", ns, "neigh", "show", "dev", DefaultDevice) +
		lab.Run(t, "bridge", "-n", ns, "fdb", "show", "dev", DefaultDevice); strings.Contains(all, "10.244.3.0") || strings.Contains(all, "0e:fa:c0:a8:64:0d") {
		t.Errorf("peer 3 left, its entries stay:\n%s", all)
	}
	if err := b.SyncPeers([]backend.Peer{peer(2), peer(3)}); err != nil {
		t.Fatal(err)
	}
	if neigh := lab.Run(t, "ip", "-n", ns, "neigh", "show", "dev", DefaultDevice); !strings.Contains(neigh, "10.244.3.0 lladdr 0e:fa:c0:a8:64:0d PERMANENT") {
		t.Errorf("peer 3 came back, its neighbour entry did not:\n%s", neigh)
	}
	// Foreign leftovers on our device, and peer 2's neighbour entry
	// deleted by hand: the resync timer's Reread makes the next sync read
	// the kernel and put them right.
	lab.Run(t, "ip", "-n", ns, "neigh", "add", "10.244.9.0", "lladdr", "0e:fa:01:02:03:04", "dev", DefaultDevice, "nud", "permanent")
	lab.Run(t, "bridge", "-n", ns, "fdb", "append", "0e:fa:01:02:03:04", "dev", DefaultDevice, "dst", "192.168.100.99")
	lab.Run(t, "ip", "-n", ns, "neigh", "del", "10.244.2.0", "dev", DefaultDevice)
	b.Reread()
	// Peer 3 leaves.
	if err := b.SyncPeers([]backend.Peer{peer(2)}); err != nil {
		t.Fatal(err)
	}
	neigh := lab.Run(t, "ip", "-n", ns, "neigh", "show", "dev", DefaultDevice)
	fdb := lab.Run(t, "bridge", "-n", ns, "fdb", "show", "dev", DefaultDevice)
	if !strings.Contains(neigh, "10.244.2.0 lladdr 0e:fa:c0:a8:64:0c PERMANENT") ||
		!strings.Contains(fdb, "0e:fa:c0:a8:64:0c dst 192.168.100.12") {
		t.Errorf("peer 2 state missing:\n%s\n%s", neigh, fdb)
	}
	for _, gone := range []string{"10.244.3.0", "0e:fa:c0:a8:64:0d", "10.244.9.0", "0e:fa:01:02:03:04"} {
		if strings.Contains(neigh+fdb, gone) {
			t.Errorf("%s left behind:\n%s\n%s", gone, neigh, fdb)
		}
	}

	r, err := b.RouteFor(netip.MustParsePrefix("10.244.2.0/24"), peer(2))
	if err != nil {
		t.Fatal(err)
	}
	if r.Dst.String() != "10.244.2.0/24" || r.Gw.String() != "10.244.2.0" || r.Flags&int(netlink.FLAG_ONLINK) == 0 {
		t.Errorf("RouteFor = %+v", r)
	}
	// A peer without a VTEP MAC is reported by name and does not stop the others.
	bad := peer(4)
	bad.VTEPMAC = nil
	err = b.SyncPeers([]backend.Peer{peer(2), bad})
	if err == nil || !strings.Contains(err.Error(), "h4") {
		t.Errorf("SyncPeers with a bad peer: %v", err)
	}
}

func TestNewValidates(t *testing.T) {
	good := Config{UnderlayAddr: netip.MustParseAddr("192.0.2.1"), UnderlayDev: "eth0", Subnet: netip.MustParsePrefix("10.244.1.0/24")}
	b, err := New(good)
	if err != nil || b.Port() != DefaultPort || b.VNI() != DefaultVNI || b.Device() != DefaultDevice {
		t.Fatalf("defaults: %v", err)
	}
	for name, mutate := range map[string]func(*Config){
		"mapped underlay":     func(c *Config) { c.UnderlayAddr = netip.MustParseAddr("::ffff:192.0.2.1") },
		"link-local underlay": func(c *Config) { c.UnderlayAddr = netip.MustParseAddr("fe80::1") },
		"no underlay":         func(c *Config) { c.UnderlayDev = "" },
		"port":                func(c *Config) { c.Port = 70000 },
		"vni":                 func(c *Config) { c.VNI = 1 << 24 },
		"long name":           func(c *Config) { c.Device = "a-very-long-device-name" },
		"no subnet":           func(c *Config) { c.Subnet = netip.Prefix{} },
	} {
		c := good
		mutate(&c)
		if _, err := New(c); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
}
