package bgp

import (
	"context"
	"fmt"
	"net/netip"
	"testing"
	"time"

	"github.com/fabricnet/fabric/internal/testwait"
)

// With IPv6 on, a host's IPv6 subnet travels on the same IPv4 session as
// its IPv4 one, and the peer learns it with the host's IPv4 address as next
// hop (carried IPv4-mapped); withdrawing removes both. A peer without IPv6
// still gets the IPv4 route, and the session stays up.
func TestIPv6SubnetOverIPv4Session(t *testing.T) {
	t.Parallel()
	const block = 13
	cfg := func(host int, ipv6 bool) Config {
		c := fastConfig(testAddr(block, host))
		c.GracefulRestartTime = 30 * time.Second
		c.IPv6 = ipv6
		return c
	}
	a := startSpeaker(t, "a", cfg(1, true))
	b := startSpeaker(t, "b", cfg(2, true))
	old := startSpeaker(t, "old", cfg(3, false))
	mustSetPeers(t, a, b.peer(PeerMesh), old.peer(PeerMesh))
	mustSetPeers(t, b, a.peer(PeerMesh))
	mustSetPeers(t, old, a.peer(PeerMesh))
	v4, v6 := netip.MustParsePrefix("10.244.1.0/24"), netip.MustParsePrefix("fd00:10:244:1::/64")
	if err := a.Advertise(context.Background(), NextHops{IPv4: a.addr}, v4, v6); err != nil {
		t.Fatal(err)
	}
	rs := b.waitRoutes(t, 15*time.Second, "a's IPv4 and IPv6 subnets", func(rs []Route) bool { return hasRoute(v4)(rs) && hasRoute(v6)(rs) })
	if r, _ := findRoute(rs, v6); r.NextHop != a.addr || r.PeerName != "a" {
		t.Errorf("IPv6 subnet learned via %s from %q, want next hop %s (a's IPv4 address) from a", r.NextHop, r.PeerName, a.addr)
	}
	old.waitRoutes(t, 15*time.Second, "a's IPv4 subnet at the IPv4-only peer", hasRoute(v4))
	if st := waitEstablished(t, b, a.addr, 10*time.Second); !st.GracefulRestart {
		t.Errorf("b-a session: %+v, want graceful restart negotiated", st)
	}
	// The IPv4-only peer's session counts as synced once its IPv4 routes
	// are in: it sends no End-of-RIB for IPv6.
	testwait.For(t, 10*time.Second, "the IPv4-only peer's End-of-RIB at a", func() error {
		if st, _ := peerState(t, a, old.addr); !st.EndOfRIB {
			return fmt.Errorf("a's view of it: %+v", st)
		}
		return nil
	})
	// With an IPv6 address on the underlay, the IPv6 subnet's next hop is
	// that address (what a router can use); the IPv4 one's stays IPv4.
	addrV6 := netip.MustParseAddr("fd99::1")
	if err := a.Advertise(context.Background(), NextHops{IPv4: a.addr, IPv6: addrV6}, v4, v6); err != nil {
		t.Fatal(err)
	}
	b.waitRoutes(t, 10*time.Second, "the IPv6 subnet via a's IPv6 address", func(rs []Route) bool {
		r6, _ := findRoute(rs, v6)
		r4, _ := findRoute(rs, v4)
		return r6.NextHop == addrV6 && r4.NextHop == a.addr
	})
	if err := a.Advertise(context.Background(), NextHops{IPv4: a.addr}, v4); err != nil {
		t.Fatal(err)
	}
	b.waitRoutes(t, 10*time.Second, "the IPv6 subnet withdrawn, the IPv4 one kept", func(rs []Route) bool { return hasRoute(v4)(rs) && lacksRoute(v6)(rs) })
	if err := a.Advertise(context.Background(), NextHops{IPv4: addrV6}, v4); err == nil {
		t.Error("an IPv6 address as the IPv4 next hop was taken")
	}
}
