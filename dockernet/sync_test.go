package dockernet

import (
	"context"
	"log/slog"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/fabricnet/fabric/dockerwatch"
	"github.com/fabricnet/fabric/internal/etcdtest"
)

// callsRecorder stands in for dockerd's API where the test must decide the
// order of what dockerd does: a real dockerd drops a network it removes
// from its listing before it calls the driver's DeleteNetwork, but only
// sometimes early enough for a sync pass to fall in between.
type callsRecorder struct {
	mu      sync.Mutex
	created []string
}

func (c *callsRecorder) CreateNetwork(_ context.Context, _ string, n dockerwatch.Network) error {
	name := n.Name
	c.mu.Lock()
	defer c.mu.Unlock()
	c.created = append(c.created, name)
	return nil
}

func (c *callsRecorder) DeleteNetwork(context.Context, string) error { return nil }

func (c *callsRecorder) made(name string) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return slices.Contains(c.created, name)
}

// TestRemovedNetworkNotMadeAgain: dockerd removing a fabric network drops
// it from its listing, then calls DeleteNetwork; a sync pass in between
// must not make it again (docker-compose down undone, seen in CI). A
// network the listing never had is made at once, and one dockerd dropped
// without removing it from the fabric is made again after remakeDelay.
func TestRemovedNetworkNotMadeAgain(t *testing.T) {
	cli := etcdtest.Start(t).Client(t)
	st := NewStore(cli, "/fabric-test/"+strings.ReplaceAll(t.Name(), "/", "-"))
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	for i, name := range []string{"proj", "kept", "new"} {
		n := Network{Name: name, Subnet: netip.PrefixFrom(netip.AddrFrom4([4]byte{172, 16, byte(i + 1), 0}), 24),
			Gateway: netip.AddrFrom4([4]byte{172, 16, byte(i + 1), 1}), Created: time.Now().UTC()}
		if err := st.Create(ctx, n); err != nil {
			t.Fatal(err)
		}
	}
	docker := &callsRecorder{}
	d := NewDriver(Host{Node: "h1"}, st, nil, slog.New(slog.DiscardHandler))
	s := NewSync(d, docker, slog.New(slog.DiscardHandler))
	pass := func(listed ...string) {
		t.Helper()
		state, _, err := st.Read(ctx)
		if err != nil {
			t.Fatal(err)
		}
		var snap dockerwatch.Snapshot
		for _, name := range listed {
			n := state.Networks[name]
			snap.Networks = append(snap.Networks, dockerwatch.Network{ID: "id-" + name, Name: name, Subnet: n.Subnet, Gateway: n.Gateway, IPAM: DriverName})
		}
		s.state, s.stateKnown, s.snap, s.dockerKnown = state, true, snap, true
		s.networks(ctx) // the part of a sync pass that makes networks
	}
	pass("proj", "kept")
	if !docker.made("new") {
		t.Fatal("a fabric network this dockerd never listed was not made at once")
	}
	pass("kept", "new") // dockerd removing proj: gone from its listing, DeleteNetwork not yet called
	if docker.made("proj") {
		t.Fatal("the sync made proj again while dockerd was removing it (before its DeleteNetwork)")
	}
	if err := d.DeleteNetwork(ctx, "id-proj"); err != nil {
		t.Fatal(err)
	}
	pass("kept", "new")
	if docker.made("proj") {
		t.Fatal("the sync made proj again after its removal")
	}

	pass("new") // dockerd dropped kept without removing it from the fabric
	if docker.made("kept") {
		t.Fatal("kept made again at once: a removal in progress would be undone")
	}
	deadline := time.Now().Add(remakeDelay + 5*time.Second)
	for !docker.made("kept") {
		if time.Now().After(deadline) {
			t.Fatalf("kept, still in the fabric, not made again %s after dockerd dropped it", remakeDelay+5*time.Second)
		}
		<-d.Changed() // the sync's own wake-up after remakeDelay
		pass("new")
	}
}
