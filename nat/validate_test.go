package nat

import (
	"io"
	"log/slog"
	"net/netip"
	"strings"
	"testing"
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
