package dataplane

import (
	"net"
	"net/netip"
	"testing"

	"github.com/fabricnet/fabric/backend"
	"github.com/fabricnet/fabric/ipip"
	"github.com/fabricnet/fabric/vxlanfallback"
	"github.com/fabricnet/fabric/wireguard"
	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"
)

func wireGuard(t *testing.T) *wireguard.Backend {
	t.Helper()
	k, err := wgtypes.GeneratePrivateKey()
	if err != nil {
		t.Fatal(err)
	}
	wg, err := wireguard.New(wireguard.Config{PrivateKey: k, UnderlayAddr: netip.MustParseAddr("192.0.2.1"), Subnet: netip.MustParsePrefix("10.244.1.0/24")})
	if err != nil {
		t.Fatal(err)
	}
	return wg
}

// These tests need no root: New and choose do not touch the kernel.

func backends(t *testing.T, pathWorks bool) (*ipip.Backend, *vxlanfallback.Backend) {
	t.Helper()
	addr, subnet := netip.MustParseAddr("192.0.2.1"), netip.MustParsePrefix("10.244.1.0/24")
	ip, err := ipip.New(ipip.Config{UnderlayAddr: addr, Subnet: subnet, PathWorks: func(netip.Addr) bool { return pathWorks }})
	if err != nil {
		t.Fatal(err)
	}
	vx, err := vxlanfallback.New(vxlanfallback.Config{UnderlayAddr: addr, UnderlayDev: "eth0", Subnet: subnet})
	if err != nil {
		t.Fatal(err)
	}
	return ip, vx
}

// MTU: the largest overhead of the backends, subtracted once.
func TestMTU(t *testing.T) {
	ip, vx := backends(t, true)
	wg := wireGuard(t)
	for _, tc := range []struct {
		name     string
		backends []backend.Backend
		underlay int
		want     int
	}{
		{"vxlan", []backend.Backend{vx}, 1500, 1450},
		{"ipip", []backend.Backend{ip}, 1500, 1480},
		{"auto", []backend.Backend{ip, vx}, 1500, 1450},
		{"encrypted", []backend.Backend{wg}, 1500, 1440},
		{"encryption optional", []backend.Backend{wg, ip, vx}, 1500, 1440},
		{"jumbo vxlan", []backend.Backend{vx}, 9000, 8950},
	} {
		m, err := New(Config{Backends: tc.backends, UnderlayDev: "eth0", UnderlayMTU: tc.underlay})
		if err != nil {
			t.Fatalf("%s: %v", tc.name, err)
		}
		if m.MTU() != tc.want {
			t.Errorf("%s: MTU %d, want %d", tc.name, m.MTU(), tc.want)
		}
	}
}

func TestNewRejects(t *testing.T) {
	_, vx := backends(t, true)
	for name, cfg := range map[string]Config{
		"no encapsulation": {},
		"kernel protocol":  {Backends: []backend.Backend{vx}, Protocol: 2},
		"static protocol":  {Backends: []backend.Backend{vx}, Protocol: 4},
		"tiny underlay":    {Backends: []backend.Backend{vx}, UnderlayMTU: 600},
	} {
		cfg.UnderlayDev = "eth0"
		if cfg.UnderlayMTU == 0 {
			cfg.UnderlayMTU = 1500
		}
		if _, err := New(cfg); err == nil {
			t.Errorf("%s: New accepted it", name)
		}
	}
}

func TestChoose(t *testing.T) {
	ip, vx := backends(t, true)
	ipBlocked, _ := backends(t, false)
	mac := net.HardwareAddr{0x0e, 0xfa, 192, 0, 2, 2}
	peer := func(mac net.HardwareAddr, encaps ...string) backend.Peer {
		return backend.Peer{Name: "p", Address: netip.MustParseAddr("192.0.2.2"), VTEPMAC: mac, Encaps: encaps}
	}
	wg := wireGuard(t)
	keyed := func(p backend.Peer) backend.Peer { p.WireGuardKey = wg.PublicKey(); return p }
	connected := []netip.Prefix{netip.MustParsePrefix("192.0.2.0/24")}
	for _, tc := range []struct {
		name      string
		backends  []backend.Backend
		peer      backend.Peer
		connected []netip.Prefix
		want      string // "" = no encapsulation reaches the peer
		why       string
	}{
		{"both ipip", []backend.Backend{ip, vx}, peer(mac, "ipip", "vxlan"), nil, "ipip", "both hosts run ipip and IP protocol 4 passes"},
		{"this host runs vxlan only", []backend.Backend{vx}, peer(mac, "ipip", "vxlan"), nil, "vxlan", "the peer runs vxlan"},
		{"peer runs vxlan only", []backend.Backend{ip, vx}, peer(mac, "vxlan"), nil, "vxlan", "ipip: the peer does not run ipip"},
		{"proto 4 blocked", []backend.Backend{ipBlocked, vx}, peer(mac, "ipip", "vxlan"), nil, "vxlan", "ipip: IP protocol 4 does not pass between us and the peer"},
		{"peer without VTEP MAC", []backend.Backend{vx}, peer(nil, "vxlan"), nil, "", "vxlan: the peer's node record has no VTEP MAC"},
		{"ipip host, vxlan peer", []backend.Backend{ip}, peer(mac, "vxlan"), nil, "", "ipip: the peer does not run ipip"},
		{"cross subnet", []backend.Backend{ip, vx}, peer(mac, "ipip"), connected, EncapDirect, "cross-subnet: peer underlay address is inside the connected prefix 192.0.2.0/24"},
		{"other subnet", []backend.Backend{ip, vx}, peer(mac, "ipip"), []netip.Prefix{netip.MustParsePrefix("198.51.100.0/24")}, "ipip", "both hosts run ipip and IP protocol 4 passes"},
		// Encryption required: a peer that cannot encrypt gets nothing.
		{"both encrypt", []backend.Backend{wg}, keyed(peer(mac, "wireguard", "vxlan")), nil, "wireguard", "both hosts encrypt with WireGuard"},
		{"peer in clear", []backend.Backend{wg}, peer(mac, "ipip", "vxlan"), nil, "", "wireguard: the peer does not encrypt (its node record offers no wireguard)"},
		{"peer key refused", []backend.Backend{wg}, peer(mac, "wireguard"), nil, "", "wireguard: the peer's node record has no usable WireGuard public key"},
		// Optional: clear to the peers that cannot encrypt.
		{"optional, peer in clear", []backend.Backend{wg, vx}, peer(mac, "vxlan"), nil, "vxlan", "wireguard: the peer does not encrypt (its node record offers no wireguard)"},
		{"optional, both encrypt", []backend.Backend{wg, vx}, keyed(peer(mac, "wireguard", "vxlan")), nil, "wireguard", "both hosts encrypt with WireGuard"},
	} {
		m, err := New(Config{Backends: tc.backends, UnderlayDev: "eth0", UnderlayMTU: 1500})
		if err != nil {
			t.Fatal(err)
		}
		if _, got, why := m.choose(tc.peer, tc.connected, false); got != tc.want || why != tc.why {
			t.Errorf("%s: chose %q (%s), want %q (%s)", tc.name, got, why, tc.want, tc.why)
		}
	}
}

