package dockernet

import (
	"context"
	"errors"
	"log/slog"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/fabricnet/fabric/internal/etcdtest"
)

// TestStoreAgainstRealEtcd: what the transactions guarantee, with a real
// etcd: hosts granting at once never give one address twice; a name or an
// overlapping subnet is refused; a network with containers is not deleted,
// and says where they are; a host's addresses are freed on release.
func TestStoreAgainstRealEtcd(t *testing.T) {
	cli := etcdtest.Start(t).Client(t)
	st := NewStore(cli, "/fabric-test/"+strings.ReplaceAll(t.Name(), "/", "-"))
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	net1 := Network{Name: "net1", Subnet: netip.MustParsePrefix("172.16.1.0/26"), Gateway: netip.MustParseAddr("172.16.1.1")}
	if err := st.Create(ctx, net1); err != nil {
		t.Fatal(err)
	}
	for _, bad := range []Network{
		{Name: "net1", Subnet: netip.MustParsePrefix("172.16.9.0/24"), Gateway: netip.MustParseAddr("172.16.9.1")},
		{Name: "inside", Subnet: netip.MustParsePrefix("172.16.1.32/27"), Gateway: netip.MustParseAddr("172.16.1.33")},
		{Name: "around", Subnet: netip.MustParsePrefix("172.16.0.0/16"), Gateway: netip.MustParseAddr("172.16.0.1")},
	} {
		if err := st.Create(ctx, bad); !errors.Is(err, ErrConflict) {
			t.Errorf("create %s %s: %v, want a conflict", bad.Name, bad.Subnet, err)
		}
	}

	// Three hosts ask for addresses at once until the network is full: 61
	// addresses (64 less the network, gateway and broadcast).
	var mu sync.Mutex
	given := map[netip.Addr]string{}
	var wg sync.WaitGroup
	for _, node := range []string{"h1", "h2", "h3"} {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				a, err := st.Grant(ctx, GrantRequest{Network: "net1", Node: node})
				if err != nil {
					if !strings.Contains(err.Error(), "no free address") {
						t.Errorf("%s: %v", node, err)
					}
					return
				}
				mu.Lock()
				if other, dup := given[a]; dup {
					t.Errorf("%s given to both %s and %s", a, other, node)
				}
				given[a] = node
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	if len(given) != 61 {
		t.Errorf("%d addresses given, want 61", len(given))
	}
	s, _, err := st.Read(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for a, node := range given {
		if !s.Owns("net1", node, a) {
			t.Errorf("etcd does not give %s to %s", a, node)
		}
	}

	err = st.Delete(ctx, "net1")
	if err == nil || !strings.Contains(err.Error(), "on h1") || !strings.Contains(err.Error(), "on h3") {
		t.Errorf("delete with containers: %v, want a refusal naming the hosts", err)
	}
	for _, node := range []string{"h1", "h2", "h3"} {
		if err := st.ReleaseNode(ctx, node); err != nil {
			t.Fatal(err)
		}
	}
	if err := st.Delete(ctx, "net1"); err != nil {
		t.Fatalf("delete an empty network: %v", err)
	}
	if s, _, _ := st.Read(ctx); len(s.Networks)+len(s.Blocks)+len(s.Grants) != 0 {
		t.Errorf("left after delete: %+v", s)
	}
}

// TestRemovalHereIsNotUndone: while this host's dockerd removes a network
// fabric-wide, the sync's view of etcd may still hold it (the watch is
// behind) while dockerd's listing no longer does; the sync must not make it
// here again, which would bring it back fabric-wide (seen in CI: a compose
// project's network outliving `docker-compose down`). A removal refused
// (containers elsewhere) leaves the network to be made again.
func TestRemovalHereIsNotUndone(t *testing.T) {
	cli := etcdtest.Start(t).Client(t)
	st := NewStore(cli, "/fabric-test/"+strings.ReplaceAll(t.Name(), "/", "-"))
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	d := NewDriver(Host{Node: "h1"}, st, nil, slog.New(slog.DiscardHandler))
	for i, name := range []string{"gone", "busy"} {
		n := Network{Name: name, Subnet: netip.PrefixFrom(netip.AddrFrom4([4]byte{172, 16, byte(i + 1), 0}), 24),
			Gateway: netip.AddrFrom4([4]byte{172, 16, byte(i + 1), 1}), Created: time.Now().UTC()}
		if err := st.Create(ctx, n); err != nil {
			t.Fatal(err)
		}
		d.networks["id-"+name] = n
	}
	if _, err := st.Grant(ctx, GrantRequest{Network: "busy", Node: "h2"}); err != nil {
		t.Fatal(err)
	}
	stale, _, err := st.Read(ctx)
	if err != nil {
		t.Fatal(err)
	}

	if err := d.DeleteNetwork(ctx, "id-gone"); err != nil {
		t.Fatal(err)
	}
	if !d.removingHere(stale, stale.Networks["gone"]) {
		t.Fatal("with the watch behind, the sync would make the network removed here again")
	}
	fresh, _, err := st.Read(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := fresh.Networks["gone"]; ok {
		t.Fatal("the network is still in etcd")
	}
	// A state that shows it gone, then one that still shows it (a watch
	// behind the read): the removed network is still not made again.
	d.removingHere(fresh, stale.Networks["busy"]) // a sync pass on the state without it
	if !d.removingHere(stale, stale.Networks["gone"]) {
		t.Fatal("after a state without the network, one that still shows it would make it here again")
	}
	// A new network of that name is made here as any other.
	again := stale.Networks["gone"]
	again.Created = again.Created.Add(time.Second)
	fresh.Networks["gone"] = again
	if d.removingHere(fresh, again) {
		t.Fatal("a new network of the removed one's name is held back")
	}

	if err := d.DeleteNetwork(ctx, "id-busy"); err == nil {
		t.Fatal("a network with a container on h2 was removed")
	}
	if d.removingHere(stale, stale.Networks["busy"]) {
		t.Fatal("after a refused removal the sync would not make the network again")
	}
}
