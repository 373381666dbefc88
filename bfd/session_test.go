package bfd

import (
	"testing"
	"time"
)

var (
	t0   = time.Date(2026, 12, 6, 0, 0, 0, 0, time.UTC)
	fast = Config{Interval: 100 * time.Millisecond, Multiplier: 3}
)

func from(st State) Packet {
	p := Packet{State: st, DetectMult: 3, MyDiscr: 77, DesiredMinTx: 100 * time.Millisecond, RequiredMinRx: 100 * time.Millisecond}
	if st != Down && st != AdminDown {
		p.YourDiscr = 1
	}
	return p
}

// upSession is a session brought Up by the three-way handshake.
func upSession(t *testing.T) *Session {
	t.Helper()
	s := NewSession(fast, 1)
	s.Receive(from(Down), t0)
	s.Receive(from(Up), t0)
	if s.State() != Up {
		t.Fatalf("handshake left the session %s", s.State())
	}
	return s
}

func TestTransitions(t *testing.T) {
	for _, tc := range []struct {
		name     string
		start    []State // packets that set the session up before
		recv     State
		want     State
		wantDiag Diag
	}{
		{"down hears down: init", nil, Down, Init, DiagNone},
		{"down hears init: up", nil, Init, Up, DiagNone},
		{"down ignores up (a stale session of the peer's)", nil, Up, Down, DiagNone},
		{"init hears init: up", []State{Down}, Init, Up, DiagNone},
		{"init hears up: up", []State{Down}, Up, Up, DiagNone},
		{"init hears down: stays", []State{Down}, Down, Init, DiagNone},
		{"up hears down: down, the neighbor said so", []State{Down, Up}, Down, Down, DiagNeighborSignaled},
		{"up hears admin down: down, the neighbor said so", []State{Down, Up}, AdminDown, Down, DiagNeighborSignaled},
		{"init hears admin down: down", []State{Down}, AdminDown, Down, DiagNeighborSignaled},
		{"up hears up: stays", []State{Down, Up}, Up, Up, DiagNone},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := NewSession(fast, 1)
			for _, st := range tc.start {
				s.Receive(from(st), t0)
			}
			s.Receive(from(tc.recv), t0)
			if s.State() != tc.want || s.Diag() != tc.wantDiag {
				t.Fatalf("state %s diag %q, want %s %q", s.State(), s.Diag(), tc.want, tc.wantDiag)
			}
		})
	}
}

func TestDetection(t *testing.T) {
	s := upSession(t)
	// The peer sends every 100 ms and allows 3 misses: dead after 300 ms.
	if got := s.DetectionTime(); got != 300*time.Millisecond {
		t.Fatalf("detection time %s, want 300ms", got)
	}
	if s.Expire(t0.Add(299 * time.Millisecond)) {
		t.Fatal("expired before the detection time")
	}
	s.Receive(from(Up), t0.Add(250*time.Millisecond)) // heard again: the deadline moves
	if s.Expire(t0.Add(500 * time.Millisecond)) {
		t.Fatal("expired although the peer was heard 250 ms ago")
	}
	if !s.Expire(t0.Add(550*time.Millisecond)) || s.State() != Down || s.Diag() != DiagDetectionExpired {
		t.Fatalf("after 300 ms of silence: state %s diag %q, want down, detection time expired", s.State(), s.Diag())
	}
	if s.RemoteDiscr() != 0 {
		t.Error("the peer's discriminator outlived its session")
	}
	if _, ok := s.DetectionDeadline(); ok {
		t.Error("a down session has a detection deadline")
	}

	// A peer that announces faster timers (Poll) may keep its old pace
	// until our Final reaches it: the old detection time holds once.
	s = upSession(t)
	slowUp := from(Up)
	slowUp.DesiredMinTx = time.Second
	s.Receive(slowUp, t0) // 3 s
	faster := from(Up)
	faster.Poll = true
	s.Receive(faster, t0)
	if s.Expire(t0.Add(2 * time.Second)) {
		t.Fatal("expired on the new, faster timers before the peer could take them up")
	}
	s.Receive(from(Up), t0.Add(2*time.Second)) // the peer's first packet at the new pace
	if !s.Expire(t0.Add(2*time.Second + 301*time.Millisecond)) {
		t.Fatal("the faster timers never took effect")
	}

	// The slower of the two sides decides: a peer sending every 400 ms
	// gets 3 × 400 ms.
	s = upSession(t)
	slow := from(Up)
	slow.DesiredMinTx = 400 * time.Millisecond
	s.Receive(slow, t0)
	if got := s.DetectionTime(); got != 1200*time.Millisecond {
		t.Fatalf("detection time against a slow sender %s, want 1.2s", got)
	}
}

