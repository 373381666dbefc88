package registry

import (
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/fabricnet/fabric/internal/etcdtest"
	clientv3 "go.etcd.io/etcd/client/v3"
)

func testPrefix(t *testing.T) string {
	return fmt.Sprintf("/fabric-test/%s-%d", t.Name(), time.Now().UnixNano())
}

func testLogger(t *testing.T) *slog.Logger {
	return slog.New(slog.NewTextHandler(t.Output(), nil))
}

func testCtx(t *testing.T, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}

func node(name string, i int) Node {
	return Node{
		Name:      name,
		Address:   netip.AddrFrom4([4]byte{192, 0, 2, byte(i)}),
		ASN:       64512,
		Subnet:    netip.PrefixFrom(netip.AddrFrom4([4]byte{10, 244, byte(i), 0}), 24),
		VTEPMAC:   fmt.Sprintf("02:00:00:00:00:%02x", i),
		Encaps:    []string{"vxlan"},
		Version:   "test",
		MachineID: "machine-" + name,
	}
}

// nodeWatch follows a Watch channel and waits for states.
type nodeWatch struct {
	t  *testing.T
	ch <-chan []Node
}

func startWatch(t *testing.T, ctx context.Context, cli *clientv3.Client, prefix string) *nodeWatch {
	return &nodeWatch{t: t, ch: Watch(ctx, cli, prefix, testLogger(t))}
}

// settle bounds a wait for something that must happen: long enough for an
// embedded etcd whose fsyncs crawl on a loaded machine (CI once took more
// than 500 ms for one delete), short enough to fail a test that waits for
// something that never comes. Tests that must tell "at once" from "after a
// lease expired" make the lease much longer than settle instead.
const settle = 15 * time.Second

// waitFor returns the first state for which cond holds, failing after settle.
func (w *nodeWatch) waitFor(what string, cond func([]Node) bool) []Node {
	w.t.Helper()
	deadline := time.After(settle)
	for {
		select {
		case nodes, ok := <-w.ch:
			if !ok {
				w.t.Fatalf("watch channel closed while waiting for %s", what)
			}
			if cond(nodes) {
				return nodes
			}
		case <-deadline:
			w.t.Fatalf("no node set with %s within %s", what, settle)
		}
	}
}

func names(nodes []Node) []string {
	var out []string
	for _, n := range nodes {
		out = append(out, n.Name)
	}
	return out
}

func hasNames(want ...string) func([]Node) bool {
	return func(nodes []Node) bool { return slices.Equal(names(nodes), want) }
}

func runHeartbeat(t *testing.T, ctx context.Context, p *Heartbeat, self Node) (stop func()) {
	ctx, cancel := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() { done <- p.Run(ctx, self) }()
	return func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Run(%s): %v", self.Name, err)
		}
	}
}