// A peer's IPv6 prefixes skip an encapsulation that carries only IPv4.
func TestChooseIPv6(t *testing.T) {
	ip, vx := backends(t, true)
	mac := net.HardwareAddr{0x0e, 0xfa, 192, 0, 2, 2}
	peer := backend.Peer{Name: "p", Address: netip.MustParseAddr("192.0.2.2"), VTEPMAC: mac, Encaps: []string{"ipip", "vxlan"}}
	for _, tc := range []struct {
		name     string
		backends []backend.Backend
		want     string
		why      string
	}{
		{"auto", []backend.Backend{ip, vx}, "vxlan", "ipip: carries only IPv4"},
		{"ipip alone", []backend.Backend{ip}, "", "ipip: carries only IPv4"},
		{"vxlan", []backend.Backend{vx}, "vxlan", "the peer runs vxlan"},
	} {
		m, err := New(Config{Backends: tc.backends, UnderlayDev: "eth0", UnderlayMTU: 1500})
		if err != nil {
			t.Fatal(err)
		}
		if _, got, why := m.choose(peer, nil, true); got != tc.want || why != tc.why {
			t.Errorf("%s: IPv6 chose %q (%s), want %q (%s)", tc.name, got, why, tc.want, tc.why)
		}
	}
	// IPv4 still takes ipip first.
	m, _ := New(Config{Backends: []backend.Backend{ip, vx}, UnderlayDev: "eth0", UnderlayMTU: 1500})
	if _, got, _ := m.choose(peer, nil, false); got != "ipip" {
		t.Errorf("IPv4 chose %q, want ipip", got)
	}
}

// A dual-stack peer on this host's segment: IPv4 goes direct, IPv6 through
// VXLAN (no IPv4 gateway for an IPv6 route); a peer without IPv6 uses no
// tunnel at all.
func TestChoosePeersIPv6Direct(t *testing.T) {
	_, vx := backends(t, true)
	m, err := New(Config{Backends: []backend.Backend{vx}, UnderlayDev: "eth0", UnderlayMTU: 1500, CrossSubnet: true})
	if err != nil {
		t.Fatal(err)
	}
	connected := []netip.Prefix{netip.MustParsePrefix("192.0.2.0/24")}
	info := func(name, addr, v4, v6 string) *PeerInfo {
		p := &PeerInfo{Name: name, Address: netip.MustParseAddr(addr), VTEPMAC: net.HardwareAddr{0x0e, 0xfa, 192, 0, 2, 2},
			Encaps: []string{"vxlan"}, Subnet: netip.MustParsePrefix(v4)}
		if v6 != "" {
			p.SubnetV6 = netip.MustParsePrefix(v6)
		}
		return p
	}
	dual, v4only := info("dual", "192.0.2.2", "10.244.2.0/24", "fd00:10:244:2::/64"), info("v4only", "192.0.2.3", "10.244.3.0/24", "")
	peers := m.choosePeers([]RemoteRoute{
		{Prefix: dual.Subnet, NextHop: dual.Address, Peer: dual}, {Prefix: dual.SubnetV6, NextHop: dual.Address, Peer: dual},
		{Prefix: v4only.Subnet, NextHop: v4only.Address, Peer: v4only},
	}, connected)
	if p := peers["dual"]; p.encap != EncapDirect || p.v6.encap != "vxlan" || p.v6.err != nil {
		t.Errorf("dual-stack peer on the segment: IPv4 %q, IPv6 %q (%v), want direct and vxlan", p.encap, p.v6.encap, p.v6.err)
	}
	if p := peers["v4only"]; p.encap != EncapDirect || p.v6 != p {
		t.Errorf("IPv4-only peer on the segment: %q, IPv6 plan %+v, want direct and no IPv6 plan", p.encap, p.v6)
	}
}
