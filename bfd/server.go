package bfd

import (
	"context"
	"encoding/binary"
	"fmt"
	"log/slog"
	"maps"
	"math/rand/v2"
	"net/netip"
	"runtime"
	"slices"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// Port is where single-hop BFD control packets go (RFC 5881).
const Port = 3784

// Peer is a neighbour to run a session with.
type Peer struct {
	Addr netip.Addr
	Config
}

// Status is one session as `fabricctl peers status` shows it.
type Status struct {
	Peer          netip.Addr
	State         State
	RemoteState   State
	Diag          Diag          // why it last went down
	DetectionTime time.Duration // how long the peer may be silent; 0 before it is heard
	Since         time.Time     // of the current state
	Downs         int           // times it went from Up to Down
}

// Change is a session moving from one state to another.
type Change struct {
	Peer        netip.Addr
	From, To    State
	Diag        Diag
	RemoteState State         // AdminDown: the peer stopped on purpose
	RemoteDiag  Diag          // why the peer went down, as it says
	UpFor       time.Duration // how long the session had been Up, going down
	At          time.Time
}

// Settle is how long a session must have been up before a Down the peer
// signals counts as a failure: peers rebuild sessions as their clients
// register (FRR does when its BGP session comes up), which shows here as
// a Down right after Up.
const Settle = time.Second

// Failed says the change is a failure of a session that was Up: the peer
// went silent, or said Down for a reason (its own detection time expired,
// a path down). A peer that stops on purpose says AdminDown (RFC 5882
// §3.2), and one that starts its session anew (FRR does when BGP comes up
// and registers the session again) says Down with no diagnostic: neither
// is a failure of the path; nor is a Down signaled before the session
// settled.
func (c Change) Failed() bool {
	if c.From != Up || c.To != Down {
		return false
	}
	if c.Diag == DiagDetectionExpired {
		return true // silence: a failure whenever it comes
	}
	return c.RemoteState == Down && c.RemoteDiag != DiagNone && c.UpFor >= Settle
}

// Server runs the sessions of one local address: it listens on Port,
// sends from a port of 49152-65535 with TTL 255 and takes only packets
// that arrive with TTL 255 from a configured peer (RFC 5881 §4-5: nobody
// off the link can reach a session).
//
// Every session runs on one thread that waits in ppoll for a packet, the
// next deadline or a request (SetPeers, Stop): a packet or a deadline
// wakes that thread and nothing else, packets at most once a wakeGap. The
// earlier reader goroutine, channel and timer woke the Go scheduler several
// times a packet, which cost a host with 49 sessions about 5 % of a core.
type Server struct {
	log      *slog.Logger
	local    netip.Addr
	peerPort int
	rx, tx   int // sockets: rx on Port (with the TTL of each packet), tx from the source port
	wake     int // eventfd: a request is waiting

	statusView map[netip.Addr]Status // Run's own copy of status

	mu       sync.Mutex
	peers    []Peer // set by SetPeers, not yet taken by Run
	newPeers bool
	stopReq  bool
	status   map[netip.Addr]Status
	changes  []Change
	changed  chan struct{}
	running  bool // Run has begun; Stop must go through it
	stopped  bool
	closed   bool // the sockets are closed
	runDone  chan struct{}
}

type received struct {
	p    Packet
	from netip.Addr
	at   time.Time
}

type session struct {
	*Session
	peer   netip.Addr
	to     unix.Sockaddr // the peer's BFD port
	nextTx time.Time
	since  time.Time
	downs  int
	shown  Status // as last published
	buf    []byte // the packet being sent
}

// Listen opens the sockets on local; port is the port peers send to and
// this server listens on (Port outside tests).
func Listen(local netip.Addr, port int, log *slog.Logger) (*Server, error) {
	if !local.IsValid() || local.Is4In6() {
		return nil, fmt.Errorf("bfd: local address %q: want IPv4 or IPv6", local)
	}
	rx, err := udpSocket(local, port, true)
	if err != nil {
		return nil, fmt.Errorf("bfd: listen on %s:%d (receiving the TTL): %w", local, port, err)
	}
	tx, err := listenSourcePort(local)
	if err != nil {
		unix.Close(rx)
		return nil, err
	}
	wake, err := unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK)
	if err != nil {
		unix.Close(rx)
		unix.Close(tx)
		return nil, fmt.Errorf("bfd: eventfd: %w", err)
	}
	return &Server{
		log: log, local: local, peerPort: port, rx: rx, tx: tx, wake: wake,
		status: map[netip.Addr]Status{}, changed: make(chan struct{}, 1), runDone: make(chan struct{}),
	}, nil
}

