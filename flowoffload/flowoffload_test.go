package flowoffload

import (
	"errors"
	"net/netip"
	"os"
	"slices"
	"testing"

	"github.com/fabricnet/fabric/lab"
	"github.com/google/nftables"
)

func TestPlan(t *testing.T) {
	v4, v6 := netip.MustParsePrefix("10.244.0.0/16"), netip.MustParsePrefix("fd00:10:244::/48")
	exists := func(dev string) bool { return dev != "fabric.wg" }
	cases := []struct {
		name        string
		st          State
		wantDevices []string
		wantRules   int
	}{
		{"bridge and tunnels, both pools", State{Pools: []netip.Prefix{v4, v6}, Devices: []string{"fabric.vxlan", "docker0", "fabric.ipip"}},
			[]string{"docker0", "fabric.ipip", "fabric.vxlan"}, 2},
		{"a device not made yet is left out", State{Pools: []netip.Prefix{v4}, Devices: []string{"docker0", "fabric.wg"}},
			[]string{"docker0"}, 1},
		{"a device named twice is hooked once", State{Pools: []netip.Prefix{v4}, Devices: []string{"docker0", "docker0"}},
			[]string{"docker0"}, 1},
		{"no IPv6 pool: one rule", State{Pools: []netip.Prefix{v4, {}}, Devices: []string{"docker0"}}, []string{"docker0"}, 1},
		{"no device: no table", State{Pools: []netip.Prefix{v4}, Devices: []string{"fabric.wg"}}, nil, 0},
		{"no pool: no table", State{Devices: []string{"docker0"}}, nil, 0},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			d := plan(c.st, exists)
			if !slices.Equal(d.devices, c.wantDevices) || len(d.pools) != c.wantRules {
				t.Errorf("plan = devices %v, %d rules; want %v, %d", d.devices, len(d.pools), c.wantDevices, c.wantRules)
			}
		})
	}
	d := plan(State{Pools: []netip.Prefix{v4}, Devices: []string{"docker0", "fabric.vxlan"}}, exists)
	if !d.equal([]string{"fabric.vxlan", "docker0"}, []*nftables.Rule{{UserData: ruleTag(v4)}}) {
		t.Error("the same devices in another order and the same rule: want equal")
	}
	if d.equal([]string{"docker0"}, []*nftables.Rule{{UserData: ruleTag(v4)}}) {
		t.Error("a device gone from the kernel's flowtable: want a rewrite")
	}
	if d.equal([]string{"docker0", "fabric.vxlan"}, []*nftables.Rule{{}}) {
		t.Error("a rule without fabric's tag (changed by hand): want a rewrite")
	}
}

func TestMask(t *testing.T) {
	if got := netipMask(netip.MustParsePrefix("10.244.0.0/18")); !slices.Equal(got, []byte{255, 255, 192, 0}) {
		t.Errorf("mask of a /18 = %v", got)
	}
	if got := netipMask(netip.MustParsePrefix("fd00::/48")); len(got) != 16 || got[5] != 255 || got[6] != 0 {
		t.Errorf("mask of a /48 = %v", got)
	}
}

// TestTableFollowsDevices runs the owner in a namespace: on a kernel
// without flowtables Supported says so and nothing is written; with them,
// the table appears, is rewritten only when something changed (a device
// made later, the bridge made again, a rule deleted by hand) and Cleanup
// removes it.
func TestTableFollowsDevices(t *testing.T) {
	lab.RequireRoot(t)
	name := lab.AddNS(t, lab.Prefix("ft"))
	ns := lab.Path(name)
	o := New(ns, lab.Logger(t))
	if err := o.Supported(); err != nil {
		if !errors.Is(err, ErrUnsupported) || os.Getenv("FABRIC_KERNEL_FLOWTABLE") == "1" {
			t.Fatalf("Supported: %v (FABRIC_KERNEL_FLOWTABLE=%q: the qemu guest, whose kernel has them)", err, os.Getenv("FABRIC_KERNEL_FLOWTABLE"))
		}
		if _, ok, err := Read(ns); ok || err != nil {
			t.Fatalf("Supported failed but a table is there (%v) or nf_tables is not readable: %v", ok, err)
		}
		t.Logf("this kernel has no flowtables (%v): the owner writes nothing", err)
		return
	}
	pools := []netip.Prefix{netip.MustParsePrefix("10.244.0.0/16"), netip.MustParsePrefix("fd00:10:244::/48")}
	st := State{Pools: pools, Devices: []string{"br0", "tun0"}}
	lab.Bridge(t, name, "br0")
	apply := func(wantWrite bool, why string) {
		t.Helper()
		wrote, err := o.Apply(st)
		if err != nil {
			t.Fatalf("%s: %v", why, err)
		}
		if wrote != wantWrite {
			t.Fatalf("%s: wrote %v, want %v", why, wrote, wantWrite)
		}
	}
	devices := func(want ...string) {
		t.Helper()
		cs, ok, err := Read(ns)
		if err != nil || !ok {
			t.Fatalf("Read: table there %v, %v", ok, err)
		}
		slices.Sort(cs.Devices)
		if !slices.Equal(cs.Devices, want) || len(cs.SlowPath) != 2 {
			t.Fatalf("flowtable on %v with counters %v; want %v and one counter per pool", cs.Devices, cs.SlowPath, want)
		}
	}
	apply(true, "first apply")
	devices("br0")
	apply(false, "nothing changed")
	lab.Bridge(t, name, "tun0")
	apply(true, "a device made later")
	devices("br0", "tun0")
	lab.Run(t, "ip", "-n", name, "link", "del", "br0")
	lab.Bridge(t, name, "br0")
	apply(true, "the bridge made again (the kernel drops a device that goes)")
	devices("br0", "tun0")

	c, done, err := o.conn()
	if err != nil {
		t.Fatal(err)
	}
	defer done()
	rs, err := c.GetRules(table, chain)
	if err != nil || len(rs) != 2 {
		t.Fatalf("rules: %d, %v", len(rs), err)
	}
	if err := c.DelRule(rs[0]); err != nil {
		t.Fatal(err)
	}
	if err := c.Flush(); err != nil {
		t.Fatal(err)
	}
	apply(true, "a rule deleted by hand")
	devices("br0", "tun0")

	if err := Cleanup(ns); err != nil {
		t.Fatal(err)
	}
	if _, ok, err := Read(ns); ok || err != nil {
		t.Fatalf("after Cleanup: table there %v, %v", ok, err)
	}
	if err := Cleanup(ns); err != nil {
		t.Fatalf("Cleanup with nothing there: %v", err)
	}
}