func TestWatchJoinChangeAndDeparture(t *testing.T) {
	cli := etcdtest.Start(t).Client(t)
	prefix := testPrefix(t)
	ctx := testCtx(t, 2*time.Minute)
	const ttl = 2 * time.Second

	w := startWatch(t, ctx, cli, prefix)
	w.waitFor("the initial empty set", hasNames())

	pa := NewHeartbeat(cli, prefix, ttl, testLogger(t))
	killA := runHeartbeat(t, ctx, pa, node("alpha", 1))
	// bravo's lease outlives the wait: if it is gone, Withdraw removed it.
	pb := NewHeartbeat(cli, prefix, 10*settle, testLogger(t))
	stopB := runHeartbeat(t, ctx, pb, node("bravo", 2))
	got := w.waitFor("alpha and bravo joined", hasNames("alpha", "bravo"))
	if !got[0].Address.IsValid() || got[1].Subnet != node("bravo", 2).Subnet || got[0].MachineID != "machine-alpha" {
		t.Fatalf("records arrived incomplete: %+v", got)
	}

	changed := node("alpha", 1)
	changed.VTEPMAC = "02:aa:bb:cc:dd:ee"
	changed.Encaps = []string{"ipip", "vxlan"}
	start := time.Now()
	pa.Update(changed)
	w.waitFor("alpha's new VTEP MAC", func(nodes []Node) bool {
		return len(nodes) == 2 && nodes[0].VTEPMAC == changed.VTEPMAC && slices.Equal(nodes[0].Encaps, changed.Encaps)
	})
	t.Logf("change seen after %s", time.Since(start).Round(time.Millisecond))

	// Graceful stop: gone at once, not after the TTL.
	stopB()
	start = time.Now()
	if err := pb.Withdraw(ctx); err != nil {
		t.Fatal(err)
	}
	w.waitFor("bravo withdrawn", hasNames("alpha"))
	t.Logf("withdrawal seen after %s", time.Since(start).Round(time.Millisecond))

	// Killed host: the record stays until its lease expires, then goes.
	killA()
	killed := time.Now()
	select {
	case nodes := <-w.ch:
		if time.Since(killed) < ttl/2 {
			t.Fatalf("node set changed %s after the kill, before the TTL could pass: %v", time.Since(killed), names(nodes))
		}
		if len(nodes) != 0 {
			t.Fatalf("unexpected node set %v", names(nodes))
		}
	case <-time.After(ttl + settle):
		t.Fatalf("killed host still listed %s after it stopped (TTL %s)", time.Since(killed), ttl)
	}
	t.Logf("killed host gone after %s (TTL %s)", time.Since(killed).Round(time.Millisecond), ttl)
}

// A graceful stop while the first put was in flight: etcd stored the
// record, but its reply was lost with the cancelled Run (CI saw this once:
// the record stayed for its whole TTL). The lost reply cannot be timed for
// real, so the test writes the record under the heartbeat's lease and leaves
// the heartbeat not knowing it, which is the state the lost reply leaves.
func TestWithdrawAfterSimulatedLostPutReply(t *testing.T) {
	cli := etcdtest.Start(t).Client(t)
	prefix := testPrefix(t)
	ctx := testCtx(t, time.Minute)
	w := startWatch(t, ctx, cli, prefix)
	w.waitFor("the initial empty set", hasNames())

	p := NewHeartbeat(cli, prefix, 10*settle, testLogger(t))
	lease, err := cli.Grant(ctx, p.ttlSec)
	if err != nil {
		t.Fatal(err)
	}
	value, _ := json.Marshal(node("alpha", 1))
	if _, err := cli.Put(ctx, nodeKey(prefix, "alpha"), string(value), clientv3.WithLease(lease.ID)); err != nil {
		t.Fatal(err)
	}
	p.leaseID = lease.ID // granted; the put's reply never came, so putKey is empty
	w.waitFor("alpha stored", hasNames("alpha"))

	if err := p.Withdraw(ctx); err != nil {
		t.Fatal(err)
	}
	w.waitFor("alpha withdrawn", hasNames())
}

func TestHeartbeatRewritesRecordAfterLeaseLoss(t *testing.T) {
	cli := etcdtest.Start(t).Client(t)
	prefix := testPrefix(t)
	ctx := testCtx(t, 2*time.Minute)

	w := startWatch(t, ctx, cli, prefix)
	p := NewHeartbeat(cli, prefix, 3*time.Second, testLogger(t))
	defer runHeartbeat(t, ctx, p, node("alpha", 1))()
	w.waitFor("alpha", hasNames("alpha"))

	// What an etcd that lost the lease (or a too-long absence) looks like.
	resp, err := cli.Get(ctx, nodeKey(prefix, "alpha"))
	if err != nil || len(resp.Kvs) != 1 {
		t.Fatalf("get alpha's record: %v", err)
	}
	if _, err := cli.Revoke(ctx, clientv3.LeaseID(resp.Kvs[0].Lease)); err != nil {
		t.Fatal(err)
	}
	w.waitFor("alpha gone with its lease", hasNames())
	w.waitFor("alpha published again", hasNames("alpha"))

	// Someone overwrote the record: the publisher restores it.
	bogus := node("alpha", 9)
	b, _ := json.Marshal(bogus)
	if _, err := cli.Put(ctx, nodeKey(prefix, "alpha"), string(b)); err != nil {
		t.Fatal(err)
	}
	w.waitFor("alpha restored", func(nodes []Node) bool {
		return len(nodes) == 1 && nodes[0].Address == node("alpha", 1).Address
	})
}

