package names

import (
	"context"
	"fmt"
	"log/slog"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/fabricnet/fabric/internal/etcdtest"
)

// settle bounds waits for what must happen, generous for a loaded machine.
const settle = 15 * time.Second

func rec(name, node string, addr string, created int) Record {
	return Record{Name: name, Node: node, Address: netip.MustParseAddr(addr), ID: name + "-" + node,
		Created: time.Unix(int64(created), 0).UTC()}
}

func TestViewConflictsAnsweredTheSameEverywhere(t *testing.T) {
	older := rec("web", "host2", "10.244.2.5", 100)
	newer := rec("web", "host1", "10.244.1.5", 200)
	sameTimeA := rec("db", "host3", "10.244.3.5", 100)
	sameTimeB := rec("db", "host1", "10.244.1.6", 100)
	upper := rec("Web", "host4", "10.244.4.5", 50)
	for _, order := range [][]Record{
		{older, newer, sameTimeA, sameTimeB},
		{newer, sameTimeB, older, sameTimeA},
	} {
		v := NewView(order, nil)
		if r, _ := v.Lookup("web"); r.Node != "host2" {
			t.Errorf("web answered by %s, want host2 (created first)", r.Node)
		}
		if r, _ := v.Lookup("db"); r.Node != "host1" {
			t.Errorf("db answered by %s, want host1 (same time, node name first)", r.Node)
		}
		if r, ok := v.Reverse(netip.MustParseAddr("10.244.1.5")); !ok || r.Name != "web" || r.Node != "host1" {
			t.Errorf("reverse of host1's web: %+v %v", r, ok)
		}
		var shadowed []string
		for _, e := range v.Entries() {
			if e.ShadowedBy != "" {
				shadowed = append(shadowed, e.Name+"@"+e.Node+">"+e.ShadowedBy)
			}
		}
		if want := []string{"db@host3>host1", "web@host1>host2"}; !slices.Equal(shadowed, want) {
			t.Errorf("shadowed %v, want %v", shadowed, want)
		}
	}
	// DNS is case-insensitive: Web and web are one name.
	v := NewView([]Record{older, upper}, nil)
	if r, _ := v.Lookup("WEB"); r.Node != "host4" {
		t.Errorf("WEB answered by %s, want host4's Web (created first)", r.Node)
	}
	if _, ok := v.Lookup("nothing"); ok {
		t.Error("an unknown name resolved")
	}
}

func TestValidate(t *testing.T) {
	good := rec("web", "host1", "10.244.1.5", 1)
	if err := good.Validate(); err != nil {
		t.Fatal(err)
	}
	for name, r := range map[string]Record{
		"no name":     {Node: "h", Address: good.Address},
		"slash":       {Name: "a/b", Node: "h", Address: good.Address},
		"no node":     {Name: "a", Address: good.Address},
		"no address":  {Name: "a", Node: "h"},
		"ipv6":        {Name: "a", Node: "h", Address: netip.MustParseAddr("fd00::1")},
		"node/escape": {Name: "a", Node: "h/../x", Address: good.Address},
	} {
		if r.Validate() == nil {
			t.Errorf("%s: accepted", name)
		}
	}
}

type watcher struct {
	t  *testing.T
	ch <-chan []Record
}

func (w *watcher) waitFor(what string, cond func([]Record) bool) []Record {
	w.t.Helper()
	deadline := time.After(settle)
	for {
		select {
		case rs := <-w.ch:
			if cond(rs) {
				return rs
			}
		case <-deadline:
			w.t.Fatalf("no directory with %s within %s", what, settle)
		}
	}
}

func has(want ...string) func([]Record) bool {
	return func(rs []Record) bool {
		var got []string
		for _, r := range rs {
			got = append(got, r.Name+"@"+r.Node)
		}
		return slices.Equal(got, want)
	}
}

// A host publishes its containers, follows starts and stops, and its names
// go when it dies (the lease ends) but not when it merely has not listed yet.
func TestPublishFollowsContainersAndDiesWithTheHost(t *testing.T) {
	cli := etcdtest.Start(t).Client(t)
	prefix := fmt.Sprintf("/fabric-test/%d", time.Now().UnixNano())
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	log := slog.New(slog.NewTextHandler(t.Output(), nil))
	w := &watcher{t: t, ch: Watch(ctx, cli, prefix, log)}
	w.waitFor("nothing", has())

	const ttl = 2 * time.Second
	pctx, kill := context.WithCancel(ctx)
	lists := make(chan []Record, 1)
	done := make(chan error, 1)
	go func() { done <- NewPublisher(cli, prefix, "host1", ttl, log).Run(pctx, lists) }()
	lists <- []Record{rec("web", "", "10.244.1.5", 1), rec("api", "", "10.244.1.6", 2)}
	got := w.waitFor("web and api on host1", has("api@host1", "web@host1"))
	if got[1].Address != netip.MustParseAddr("10.244.1.5") {
		t.Errorf("web's address %v", got[1].Address)
	}
	lists <- []Record{rec("api", "", "10.244.1.6", 2)}
	w.waitFor("web gone", has("api@host1"))

	// Another host's records are not touched by host1's publisher.
	other := rec("db", "host2", "10.244.2.5", 3)
	if _, err := cli.Put(ctx, Key(prefix, other), `{"name":"db","node":"host2","address":"10.244.2.5","id":"x","created":"1970-01-01T00:00:03Z"}`); err != nil {
		t.Fatal(err)
	}
	w.waitFor("db on host2 too", has("api@host1", "db@host2"))
	// A malformed record is skipped, the rest stays.
	if _, err := cli.Put(ctx, prefix+"/containers/host3/bad", `{"name":"bad"`); err != nil {
		t.Fatal(err)
	}
	lists <- []Record{rec("api", "", "10.244.1.6", 2), rec("cache", "", "10.244.1.7", 4)}
	w.waitFor("cache on host1, the bad record skipped", has("api@host1", "cache@host1", "db@host2"))

	// host1 dies: its records go once the lease ends; host2's stay.
	kill()
	<-done
	killed := time.Now()
	w.waitFor("host1's names gone", has("db@host2"))
	if gone := time.Since(killed); gone < ttl/2 {
		t.Errorf("host1's names went %s after it died, before its lease (%s) could end", gone, ttl)
	}
}

