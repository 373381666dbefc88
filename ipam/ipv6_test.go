package ipam

import (
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/fabricnet/fabric/internal/etcdtest"
)

// Each IPv4 subnet pairs with one /64; the IPv6 pool must have a /64 for
// every IPv4 subnet, and be an IPv6 unicast network.
func TestPoolV6(t *testing.T) {
	p := pool("10.244.0.0/16", 24)
	p.NetworkV6 = netip.MustParsePrefix("fd00:10:244::/48")
	if err := p.Validate(); err != nil {
		t.Fatal(err)
	}
	for v4, want := range map[string]string{"10.244.0.0/24": "fd00:10:244::/64", "10.244.7.0/24": "fd00:10:244:7::/64", "10.244.255.0/24": "fd00:10:244:ff::/64"} {
		if got, ok := p.SubnetV6(netip.MustParsePrefix(v4)); !ok || got.String() != want {
			t.Errorf("SubnetV6(%s) = %s %v, want %s", v4, got, ok, want)
		}
	}
	if _, ok := p.SubnetV6(netip.MustParsePrefix("10.245.0.0/24")); ok {
		t.Error("a subnet outside the pool got an IPv6 subnet")
	}
	if _, ok := pool("10.244.0.0/16", 24).SubnetV6(netip.MustParsePrefix("10.244.7.0/24")); ok {
		t.Error("a pool without IPv6 gave an IPv6 subnet")
	}
	for v6, problem := range map[string]string{
		"fd00:10:244::/57":    "must be /56 or larger",
		"fd00:10:244::1/48":   "host bits",
		"fe80::/48":           "not a unicast range",
		"::ffff:10.0.0.0/104": "not an IPv6 network",
	} {
		q := *p
		q.NetworkV6 = netip.MustParsePrefix(v6)
		if err := q.Validate(); err == nil || !strings.Contains(err.Error(), problem) {
			t.Errorf("IPv6 pool %s: %v, want an error saying %q", v6, err, problem)
		}
	}
}

// IPv6 added to a running IPv4 fabric is stored once for every host; a
// host configured without it follows the fabric's; a different one is a
// conflict.
func TestEnsurePoolAddsIPv6(t *testing.T) {
	cli := etcdtest.Start(t).Client(t)
	prefix := testPrefix(t)
	ctx := testCtx(t, 10*time.Second)
	v4 := pool("10.244.0.0/16", 24)
	if _, err := EnsurePool(ctx, cli, prefix, v4); err != nil {
		t.Fatal(err)
	}
	dual := *v4
	dual.NetworkV6 = netip.MustParsePrefix("fd00:10:244::/48")
	if got, err := EnsurePool(ctx, cli, prefix, &dual); err != nil || got != dual {
		t.Fatalf("adding IPv6: %+v %v", got, err)
	}
	if got, err := EnsurePool(ctx, cli, prefix, v4); err != nil || got != dual {
		t.Fatalf("a host configured without IPv6: %+v %v, want the stored dual-stack pool", got, err)
	}
	if got, err := GetPool(ctx, cli, prefix); err != nil || got != dual {
		t.Fatalf("stored: %+v %v", got, err)
	}
	other := dual
	other.NetworkV6 = netip.MustParsePrefix("fd00:99::/48")
	if _, err := EnsurePool(ctx, cli, prefix, &other); err == nil || !strings.Contains(err.Error(), "pool conflict") {
		t.Fatalf("a different IPv6 pool: %v, want a conflict", err)
	}
}

// A pool that overlaps the host's underlay network (either family) is
// refused with both named; pools beside it are fine.
func TestPoolOverlapsUnderlay(t *testing.T) {
	p := Pool{Network: netip.MustParsePrefix("10.244.0.0/16"), SubnetLen: 24, NetworkV6: netip.MustParsePrefix("fd00:10:244::/48")}
	for _, c := range []struct {
		underlay []string
		clash    string
	}{
		{[]string{"192.168.100.11/24", "fd99::2/64"}, ""},
		{[]string{"10.244.7.3/24"}, "the pool 10.244.0.0/16 overlaps this host's underlay network 10.244.7.0/24"},
		{[]string{"10.0.0.5/8"}, "the pool 10.244.0.0/16 overlaps this host's underlay network 10.0.0.0/8"},
		{[]string{"192.168.100.11/24", "fd00:10:244:99::2/64"}, "the pool fd00:10:244::/48 overlaps this host's underlay network fd00:10:244:99::/64"},
		{[]string{"fd00::1/8"}, "the pool fd00:10:244::/48 overlaps this host's underlay network fd00::/8"},
	} {
		var underlay []netip.Prefix
		for _, u := range c.underlay {
			underlay = append(underlay, netip.MustParsePrefix(u))
		}
		err := p.CheckUnderlay(underlay)
		if (c.clash == "") != (err == nil) || (err != nil && !strings.Contains(err.Error(), c.clash)) {
			t.Errorf("underlay %v: %v, want %q", c.underlay, err, c.clash)
		}
	}
}
