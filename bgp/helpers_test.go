package bgp

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	api "github.com/osrg/gobgp/v4/api"
	bgppacket "github.com/osrg/gobgp/v4/pkg/packet/bgp"
)

// Test speakers live on 127.11.<block>.<host>, one block per test so tests
// can run in parallel, each speaker on port 179 of its own address.
func testAddr(block, host int) netip.Addr {
	return netip.AddrFrom4([4]byte{127, 11, byte(block), byte(host)})
}

func testLogger() *slog.Logger {
	level := slog.LevelError
	switch os.Getenv("FABRIC_BGP_TEST_LOG") {
	case "debug":
		level = slog.LevelDebug
	case "info":
		level = slog.LevelInfo
	}
	return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level}))
}

// fastConfig uses a 3 s hold time so failure tests finish quickly.
func fastConfig(addr netip.Addr) Config {
	return Config{
		ListenAddress:     addr,
		HoldTime:          3 * time.Second,
		KeepaliveInterval: time.Second,
		ConnectRetry:      time.Second,
		Logger:            testLogger(),
	}
}

// testSpeaker is a started speaker plus a reader that keeps the latest
// route set it published.
type testSpeaker struct {
	*Speaker
	name string
	addr netip.Addr

	mu      sync.Mutex
	latest  []Route
	updated chan struct{} // closed and replaced on every new set
}

func startSpeaker(t *testing.T, name string, cfg Config) *testSpeaker {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	sp, err := Start(ctx, cfg)
	if err != nil {
		t.Fatalf("start %s: %v", name, err)
	}
	ts := &testSpeaker{Speaker: sp, name: name, addr: cfg.ListenAddress, updated: make(chan struct{})}
	go func() {
		for routes := range sp.Routes() {
			ts.mu.Lock()
			ts.latest = routes
			close(ts.updated)
			ts.updated = make(chan struct{})
			ts.mu.Unlock()
		}
	}()
	t.Cleanup(sp.Stop)
	return ts
}

func (ts *testSpeaker) snapshot() ([]Route, chan struct{}) {
	ts.mu.Lock()
	defer ts.mu.Unlock()
	return slices.Clone(ts.latest), ts.updated
}

// waitRoutes waits until cond holds for the published route set and returns
// that set; it fails the test after timeout.
func (ts *testSpeaker) waitRoutes(t *testing.T, timeout time.Duration, what string, cond func([]Route) bool) []Route {
	t.Helper()
	deadline := time.After(timeout)
	for {
		routes, updated := ts.snapshot()
		if cond(routes) {
			return routes
		}
		select {
		case <-updated:
		case <-deadline:
			t.Fatalf("%s: %s not reached within %s; routes: %s", ts.name, what, timeout, formatRoutes(routes))
		}
	}
}

// holdsFor fails the test if cond stops holding within d.
func (ts *testSpeaker) holdsFor(t *testing.T, d time.Duration, what string, cond func([]Route) bool) {
	t.Helper()
	deadline := time.After(d)
	for {
		routes, updated := ts.snapshot()
		if !cond(routes) {
			t.Fatalf("%s: %s stopped holding; routes: %s", ts.name, what, formatRoutes(routes))
		}
		select {
		case <-updated:
		case <-deadline:
			return
		}
	}
}

func (ts *testSpeaker) peer(typ PeerType) Peer {
	return Peer{Name: ts.name, Address: ts.addr, Type: typ}
}

func findRoute(routes []Route, prefix netip.Prefix) (Route, bool) {
	for _, r := range routes {
		if r.Prefix == prefix {
			return r, true
		}
	}
	return Route{}, false
}

func hasRoute(prefix netip.Prefix) func([]Route) bool {
	return func(rs []Route) bool { _, ok := findRoute(rs, prefix); return ok }
}

func lacksRoute(prefix netip.Prefix) func([]Route) bool {
	return func(rs []Route) bool { _, ok := findRoute(rs, prefix); return !ok }
}

func formatRoutes(routes []Route) string {
	if len(routes) == 0 {
		return "(none)"
	}
	parts := make([]string, 0, len(routes))
	for _, r := range routes {
		parts = append(parts, fmt.Sprintf("%s via %s from %s(%s,%s)", r.Prefix, r.NextHop, r.PeerName, r.PeerAddress, r.PeerType))
	}
	return strings.Join(parts, "; ")
}

func peerState(t *testing.T, sp *testSpeaker, addr netip.Addr) (PeerStatus, bool) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	peers, err := sp.Peers(ctx)
	if err != nil {
		t.Fatalf("%s: Peers: %v", sp.name, err)
	}
	for _, p := range peers {
		if p.Address == addr {
			return p, true
		}
	}
	return PeerStatus{}, false
}

