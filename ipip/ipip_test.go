package ipip

import (
	"net/netip"
	"os/exec"
	"strings"
	"testing"

	"github.com/fabricnet/fabric/backend"
	"github.com/fabricnet/fabric/lab"
	"github.com/vishvananda/netlink"
)

func TestRouteForShape(t *testing.T) {
	peer := backend.Peer{Name: "h2", Address: netip.MustParseAddr("192.168.100.12"), Subnet: netip.MustParsePrefix("10.244.2.0/24")}
	r, err := routeFor(7, netip.MustParsePrefix("10.244.2.0/24"), peer)
	if err != nil {
		t.Fatal(err)
	}
	// 10.244.2.0/24 via 192.168.100.12 dev fabric.ipip onlink: the gateway is the outer destination.
	if r.LinkIndex != 7 || r.Dst.String() != "10.244.2.0/24" || r.Gw.String() != "192.168.100.12" ||
		r.Flags&int(netlink.FLAG_ONLINK) == 0 || r.Scope != netlink.SCOPE_UNIVERSE {
		t.Errorf("route = %+v", r)
	}
	peer.Address = netip.MustParseAddr("2001:db8::2")
	if _, err := routeFor(7, netip.MustParsePrefix("10.244.2.0/24"), peer); err == nil {
		t.Error("accepted an IPv6 underlay address")
	}
}

func TestRouteForNeedsEnsure(t *testing.T) {
	b, err := New(Config{UnderlayAddr: netip.MustParseAddr("192.0.2.1"), Subnet: netip.MustParsePrefix("10.244.1.0/24")})
	if err != nil {
		t.Fatal(err)
	}
	if b.Device() != DefaultDevice || b.Overhead() != 20 || b.Name() != "ipip" {
		t.Errorf("device %s overhead %d name %s", b.Device(), b.Overhead(), b.Name())
	}
	if _, err := b.RouteFor(netip.MustParsePrefix("10.244.2.0/24"), backend.Peer{Name: "h2", Address: netip.MustParseAddr("192.0.2.2")}); err == nil {
		t.Error("RouteFor before Ensure succeeded")
	}
}

func TestNewValidates(t *testing.T) {
	for name, cfg := range map[string]Config{
		"no underlay": {Subnet: netip.MustParsePrefix("10.244.1.0/24")},
		"no subnet":   {UnderlayAddr: netip.MustParseAddr("192.0.2.1")},
		"tunl0":       {Device: "tunl0", UnderlayAddr: netip.MustParseAddr("192.0.2.1"), Subnet: netip.MustParsePrefix("10.244.1.0/24")},
	} {
		if _, err := New(cfg); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
}

// Supported agrees with the kernel, whichever it is
// and leaves no probe device behind.
func TestSupportedMatchesKernel(t *testing.T) {
	lab.RequireRoot(t)
	name := lab.AddNS(t, lab.Prefix("ip"))
	h := lab.Handle(t, name)

	got, err := Supported(h)
	if err != nil {
		t.Fatalf("Supported: %v", err)
	}
	// With a local address of its own: a tunnel with none is the kernel's
	// tunl0, which exists ("File exists") once the ipip module is loaded.
	out, ipErr := exec.Command("ip", "-n", name, "link", "add", name+"x", "type", "ipip", "local", "127.3.4.5").CombinedOutput()
	kernelHas := ipErr == nil
	if got != kernelHas {
		t.Fatalf("Supported = %v; ip link add type ipip: %v %s", got, ipErr, out)
	}
	links, _ := h.LinkList()
	for _, l := range links {
		if strings.HasPrefix(l.Attrs().Name, "fabprobe") {
			t.Errorf("probe device %s left behind", l.Attrs().Name)
		}
	}
	t.Logf("ipip supported: %v", got)
}
