package bgp

import (
	"context"
	"fmt"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/osrg/gobgp/v4/pkg/apiutil"
)

// TestMeshLifecycle runs a real iBGP full mesh over loopback and walks it
// through what a fabric sees: hosts joining, a host withdrawing, moving to a
// new subnet, being removed from the config, and dying abruptly.
func TestMeshLifecycle(t *testing.T) {
	t.Parallel()
	const block = 1
	names := []string{"host-a", "host-b", "host-c"}
	var speakers []*testSpeaker
	for i, name := range names {
		speakers = append(speakers, startSpeaker(t, name, fastConfig(testAddr(block, i+1))))
	}
	meshPeers := func(self *testSpeaker, all []*testSpeaker) []Peer {
		var ps []Peer
		for _, o := range all {
			if o != self {
				ps = append(ps, o.peer(PeerMesh))
			}
		}
		return ps
	}
	prefixes := map[*testSpeaker]netip.Prefix{}
	for i, sp := range speakers {
		mustSetPeers(t, sp, meshPeers(sp, speakers)...)
		prefixes[sp] = mustAdvertise(t, sp, fmt.Sprintf("10.244.%d.0/24", i+1))
	}

	expectLearned := func(t *testing.T, sp *testSpeaker, from *testSpeaker, timeout time.Duration) {
		t.Helper()
		routes := sp.waitRoutes(t, timeout, "route from "+from.name, hasRoute(prefixes[from]))
		r, _ := findRoute(routes, prefixes[from])
		want := Route{Prefix: prefixes[from], NextHop: from.addr, PeerAddress: from.addr, PeerName: from.name, PeerType: PeerMesh}
		if r != want {
			t.Fatalf("%s learned %+v, want %+v", sp.name, r, want)
		}
		if _, own := findRoute(routes, prefixes[sp]); own {
			t.Fatalf("%s reports its own prefix %s as learned", sp.name, prefixes[sp])
		}
	}

	t.Run("three hosts learn each other", func(t *testing.T) {
		for _, sp := range speakers {
			for _, other := range speakers {
				if other == sp {
					continue
				}
				expectLearned(t, sp, other, 30*time.Second) // a bound for a loaded machine; the time is logged
				st := waitEstablished(t, sp, other.addr, 15*time.Second)
				if st.Name != other.name || st.Type != PeerMesh || st.ASN != DefaultASN {
					t.Fatalf("%s: peer status %+v", sp.name, st)
				}
				if st.Received != 1 || st.Accepted != 1 {
					t.Fatalf("%s: peer %s received %d accepted %d prefixes, want 1/1", sp.name, other.name, st.Received, st.Accepted)
				}
				if st.Since.IsZero() || time.Since(st.Since) > time.Minute {
					t.Fatalf("%s: peer %s Since = %v", sp.name, other.name, st.Since)
				}
			}
			routes, _ := sp.snapshot()
			if len(routes) != 2 {
				t.Fatalf("%s: want exactly 2 routes, got %s", sp.name, formatRoutes(routes))
			}
		}
	})

	d := startSpeaker(t, "host-d", fastConfig(testAddr(block, 4)))
	speakers = append(speakers, d)
	t.Run("a joining host is peered", func(t *testing.T) {
		start := time.Now()
		prefixes[d] = mustAdvertise(t, d, "10.244.4.0/24")
		for _, sp := range speakers {
			mustSetPeers(t, sp, meshPeers(sp, speakers)...)
		}
		for _, sp := range speakers {
			for _, other := range speakers {
				if other != sp && (sp == d || other == d) {
					expectLearned(t, sp, other, 30*time.Second) // a bound for a loaded machine; the time is logged
				}
			}
		}
		t.Logf("fourth host fully meshed after %s", time.Since(start).Round(time.Millisecond))
	})

	a, b, c := speakers[0], speakers[1], speakers[2]

	t.Run("graceful withdraw is seen at once", func(t *testing.T) {
		start := time.Now()
		if err := d.Withdraw(context.Background()); err != nil {
			t.Fatal(err)
		}
		for _, sp := range []*testSpeaker{a, b, c} {
			sp.waitRoutes(t, time.Second-time.Since(start), "withdrawal of "+prefixes[d].String(), lacksRoute(prefixes[d]))
		}
		if err := d.Withdraw(context.Background()); err != nil {
			t.Fatalf("second Withdraw: %v", err)
		}
		// Withdrawing our own prefix must not take learned routes with it.
		d.holdsFor(t, 300*time.Millisecond, "learned routes kept", hasRoute(prefixes[a]))
	})

	t.Run("advertising a new prefix replaces the old one", func(t *testing.T) {
		old := prefixes[a]
		mustAdvertise(t, a, old.String()) // same again: no-op
		newPrefix := mustAdvertise(t, a, "10.244.99.0/24")
		prefixes[a] = newPrefix
		for _, sp := range []*testSpeaker{b, c, d} {
			sp.waitRoutes(t, 2*time.Second, "only the new prefix of host-a", func(rs []Route) bool {
				_, hasOld := findRoute(rs, old)
				r, hasNew := findRoute(rs, newPrefix)
				return !hasOld && hasNew && r.NextHop == a.addr
			})
		}
	})

	t.Run("removing a peer removes its routes", func(t *testing.T) {
		mustSetPeers(t, b, a.peer(PeerMesh), d.peer(PeerMesh)) // drop host-c
		b.waitRoutes(t, 2*time.Second, "host-c's route gone", lacksRoute(prefixes[c]))
		if _, ok := peerState(t, b, c.addr); ok {
			t.Fatal("host-b still lists host-c as a peer")
		}
		// host-c still dials host-b, which must keep refusing it.
		b.holdsFor(t, 3*time.Second, "host-c stays out", lacksRoute(prefixes[c]))
		if st, _ := peerState(t, c, b.addr); st.State == "established" {
			t.Fatal("host-c re-established a session with host-b, which no longer has it configured")
		}
	})

	t.Run("an abruptly stopped host's route disappears", func(t *testing.T) {
		start := time.Now()
		a.Stop() // no Withdraw: sessions just close
		for _, sp := range []*testSpeaker{b, c, d} {
			// A bound for a loaded machine (the closed sessions tell peers
			// at once; the time is logged); GR is off in fastConfig.
			sp.waitRoutes(t, 15*time.Second-time.Since(start), "host-a's route gone", lacksRoute(prefixes[a]))
		}
		t.Logf("host-a's route gone everywhere %s after it stopped", time.Since(start).Round(time.Millisecond))
		st := waitState(t, b, a.addr, func(s SessionState) bool { return s != Established }, 15*time.Second)
		if st.Received != 0 {
			t.Fatalf("host-b still counts %d prefixes from stopped host-a", st.Received)
		}
		a.Stop() // idempotent
		if err := a.Advertise(context.Background(), NextHops{IPv4: a.addr}, prefixes[a]); err == nil {
			t.Fatal("Advertise on a stopped speaker succeeded")
		}
	})
}