// udpSocket is a non-blocking UDP socket bound to local:port (either
// family) that receives each packet's TTL (hop limit), or sends with 255.
func udpSocket(local netip.Addr, port int, receiveTTL bool) (int, error) {
	family, level, option, value := unix.AF_INET, unix.IPPROTO_IP, unix.IP_TTL, 255
	if receiveTTL {
		option, value = unix.IP_RECVTTL, 1
	}
	if local.Is6() {
		family, level, option = unix.AF_INET6, unix.IPPROTO_IPV6, unix.IPV6_UNICAST_HOPS
		if receiveTTL {
			option = unix.IPV6_RECVHOPLIMIT
		}
	}
	fd, err := unix.Socket(family, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC|unix.SOCK_NONBLOCK, 0)
	if err != nil {
		return -1, err
	}
	if err := unix.SetsockoptInt(fd, level, option, value); err != nil {
		unix.Close(fd)
		return -1, err
	}
	if err := unix.Bind(fd, sockaddr(local, port)); err != nil {
		unix.Close(fd)
		return -1, err
	}
	return fd, nil
}

// listenSourcePort binds a UDP socket sending with TTL 255 to a free port
// of 49152-65535, where RFC 5881 §4 wants the source port.
func listenSourcePort(local netip.Addr) (int, error) {
	var err error
	for range 64 {
		var fd int
		if fd, err = udpSocket(local, 49152+rand.IntN(65536-49152), false); err == nil {
			return fd, nil
		}
	}
	return -1, fmt.Errorf("bfd: no free source port in 49152-65535 on %s: %w", local, err)
}

// request wakes Run for what SetPeers or Stop left under s.mu; once the
// sockets are closed, their numbers may be another file's, and it does
// nothing.
func (s *Server) request() {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return
	}
	var one [8]byte
	binary.NativeEndian.PutUint64(one[:], 1)
	unix.Write(s.wake, one[:])
}

func (s *Server) closeSockets() {
	s.mu.Lock()
	defer s.mu.Unlock()
	if !s.closed {
		s.closed = true
		unix.Close(s.rx)
		unix.Close(s.tx)
		unix.Close(s.wake)
	}
}

// SetPeers makes the sessions those of peers: new ones start Down, gone
// ones end without a word (their peers were removed on purpose). One
// goroutine calls it (the agent's main loop); it never blocks.
func (s *Server) SetPeers(peers []Peer) {
	s.mu.Lock()
	s.peers, s.newPeers = slices.Clone(peers), true
	s.mu.Unlock()
	s.request()
}

// Changed is signalled after state changes; Changes takes them.
func (s *Server) Changed() <-chan struct{} { return s.changed }

// Changes returns the state changes since the last call, oldest first.
func (s *Server) Changes() []Change {
	s.mu.Lock()
	defer s.mu.Unlock()
	c := s.changes
	s.changes = nil
	return c
}

// Status lists the sessions by peer address.
func (s *Server) Status() []Status {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := slices.Collect(maps.Values(s.status))
	slices.SortFunc(out, func(a, b Status) int { return a.Peer.Compare(b.Peer) })
	return out
}

// Run runs the sessions until ctx ends or Stop; both tell every peer
// AdminDown first, so that a stop is not taken for a failure.
func (s *Server) Run(ctx context.Context) {
	defer close(s.runDone)
	s.mu.Lock()
	stoppedFirst := s.stopped
	s.running = !stoppedFirst
	s.mu.Unlock()
	if stoppedFirst {
		return
	}
	stopOnCancel := context.AfterFunc(ctx, func() {
		s.mu.Lock()
		s.stopReq = true
		s.mu.Unlock()
		s.request()
	})
	defer stopOnCancel()
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	sessions := map[netip.Addr]*session{}
	byDiscr := map[uint32]*session{}
	defer func() {
		s.adminDown(sessions)
		s.closeSockets()
	}()
	buf, oob := make([]byte, 512), make([]byte, 64)
	fds := []unix.PollFd{{Fd: int32(s.rx), Events: unix.POLLIN}, {Fd: int32(s.wake), Events: unix.POLLIN}}
	var lastWake time.Time
	for {
		ts := unix.NsecToTimespec(max(0, time.Until(nextEvent(sessions)).Nanoseconds()))
		if _, err := unix.Ppoll(fds, &ts, nil); err != nil && err != unix.EINTR {
			s.log.Error("bfd: wait for packets", "err", err)
			return
		}
		if fds[0].Revents != 0 && fds[1].Revents == 0 {
			// Packets wake the thread at most once a wakeGap: the ones that
			// arrive meanwhile are read together (49 peers send 245 a
			// second), and a request still ends the wait.
			if gap := wakeGap(sessions) - time.Since(lastWake); gap > 0 {
				ts := unix.NsecToTimespec(gap.Nanoseconds())
				unix.Ppoll(fds[1:], &ts, nil)
			}
		}
		lastWake = time.Now()
		if fds[1].Revents != 0 {
			var count [8]byte
			unix.Read(s.wake, count[:])
			s.mu.Lock()
			stop, peers, newPeers := s.stopReq, s.peers, s.newPeers
			s.newPeers = false
			s.mu.Unlock()
			if stop {
				return
			}
			if newPeers {
				s.applyPeers(sessions, byDiscr, peers)
			}
		}
		if fds[0].Revents != 0 {
			s.readAll(sessions, byDiscr, buf, oob)
		}
		now := time.Now()
		for _, ss := range sessions {
			from := ss.State()
			if ss.Expire(now) {
				s.note(ss, from, now)
			}
			iv := ss.TxInterval()
			if iv > 0 && ss.nextTx.After(now.Add(iv)) {
				// Faster now (the session came up): the peer already
				// counts on the new interval.
				ss.nextTx = now.Add(jitter(iv, ss.cfg.Multiplier))
			}
			if iv > 0 && !now.Add(iv/early).Before(ss.nextTx) {
				s.send(ss)
				ss.nextTx = now.Add(jitter(iv, ss.cfg.Multiplier))
			}
		}
		s.publish(sessions)
	}
}