func TestTimersAndPoll(t *testing.T) {
	s := NewSession(fast, 1)
	if s.TxInterval() != time.Second {
		t.Fatalf("tx interval while down %s, want 1s (RFC 5880 6.8.3)", s.TxInterval())
	}
	s.Receive(from(Down), t0)
	s.Receive(from(Up), t0)
	if s.TxInterval() != 100*time.Millisecond {
		t.Fatalf("tx interval once up %s, want the configured 100ms", s.TxInterval())
	}
	// The faster timers are announced with a Poll until the peer's Final.
	if p := s.Packet(); !p.Poll || p.DesiredMinTx != 100*time.Millisecond {
		t.Fatalf("first packet once up: %+v, want Poll with the new interval", p)
	}
	final := from(Up)
	final.Final = true
	s.Receive(final, t0)
	if p := s.Packet(); p.Poll {
		t.Fatal("still polling after the peer's Final")
	}
	// The peer's own Poll is answered by a Final, never with Poll in the
	// same packet.
	poll := from(Up)
	poll.Poll = true
	s.Receive(poll, t0)
	if p := s.Packet(); !p.Final || p.Poll {
		t.Fatalf("answer to a poll: %+v, want Final alone", p)
	}
	// The peer slows us down: we send no faster than it can take.
	slowRx := from(Up)
	slowRx.RequiredMinRx = 500 * time.Millisecond
	s.Receive(slowRx, t0)
	if s.TxInterval() != 500*time.Millisecond {
		t.Fatalf("tx interval against a peer that takes 500ms: %s", s.TxInterval())
	}
	noRx := from(Up)
	noRx.RequiredMinRx = 0
	s.Receive(noRx, t0)
	if s.TxInterval() != 0 {
		t.Fatal("sending to a peer that asks for no packets")
	}
	// Back down: back to the slow rate.
	s.Receive(from(Down), t0)
	s.Receive(from(Down), t0) // Down hears Down: Init, at 1 s
	if s.TxInterval() != time.Second {
		t.Fatalf("tx interval after going down %s, want 1s", s.TxInterval())
	}
}

func TestAdminDown(t *testing.T) {
	s := upSession(t)
	s.SetAdminDown()
	p := s.Packet()
	if p.State != AdminDown || p.Diag != DiagAdministrativeDown {
		t.Fatalf("packet after SetAdminDown: %+v", p)
	}
	if s.Receive(from(Up), t0) || s.State() != AdminDown {
		t.Fatal("an admin-down session moved on a packet")
	}
	if s.Expire(t0.Add(time.Hour)) {
		t.Fatal("an admin-down session expired")
	}
}

func TestPacketRoundTrip(t *testing.T) {
	p := Packet{Diag: DiagDetectionExpired, State: Up, Poll: true, DetectMult: 3, MyDiscr: 0xdeadbeef, YourDiscr: 7,
		DesiredMinTx: 300 * time.Millisecond, RequiredMinRx: 200 * time.Millisecond}
	got, err := Parse(p.Marshal())
	if err != nil || got != p {
		t.Fatalf("round trip: %+v, %v; want %+v", got, err, p)
	}
	for _, tc := range []struct {
		name string
		bad  func(b []byte)
	}{
		{"version 0", func(b []byte) { b[0] &^= 0xe0 }},
		{"multiplier 0", func(b []byte) { b[2] = 0 }},
		{"multipoint", func(b []byte) { b[1] |= 0x01 }},
		{"authentication", func(b []byte) { b[1] |= 0x04 }},
		{"my discriminator 0", func(b []byte) { copy(b[4:8], []byte{0, 0, 0, 0}) }},
		{"your discriminator 0 while up", func(b []byte) { copy(b[8:12], []byte{0, 0, 0, 0}) }},
		{"length past the data", func(b []byte) { b[3] = 48 }},
	} {
		b := p.Marshal()
		tc.bad(b)
		if _, err := Parse(b); err == nil {
			t.Errorf("%s: accepted", tc.name)
		}
	}
	if _, err := Parse(p.Marshal()[:20]); err == nil {
		t.Error("a short packet was accepted")
	}
}

func TestFailed(t *testing.T) {
	for _, tc := range []struct {
		name string
		c    Change
		want bool
	}{
		{"silence", Change{From: Up, To: Down, Diag: DiagDetectionExpired, RemoteState: Up}, true},
		{"silence right after up", Change{From: Up, To: Down, Diag: DiagDetectionExpired, UpFor: time.Millisecond}, true},
		{"the peer saw us go silent", Change{From: Up, To: Down, Diag: DiagNeighborSignaled, RemoteState: Down, RemoteDiag: DiagDetectionExpired, UpFor: time.Minute}, true},
		{"the peer stops on purpose", Change{From: Up, To: Down, Diag: DiagNeighborSignaled, RemoteState: AdminDown, RemoteDiag: DiagAdministrativeDown, UpFor: time.Minute}, false},
		{"the peer starts its session anew", Change{From: Up, To: Down, Diag: DiagNeighborSignaled, RemoteState: Down, UpFor: time.Minute}, false},
		{"a down signaled before the session settled", Change{From: Up, To: Down, Diag: DiagNeighborSignaled, RemoteState: Down, RemoteDiag: DiagNeighborSignaled, UpFor: 5 * time.Millisecond}, false},
		{"init to down is no failure of an up session", Change{From: Init, To: Down, Diag: DiagDetectionExpired}, false},
	} {
		if got := tc.c.Failed(); got != tc.want {
			t.Errorf("%s: Failed() = %v, want %v", tc.name, got, tc.want)
		}
	}
}
