package ipam

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/fabricnet/fabric/internal/etcdclient"
	"github.com/fabricnet/fabric/internal/etcdtest"
	"github.com/fabricnet/fabric/internal/testwait"
	clientv3 "go.etcd.io/etcd/client/v3"
)

// testPrefix is unique per test so tests can share one etcd member.
func testPrefix(t *testing.T) string {
	return fmt.Sprintf("/fabric-test/%s-%d", t.Name(), time.Now().UnixNano())
}

func testLogger(t *testing.T) *slog.Logger {
	return slog.New(slog.NewTextHandler(t.Output(), &slog.HandlerOptions{Level: slog.LevelDebug}))
}

func testCtx(t *testing.T, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}

func newManager(t *testing.T, cli *clientv3.Client, prefix, node, machine string, ttl time.Duration, pool *Pool) *Manager {
	t.Helper()
	m, err := New(Options{
		Client: cli, Prefix: prefix, Node: node, MachineID: machine,
		HostAddr: netip.MustParseAddr("192.0.2.10"), TTL: ttl, Pool: pool, Logger: testLogger(t),
	})
	if err != nil {
		t.Fatalf("New(%s): %v", node, err)
	}
	return m
}

func pool(network string, subnetLen int) *Pool {
	return &Pool{Network: netip.MustParsePrefix(network), SubnetLen: subnetLen}
}

func TestConcurrentAgentsGetDistinctSubnetsUntilPoolExhausted(t *testing.T) {
	cli := etcdtest.Start(t).Client(t)
	prefix := testPrefix(t)
	p := pool("10.99.0.0/18", 24) // 64 subnets
	ctx := testCtx(t, 30*time.Second)

	const agents = 64
	leases := make([]Lease, agents)
	errs := make([]error, agents)
	var wg sync.WaitGroup
	start := make(chan struct{})
	for i := range agents {
		m := newManager(t, cli, prefix, fmt.Sprintf("host-%02d", i), fmt.Sprintf("machine-%02d", i), time.Minute, p)
		wg.Add(1)
		go func() {
			defer wg.Done()
			<-start
			leases[i], errs[i] = m.Acquire(ctx)
		}()
	}
	close(start)
	wg.Wait()

	seen := map[netip.Prefix]string{}
	for i, l := range leases {
		if errs[i] != nil {
			t.Fatalf("agent %d: %v", i, errs[i])
		}
		if !p.Contains(l.Subnet) {
			t.Errorf("agent %d got %s, outside pool %s", i, l.Subnet, p)
		}
		if other, dup := seen[l.Subnet]; dup {
			t.Errorf("subnet %s given to both %s and %s", l.Subnet, other, l.Node)
		}
		seen[l.Subnet] = l.Node
	}
	if len(seen) != agents {
		t.Fatalf("got %d distinct subnets for %d agents", len(seen), agents)
	}

	listed, bad, err := List(ctx, cli, prefix)
	if err != nil || len(bad) != 0 || len(listed) != agents {
		t.Fatalf("List: %d leases, bad %v, err %v; want %d leases", len(listed), bad, err, agents)
	}
	for _, l := range listed {
		if seen[l.Subnet] != l.Node {
			t.Errorf("List shows %s for %s, acquire gave it to %s", l.Subnet, l.Node, seen[l.Subnet])
		}
		if until := time.Until(l.Expires); until < 50*time.Second || until > 61*time.Second {
			t.Errorf("lease of %s expires in %s, want about 1m", l.Node, until)
		}
	}

	late := newManager(t, cli, prefix, "host-late", "machine-late", time.Minute, p)
	_, err = late.Acquire(ctx)
	if !errors.Is(err, ErrPoolExhausted) {
		t.Fatalf("65th agent: got %v, want pool exhausted", err)
	}
	for _, want := range []string{"10.99.0.0/18", "64 of 64"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("exhaustion error %q does not mention %q", err, want)
		}
	}
}