// early: a packet due within 1/early of its interval goes out with the
// packets sent now, saving the thread a wake-up of its own.
const early = 10

// readAll takes the packets waiting on the receive socket, at most 256 at
// a time: a flood must not keep the sessions from sending.
func (s *Server) readAll(sessions map[netip.Addr]*session, byDiscr map[uint32]*session, buf, oob []byte) {
	for range 256 {
		n, oobn, _, from, err := unix.Recvmsg(s.rx, buf, oob, unix.MSG_DONTWAIT)
		if err != nil {
			return // EAGAIN: none left
		}
		at := time.Now()
		var src netip.Addr
		switch from := from.(type) {
		case *unix.SockaddrInet4:
			src = netip.AddrFrom4(from.Addr)
		case *unix.SockaddrInet6:
			src = netip.AddrFrom16(from.Addr).Unmap()
		default:
			continue
		}
		if ttl, ok := receivedTTL(oob[:oobn]); !ok || ttl != 255 {
			continue // not from the link (RFC 5881 §5)
		}
		p, err := Parse(buf[:n])
		if err != nil {
			continue
		}
		s.receive(sessions, byDiscr, received{p: p, from: src, at: at})
	}
}

// Stop ends Run (AdminDown to every peer first) and waits for it; before
// Run it closes the sockets, and Run then returns at once. Safe to call
// twice.
func (s *Server) Stop() {
	s.mu.Lock()
	already, running := s.stopped, s.running
	s.stopped = true
	s.stopReq = running
	s.mu.Unlock()
	switch {
	case already:
		return
	case !running:
		s.closeSockets()
		return
	}
	s.request()
	<-s.runDone
}

func (s *Server) applyPeers(sessions map[netip.Addr]*session, byDiscr map[uint32]*session, peers []Peer) {
	want := map[netip.Addr]Peer{}
	for _, p := range peers {
		want[p.Addr.Unmap()] = p
	}
	for addr, ss := range sessions {
		if p, ok := want[addr]; !ok || p.Config != ss.cfg {
			delete(sessions, addr)
			delete(byDiscr, ss.LocalDiscr())
		}
	}
	now := time.Now()
	for addr, p := range want {
		if _, ok := sessions[addr]; ok {
			continue
		}
		discr := rand.Uint32()
		for discr == 0 || byDiscr[discr] != nil {
			discr = rand.Uint32()
		}
		ss := &session{Session: NewSession(p.Config, discr), peer: addr, to: sockaddr(addr, s.peerPort), since: now,
			nextTx: now.Add(jitter(slowInterval, p.Multiplier) / 4)} // the first packet soon, not all at once
		sessions[addr] = ss
		byDiscr[discr] = ss
	}
}

func (s *Server) receive(sessions map[netip.Addr]*session, byDiscr map[uint32]*session, r received) {
	var ss *session
	if r.p.YourDiscr != 0 {
		ss = byDiscr[r.p.YourDiscr]
	} else {
		ss = sessions[r.from]
	}
	if ss == nil || ss.peer != r.from {
		return // no session with that sender: fail closed
	}
	from := ss.State()
	if ss.Receive(r.p, r.at) {
		s.note(ss, from, r.at)
	}
	if ss.FinalDue() {
		s.send(ss) // a Poll is answered at once (§6.8.7)
	}
}