func TestInvalidRecordsSkipped(t *testing.T) {
	cli := etcdtest.Start(t).Client(t)
	prefix := testPrefix(t)
	ctx := testCtx(t, 2*time.Minute)

	valid := node("good", 1)
	noAddr := node("noaddr", 2)
	noAddr.Address = netip.Addr{}
	badMAC := node("badmac", 3)
	badMAC.VTEPMAC = "zz"
	renamed := node("real-name", 4)
	put := func(name string, v any) {
		t.Helper()
		var s string
		if str, ok := v.(string); ok {
			s = str
		} else {
			b, _ := json.Marshal(v)
			s = string(b)
		}
		if _, err := cli.Put(ctx, nodeKey(prefix, name), s); err != nil {
			t.Fatal(err)
		}
	}
	put("good", valid)
	put("garbage", "{not json")
	put("noaddr", noAddr)
	put("badmac", badMAC)
	put("alias", renamed)

	nodes, bad, err := List(ctx, cli, prefix)
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(names(nodes), []string{"good"}) {
		t.Errorf("List nodes %v, want only good", names(nodes))
	}
	problems := map[string]string{}
	for _, b := range bad {
		problems[strings.TrimPrefix(b.Key, nodesPrefix(prefix))] = b.Problem
	}
	for name, want := range map[string]string{"garbage": "not a valid node record", "noaddr": "address", "badmac": "vtepMAC", "alias": "stored under"} {
		if !strings.Contains(problems[name], want) {
			t.Errorf("bad record %s: problem %q, want mention of %q", name, problems[name], want)
		}
	}

	w := startWatch(t, ctx, cli, prefix)
	w.waitFor("only the valid record", hasNames("good"))
	// The watch keeps going: a later valid record arrives, a record turning
	// invalid disappears.
	put("late", node("late", 5))
	w.waitFor("late joined", hasNames("good", "late"))
	put("late", "{}")
	w.waitFor("late invalid", hasNames("good"))
}

func TestWatchAcrossMemberFailures(t *testing.T) {
	cluster := etcdtest.StartCluster(t, 3)
	ctx := testCtx(t, 2*time.Minute)
	prefix := testPrefix(t)
	// Watching through members 0 and 1 only: stopping each in turn is sure
	// to break the watch stream at least once.
	watchCli := cluster.ClientFor(t, cluster.Endpoint(0), cluster.Endpoint(1))
	w := startWatch(t, ctx, watchCli, prefix)
	w.waitFor("the initial empty set", hasNames())

	pub := NewHeartbeat(cluster.Client(t), prefix, 2*time.Second, testLogger(t))
	defer runHeartbeat(t, ctx, pub, node("alpha", 1))()
	w.waitFor("alpha", hasNames("alpha"))

	for _, down := range []int{0, 1} {
		stepStart := time.Now()
		cluster.StopMember(down)
		other := cluster.ClientFor(t, cluster.Endpoint((down+1)%3))
		name := fmt.Sprintf("while-m%d-down", down)
		b, _ := json.Marshal(node(name, 10+down))
		etcdtest.PutAsAgent(ctx, t, other, nodeKey(prefix, name), string(b))
		t.Logf("member %d down: put done after %s", down, time.Since(stepStart).Round(time.Millisecond))
		w.waitFor(name, func(nodes []Node) bool { return slices.Contains(names(nodes), name) })
		t.Logf("member %d down: change seen after %s", down, time.Since(stepStart).Round(time.Millisecond))
		cluster.RestartMember(down)
	}
	// alpha's lease (TTL 2 s) was renewed through all of it.
	nodes, _, err := List(ctx, watchCli, prefix)
	if err != nil || !slices.Contains(names(nodes), "alpha") {
		t.Fatalf("alpha lost during member failures: %v %v", names(nodes), err)
	}
}

