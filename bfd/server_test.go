package bfd

import (
	"context"
	"log/slog"
	"net"
	"net/netip"
	"testing"
	"time"

	"golang.org/x/net/ipv4"

	"github.com/fabricnet/fabric/internal/nsthread"
	"github.com/fabricnet/fabric/lab"
)

var (
	addrA = netip.MustParseAddr("10.99.0.1")
	addrB = netip.MustParseAddr("10.99.0.2")
	addrC = netip.MustParseAddr("10.99.0.3")
)

// link makes namespaces A and B joined by a veth, A at 10.99.0.1 and B at
// .2 and also .3, an address that is no peer of A's.
func link(t *testing.T) (nsA, nsB string) {
	t.Helper()
	lab.RequireRoot(t)
	prefix := lab.Prefix("bf")
	nsA, nsB = lab.AddNS(t, prefix+"a"), lab.AddNS(t, prefix+"b")
	lab.Veth(t, nsA, "eth0", nsB, "eth0")
	lab.Addr(t, nsA, "eth0", addrA.String()+"/24")
	lab.Addr(t, nsB, "eth0", addrB.String()+"/24")
	lab.Addr(t, nsB, "eth0", addrC.String()+"/24")
	return nsA, nsB
}

func serve(t *testing.T, ns string, local netip.Addr, peers ...Peer) (*Server, context.CancelFunc) {
	t.Helper()
	var s *Server
	if err := nsthread.Do(ns, func() (err error) {
		s, err = Listen(local, Port, lab.Logger(t).With("host", local.String()))
		return err
	}); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { s.Run(ctx); close(done) }()
	t.Cleanup(func() { cancel(); <-done })
	s.SetPeers(peers)
	return s, cancel
}

func stateOf(s *Server, peer netip.Addr) Status {
	for _, st := range s.Status() {
		if st.Peer == peer {
			return st
		}
	}
	return Status{}
}

func waitState(t *testing.T, s *Server, peer netip.Addr, want State, within time.Duration) time.Duration {
	t.Helper()
	start := time.Now()
	for time.Since(start) < within {
		if stateOf(s, peer).State == want {
			return time.Since(start)
		}
		time.Sleep(5 * time.Millisecond)
	}
	t.Fatalf("session with %s: %s, not %s within %s", peer, stateOf(s, peer).State, want, within)
	return 0
}

var testTimers = Config{Interval: 50 * time.Millisecond, Multiplier: 3}