func (s *Server) note(ss *session, from State, at time.Time) {
	c := Change{Peer: ss.peer, From: from, To: ss.State(), Diag: ss.Diag(), RemoteState: ss.RemoteState(), RemoteDiag: ss.RemoteDiag(), At: at}
	if from == Up {
		ss.downs++
		c.UpFor = at.Sub(ss.since)
	}
	ss.since = at
	s.log.Info("bfd session "+c.To.String(), "peer", c.Peer, "from", c.From, "diag", c.Diag.String(), "peer_state", c.RemoteState, "peer_diag", c.RemoteDiag.String())
	s.mu.Lock()
	s.changes = append(s.changes, c)
	s.mu.Unlock()
	select {
	case s.changed <- struct{}{}:
	default:
	}
}

// publish hands Status the sessions; only when one changed, as it runs
// after every packet.
func (s *Server) publish(sessions map[netip.Addr]*session) {
	changed := len(sessions) != len(s.statusView)
	for addr, ss := range sessions {
		var dt time.Duration
		if ss.remoteMult > 0 {
			dt = ss.detect // the one in force, through a change of timers
		}
		st := Status{Peer: addr, State: ss.State(), RemoteState: ss.RemoteState(), Diag: ss.Diag(),
			DetectionTime: dt, Since: ss.since, Downs: ss.downs}
		if st != ss.shown {
			ss.shown, changed = st, true
		}
	}
	if !changed {
		return
	}
	st := make(map[netip.Addr]Status, len(sessions))
	for addr, ss := range sessions {
		st[addr] = ss.shown
	}
	s.statusView = st
	s.mu.Lock()
	s.status = st
	s.mu.Unlock()
}

func (s *Server) send(ss *session) {
	ss.buf = ss.Packet().AppendTo(ss.buf[:0])
	if err := unix.Sendto(s.tx, ss.buf, unix.MSG_DONTWAIT, ss.to); err != nil {
		s.log.Debug("bfd send", "peer", ss.peer, "err", err)
	}
}

// adminDown tells every peer this side stops on purpose; three copies, as
// one may be lost.
func (s *Server) adminDown(sessions map[netip.Addr]*session) {
	if len(sessions) == 0 {
		return
	}
	for _, ss := range sessions {
		ss.SetAdminDown()
	}
	for i := range 3 {
		if i > 0 {
			time.Sleep(10 * time.Millisecond)
		}
		for _, ss := range sessions {
			s.send(ss)
		}
	}
}

// sockaddr is addr:port for the socket calls.
func sockaddr(addr netip.Addr, port int) unix.Sockaddr {
	if addr.Is4() {
		return &unix.SockaddrInet4{Port: port, Addr: addr.As4()}
	}
	return &unix.SockaddrInet6{Port: port, Addr: addr.As16()}
}

// receivedTTL finds IP_TTL (IPV6_HOPLIMIT) among a packet's control
// messages.
func receivedTTL(oob []byte) (int, bool) {
	for len(oob) > 0 {
		h, data, rest, err := unix.ParseOneSocketControlMessage(oob)
		if err != nil {
			return 0, false
		}
		ipv4 := h.Level == unix.SOL_IP && h.Type == unix.IP_TTL
		ipv6 := h.Level == unix.SOL_IPV6 && h.Type == unix.IPV6_HOPLIMIT
		if (ipv4 || ipv6) && len(data) >= 4 {
			return int(binary.NativeEndian.Uint32(data)), true
		}
		oob = rest
	}
	return 0, false
}

// nextEvent is the earliest transmission or detection deadline.
func nextEvent(sessions map[netip.Addr]*session) time.Time {
	next := time.Now().Add(time.Second)
	for _, ss := range sessions {
		if ss.TxInterval() > 0 && ss.nextTx.Before(next) {
			next = ss.nextTx
		}
		if d, ok := ss.DetectionDeadline(); ok && d.Before(next) {
			next = d
		}
	}
	return next
}

// wakeGap is the shortest time between two wake-ups for packets: a tenth
// of the fastest session's interval (as early), at most maxWakeGap. Packets
// are read up to that late, a small part of any detection time (at least
// three intervals).
func wakeGap(sessions map[netip.Addr]*session) time.Duration {
	gap := maxWakeGap
	for _, ss := range sessions {
		if iv := ss.TxInterval(); iv > 0 {
			gap = min(gap, iv/early)
		}
	}
	return gap
}

const maxWakeGap = 10 * time.Millisecond

// jitter shortens an interval by 0-15 % (10-15 % with a multiplier of 1),
// so that sessions do not send in lockstep; a packet sent up to a tenth of
// the interval early (with another, one wake-up for both: early) makes
// that the 0-25 % (10-25 %) of RFC 5880 §6.8.7.
func jitter(d time.Duration, mult uint8) time.Duration {
	lo := 0.85
	hi := 1.0
	if mult == 1 {
		hi = 0.9
	}
	return time.Duration(float64(d) * (lo + rand.Float64()*(hi-lo)))
}
