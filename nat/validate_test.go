package nat

import (
	"io"
	"log/slog"
	"net/netip"
	"strings"
	"testing"

	"github.com/fabricnet/fabric/iptables"
)

func TestValidatePublish(t *testing.T) {
	pool := netip.MustParsePrefix("10.244.0.0/16")
	existing := []PublishedPort{
		publish("tcp", 8080, "10.244.2.2:80"),
		publish("udp", 53, "10.244.3.3:53", "a", "b"),
	}
	for _, c := range []struct {
		name    string
		p       PublishedPort
		wantErr string // "" = valid
	}{
		{"valid", publish("tcp", 8081, "10.244.2.2:80"), ""},
		{"same port other proto", publish("udp", 8080, "10.244.2.2:80"), ""},
		{"same port disjoint hosts", publish("udp", 53, "10.244.3.4:53", "c"), ""},
		{"outside pool", publish("tcp", 9000, "192.168.1.5:80"), "outside the fabric pool 10.244.0.0/16"},
		{"conflict", publish("tcp", 8080, "10.244.5.5:80"), "already published (tcp/8080 -> 10.244.2.2:80)"},
		{"conflict on a shared host", publish("udp", 53, "10.244.3.4:53", "b"), "already published (udp/53 -> 10.244.3.3:53 on a,b)"},
		{"port 0", publish("tcp", 0, "10.244.2.2:80"), "host port 0"},
		{"BGP", publish("tcp", 179, "10.244.2.2:80"), "tcp/179 is reserved for BGP on fabric hosts"},
		{"VXLAN", publish("udp", 4789, "10.244.2.2:80"), "udp/4789 is reserved for VXLAN (the IANA port)"},
		{"etcd", publish("tcp", 2379, "10.244.2.2:80"), "tcp/2379 is reserved for etcd clients"},
		{"this host's own port", publish("tcp", 1790, "10.244.2.2:80"), "tcp/1790 is reserved for this host's BGP port"},
		{"UDP 179 is no BGP", publish("udp", 179, "10.244.2.2:53"), ""},
		{"target port 0", publish("tcp", 1, "10.244.2.2:0"), "non-zero port"},
		{"bad proto", PublishedPort{Proto: "sctp", HostPort: 1, Target: netip.MustParseAddrPort("10.244.2.2:80")}, `protocol "sctp"`},
		{"no target", PublishedPort{Proto: "tcp", HostPort: 1}, "needs an address"},
		{"ipv6", publish("tcp", 1, "[fd00::1]:80"), "not IPv4"},
	} {
		err := ValidatePublish(c.p, []netip.Prefix{pool}, existing, Reserved{"tcp/1790": "this host's BGP port"})
		switch {
		case c.wantErr == "" && err != nil:
			t.Errorf("%s: unexpected error %v", c.name, err)
		case c.wantErr != "" && (err == nil || !strings.Contains(err.Error(), c.wantErr)):
			t.Errorf("%s: error %v, want one containing %q", c.name, err, c.wantErr)
		}
	}
}

func TestSelectPublishesFiltersAndSkipsConflicts(t *testing.T) {
	m := &Manager{log: slog.New(slog.NewTextHandler(io.Discard, nil))}
	st := hostState("h1", h1Subnet,
		publish("tcp", 9000, "10.244.1.2:80"),
		publish("tcp", 8080, "10.244.2.2:80", "h2"),
		publish("tcp", 9000, "10.244.1.3:80"), // conflicts: skipped
		publish("tcp", 7000, "172.16.0.1:80"), // outside pool: skipped
		publish("udp", 53, "10.244.1.2:53", "h1", "h3"),
	)
	got := m.selectPublishes(st)
	var names []string
	for _, p := range got {
		names = append(names, p.String())
	}
	want := "tcp/9000 -> 10.244.1.2:80|udp/53 -> 10.244.1.2:53 on h1,h3"
	if strings.Join(names, "|") != want {
		t.Errorf("selected %q, want %q", strings.Join(names, "|"), want)
	}
}

// TestLocalPortsPerFamily: a port a container on a fabric network
// publishes (`docker run -p`) is forwarded in each family's tables to its
// address of that family, once, whether dockerd bound 0.0.0.0, :: or both;
// a binding to one IPv4 address stays IPv4, and a container without an
// IPv6 address gets no IPv6 rule.
func TestLocalPortsPerFamily(t *testing.T) {
	target := netip.MustParseAddrPort("172.30.0.18:8000")
	st := State{Pool: netip.MustParsePrefix("10.244.0.0/16"), Subnet: netip.MustParsePrefix("10.244.2.0/24"),
		PoolV6: netip.MustParsePrefix("fd00:10:244::/48"), SubnetV6: netip.MustParsePrefix("fd00:10:244:2::/64"),
		Networks: []netip.Prefix{netip.MustParsePrefix("172.30.0.0/24"), netip.MustParsePrefix("fd00:30::/64")}, EndpointLinks: "fnep+",
		LocalPorts: []LocalPort{
			{Proto: "tcp", HostIP: netip.MustParseAddr("0.0.0.0"), HostPort: 8081, Target: target},
			{Proto: "tcp", HostIP: netip.MustParseAddr("::"), HostPort: 8081, Target: target},
			{Proto: "tcp", HostIP: netip.MustParseAddr("192.168.100.12"), HostPort: 8082, Target: target},
			{Proto: "udp", HostPort: 5353, Target: netip.MustParseAddrPort("172.30.0.19:53")}, // no IPv6 address
		},
		AddressesV6: map[netip.Addr]netip.Addr{target.Addr(): netip.MustParseAddr("fd00:30:0:0:1000::")},
	}
	dnats := func(s iptables.Section) []string {
		var out []string
		for _, c := range s.Chains {
			if c.Name == PreroutingChain {
				for _, r := range c.Rules {
					if strings.Contains(r, "DNAT") {
						out = append(out, r[strings.Index(r, "--dport"):])
					}
				}
			}
		}
		return out
	}
	v4, v6 := dnats(render(st, nil, false)), dnats(renderIPv6(st, nil, false))
	want4 := []string{"--dport 8081", "--dport 8082", "--dport 5353"}
	if len(v4) != 3 {
		t.Fatalf("IPv4 DNAT rules %q, want one each for %q", v4, want4)
	}
	for i, w := range want4 {
		if !strings.HasPrefix(v4[i], w) {
			t.Errorf("IPv4 DNAT rule %d: %q, want %q", i, v4[i], w)
		}
	}
	if len(v6) != 1 || !strings.HasPrefix(v6[0], "--dport 8081") || !strings.HasSuffix(v6[0], "--to-destination [fd00:30:0:0:1000::]:8000") {
		t.Errorf("IPv6 DNAT rules %q, want one, 8081 to [fd00:30:0:0:1000::]:8000", v6)
	}
}