// waitFastTimers waits for s's session with peer to run testTimers: up at
// the slow start-up pace first, then the fast timers once the poll
// sequences are over.
func waitFastTimers(t *testing.T, s *Server, peer netip.Addr) {
	t.Helper()
	start := time.Now()
	for stateOf(s, peer).DetectionTime != 150*time.Millisecond {
		if time.Since(start) > 5*time.Second {
			t.Fatalf("detection time %s, want 3 × 50ms", stateOf(s, peer).DetectionTime)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// TestSessionLifecycle: two hosts bring a session up; one that goes
// silent (its link down: no word) is detected within the detection time;
// one that stops on purpose says AdminDown, and that is not a failure.
func TestSessionLifecycle(t *testing.T) {
	nsA, nsB := link(t)
	a, _ := serve(t, nsA, addrA, Peer{Addr: addrB, Config: testTimers})
	b, stopB := serve(t, nsB, addrB, Peer{Addr: addrA, Config: testTimers})
	waitState(t, a, addrB, Up, 5*time.Second)
	waitState(t, b, addrA, Up, 5*time.Second)
	waitFastTimers(t, a, addrB)
	a.Changes()

	// Silence: B's link goes down, nothing is said.
	lab.Exec(t, nsB, "ip", "link", "set", "eth0", "down")
	took := waitState(t, a, addrB, Down, 2*time.Second)
	t.Logf("silent peer detected in %s", took)
	changes := a.Changes()
	if len(changes) == 0 || !changes[len(changes)-1].Failed() || changes[len(changes)-1].Diag != DiagDetectionExpired {
		t.Fatalf("changes after silence: %+v, want a failure by detection time", changes)
	}
	lab.Exec(t, nsB, "ip", "link", "set", "eth0", "up")
	lab.Exec(t, nsA, "ip", "link", "set", "eth0", "up")
	waitState(t, a, addrB, Up, 5*time.Second)
	a.Changes()

	// A stop on purpose: AdminDown, not a failure.
	stopB()
	waitState(t, a, addrB, Down, 2*time.Second)
	for _, c := range a.Changes() {
		if c.Failed() || c.RemoteState != AdminDown {
			t.Fatalf("a peer's stop taken for a failure: %+v", c)
		}
	}
	if st := stateOf(a, addrB); st.Downs < 2 {
		t.Errorf("downs %d, want at least the 2 above", st.Downs)
	}
}

// TestStrangerCannotTouchASession: packets from an address that is not a
// configured peer, or from off the link (TTL below 255), move nothing.
func TestStrangerCannotTouchASession(t *testing.T) {
	nsA, nsB := link(t)
	a, _ := serve(t, nsA, addrA, Peer{Addr: addrB, Config: testTimers})
	serve(t, nsB, addrB, Peer{Addr: addrA, Config: testTimers})
	waitState(t, a, addrB, Up, 5*time.Second)
	a.Changes()

	// A stranger at .3 runs a session towards A: A never answers it.
	stranger, _ := serve(t, nsB, addrC, Peer{Addr: addrA, Config: testTimers})
	deadline := time.Now().Add(1500 * time.Millisecond) // the stranger sends every second while down
	for time.Now().Before(deadline) {
		if st := stateOf(stranger, addrA).State; st == Up || st == Init {
			t.Fatalf("A answered a stranger: its session is %s", st)
		}
		time.Sleep(20 * time.Millisecond)
	}
	if len(a.Status()) != 1 {
		t.Fatalf("A has sessions %+v, want only B's", a.Status())
	}

	// A forged Down from B's own address but from off the link (TTL 254):
	// dropped. The same packet with TTL 255 does take the session down,
	// which shows the forgery would work without the TTL check.
	forge := func(ttl int) {
		t.Helper()
		err := nsthread.Do(nsB, func() error {
			c, err := net.ListenUDP("udp4", net.UDPAddrFromAddrPort(netip.AddrPortFrom(addrB, 0)))
			if err != nil {
				return err
			}
			defer c.Close()
			if err := ipv4.NewConn(c).SetTTL(ttl); err != nil {
				return err
			}
			p := Packet{State: Down, DetectMult: 3, MyDiscr: 4242, DesiredMinTx: time.Second, RequiredMinRx: time.Second}
			_, err = c.WriteToUDP(p.Marshal(), net.UDPAddrFromAddrPort(netip.AddrPortFrom(addrA, Port)))
			return err
		})
		if err != nil {
			t.Fatal(err)
		}
	}
	// The forged Down would show as "neighbor signaled"; a busy machine
	// may starve a session into "detection time expired", which is not it.
	signaled := func(changes []Change) bool {
		for _, c := range changes {
			if c.Diag == DiagNeighborSignaled {
				return true
			}
		}
		return false
	}
	forge(254)
	time.Sleep(200 * time.Millisecond) // nothing to wait for: the packet must change nothing
	if c := a.Changes(); signaled(c) {
		t.Fatalf("a packet with TTL 254 took the session down: %+v", c)
	}
	forge(255)
	start := time.Now()
	for !signaled(a.Changes()) {
		if time.Since(start) > time.Second {
			t.Fatal("the same packet with TTL 255 did not take the session down: the test proves nothing")
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func TestMain(m *testing.M) {
	slog.SetDefault(slog.New(slog.DiscardHandler))
	m.Run()
}

// TestSessionOverIPv6: on an IPv6 underlay the sessions run over IPv6,
// with the hop limit checked as the TTL is: up both ways, and a silent
// peer detected.
func TestSessionOverIPv6(t *testing.T) {
	nsA, nsB := link(t)
	a6, b6 := netip.MustParseAddr("2001:db8:99::1"), netip.MustParseAddr("2001:db8:99::2")
	lab.Exec(t, nsA, "ip", "-6", "addr", "add", a6.String()+"/64", "dev", "eth0", "nodad")
	lab.Exec(t, nsB, "ip", "-6", "addr", "add", b6.String()+"/64", "dev", "eth0", "nodad")
	a, _ := serve(t, nsA, a6, Peer{Addr: b6, Config: testTimers})
	b, _ := serve(t, nsB, b6, Peer{Addr: a6, Config: testTimers})
	waitState(t, a, b6, Up, 5*time.Second)
	waitState(t, b, a6, Up, 5*time.Second)
	waitFastTimers(t, a, b6)
	lab.Exec(t, nsB, "ip", "link", "set", "eth0", "down")
	took := waitState(t, a, b6, Down, 2*time.Second)
	t.Logf("silent IPv6 peer detected in %s", took)
}
