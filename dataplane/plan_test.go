package dataplane

import (
	"net"
	"net/netip"
	"slices"
	"testing"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/fabricnet/fabric/backend"
)

// TestPlan: the route diff, without a kernel. Each case names what the
// operator would see if its rule broke.
func TestPlan(t *testing.T) {
	via := func(prefix, gw string, link int) *netlink.Route {
		return &netlink.Route{Dst: backend.IPNet(netip.MustParsePrefix(prefix)), Gw: net.ParseIP(gw).To4(), LinkIndex: link,
			Flags: int(netlink.FLAG_ONLINK), Protocol: 93}
	}
	unreachable := func(prefix string) *netlink.Route {
		return &netlink.Route{Dst: backend.IPNet(netip.MustParsePrefix(prefix)), Type: unix.RTN_UNREACHABLE, Protocol: 93}
	}
	dev := func(prefix string, link int) *netlink.Route {
		return &netlink.Route{Dst: backend.IPNet(netip.MustParsePrefix(prefix)), LinkIndex: link, Scope: netlink.SCOPE_LINK, Protocol: 93}
	}
	// The kernel reports the type it stores; a route fabric builds leaves
	// it unset for unicast.
	asRead := func(r *netlink.Route) *netlink.Route {
		c := *r
		if c.Type == 0 {
			c.Type = unix.RTN_UNICAST
		}
		return &c
	}
	desired := func(rs ...*netlink.Route) map[netip.Prefix]*netlink.Route {
		m := map[netip.Prefix]*netlink.Route{}
		for _, r := range rs {
			m[prefixOf(r.Dst)] = r
		}
		return m
	}
	prefixes := func(rs []*netlink.Route) []string {
		var out []string
		for _, r := range rs {
			out = append(out, prefixOf(r.Dst).String())
		}
		return out
	}
	dup := asRead(via("10.244.2.0/24", "192.168.100.3", 5))

	for _, c := range []struct {
		name                 string
		have                 []*netlink.Route
		want                 map[netip.Prefix]*netlink.Route
		keep                 []string
		add, replace, delete []string
	}{
		{
			name: "a route the kernel has as wanted is left alone (no churn on every apply)",
			have: []*netlink.Route{asRead(via("10.244.2.0/24", "192.168.100.2", 5)), asRead(dev("172.16.1.5/32", 9)), asRead(unreachable("172.16.1.0/28"))},
			want: desired(via("10.244.2.0/24", "192.168.100.2", 5), dev("172.16.1.5/32", 9), unreachable("172.16.1.0/28")),
		},
		{
			name:    "a peer that moved to another next hop or device is replaced in place, never deleted first",
			have:    []*netlink.Route{asRead(via("10.244.2.0/24", "192.168.100.2", 5)), asRead(dev("172.16.1.5/32", 9))},
			want:    desired(via("10.244.2.0/24", "192.168.100.9", 5), dev("172.16.1.5/32", 11)),
			replace: []string{"10.244.2.0/24", "172.16.1.5/32"},
		},
		{
			name: "a new peer's route is added",
			want: desired(via("10.244.2.0/24", "192.168.100.2", 5)),
			add:  []string{"10.244.2.0/24"},
		},
		{
			name:   "a withdrawn route goes: nothing re-installs it",
			have:   []*netlink.Route{asRead(via("10.244.2.0/24", "192.168.100.2", 5))},
			want:   desired(),
			delete: []string{"10.244.2.0/24"},
		},
		{
			name: "a route whose device is away for a moment is kept",
			have: []*netlink.Route{asRead(via("10.244.2.0/24", "192.168.100.2", 5))},
			want: desired(),
			keep: []string{"10.244.2.0/24"},
		},
		{
			name:   "a second route for one prefix, left by an earlier run, goes",
			have:   []*netlink.Route{asRead(via("10.244.2.0/24", "192.168.100.2", 5)), dup},
			want:   desired(via("10.244.2.0/24", "192.168.100.2", 5)),
			delete: []string{"10.244.2.0/24"},
		},
		{
			name:    "an owned route of another type (a blackhole an older version left) is replaced by the unreachable one",
			have:    []*netlink.Route{{Dst: backend.IPNet(netip.MustParsePrefix("172.16.1.0/24")), Type: unix.RTN_BLACKHOLE, Protocol: 93}},
			want:    desired(unreachable("172.16.1.0/24")),
			replace: []string{"172.16.1.0/24"},
		},
		{
			name:    "an unreachable block that a container's /32 does not cover stays unreachable, and a block turned unicast is replaced",
			have:    []*netlink.Route{asRead(unreachable("172.16.1.0/28")), asRead(unreachable("172.16.1.16/28"))},
			want:    desired(unreachable("172.16.1.0/28"), via("172.16.1.16/28", "192.168.100.2", 5)),
			replace: []string{"172.16.1.16/28"},
		},
	} {
		t.Run(c.name, func(t *testing.T) {
			keep := map[netip.Prefix]bool{}
			for _, k := range c.keep {
				keep[netip.MustParsePrefix(k)] = true
			}
			got := Plan(c.have, c.want, keep)
			for _, check := range []struct {
				what      string
				got, want []string
			}{{"add", prefixes(got.Add), c.add}, {"replace", prefixes(got.Replace), c.replace}, {"delete", prefixes(got.Delete), c.delete}} {
				if !slices.Equal(check.got, check.want) {
					t.Errorf("%s: got %v, want %v", check.what, check.got, check.want)
				}
			}
			if c.name == "a second route for one prefix, left by an earlier run, goes" && (len(got.Delete) != 1 || got.Delete[0] != dup) {
				t.Errorf("deleted %v, want the duplicate (via .3), not the route that stays", got.Delete)
			}
		})
	}
}
