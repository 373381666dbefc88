package agent

import (
	"net/netip"
	"strings"
	"testing"

	"github.com/fabricnet/fabric/internal/nsthread"
	"github.com/fabricnet/fabric/lab"
)

// findUnderlay without settings: a host with IPv4 keeps its IPv4 address
// also when another interface has IPv6 only; a host with no IPv4 at all
// takes its global IPv6 address, as underlay and IPv6 next hop alike.
func TestFindUnderlay(t *testing.T) {
	lab.RequireRoot(t)
	prefix := lab.Prefix("ul")
	for _, c := range []struct {
		name     string
		addrs    map[string]string // device -> address
		want     string
		wantV6   string
		wantFail bool
	}{
		{"IPv4 beside an IPv6-only interface", map[string]string{"eth0": "192.0.2.1/24", "eth1": "2001:db8:1::1/64"}, "192.0.2.1", "", false},
		{"IPv6 only", map[string]string{"eth0": "2001:db8:1::1/64"}, "2001:db8:1::1", "2001:db8:1::1/64", false},
		{"two IPv6-only interfaces", map[string]string{"eth0": "2001:db8:1::1/64", "eth1": "2001:db8:2::1/64"}, "", "", true},
	} {
		t.Run(c.name, func(t *testing.T) {
			ns, other := lab.AddNS(t, prefix+"h"), lab.AddNS(t, prefix+"o")
			for dev, a := range c.addrs {
				lab.Veth(t, ns, dev, other, dev)
				if p := netip.MustParsePrefix(a); p.Addr().Is6() {
					lab.Exec(t, ns, "ip", "addr", "add", a, "dev", dev, "nodad")
				} else {
					lab.Addr(t, ns, dev, a)
				}
			}
			var u underlay
			err := nsthread.Do(ns, func() (err error) {
				u, err = findUnderlay("", netip.Addr{})
				return err
			})
			switch {
			case c.wantFail && err == nil:
				t.Fatalf("chose %s (%s), want an error: no way to tell which", u.Dev, u.Addr)
			case c.wantFail && !strings.Contains(err.Error(), "cannot choose one"):
				t.Fatalf("error %v, want one saying it cannot choose", err)
			case c.wantFail:
			case err != nil:
				t.Fatal(err)
			case u.Addr.String() != c.want || (c.wantV6 != "" && u.V6.String() != c.wantV6):
				t.Errorf("underlay %s on %s (V6 %s), want %s (V6 %s)", u.Addr, u.Dev, u.V6, c.want, c.wantV6)
			}
		})
	}
}
