package e2e

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/fabricnet/fabric/lab"
)

// TestCrossSubnetDirectAndVXLAN: hosts on two underlay subnets joined by a
// router. With --cross-subnet, peers on the host's own subnet are routed
// unencapsulated and peers behind the router over VXLAN; containers reach
// each other on every pair, and the choice shows in `fabricctl peers status`.
func TestCrossSubnetDirectAndVXLAN(t *testing.T) {
	// Hosts go round-robin: host1, host3 on subnet 0; host2 on subnet 1.
	f := newFabric(t, lab.Spec{Hosts: 3, Subnets: 2}, "--cross-subnet", "--vxlan-port", "8472")
	hosts := f.lab.Hosts()
	for _, h := range hosts {
		f.start(h)
	}
	for _, h := range hosts {
		f.eventually(20*time.Second, h.Name+" routes", func() error { return f.routesTo(h, f.otherSubnets(h, hosts)) })
	}
	byName := map[string]*lab.Host{}
	for _, h := range hosts {
		byName[h.Name] = h
	}
	ps, err := f.peers(byName["host1"])
	if err != nil {
		t.Fatal(err)
	}
	routed := f.autoEncap(byName["host1"])
	for _, p := range ps {
		want := routed
		if byName[p.Name].SubnetIndex == byName["host1"].SubnetIndex {
			want = "direct"
		}
		if p.Encap != want {
			t.Errorf("host1 -> %s: encapsulation %q, want %q (%s)", p.Name, p.Encap, want, p.EncapReason)
		}
	}
	out, _ := f.fabricctl(byName["host1"], "peers", "status")
	t.Logf("peers status on host1:\n%s", out)
	r := f.ownedRoutes(byName["host1"])[f.subnet(byName["host3"]).String()]
	if !strings.Contains(r, "dev eth0") || strings.Contains(r, "fabric.vxlan") {
		t.Errorf("route host1 -> host3 (same subnet) is %q, want a plain route on eth0", r)
	}
	f.containersTalk(hosts)
}

// TestMTUNoBlackHole: the container MTU is the underlay's minus VXLAN's 50
// bytes; the largest packet that fits crosses hosts with DF set, and one byte
// more is refused at the sender instead of vanishing.
func TestMTUNoBlackHole(t *testing.T) {
	// Mode vxlan explicitly: the other tests run auto, which falls back to
	// VXLAN on this kernel; both modes must carry traffic.
	f := newFabric(t, lab.Spec{Hosts: 2, MTU: 1500}, "--encapsulation", "vxlan")
	hosts := f.lab.Hosts()
	for _, h := range hosts {
		f.start(h)
	}
	st, err := f.status(hosts[0])
	if err != nil {
		t.Fatal(err)
	}
	if st.MTU != 1450 {
		t.Fatalf("fabric MTU %d, want 1500-50 = 1450 (VXLAN; IPIP's 20 is not also subtracted on a kernel without IPIP)", st.MTU)
	}
	f.eventually(20*time.Second, "routes", func() error { return f.routesTo(hosts[0], f.otherSubnets(hosts[0], hosts)) })
	c1, c2 := f.container(hosts[0], "c1", 2), f.container(hosts[1], "c1", 2)
	// 1450 - 20 (IP) - 8 (ICMP) = 1422 bytes of payload.
	f.eventually(5*time.Second, "largest DF ping", func() error { return ping(c1, c2.Addr, "-M", "do", "-s", "1422") })
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	out, err := c1.Run(ctx, "ping", "-c", "1", "-W", "2", "-M", "do", "-s", "1423", c2.Addr.String())
	if err == nil || !strings.Contains(out, "message too long") {
		t.Fatalf("a 1423-byte DF ping must be refused at the sender with 'message too long', got err=%v:\n%s", err, out)
	}
	// TCP between the containers works at this MTU.
	if _, err := tcpExchange(c2, c1, 8001); err != nil {
		t.Fatal(err)
	}
}
