package dataplane

import (
	"net/netip"
	"testing"

	"github.com/fabricnet/fabric/ipip"
	"github.com/fabricnet/fabric/vxlanfallback"
)

type fixedProber bool

func (p fixedProber) IPIPWorks(netip.Addr) bool { return bool(p) }

func backends(t *testing.T) (*ipip.Backend, *vxlanfallback.Backend) {
	t.Helper()
	addr, subnet := netip.MustParseAddr("192.0.2.1"), netip.MustParsePrefix("10.244.1.0/24")
	ip, err := ipip.New(ipip.Config{UnderlayAddr: addr, Subnet: subnet})
	if err != nil {
		t.Fatal(err)
	}
	vx, err := vxlanfallback.New(vxlanfallback.Config{UnderlayAddr: addr, UnderlayDev: "eth0", Subnet: subnet})
	if err != nil {
		t.Fatal(err)
	}
	return ip, vx
}

// MTU: the largest overhead the mode can use, subtracted once.
func TestMTU(t *testing.T) {
	ip, vx := backends(t)
	for _, tc := range []struct {
		name string
		cfg  Config
		want int
	}{
		{"vxlan", Config{Mode: ModeVXLAN, VXLAN: vx, IPIP: ip}, 1450},
		{"ipip", Config{Mode: ModeIPIP, VXLAN: vx, IPIP: ip}, 1480},
		{"auto both", Config{Mode: ModeAuto, VXLAN: vx, IPIP: ip}, 1450},
		{"auto no ipip kernel", Config{Mode: ModeAuto, VXLAN: vx}, 1450},
		{"auto ipip only", Config{Mode: ModeAuto, IPIP: ip}, 1480},
		{"jumbo vxlan", Config{Mode: ModeVXLAN, VXLAN: vx, UnderlayMTU: 9000}, 8950},
	} {
		tc.cfg.UnderlayDev = "eth0"
		if tc.cfg.UnderlayMTU == 0 {
			tc.cfg.UnderlayMTU = 1500
		}
		m, err := New(tc.cfg)
		if err != nil {
			t.Fatalf("%s: %v", tc.name, err)
		}
		if m.MTU() != tc.want {
			t.Errorf("%s: MTU %d, want %d", tc.name, m.MTU(), tc.want)
		}
	}
}

func TestNewRejects(t *testing.T) {
	_, vx := backends(t)
	for name, cfg := range map[string]Config{
		"ipip mode without ipip": {Mode: ModeIPIP, VXLAN: vx},
		"kernel protocol":        {Mode: ModeVXLAN, VXLAN: vx, Protocol: 2},
		"static protocol":        {Mode: ModeVXLAN, VXLAN: vx, Protocol: 4},
		"unknown mode":           {Mode: "gre", VXLAN: vx},
		"tiny underlay":          {Mode: ModeVXLAN, VXLAN: vx, UnderlayMTU: 600},
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

func TestChooseAuto(t *testing.T) {
	ip, vx := backends(t)
	peer := netip.MustParseAddr("192.0.2.2")
	connected := []netip.Prefix{netip.MustParsePrefix("192.0.2.0/24")}
	for _, tc := range []struct {
		name      string
		cfg       Config
		encaps    []string
		connected []netip.Prefix
		want      string
		why       string
	}{
		{"both ipip", Config{IPIP: ip, VXLAN: vx}, []string{"ipip", "vxlan"}, nil, EncapIPIP, "both kernels support ipip and IP protocol 4 passes"},
		{"no ipip here", Config{VXLAN: vx}, []string{"ipip", "vxlan"}, nil, EncapVXLAN, "this kernel has no ipip support"},
		{"no ipip there", Config{IPIP: ip, VXLAN: vx}, []string{"vxlan"}, nil, EncapVXLAN, "the peer's kernel has no ipip support"},
		{"proto 4 blocked", Config{IPIP: ip, VXLAN: vx, Prober: fixedProber(false)}, []string{"ipip", "vxlan"}, nil, EncapVXLAN, "IP protocol 4 does not pass between us and the peer"},
		{"cross subnet", Config{IPIP: ip, VXLAN: vx}, []string{"ipip"}, connected, EncapDirect, "cross-subnet: peer underlay address is inside the connected prefix 192.0.2.0/24"},
		{"other subnet", Config{IPIP: ip, VXLAN: vx}, []string{"ipip"}, []netip.Prefix{netip.MustParsePrefix("198.51.100.0/24")}, EncapIPIP, "both kernels support ipip and IP protocol 4 passes"},
	} {
		tc.cfg.Mode, tc.cfg.UnderlayDev, tc.cfg.UnderlayMTU = ModeAuto, "eth0", 1500
		m, err := New(tc.cfg)
		if err != nil {
			t.Fatal(err)
		}
		if got, why := m.choose(peer, tc.encaps, tc.connected); got != tc.want || why != tc.why {
			t.Errorf("%s: chose %s (%s), want %s (%s)", tc.name, got, why, tc.want, tc.why)
		}
	}
}
