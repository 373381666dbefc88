package bfd

import "time"

// Config is one side's timers for a session.
type Config struct {
	// Interval is how often this side sends once the session is Up, and
	// the fastest it asks the peer to send.
	Interval time.Duration
	// Multiplier is how many of the peer's intervals may pass unheard
	// before the peer is taken for dead (RFC 5880 Detect Mult).
	Multiplier uint8
}

// slowInterval is the transmit interval while a session is not Up: RFC 5880
// §6.8.3 asks for at least one second.
const slowInterval = time.Second

// Session is one BFD session's state machine (RFC 5880 §6.8). It does no
// I/O and reads no clock: the caller hands it packets and the time.
type Session struct {
	cfg         Config
	local       uint32 // My Discriminator
	remote      uint32 // the peer's, once heard
	state       State
	diag        Diag
	remoteState State
	remoteDiag  Diag
	remoteMinRx time.Duration // how fast the peer lets us send (0: not at all)
	remoteMinTx time.Duration
	remoteMult  uint8
	desiredTx   time.Duration // what we send at and say we send at
	polling     bool          // a Poll sequence is on: our timers changed
	finalDue    bool          // the peer polled: the next packet carries Final
	lastRx      time.Time
	detect      time.Duration // the detection time from the last packet on
}

// NewSession starts a session Down, with discr as My Discriminator
// (nonzero, unique on this host).
func NewSession(cfg Config, discr uint32) *Session {
	return &Session{cfg: cfg, local: discr, state: Down, remoteState: Down,
		remoteMinRx: time.Microsecond, desiredTx: slowInterval}
}

// Receive applies a packet from the peer (§6.8.6) and reports whether the
// session's state changed.
func (s *Session) Receive(p Packet, now time.Time) bool {
	if s.state == AdminDown {
		return false
	}
	prev := s.DetectionTime()
	s.remote = p.MyDiscr
	s.remoteState, s.remoteDiag = p.State, p.Diag
	s.remoteMinRx, s.remoteMinTx, s.remoteMult = p.RequiredMinRx, p.DesiredMinTx, p.DetectMult
	s.lastRx = now
	s.detect = s.DetectionTime()
	if p.Poll && s.detect < prev {
		// The peer announces faster timers and may keep its old pace
		// until our Final reaches it: one more of its old intervals.
		s.detect = prev
	}
	if p.Final {
		s.polling = false // the peer took our new timers
	}
	if p.Poll {
		s.finalDue = true
	}
	old := s.state
	switch {
	case p.State == AdminDown:
		if s.state != Down {
			s.down(DiagNeighborSignaled)
		}
	case s.state == Down && p.State == Down:
		s.state = Init
	case s.state == Down && p.State == Init, s.state == Init && (p.State == Init || p.State == Up):
		s.up()
	case s.state == Up && p.State == Down:
		s.down(DiagNeighborSignaled)
	}
	return s.state != old
}

// Expire takes the session Down if the peer has been silent for the
// detection time (§6.8.4), and reports whether it did.
func (s *Session) Expire(now time.Time) bool {
	deadline, ok := s.DetectionDeadline()
	if !ok || now.Before(deadline) {
		return false
	}
	s.down(DiagDetectionExpired)
	s.remote = 0 // a new session of the peer's may use another discriminator
	return true
}

// DetectionDeadline is when the peer counts as dead if nothing more is
// heard; there is none while the session is not Init or Up.
func (s *Session) DetectionDeadline() (time.Time, bool) {
	if s.state != Init && s.state != Up {
		return time.Time{}, false
	}
	return s.lastRx.Add(s.detect), true
}

// DetectionTime is how long the peer may be silent (§6.8.4: its multiplier
// times the slower of its sending and what we asked for).
func (s *Session) DetectionTime() time.Duration {
	return time.Duration(s.remoteMult) * max(s.cfg.Interval, s.remoteMinTx)
}

// TxInterval is the time between two packets before jitter; 0 while the
// peer asks for none.
func (s *Session) TxInterval() time.Duration {
	if s.remoteMinRx == 0 {
		return 0
	}
	return max(s.desiredTx, s.remoteMinRx)
}

// Packet is the next packet to send. A pending Final goes out first: a
// packet never carries Poll and Final both (§6.5).
func (s *Session) Packet() Packet {
	p := Packet{
		Diag: s.diag, State: s.state, DetectMult: s.cfg.Multiplier,
		MyDiscr: s.local, YourDiscr: s.remote,
		DesiredMinTx: s.desiredTx, RequiredMinRx: s.cfg.Interval,
	}
	if s.finalDue {
		p.Final, s.finalDue = true, false
	} else {
		p.Poll = s.polling
	}
	return p
}

// SetAdminDown stops the session on purpose: the peer is told, and must
// not take it for a failure (RFC 5882 §3.2).
func (s *Session) SetAdminDown() {
	s.state, s.diag = AdminDown, DiagAdministrativeDown
	s.polling = false
}

// FinalDue says whether the peer polled and waits for an answer now.
func (s *Session) FinalDue() bool { return s.finalDue }

func (s *Session) up() {
	s.state, s.diag = Up, DiagNone
	if s.desiredTx != s.cfg.Interval {
		s.desiredTx = s.cfg.Interval
		s.polling = true // §6.8.3: a timer change while Up is a Poll sequence
	}
}

func (s *Session) down(d Diag) {
	s.state, s.diag = Down, d
	s.desiredTx, s.polling = slowInterval, false
}

// State, Diag and RemoteState report the session; LocalDiscr and
// RemoteDiscr its discriminators.
func (s *Session) State() State        { return s.state }
func (s *Session) Diag() Diag          { return s.diag }
func (s *Session) RemoteState() State  { return s.remoteState }
func (s *Session) RemoteDiag() Diag    { return s.remoteDiag }
func (s *Session) LocalDiscr() uint32  { return s.local }
func (s *Session) RemoteDiscr() uint32 { return s.remote }