func TestNodeValidate(t *testing.T) {
	if err := node("ok", 1).Validate(); err != nil {
		t.Fatal(err)
	}
	for name, mutate := range map[string]func(*Node){
		"empty name":     func(n *Node) { n.Name = "" },
		"slash in name":  func(n *Node) { n.Name = "a/b" },
		"no asn":         func(n *Node) { n.ASN = 0 },
		"no subnet":      func(n *Node) { n.Subnet = netip.Prefix{} },
		"host bits":      func(n *Node) { n.Subnet = netip.MustParsePrefix("10.0.0.1/24") },
		"mapped address": func(n *Node) { n.Address = netip.MustParseAddr("::ffff:10.0.0.1") },
		"link-local":     func(n *Node) { n.Address = netip.MustParseAddr("fe80::1") },
		"bad encap":      func(n *Node) { n.Encaps = []string{"VXLAN"} },
	} {
		n := node("x", 1)
		mutate(&n)
		if err := n.Validate(); err == nil {
			t.Errorf("%s accepted", name)
		}
	}
}

// TestHandOverKeepsRecordThroughSlowRestart: a stopping fabricd hands its
// record over for the restart time. The restart takes longer than the
// liveness TTL, yet the record never leaves; the next process publishes
// it under its own lease, and the handed-over lease expiring then does
// not remove it. Without a next process it goes after the restart time.
func TestHandOverKeepsRecordThroughSlowRestart(t *testing.T) {
	cli := etcdtest.Start(t).Client(t)
	prefix := testPrefix(t)
	ctx := testCtx(t, 2*time.Minute)
	const ttl, restart = 2 * time.Second, 6 * time.Second // etcd raises a lease under ~2 s to its minimum
	w := startWatch(t, ctx, cli, prefix)
	w.waitFor("the initial empty set", hasNames())

	first := NewHeartbeat(cli, prefix, ttl, testLogger(t))
	stop := runHeartbeat(t, ctx, first, node("alpha", 1))
	w.waitFor("alpha published", hasNames("alpha"))
	stop()
	if err := first.HandOver(ctx, restart); err != nil {
		t.Fatal(err)
	}
	stopped := time.Now()
	// A restart of 2.5 TTLs, then the next process until past the
	// handed-over lease: alpha must stay listed throughout.
	stayed := func(d time.Duration, when string) {
		t.Helper()
		end := time.After(d)
		for {
			select {
			case nodes := <-w.ch:
				if !slices.Equal(names(nodes), []string{"alpha"}) {
					t.Fatalf("alpha left %s (%s after the stop; TTL %s, handed over for %s): %v", when, time.Since(stopped).Round(time.Millisecond), ttl, restart, names(nodes))
				}
			case <-end:
				return
			}
		}
	}
	stayed(5*ttl/2, "during the restart")
	second := NewHeartbeat(cli, prefix, ttl, testLogger(t))
	stop2 := runHeartbeat(t, ctx, second, node("alpha", 1))
	stayed(restart+ttl, "after the next process took it over")
	stop2()

	// No next process: the handed-over record goes after the restart time.
	if err := second.HandOver(ctx, restart); err != nil {
		t.Fatal(err)
	}
	stopped = time.Now()
	w.waitFor("alpha gone after the restart time", hasNames())
	if took := time.Since(stopped); took < restart-ttl {
		t.Errorf("the handed-over record went after %s, before the restart time %s", took, restart)
	}
}