// Withdraw removes the names at once (fabricctl leave).
func TestWithdraw(t *testing.T) {
	cli := etcdtest.Start(t).Client(t)
	prefix := fmt.Sprintf("/fabric-test/%d", time.Now().UnixNano())
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	w := &watcher{t: t, ch: Watch(ctx, cli, prefix, nil)}
	// A lease far longer than the wait: gone in time means withdrawn.
	p := NewPublisher(cli, prefix, "host1", 10*settle, nil)
	pctx, stop := context.WithCancel(ctx)
	lists := make(chan []Record, 1)
	done := make(chan error, 1)
	go func() { done <- p.Run(pctx, lists) }()
	lists <- []Record{rec("web", "", "10.244.1.5", 1)}
	w.waitFor("web", has("web@host1"))
	stop()
	<-done
	if err := p.Withdraw(ctx); err != nil {
		t.Fatal(err)
	}
	w.waitFor("nothing", has())
}

// Any etcd client can write a record; only a name pointing into its own
// node's lease is answered.
func TestTrustedOnlyInsideTheNodesLease(t *testing.T) {
	held := map[string][]netip.Prefix{
		"host1": {netip.MustParsePrefix("10.244.1.0/24")},
		"host2": {netip.MustParsePrefix("10.244.2.0/24")},
	}
	own := rec("web", "host1", "10.244.1.5", 1)
	for _, tc := range []struct {
		name string
		r    Record
		ok   bool
	}{
		{"own container", own, true},
		{"another host's container", rec("bank", "host1", "10.244.2.5", 1), false},
		{"an underlay address", rec("gw", "host1", "192.168.100.11", 1), false},
		{"the outside world", rec("login", "host2", "203.0.113.9", 1), false},
		{"a node without a lease", rec("x", "host9", "10.244.9.5", 1), false},
	} {
		kept, refused := Trusted([]Record{tc.r}, held, nil)
		if got := len(kept) == 1; got != tc.ok {
			t.Errorf("%s: trusted=%v, want %v (refusals %+v)", tc.name, got, tc.ok, refused)
		}
		if !tc.ok && (len(refused) != 1 || refused[0].Reason == "") {
			t.Errorf("%s: refusal without a reason: %+v", tc.name, refused)
		}
	}
	if kept, _ := Trusted([]Record{own}, nil, nil); len(kept) != 0 {
		t.Error("records trusted before the leases are known")
	}
}

// A record's IPv6 address is answered only inside its node's /64: one in
// another host's /64 is cleared (its IPv4 address still answers) and the
// refusal says why.
func TestTrustIPv6(t *testing.T) {
	heldV6 := map[string][]netip.Prefix{"host1": {netip.MustParsePrefix("fd00:10:244:1::/64")}, "host2": {netip.MustParsePrefix("fd00:10:244:2::/64")}}
	own, forged, none := rec("web", "host1", "10.244.1.5", 1), rec("bank", "host1", "10.244.1.6", 1), rec("db", "host1", "10.244.1.7", 1)
	own.AddressV6 = netip.MustParseAddr("fd00:10:244:1::5")
	forged.AddressV6 = netip.MustParseAddr("fd00:10:244:2::9") // host2's container
	// On a fabric network, the IPv6 address must be given to the node
	// there (dockernet's grants), as the IPv4 one is.
	onNet, forgedOnNet := rec("api", "host1", "172.16.1.5", 1), rec("vault", "host1", "172.16.1.6", 1)
	onNet.Network, forgedOnNet.Network = "net6", "net6"
	onNet.AddressV6, forgedOnNet.AddressV6 = netip.MustParseAddr("fd00:16:1::5"), netip.MustParseAddr("fd00:16:1::9")
	owns := func(network, node string, a netip.Addr) bool {
		return network == "net6" && node == "host1" && a == netip.MustParseAddr("fd00:16:1::5")
	}
	out, refused := TrustIPv6([]Record{own, forged, none, onNet, forgedOnNet}, heldV6, owns)
	if out[0].AddressV6 != own.AddressV6 || out[1].AddressV6.IsValid() || out[2].AddressV6.IsValid() || out[1].Address != forged.Address {
		t.Errorf("records after the IPv6 check: %+v", out)
	}
	if out[3].AddressV6 != onNet.AddressV6 || out[4].AddressV6.IsValid() {
		t.Errorf("network records after the IPv6 check: %+v", out[3:])
	}
	if len(refused) != 2 || refused[0].Record.Name != "bank" || !strings.Contains(refused[0].Reason, "not in the IPv6 subnet of host1") ||
		refused[1].Record.Name != "vault" || !strings.Contains(refused[1].Reason, "on network net6 is not given to host1") {
		t.Errorf("refusals %+v, want bank's and vault's IPv6 addresses", refused)
	}
	if out, _ := TrustIPv6([]Record{own}, nil, nil); out[0].AddressV6.IsValid() {
		t.Error("an IPv6 address trusted without an IPv6 pool")
	}
}
