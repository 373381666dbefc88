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
// other, and one reflector killed (and kept down past its graceful restart)
// or leaving loses no packet between two clients.
func TestFabricRouteReflectors(t *testing.T) {
	t.Parallel()
	f := newFabric(t, lab.Spec{Hosts: 4}, "--bgp-hold-time", "3s", "--bgp-keepalive", "1s", "--graceful-restart-time", "5s")
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

	// pingWhile pings client c4 from client c3 every 10 ms for 8 s while
	// event happens, and fails the test on any loss.
	pingWhile := func(what string, event func()) {
		t.Helper()
		var out string
		done := make(chan struct{})
		go func() {
			defer close(done)
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			out, _ = ctrs[c3.Name].Run(ctx, "ping", "-q", "-i", "0.01", "-w", "8", ctrs[c4.Name].Addr.String())
		}()
		time.Sleep(2 * time.Second)
		event()
		<-done
		m := regexp.MustCompile(`(\d+) packets transmitted, (\d+) received`).FindStringSubmatch(out)
		if m == nil {
			t.Fatalf("no ping summary: %s", out)
		}
		sent, _ := strconv.Atoi(m[1])
		got, _ := strconv.Atoi(m[2])
		t.Logf("client %s -> client %s while %s: %d sent, %d received", c3.Name, c4.Name, what, sent, got)
		if got != sent || sent < 200 {
			t.Errorf("%d of %d packets lost while %s", sent-got, sent, what)
		}
	}
	clientsRouted := func(when string) {
		t.Helper()
		if _, ok := f.ownedRoutes(c3)[f.subnet(c4).String()]; !ok {
			t.Errorf("%s lost its route to %s %s", c3.Name, c4.Name, when)
		}
	}

	// One reflector dies (SIGKILL) and stays down: its clients keep its
	// reflected routes through the graceful-restart time, then hold the
	// same routes from the other reflector.
	pingWhile("reflector "+rr1.Name+" was killed", func() {
		if err := f.agents[rr1.Name].proc.Kill(); err != nil {
			t.Fatal(err)
		}
	})
	time.Sleep(6 * time.Second) // past the 5 s graceful-restart time
	clientsRouted("after the killed reflector's graceful restart ran out")
	pingWhile("reflector "+rr1.Name+" stayed dead past its graceful restart", func() {})

	// It comes back; then the other one leaves for good.
	f.start(rr1, "--route-reflector")
	f.eventually(30*time.Second, c3.Name+" in session with both reflectors again", func() error {
		return f.allEstablished(c3, 2)
	})
	pingWhile("reflector "+rr2.Name+" left", func() {
		if o, err := f.fabricctl(rr2, "leave"); err != nil {
			t.Fatalf("fabricctl leave on %s: %v %s", rr2.Name, err, o)
		}
	})
	clientsRouted("with one reflector left")
	if st, _ := f.fabricctl(c3, "peers", "status"); !strings.Contains(st, rr1.Name) {
		t.Errorf("peers status on %s lacks %s:\n%s", c3.Name, rr1.Name, st)
	}
}