func waitEstablished(t *testing.T, sp *testSpeaker, addr netip.Addr, timeout time.Duration) PeerStatus {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		st, ok := peerState(t, sp, addr)
		if ok && st.State == "established" {
			return st
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: session to %s not established within %s (state %q, configured %v)", sp.name, addr, timeout, st.State, ok)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// mustSetPeers sets sp's peers. Between fabric hosts only the one with the
// lower address dials, as fabricd has it (planner.FabricPeers): when both
// dial, GoBGP's idle hold after the collision can keep a session down for
// longer than a test waits (seen: no route within 10 s).
func mustSetPeers(t *testing.T, sp *testSpeaker, peers ...Peer) {
	t.Helper()
	for i, p := range peers {
		switch p.Type {
		case PeerMesh, PeerRRClient, PeerRouteReflector:
			peers[i].Passive = p.Passive || sp.addr.Compare(p.Address) > 0
		}
	}
	if err := sp.SetPeers(context.Background(), peers); err != nil {
		t.Fatalf("%s: SetPeers: %v", sp.name, err)
	}
}

func mustAdvertise(t *testing.T, sp *testSpeaker, prefix string) netip.Prefix {
	t.Helper()
	p := netip.MustParsePrefix(prefix)
	if err := sp.Advertise(context.Background(), NextHops{IPv4: sp.addr}, p); err != nil {
		t.Fatalf("%s: Advertise %s: %v", sp.name, p, err)
	}
	return p
}

// frozenProxy is a test device: a TCP relay between two speakers that can
// be frozen, after which it forwards nothing and closes nothing, like a
// peer that hung or a network path that silently drops everything. Only
// the BGP hold timer can detect that.
type frozenProxy struct {
	listener  net.Listener
	target    string
	localAddr *net.TCPAddr // source address for the upstream connection

	mu     sync.Mutex
	frozen bool
	conns  []net.Conn
}

func newFrozenProxy(t *testing.T, listen netip.AddrPort, target netip.AddrPort, source netip.Addr) *frozenProxy {
	t.Helper()
	l, err := net.Listen("tcp", listen.String())
	if err != nil {
		t.Fatalf("frozenProxy listen: %v", err)
	}
	p := &frozenProxy{listener: l, target: target.String(), localAddr: net.TCPAddrFromAddrPort(netip.AddrPortFrom(source, 0))}
	go p.accept()
	t.Cleanup(p.close)
	return p
}

func (p *frozenProxy) accept() {
	for {
		down, err := p.listener.Accept()
		if err != nil {
			return
		}
		d := net.Dialer{LocalAddr: p.localAddr, Timeout: 2 * time.Second}
		up, err := d.Dial("tcp", p.target)
		if err != nil {
			down.Close()
			continue
		}
		p.mu.Lock()
		p.conns = append(p.conns, down, up)
		p.mu.Unlock()
		go p.relay(down, up)
		go p.relay(up, down)
	}
}

func (p *frozenProxy) isFrozen() bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.frozen
}

func (p *frozenProxy) relay(src, dst net.Conn) {
	buf := make([]byte, 32*1024)
	for {
		n, err := src.Read(buf)
		if p.isFrozen() {
			// Swallow everything, including EOF: the other side must see
			// silence, not a closed connection.
			if err != nil {
				return
			}
			continue
		}
		if n > 0 {
			if _, werr := dst.Write(buf[:n]); werr != nil {
				src.Close()
				return
			}
		}
		if err != nil {
			if err != io.EOF {
				src.Close()
			}
			dst.Close()
			return
		}
	}
}

func (p *frozenProxy) freeze() {
	p.mu.Lock()
	p.frozen = true
	p.mu.Unlock()
}

func (p *frozenProxy) close() {
	p.listener.Close()
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, c := range p.conns {
		c.Close()
	}
}

// TestSessionStateNames: GoBGP's API states and its FSM's name the same
// states; both map to ours.
func TestSessionStateNames(t *testing.T) {
	for _, tc := range []struct {
		api  api.PeerState_SessionState
		fsm  bgppacket.FSMState
		want SessionState
	}{
		{api.PeerState_SESSION_STATE_IDLE, bgppacket.BGP_FSM_IDLE, Idle},
		{api.PeerState_SESSION_STATE_CONNECT, bgppacket.BGP_FSM_CONNECT, Connect},
		{api.PeerState_SESSION_STATE_ACTIVE, bgppacket.BGP_FSM_ACTIVE, Active},
		{api.PeerState_SESSION_STATE_OPENSENT, bgppacket.BGP_FSM_OPENSENT, OpenSent},
		{api.PeerState_SESSION_STATE_OPENCONFIRM, bgppacket.BGP_FSM_OPENCONFIRM, OpenConfirm},
		{api.PeerState_SESSION_STATE_ESTABLISHED, bgppacket.BGP_FSM_ESTABLISHED, Established},
	} {
		if got := sessionStateName(tc.api); got != tc.want {
			t.Errorf("sessionStateName(%v) = %s, want %s", tc.api, got, tc.want)
		}
		if got := fsmStateName(tc.fsm); got != tc.want {
			t.Errorf("fsmStateName(%v) = %s, want %s", tc.fsm, got, tc.want)
		}
	}
	if sessionStateName(api.PeerState_SESSION_STATE_UNSPECIFIED) != Idle {
		t.Error("an unspecified state is not idle")
	}
}
