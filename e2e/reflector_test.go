package e2e

import (
	"context"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/fabricnet/fabric/lab"
)

// TestFabricRouteReflectors: two hosts started with --route-reflector reflect
// for the fabric; the other hosts see them in the node records and peer only
// with them (2 sessions instead of n-1), every container still reaches every
// other, and one reflector leaving loses no packet between two clients.
func TestFabricRouteReflectors(t *testing.T) {
	f := newFabric(t, lab.Spec{Hosts: 4}, "--bgp-hold-time", "3s", "--bgp-keepalive", "1s")
	hosts := f.lab.Hosts()
	rr1, rr2, c3, c4 := hosts[0], hosts[1], hosts[2], hosts[3]
	f.start(rr1, "--route-reflector")
	f.start(rr2, "--route-reflector")
	f.start(c3)
	f.start(c4)
	for _, h := range hosts {
		f.eventually(30*time.Second, h.Name+" routes", func() error { return f.routesTo(h, f.otherSubnets(h, hosts)) })
	}
	sessions := func(h *lab.Host) map[string]string {
		ps, err := f.peers(h)
		if err != nil {
			t.Fatal(err)
		}
		out := map[string]string{}
		for _, p := range ps {
			out[p.Name] = p.Type
		}
		return out
	}
	for _, c := range []*lab.Host{c3, c4} {
		got := sessions(c)
		if len(got) != 2 || got[rr1.Name] != "route-reflector" || got[rr2.Name] != "route-reflector" {
			t.Errorf("%s peers with %v, want only the two reflectors", c.Name, got)
		}
	}
	if got := sessions(rr1); got[rr2.Name] != "mesh" || got[c3.Name] != "rr-client" || got[c4.Name] != "rr-client" {
		t.Errorf("reflector %s peers with %v, want %s as mesh and the others as clients", rr1.Name, got, rr2.Name)
	}
	ctrs := f.containersTalk(hosts)

	// One reflector leaves while a client pings another client.
	var out string
	done := make(chan struct{})
	go func() {
		defer close(done)
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		out, _ = ctrs[c3.Name].Run(ctx, "ping", "-q", "-i", "0.01", "-w", "8", ctrs[c4.Name].Addr.String())
	}()
	time.Sleep(2 * time.Second)
	if o, err := f.fabricctl(rr1, "leave"); err != nil {
		t.Fatalf("fabricctl leave on %s: %v %s", rr1.Name, err, o)
	}
	<-done
	m := regexp.MustCompile(`(\d+) packets transmitted, (\d+) received`).FindStringSubmatch(out)
	if m == nil {
		t.Fatalf("no ping summary: %s", out)
	}
	sent, _ := strconv.Atoi(m[1])
	got, _ := strconv.Atoi(m[2])
	t.Logf("client %s -> client %s while reflector %s left: %d sent, %d received", c3.Name, c4.Name, rr1.Name, sent, got)
	if got != sent || sent < 200 {
		t.Errorf("%d of %d packets lost while one of two reflectors left", sent-got, sent)
	}
	if _, ok := f.ownedRoutes(c3)[f.subnet(c4).String()]; !ok {
		t.Errorf("%s lost its route to %s with one reflector left", c3.Name, c4.Name)
	}
	if st, _ := f.fabricctl(c3, "peers", "status"); !strings.Contains(st, rr2.Name) {
		t.Errorf("peers status on %s lacks %s:\n%s", c3.Name, rr2.Name, st)
	}
}
