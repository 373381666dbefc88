package dataplane

import (
	"net"
	"net/netip"
	"testing"

	"github.com/fabricnet/fabric/backend"
	"github.com/fabricnet/fabric/ipip"
	"github.com/fabricnet/fabric/vxlanfallback"
)

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
	for _, tc := range []struct {
		name     string
		backends []backend.Backend
		underlay int
		want     int
	}{
		{"vxlan", []backend.Backend{vx}, 1500, 1450},
		{"ipip", []backend.Backend{ip}, 1500, 1480},
		{"auto", []backend.Backend{ip, vx}, 1500, 1450},
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
	} {
		m, err := New(Config{Backends: tc.backends, UnderlayDev: "eth0", UnderlayMTU: 1500})
		if err != nil {
			t.Fatal(err)
		}
		if _, got, why := m.choose(tc.peer, tc.connected); got != tc.want || why != tc.why {
			t.Errorf("%s: chose %q (%s), want %q (%s)", tc.name, got, why, tc.want, tc.why)
		}
	}
}