func TestRestartKeepsSubnet(t *testing.T) {
	cli := etcdtest.Start(t).Client(t)
	prefix := testPrefix(t)
	p := pool("10.98.0.0/16", 24)
	ctx := testCtx(t, 10*time.Second)

	first, err := newManager(t, cli, prefix, "h1", "m1", time.Minute, p).Acquire(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := newManager(t, cli, prefix, "h2", "m2", time.Minute, p).Acquire(ctx); err != nil {
		t.Fatal(err)
	}
	// What else hangs on the host's lease (its Docker networks' addresses).
	attached := prefix + "/netaddrs/net1/172.16.1.2"
	if _, err := cli.Put(ctx, attached, `{"node":"h1"}`, clientv3.WithLease(first.LeaseID)); err != nil {
		t.Fatal(err)
	}
	// A restarted agent: new Manager, same name and machine id, and no --pool.
	again, err := newManager(t, cli, prefix, "h1", "m1", time.Minute, nil).Acquire(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if again.Subnet != first.Subnet {
		t.Fatalf("after restart got %s, before %s", again.Subnet, first.Subnet)
	}
	if got := again.Gateway(); got != first.Subnet.Addr().Next() {
		t.Errorf("gateway %s, want first address of %s", got, first.Subnet)
	}
	// The same lease, so what hangs on it stays.
	if again.LeaseID != first.LeaseID {
		t.Errorf("restart moved the subnet from lease %x to %x: the keys attached to the old one went with it", int64(first.LeaseID), int64(again.LeaseID))
	}
	if resp, err := cli.Get(ctx, attached); err != nil || len(resp.Kvs) != 1 {
		t.Errorf("a key on the host's lease is gone after the restart: %v", err)
	}
	// A lease that ended while the host was away: a fresh one.
	if _, err := cli.Revoke(ctx, first.LeaseID); err != nil {
		t.Fatal(err)
	}
	if _, err := cli.Put(ctx, subnetKey(prefix, first.Subnet), encodeLease(Lease{Node: "h1", MachineID: "m1"})); err != nil {
		t.Fatal(err) // the subnet key as a host that died and whose lease ended left it
	}
	again, err = newManager(t, cli, prefix, "h1", "m1", time.Minute, nil).Acquire(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if again.LeaseID == first.LeaseID || again.LeaseID == 0 {
		t.Errorf("after the old lease ended the subnet is on lease %x", int64(again.LeaseID))
	}
	leases, _, err := List(ctx, cli, prefix)
	if err != nil {
		t.Fatal(err)
	}
	found := false
	for _, l := range leases {
		if l.Node == "h1" {
			found = l.Subnet == first.Subnet && l.LeaseID == again.LeaseID
		}
	}
	if !found {
		t.Fatalf("List does not show h1 with %s on lease %x: %+v", first.Subnet, int64(again.LeaseID), leases)
	}
}

func TestKilledAgentSubnetReservedUntilTTL(t *testing.T) {
	cli := etcdtest.Start(t).Client(t)
	prefix := testPrefix(t)
	p := pool("10.97.0.0/29", 30) // two subnets
	ctx := testCtx(t, 20*time.Second)
	const ttl = 3 * time.Second

	if _, err := newManager(t, cli, prefix, "other", "m-other", time.Minute, p).Acquire(ctx); err != nil {
		t.Fatal(err)
	}
	victim := newManager(t, cli, prefix, "victim", "m-victim", ttl, p)
	held, kill, keepDone := acquireAndKeep(t, ctx, victim)

	newcomer := newManager(t, cli, prefix, "newcomer", "m-newcomer", ttl, p)
	// Longer than the TTL: only the running keepalive holds the subnet.
	time.Sleep(ttl + 1500*time.Millisecond)
	if l, err := newcomer.Acquire(ctx); !errors.Is(err, ErrPoolExhausted) {
		t.Fatalf("while the victim runs: newcomer got %v %v, want pool exhausted", l.Subnet, err)
	}

	kill() // the agent dies without releasing
	if err := <-keepDone; err != nil {
		t.Fatalf("KeepAlive: %v", err)
	}
	killedAt := time.Now()
	time.Sleep(ttl / 2)
	if l, err := newcomer.Acquire(ctx); !errors.Is(err, ErrPoolExhausted) {
		t.Fatalf("before the TTL passed: newcomer got %v %v, want pool exhausted", l.Subnet, err)
	}
	for {
		l, err := newcomer.Acquire(ctx)
		if err == nil {
			if l.Subnet != held.Subnet {
				t.Fatalf("newcomer got %s, want the dead agent's %s", l.Subnet, held.Subnet)
			}
			t.Logf("dead agent's subnet free after %s (TTL %s)", time.Since(killedAt).Round(100*time.Millisecond), ttl)
			break
		}
		if !errors.Is(err, ErrPoolExhausted) {
			t.Fatal(err)
		}
		if time.Since(killedAt) > ttl+3*time.Second {
			t.Fatalf("dead agent's subnet still taken %s after it stopped (TTL %s)", time.Since(killedAt), ttl)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

func TestKeepAliveTakesSameSubnetAfterLeaseLoss(t *testing.T) {
	cli := etcdtest.Start(t).Client(t)
	prefix := testPrefix(t)
	p := pool("10.96.0.0/16", 24)
	ctx := testCtx(t, 20*time.Second)

	m := newManager(t, cli, prefix, "h1", "m1", 3*time.Second, p)
	held, stop, keepDone := acquireAndKeep(t, ctx, m)
	defer stop()

	// What etcd does when the host was away longer than the TTL.
	if _, err := cli.Revoke(ctx, held.LeaseID); err != nil {
		t.Fatal(err)
	}
	testwait.Until(t, 5*time.Second, "subnet taken again on a new lease", func() bool {
		leases, _, _ := List(ctx, cli, prefix)
		return len(leases) == 1 && leases[0].Subnet == held.Subnet && leases[0].Node == "h1" && leases[0].LeaseID != held.LeaseID
	})

	// Now the lease is lost and another host grabs the subnet in between.
	cur, _ := m.Lease()
	if _, err := cli.Revoke(ctx, cur.LeaseID); err != nil {
		t.Fatal(err)
	}
	thief := Lease{Subnet: held.Subnet, Node: "thief", MachineID: "m-thief"}
	if _, err := cli.Put(ctx, subnetKey(prefix, held.Subnet), encodeLease(thief)); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-keepDone:
		if !errors.Is(err, ErrSubnetLost) || !strings.Contains(err.Error(), "thief") {
			t.Fatalf("KeepAlive ended with %v, want subnet lost naming the new owner", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("KeepAlive did not notice that its subnet went to another host")
	}
}

func TestDuplicateNodeNameRefused(t *testing.T) {
	cli := etcdtest.Start(t).Client(t)
	prefix := testPrefix(t)
	p := pool("10.95.0.0/16", 24)
	ctx := testCtx(t, 10*time.Second)

	held, err := newManager(t, cli, prefix, "web1", "machine-A", time.Minute, p).Acquire(ctx)
	if err != nil {
		t.Fatal(err)
	}
	impostor := newManager(t, cli, prefix, "web1", "machine-B", time.Minute, p)
	_, err = impostor.Acquire(ctx)
	if !errors.Is(err, ErrNodeConflict) {
		t.Fatalf("second machine named web1: got %v, want node conflict", err)
	}
	for _, want := range []string{`"web1"`, "machine-A", held.Subnet.String(), subnetKey(prefix, held.Subnet), "fabricctl ipam release web1"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("conflict error %q does not mention %q", err, want)
		}
	}

	if err := ReleaseNode(ctx, cli, prefix, "no-such-host"); err == nil || !strings.Contains(err.Error(), "no-such-host") {
		t.Errorf("ReleaseNode of unknown node: %v", err)
	}
	if err := ReleaseNode(ctx, cli, prefix, "web1"); err != nil {
		t.Fatal(err)
	}
	if _, err := cli.TimeToLive(ctx, held.LeaseID); err == nil {
		ttl, _ := cli.TimeToLive(ctx, held.LeaseID)
		if ttl.TTL > 0 {
			t.Errorf("released node's lease still alive (TTL %d)", ttl.TTL)
		}
	}
	if _, err := impostor.Acquire(ctx); err != nil {
		t.Fatalf("after release the new machine should get a subnet: %v", err)
	}
}

func TestReleaseFreesSubnet(t *testing.T) {
	cli := etcdtest.Start(t).Client(t)
	prefix := testPrefix(t)
	p := pool("10.94.0.0/23", 24) // two subnets
	ctx := testCtx(t, 10*time.Second)

	a := newManager(t, cli, prefix, "a", "ma", time.Minute, p)
	la, err := a.Acquire(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := newManager(t, cli, prefix, "b", "mb", time.Minute, p).Acquire(ctx); err != nil {
		t.Fatal(err)
	}
	c := newManager(t, cli, prefix, "c", "mc", time.Minute, p)
	if _, err := c.Acquire(ctx); !errors.Is(err, ErrPoolExhausted) {
		t.Fatalf("third host on a two-subnet pool: %v", err)
	}
	if err := a.Release(ctx); err != nil {
		t.Fatal(err)
	}
	lc, err := c.Acquire(ctx)
	if err != nil || lc.Subnet != la.Subnet {
		t.Fatalf("after release: got %v %v, want %s", lc.Subnet, err, la.Subnet)
	}
}

func TestMalformedPoolConfig(t *testing.T) {
	cli := etcdtest.Start(t).Client(t)
	ctx := testCtx(t, 10*time.Second)
	cases := []struct{ name, value, problem string }{
		{"bad JSON", `{"network": "10.0.0.0/16",`, "not valid JSON"},
		{"bad CIDR", `{"network":"10.0.0.0/33","subnetLen":24}`, "not a CIDR"},
		{"no network", `{"subnetLen":24}`, "not a CIDR"},
		{"subnetLen too short", `{"network":"10.0.0.0/16","subnetLen":16}`, "out of range"},
		{"subnetLen too long", `{"network":"10.0.0.0/16","subnetLen":31}`, "out of range"},
		{"IPv6", `{"network":"fd00::/48","subnetLen":64}`, "not IPv4"},
		{"host bits", `{"network":"10.0.1.0/16","subnetLen":24}`, "host bits"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			prefix := testPrefix(t)
			key := prefix + "/config"
			if _, err := cli.Put(ctx, key, tc.value); err != nil {
				t.Fatal(err)
			}
			_, err := GetPool(ctx, cli, prefix)
			if err == nil || !strings.Contains(err.Error(), key) || !strings.Contains(err.Error(), tc.problem) {
				t.Fatalf("GetPool with %s: %v; want error naming %s and %q", tc.value, err, key, tc.problem)
			}
			_, err = newManager(t, cli, prefix, "h", "m", time.Minute, nil).Acquire(ctx)
			if err == nil || !strings.Contains(err.Error(), key) {
				t.Fatalf("Acquire with %s: %v; want error naming %s", tc.value, err, key)
			}
		})
	}

	t.Run("absent", func(t *testing.T) {
		prefix := testPrefix(t)
		_, err := newManager(t, cli, prefix, "h", "m", time.Minute, nil).Acquire(ctx)
		if !errors.Is(err, ErrNoPool) || !strings.Contains(err.Error(), "fabricctl ipam init") || !strings.Contains(err.Error(), "--pool") {
			t.Fatalf("no pool: %v", err)
		}
	})
}

func TestPoolConflict(t *testing.T) {
	cli := etcdtest.Start(t).Client(t)
	prefix := testPrefix(t)
	ctx := testCtx(t, 10*time.Second)

	// Many agents with the same --pool starting at once all agree.
	var wg sync.WaitGroup
	errs := make(chan error, 10)
	for range 10 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			got, err := EnsurePool(ctx, cli, prefix, pool("10.1.0.0/16", 24))
			if err == nil && got != *pool("10.1.0.0/16", 24) {
				err = fmt.Errorf("EnsurePool returned %s", got)
			}
			errs <- err
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Fatal(err)
		}
	}

	_, err := EnsurePool(ctx, cli, prefix, pool("10.2.0.0/16", 24))
	for _, want := range []string{"pool conflict", prefix + "/config", "10.1.0.0/16 /24", "10.2.0.0/16 /24"} {
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("conflicting pool: %v; want mention of %q", err, want)
		}
	}
	if _, err := EnsurePool(ctx, cli, prefix, pool("10.1.0.0/16", 26)); err == nil {
		t.Error("a different subnet length must conflict too")
	}
	_, err = newManager(t, cli, prefix, "h", "m", time.Minute, pool("10.2.0.0/16", 24)).Acquire(ctx)
	if err == nil || !strings.Contains(err.Error(), "pool conflict") {
		t.Errorf("Acquire with a conflicting pool: %v", err)
	}
	if got, err := GetPool(ctx, cli, prefix); err != nil || got != *pool("10.1.0.0/16", 24) {
		t.Errorf("stored pool changed: %v %v", got, err)
	}
}

func TestMalformedSubnetValueSkippedAndKept(t *testing.T) {
	cli := etcdtest.Start(t).Client(t)
	prefix := testPrefix(t)
	p := pool("10.93.0.0/23", 24) // two subnets
	ctx := testCtx(t, 10*time.Second)
	if _, err := EnsurePool(ctx, cli, prefix, p); err != nil {
		t.Fatal(err)
	}
	badKey := prefix + "/subnets/10.93.0.0-24"
	const garbage = "this is not json"
	if _, err := cli.Put(ctx, badKey, garbage); err != nil {
		t.Fatal(err)
	}
	oddKey := prefix + "/subnets/garbage"
	if _, err := cli.Put(ctx, oddKey, "{}"); err != nil {
		t.Fatal(err)
	}

	l, err := newManager(t, cli, prefix, "h1", "m1", time.Minute, nil).Acquire(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if l.Subnet != netip.MustParsePrefix("10.93.1.0/24") {
		t.Fatalf("got %s, want the subnet not held by the malformed key", l.Subnet)
	}
	_, err = newManager(t, cli, prefix, "h2", "m2", time.Minute, nil).Acquire(ctx)
	if !errors.Is(err, ErrPoolExhausted) || !strings.Contains(err.Error(), "2 of 2") {
		t.Fatalf("second host: %v, want exhaustion with 2 of 2 taken", err)
	}
	resp, err := cli.Get(ctx, badKey)
	if err != nil || len(resp.Kvs) != 1 || string(resp.Kvs[0].Value) != garbage {
		t.Fatalf("malformed key was changed: %v %v", resp, err)
	}

	leases, bad, err := List(ctx, cli, prefix)
	if err != nil {
		t.Fatal(err)
	}
	if len(leases) != 1 || leases[0].Node != "h1" {
		t.Errorf("List leases: %+v", leases)
	}
	problems := map[string]string{}
	for _, b := range bad {
		problems[b.Key] = b.Problem
	}
	if !strings.Contains(problems[badKey], "JSON") || !strings.Contains(problems[oddKey], "garbage") || len(bad) != 2 {
		t.Errorf("List bad entries: %+v", bad)
	}
}

func TestWorksWithOneOfThreeMembersDown(t *testing.T) {
	cluster := etcdtest.StartCluster(t, 3)
	cli := cluster.Client(t)
	prefix := testPrefix(t)
	p := pool("10.92.0.0/16", 24)
	ctx := testCtx(t, 30*time.Second)

	cluster.StopMember(0)
	m := newManager(t, cli, prefix, "h1", "m1", 3*time.Second, p)
	// Member 0 may have been the leader: like the agent, try again while
	// the other two elect a new one.
	var held Lease
	var err error
	for attempt := 0; attempt < 10; attempt++ {
		attemptCtx, cancel := context.WithTimeout(ctx, 2*time.Second)
		held, err = m.Acquire(attemptCtx)
		cancel()
		if !etcdclient.Unavailable(err) {
			break
		}
	}
	if err != nil {
		t.Fatalf("acquire with one member down: %v", err)
	}
	keepCtx, stop := context.WithCancel(ctx)
	defer stop()
	go m.KeepAlive(keepCtx)

	// Take another member away and bring the first back: the client has to
	// move, and the lease must still be renewed past its TTL.
	cluster.RestartMember(0)
	cluster.StopMember(1)
	time.Sleep(4 * time.Second)
	leases, _, err := List(ctx, cli, prefix)
	if err != nil {
		t.Fatal(err)
	}
	// Still listed 4 s into a 3 s TTL means it was renewed through the
	// member changes (the remaining TTL at this instant depends on when the
	// last renewal landed, so it is not checked).
	if len(leases) != 1 || leases[0].Subnet != held.Subnet {
		t.Fatalf("after 4 s (TTL 3 s) with members down: %+v, want %s still leased", leases, held.Subnet)
	}
	l2, err := newManager(t, cli, prefix, "h2", "m2", 3*time.Second, nil).Acquire(ctx)
	if err != nil || l2.Subnet == held.Subnet {
		t.Fatalf("second host: %v %v", l2.Subnet, err)
	}
}

func TestPoolValidate(t *testing.T) {
	ok := []*Pool{pool("10.0.0.0/8", 24), pool("10.0.0.0/29", 30), pool("192.168.0.0/16", 17)}
	for _, p := range ok {
		if err := p.Validate(); err != nil {
			t.Errorf("%s: %v", p, err)
		}
	}
	bad := []Pool{{}, *pool("10.0.0.0/24", 24), *pool("10.0.0.0/16", 31), *pool("10.0.0.0/16", 0), *pool("fd00::/8", 24), *pool("10.0.0.1/16", 24)}
	for _, p := range bad {
		if err := p.Validate(); err == nil {
			t.Errorf("%s accepted", p)
		}
	}
	p := pool("10.99.0.0/18", 24)
	if p.Size() != 64 || p.Subnet(63) != netip.MustParsePrefix("10.99.63.0/24") {
		t.Errorf("pool arithmetic: size %d, last %s", p.Size(), p.Subnet(63))
	}
}

// The agent retries Acquire while etcd is away; it recognises that case with
// etcdclient.Unavailable, so Acquire must keep etcd's error in its chain.
func TestAcquireWhileEtcdUnreachableReportsUnavailable(t *testing.T) {
	cluster := etcdtest.Start(t)
	cli := cluster.Client(t)
	cluster.StopMember(0)
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	_, err := newManager(t, cli, testPrefix(t), "h", "m", time.Minute, pool("10.91.0.0/16", 24)).Acquire(ctx)
	if !etcdclient.Unavailable(err) {
		t.Fatalf("Acquire with etcd down: %v, want an error etcdclient.Unavailable recognises", err)
	}
}

func TestKeepAliveRidesOutEtcdOutage(t *testing.T) {
	cluster := etcdtest.Start(t)
	cli := cluster.Client(t)
	prefix := testPrefix(t)
	ctx := testCtx(t, 20*time.Second)
	m := newManager(t, cli, prefix, "h1", "m1", 3*time.Second, pool("10.90.0.0/16", 24))
	held, stop, keepDone := acquireAndKeep(t, ctx, m)
	defer stop()

	cluster.StopMember(0)
	time.Sleep(2 * time.Second)
	if l, ok := m.Lease(); !ok || l.Subnet != held.Subnet {
		t.Fatalf("subnet dropped while etcd is away: %v %v", l.Subnet, ok)
	}
	cluster.RestartMember(0)
	time.Sleep(4 * time.Second) // longer than the TTL: only renewals keep it
	select {
	case err := <-keepDone:
		t.Fatalf("KeepAlive gave up after an etcd outage: %v", err)
	default:
	}
	leases, _, err := List(ctx, cli, prefix)
	if err != nil || len(leases) != 1 || leases[0].Subnet != held.Subnet || leases[0].Node != "h1" {
		t.Fatalf("after the outage: %+v %v, want h1 still holding %s", leases, err, held.Subnet)
	}
}

// acquireAndKeep takes m's subnet and runs its keep-alive until the returned
// stop is called; keepDone receives what KeepAlive returned.
func acquireAndKeep(t *testing.T, ctx context.Context, m *Manager) (held Lease, stop context.CancelFunc, keepDone <-chan error) {
	t.Helper()
	held, err := m.Acquire(ctx)
	if err != nil {
		t.Fatal(err)
	}
	keepCtx, stop := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() { done <- m.KeepAlive(keepCtx) }()
	return held, stop, done
}

// Watch follows who holds which subnet: a lease taken appears, a release
// makes it go, and an unreadable key holds nothing.
func TestWatchHoldings(t *testing.T) {
	cli := etcdtest.Start(t).Client(t)
	prefix := testPrefix(t)
	ctx := testCtx(t, 30*time.Second)
	ch := Watch(ctx, cli, prefix, testLogger(t))
	next := func(what string, ok func(Holdings) bool) Holdings {
		t.Helper()
		deadline := time.After(5 * time.Second)
		for {
			select {
			case h := <-ch:
				if ok(h) {
					return h
				}
			case <-deadline:
				t.Fatalf("%s: not seen within 5s", what)
			}
		}
	}
	next("empty at start", func(h Holdings) bool { return len(h) == 0 })
	m := newManager(t, cli, prefix, "host-a", "machine-a", time.Minute, pool("10.99.0.0/16", 24))
	l, err := m.Acquire(ctx)
	if err != nil {
		t.Fatal(err)
	}
	h := next("host-a's lease", func(h Holdings) bool { return len(h["host-a"]) == 1 })
	if h["host-a"][0] != l.Subnet {
		t.Errorf("holdings %v, want host-a holding %s", h, l.Subnet)
	}
	if _, err := cli.Put(ctx, subnetsPrefix(prefix)+"junk", "{"); err != nil {
		t.Fatal(err)
	}
	if err := ReleaseNode(ctx, cli, prefix, "host-a"); err != nil {
		t.Fatal(err)
	}
	next("release", func(h Holdings) bool { return len(h) == 0 })
}
