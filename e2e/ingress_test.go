package e2e

import (
	"context"
	"net/netip"
	"regexp"
	"strconv"
	"testing"

	"github.com/fabricnet/fabric/lab"
	"github.com/fabricnet/fabric/vxlanfallback"
)

// TestForgedTunnelPacketsDropped: a host on the underlay that is not a
// fabric host sends VXLAN packets to host1 whose inner source is a container
// address of host2, as if host2 had sent them. Not one may reach host1's
// container; host2's real traffic still does. Over an IPv4 underlay and
// over an IPv6-only one, where the packets come over IPv6.
func TestForgedTunnelPacketsDropped(t *testing.T) {
	t.Parallel()
	for _, v6 := range []bool{false, true} {
		t.Run(map[bool]string{false: "ipv4-underlay", true: "ipv6-underlay"}[v6], func(t *testing.T) {
			t.Parallel()
			forgedTunnelPacketsDropped(t, v6)
		})
	}
}

func forgedTunnelPacketsDropped(t *testing.T, ipv6Underlay bool) {
	f := newFabric(t, lab.Spec{Hosts: 2, IPv6Underlay: ipv6Underlay})
	hosts := f.startMesh()
	h1, h2 := hosts[0], hosts[1]
	target := f.container(h1, "target", 2)
	peer := f.container(h2, "peer", 2)
	ctx := context.Background()

	forged := f.subnet(h2).Addr().Next().Next().Next() // .3 of host2's subnet: no container there
	// Count ICMP from the forged and the real source in the target container.
	for _, src := range []netip.Addr{forged, peer.Addr} {
		if out, err := target.Run(ctx, "iptables", "-I", "INPUT", "-s", src.String(), "-p", "icmp", "-j", "ACCEPT"); err != nil {
			t.Fatalf("counter rule: %v: %s", err, out)
		}
	}
	counted := func(src netip.Addr) int {
		out, _ := target.Run(ctx, "iptables", "-L", "INPUT", "-v", "-x", "-n")
		m := regexp.MustCompile(`(?m)^\s*(\d+)\s+\d+\s+ACCEPT\s+\S+\s+--\s+\*\s+\*\s+` + regexp.QuoteMeta(src.String()) + `\s`).FindStringSubmatch(out)
		if m == nil {
			t.Fatalf("no counter for %s in:\n%s", src, out)
		}
		n, _ := strconv.Atoi(m[1])
		return n
	}

	// The attacker: a VXLAN device of its own toward host1, with host1's
	// VNI, port and VTEP MAC, and host2's container range as its address.
	attacker, err := f.lab.AddOutside(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for _, args := range [][]string{
		{"link", "add", "fakevx", "type", "vxlan", "id", strconv.Itoa(vxlanfallback.DefaultVNI), "dstport", strconv.Itoa(vxlanfallback.DefaultPort),
			"remote", h1.Addr.String(), "local", attacker.Addr.String(), "dev", attacker.Dev},
		{"addr", "add", forged.String() + "/32", "dev", "fakevx"},
		{"link", "set", "fakevx", "up"},
		{"neigh", "add", target.Addr.String(), "lladdr", vxlanfallback.MACFor(h1.Addr, f.subnet(h1)).String(), "dev", "fakevx", "nud", "permanent"},
		{"route", "add", target.Addr.String() + "/32", "dev", "fakevx"},
	} {
		if out, err := attacker.Run(ctx, "ip", args...); err != nil {
			t.Fatalf("attacker: ip %v: %v: %s", args, err, out)
		}
	}
	// Replies go to host2, so the attacker sees none either way: count at
	// the target.
	attacker.Run(ctx, "ping", "-c", "20", "-i", "0.05", "-W", "1", target.Addr.String())
	if n := counted(forged); n != 0 {
		t.Errorf("%d forged packets from %s (sent by a non-fabric host) reached host1's container", n, forged)
	}
	// The real host2 still gets through.
	if err := ping(peer, target.Addr); err != nil {
		t.Errorf("host2's container cannot reach host1's: %v", err)
	}
	if n := counted(peer.Addr); n == 0 {
		t.Errorf("host2's ping was not counted: the counter proves nothing")
	}
	out, _ := h1.Run(ctx, map[bool]string{false: "iptables", true: "ip6tables"}[ipv6Underlay], "-L", "FABRIC-INPUT", "-v", "-n")
	t.Logf("host1 FABRIC-INPUT:\n%s", out)
}