func waitState(t *testing.T, sp *testSpeaker, addr netip.Addr, ok func(SessionState) bool, timeout time.Duration) PeerStatus {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		st, _ := peerState(t, sp, addr)
		if ok(st.State) {
			return st
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: peer %s stuck in state %q", sp.name, addr, st.State)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// TestHoldTimerDetectsSilentPeer: host-b's session to host-a runs through a
// frozenProxy. Frozen, it neither forwards nor closes anything, so only the
// hold timer (3 s here) can tell host-a that host-b is gone.
func TestHoldTimerDetectsSilentPeer(t *testing.T) {
	t.Parallel()
	const block = 2
	a := startSpeaker(t, "host-a", fastConfig(testAddr(block, 1)))
	bCfg := fastConfig(testAddr(block, 2))
	bCfg.ListenPort = -1 // host-b only dials, through the proxy
	b := startSpeaker(t, "host-b", bCfg)

	proxyListen := netip.AddrPortFrom(testAddr(block, 10), 179)
	proxySource := testAddr(block, 11) // host-a sees host-b coming from here
	proxy := newFrozenProxy(t, proxyListen, netip.AddrPortFrom(a.addr, 179), proxySource)

	mustSetPeers(t, a, Peer{Name: "host-b", Address: proxySource, Passive: true})
	mustSetPeers(t, b, Peer{Name: "host-a", Address: proxyListen.Addr(), Port: proxyListen.Port()})
	prefixB := mustAdvertise(t, b, "10.244.2.0/24")
	routes := a.waitRoutes(t, 10*time.Second, "host-b's route", hasRoute(prefixB))
	if r, _ := findRoute(routes, prefixB); r.NextHop != b.addr || r.PeerName != "host-b" {
		t.Fatalf("learned %+v", r)
	}

	proxy.freeze()
	start := time.Now()
	a.waitRoutes(t, 5*time.Second, "host-b's route gone after hold timer", lacksRoute(prefixB))
	elapsed := time.Since(start)
	t.Logf("silent peer detected after %s", elapsed.Round(time.Millisecond))
	// Keepalives arrive every second, so the last one was at most 1 s
	// before the freeze: expiry comes 2-3 s after it. Quicker means the
	// proxy leaked a close and the test proves nothing.
	if elapsed < 1500*time.Millisecond {
		t.Fatalf("route went after %s, before the hold timer could expire", elapsed)
	}
}

// TestMD5 checks TCP MD5 signatures: matching keys establish, a mismatch
// never does (the kernel drops the unsigned or wrongly signed segments).
func TestMD5(t *testing.T) {
	t.Parallel()
	const block = 3
	a := startSpeaker(t, "host-a", fastConfig(testAddr(block, 1)))
	b := startSpeaker(t, "host-b", fastConfig(testAddr(block, 2)))
	c := startSpeaker(t, "host-c", fastConfig(testAddr(block, 3)))

	withPassword := func(p Peer, pw string) Peer { p.Password = pw; return p }
	mustSetPeers(t, a, withPassword(b.peer(PeerMesh), "s3cret"), withPassword(c.peer(PeerMesh), "s3cret"))
	mustSetPeers(t, b, withPassword(a.peer(PeerMesh), "s3cret"))
	mustSetPeers(t, c, withPassword(a.peer(PeerMesh), "wrong"))
	prefixB := mustAdvertise(t, b, "10.244.2.0/24")
	prefixC := mustAdvertise(t, c, "10.244.3.0/24")

	// Bounds for a loaded machine: a SYN that meets the listener before its
	// MD5 key is set is dropped, and TCP retries it after 1, 2, 4 s...
	a.waitRoutes(t, 30*time.Second, "host-b's route over MD5", hasRoute(prefixB))
	waitEstablished(t, a, b.addr, 15*time.Second)
	a.holdsFor(t, 4*time.Second, "no route from mismatched host-c", lacksRoute(prefixC))
	for _, pair := range []struct {
		sp   *testSpeaker
		peer netip.Addr
	}{{a, c.addr}, {c, a.addr}} {
		if st, _ := peerState(t, pair.sp, pair.peer); st.State == "established" {
			t.Fatalf("%s established with %s despite mismatched MD5 keys", pair.sp.name, pair.peer)
		}
	}

	// Fixing host-c's key brings it up: the mismatch was the only obstacle.
	mustSetPeers(t, c, withPassword(a.peer(PeerMesh), "s3cret"))
	a.waitRoutes(t, 30*time.Second, "host-c's route after fixing its key", hasRoute(prefixC))
}

// TestUnconfiguredPeerRejected: a speaker that dials us without being in our
// peer list never gets a session or gets routes in.
func TestUnconfiguredPeerRejected(t *testing.T) {
	t.Parallel()
	const block = 4
	a := startSpeaker(t, "host-a", fastConfig(testAddr(block, 1)))
	b := startSpeaker(t, "host-b", fastConfig(testAddr(block, 2)))
	stranger := startSpeaker(t, "stranger", fastConfig(testAddr(block, 3)))
	mustSetPeers(t, a, b.peer(PeerMesh))
	mustSetPeers(t, b, a.peer(PeerMesh))
	mustSetPeers(t, stranger, a.peer(PeerMesh))
	prefixB := mustAdvertise(t, b, "10.244.2.0/24")
	prefixStranger := mustAdvertise(t, stranger, "10.244.3.0/24")

	// The configured peer establishes; in the same time the stranger,
	// dialling every 1-2 s, must never get in.
	a.waitRoutes(t, 10*time.Second, "host-b's route", hasRoute(prefixB))
	a.holdsFor(t, 4*time.Second, "stranger's route absent", lacksRoute(prefixStranger))
	if st, _ := peerState(t, stranger, a.addr); st.State == "established" {
		t.Fatal("unconfigured stranger established a session")
	}
	ctx := context.Background()
	peers, err := a.Peers(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(peers) != 1 || peers[0].Address != b.addr {
		t.Fatalf("host-a peers = %+v, want only host-b", peers)
	}
}

// TestExternalPeer: a top-of-rack router in another AS originates the
// default route. It must arrive attributed to the external peer with the
// router as next hop, and our subnet must reach the router.
func TestExternalPeer(t *testing.T) {
	t.Parallel()
	const block = 5
	hostCfg := fastConfig(testAddr(block, 1))
	host := startSpeaker(t, "host-a", hostCfg)
	torCfg := fastConfig(testAddr(block, 254))
	torCfg.ASN = 65001
	tor := startSpeaker(t, "tor", torCfg)

	// host-b is in host-a's mesh but does not peer with the router.
	meshMate := startSpeaker(t, "host-b", fastConfig(testAddr(block, 2)))

	mustSetPeers(t, host, Peer{Name: "tor", Address: tor.addr, ASN: 65001, Type: PeerExternal}, meshMate.peer(PeerMesh))
	mustSetPeers(t, meshMate, host.peer(PeerMesh))
	mustSetPeers(t, tor, Peer{Name: "host-a", Address: host.addr, ASN: DefaultASN, Type: PeerExternal})
	defaultRoute := mustAdvertise(t, tor, "0.0.0.0/0")
	hostPrefix := mustAdvertise(t, host, "10.244.1.0/24")
	mateprefix := mustAdvertise(t, meshMate, "10.244.2.0/24")

	routes := host.waitRoutes(t, 10*time.Second, "default route from tor", hasRoute(defaultRoute))
	r, _ := findRoute(routes, defaultRoute)
	want := Route{Prefix: defaultRoute, NextHop: tor.addr, PeerAddress: tor.addr, PeerName: "tor", PeerType: PeerExternal}
	if r != want {
		t.Fatalf("learned %+v, want %+v", r, want)
	}
	routes = tor.waitRoutes(t, 5*time.Second, "host subnet at tor", hasRoute(hostPrefix))
	if r, _ := findRoute(routes, hostPrefix); r.NextHop != host.addr {
		t.Fatalf("tor learned %+v, want next hop %s", r, host.addr)
	}
	st := waitEstablished(t, host, tor.addr, time.Second)
	if st.ASN != 65001 || st.Type != PeerExternal {
		t.Fatalf("status %+v", st)
	}

	// host-a is no transit: host-b's subnet does not reach the router via
	// host-a, and the router's default route does not leak into the mesh.
	host.waitRoutes(t, 10*time.Second, "host-b's route at host-a", hasRoute(mateprefix))
	meshMate.waitRoutes(t, 5*time.Second, "host-a's route at host-b", hasRoute(hostPrefix))
	tor.holdsFor(t, 2*time.Second, "no transit route for host-b", lacksRoute(mateprefix))
	meshMate.holdsFor(t, 0, "no leaked default route", lacksRoute(defaultRoute))
}

// TestRouteReflector: two clients that only peer with a reflector still
// learn each other's subnets, with the originating host as next hop.
func TestRouteReflector(t *testing.T) {
	t.Parallel()
	const block = 6
	rr := startSpeaker(t, "reflector", fastConfig(testAddr(block, 1)))
	c1 := startSpeaker(t, "client-1", fastConfig(testAddr(block, 2)))
	c2 := startSpeaker(t, "client-2", fastConfig(testAddr(block, 3)))
	mustSetPeers(t, rr, c1.peer(PeerRRClient), c2.peer(PeerRRClient))
	mustSetPeers(t, c1, rr.peer(PeerRouteReflector))
	mustSetPeers(t, c2, rr.peer(PeerRouteReflector))
	p1 := mustAdvertise(t, c1, "10.244.2.0/24")
	p2 := mustAdvertise(t, c2, "10.244.3.0/24")

	routes := c1.waitRoutes(t, 10*time.Second, "client-2's route via reflector", hasRoute(p2))
	r, _ := findRoute(routes, p2)
	want := Route{Prefix: p2, NextHop: c2.addr, PeerAddress: rr.addr, PeerName: "reflector", PeerType: PeerRouteReflector}
	if r != want {
		t.Fatalf("client-1 learned %+v, want %+v", r, want)
	}
	routes = rr.waitRoutes(t, 5*time.Second, "both clients at reflector", func(rs []Route) bool {
		return hasRoute(p1)(rs) && hasRoute(p2)(rs)
	})
	if r, _ := findRoute(routes, p1); r.PeerType != PeerRRClient || r.PeerName != "client-1" {
		t.Fatalf("reflector learned %+v", r)
	}
}

func TestStartErrors(t *testing.T) {
	t.Parallel()
	const block = 7
	a := startSpeaker(t, "host-a", fastConfig(testAddr(block, 1)))
	_ = a
	ctx := context.Background()
	if _, err := Start(ctx, fastConfig(testAddr(block, 1))); err == nil || !strings.Contains(err.Error(), "address already in use") {
		t.Fatalf("second speaker on a busy port: err = %v, want address already in use", err)
	}
	if _, err := Start(ctx, Config{ListenAddress: netip.MustParseAddr("0.0.0.0")}); err == nil {
		t.Fatal("Start on 0.0.0.0 succeeded")
	}
	if err := a.SetPeers(ctx, []Peer{{Address: testAddr(block, 2), Type: "bogus"}}); err == nil {
		t.Fatal("SetPeers accepted an unknown peer type")
	}
	if err := a.SetPeers(ctx, []Peer{{Address: testAddr(block, 2)}, {Address: testAddr(block, 2)}}); err == nil {
		t.Fatal("SetPeers accepted a duplicate address")
	}
	// The busy-port failure must not have left anything behind: the port is
	// still ours, and a fresh speaker can take it once we stop.
	a.Stop()
	b := startSpeaker(t, "host-a-again", fastConfig(testAddr(block, 1)))
	b.Stop()
}

// TestMaxPrefixes: a router that sends more routes than its peer's limit
// loses the session, and its routes with it; within the limit it stays.
func TestMaxPrefixes(t *testing.T) {
	t.Parallel()
	const block = 9
	host := startSpeaker(t, "host", fastConfig(testAddr(block, 1)))
	torCfg := fastConfig(testAddr(block, 254))
	torCfg.ASN = 65001
	tor := startSpeaker(t, "tor", torCfg)
	mustSetPeers(t, tor, Peer{Name: "host", Address: host.addr, ASN: DefaultASN, Type: PeerExternal})
	mustSetPeers(t, host, Peer{Name: "tor", Address: tor.addr, ASN: 65001, Type: PeerExternal, MaxPrefixes: 2})
	announce := func(prefix string) netip.Prefix {
		t.Helper()
		p := netip.MustParsePrefix(prefix)
		path, err := localPath(p, tor.addr)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := tor.server.AddPath(apiutil.AddPathRequest{Paths: []*apiutil.Path{path}}); err != nil {
			t.Fatal(err)
		}
		return p
	}
	first, second := announce("10.250.1.0/24"), announce("10.250.2.0/24")
	host.waitRoutes(t, 10*time.Second, "two routes within the limit", func(rs []Route) bool { return hasRoute(first)(rs) && hasRoute(second)(rs) })
	third := announce("10.250.3.0/24")
	host.waitRoutes(t, 10*time.Second, "every route of the router gone past the limit", func(rs []Route) bool {
		return lacksRoute(first)(rs) && lacksRoute(third)(rs)
	})
	if st, _ := peerState(t, host, tor.addr); st.State == "established" {
		t.Errorf("session with a router over its prefix limit still established")
	}
}

// TestBestPathFollowsWithdrawals: two routers announce one prefix; when the
// one whose path is best withdraws, the host's route moves to the other
// router instead of disappearing (the route set is kept from best-path
// changes, not from listings), and it goes when both have withdrawn.
func TestBestPathFollowsWithdrawals(t *testing.T) {
	t.Parallel()
	const block = 11
	host := startSpeaker(t, "host", fastConfig(testAddr(block, 1)))
	r1 := startSpeaker(t, "r1", fastConfig(testAddr(block, 2)))
	r2 := startSpeaker(t, "r2", fastConfig(testAddr(block, 3)))
	mustSetPeers(t, host, r1.peer(PeerMesh), r2.peer(PeerMesh))
	mustSetPeers(t, r1, host.peer(PeerMesh))
	mustSetPeers(t, r2, host.peer(PeerMesh))
	p := mustAdvertise(t, r1, "10.251.0.0/24")
	mustAdvertise(t, r2, "10.251.0.0/24")
	via := func(nh netip.Addr) func([]Route) bool {
		return func(rs []Route) bool { r, ok := findRoute(rs, p); return ok && r.NextHop == nh }
	}
	// Equal paths: the lower router ID wins (r1).
	host.waitRoutes(t, 15*time.Second, "the route via r1", via(r1.addr))
	if err := r1.Withdraw(context.Background()); err != nil {
		t.Fatal(err)
	}
	rs := host.waitRoutes(t, 10*time.Second, "the route via r2 after r1 withdrew", via(r2.addr))
	if r, _ := findRoute(rs, p); r.PeerName != r2.name {
		t.Errorf("route via r2 names peer %q, want %q", r.PeerName, r2.name)
	}
	if err := r2.Withdraw(context.Background()); err != nil {
		t.Fatal(err)
	}
	host.waitRoutes(t, 10*time.Second, "no route after both withdrew", lacksRoute(p))
}

// TestWatchSessions: a watcher is woken when a session comes up and when it
// goes, and Peers shows the state it was woken for (GoBGP signals
// Established before its own listing shows it). The agent reads sessions
// only on these signals, so a missed one leaves a peer taken for away.
func TestWatchSessions(t *testing.T) {
	t.Parallel()
	const block = 14
	a := startSpeaker(t, "host-a", fastConfig(testAddr(block, 1)))
	b := startSpeaker(t, "host-b", fastConfig(testAddr(block, 2)))
	sessions := a.WatchSessions()
	// awaitState reads a's view of host-b only when woken, as the agent does.
	awaitState := func(want func(SessionState) bool, what string) {
		t.Helper()
		deadline := time.After(10 * time.Second)
		var last SessionState
		for {
			select {
			case <-sessions:
			case <-deadline:
				t.Fatalf("host-a: no signal showing the session to host-b %s within 10 s (last seen on a signal: %q)", what, last)
			}
			st, _ := peerState(t, a, b.addr)
			if last = st.State; want(last) {
				return
			}
		}
	}
	mustSetPeers(t, a, Peer{Name: "host-b", Address: b.addr})
	mustSetPeers(t, b, Peer{Name: "host-a", Address: a.addr})
	awaitState(func(s SessionState) bool { return s == Established }, "established")
	b.Stop()
	awaitState(func(s SessionState) bool { return s != Established }, "down")
}
