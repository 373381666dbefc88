// Package probe finds out, per peer, whether the underlay path between this
// host and the peer carries IP protocol 4 (IPIP). Some routers and clouds drop
// protocol 4; for those peers fabricd uses VXLAN instead.
//
// Every fabricd opens a raw IP protocol 4 socket on its underlay address. Raw
// sockets get a copy of each incoming protocol 4 packet before the ipip module
// (if any) handles it, and they work on kernels without the ipip module, so
// the prober and the responder run the same everywhere. A probe is an IPIP
// packet whose inner packet is undeliverable (see wire.go); the peer's
// responder answers it over protocol 4. A peer is marked "IPIP works" when an
// answer arrives and "blocked" after FailAfter probes in a row go unanswered.
package probe

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"sync/atomic"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Defaults for the zero values of Config. A working path that stops
// passing protocol 4 is blocked after about Interval (the next probe) +
// its timeout + (FailAfter-1) × FastInterval: 0.45-0.85 s on a fast
// underlay. Random loss makes it blocked only if FailAfter probes in a
// row are lost: at 10 % round-trip loss once in 10^8 probes, not once an
// hour as 3 misses in a row at a 2 s interval did.
const (
	DefaultInterval            = 400 * time.Millisecond
	DefaultFastInterval        = 50 * time.Millisecond
	DefaultMinTimeout          = 100 * time.Millisecond
	DefaultFailAfter           = 8
	DefaultRecoverAfter        = 2
	DefaultMaxRepliesPerSecond = 1000
)

const (
	// maxTimeout bounds the wait for one answer, whatever the round trip.
	maxTimeout = 2 * time.Second
	// lateAnswer is how long a missed probe's answer still counts as an
	// answer: it proves the path works, only slower than the timeout.
	lateAnswer = 5 * time.Second
	// maxInFlight bounds the probes remembered per peer.
	maxInFlight = 64
)

// Config configures a Prober.
type Config struct {
	// Local is this host's underlay IPv4 address. Probes leave from it and
	// peers send theirs to it.
	Local netip.Addr
	// Interval between two probes to a peer whose probes are answered, and
	// to a blocked peer. Default DefaultInterval.
	Interval time.Duration
	// FastInterval between two probes to a peer whose last probe went
	// unanswered: a working path is found blocked (or not) within
	// FailAfter of them rather than FailAfter intervals.
	// Default DefaultFastInterval.
	FastInterval time.Duration
	// MinTimeout: a probe unanswered after max(MinTimeout, 4 × the smoothed
	// round trip) is missed; several may be in flight, and an answer that
	// comes later still counts. Default DefaultMinTimeout.
	MinTimeout time.Duration
	// FailAfter consecutive unanswered probes mark a peer blocked.
	// Default DefaultFailAfter.
	FailAfter int
	// RecoverAfter consecutive answers move a blocked peer back to IPIP.
	// A new peer needs only one. Default DefaultRecoverAfter.
	RecoverAfter int
	// MaxRepliesPerSecond caps the answers to requests, from anyone. A reply
	// is no larger than its request, so this is no amplifier anyway; the cap
	// keeps a flood from costing CPU and upstream bandwidth. It must cover
	// the whole cluster: every peer asks once per Interval (2.5 a second
	// by default), and 1/FastInterval a second while its probes go
	// unanswered. Default DefaultMaxRepliesPerSecond.
	MaxRepliesPerSecond int
	// StateFile, if set, keeps the verdicts across restarts: they are
	// written there on every change and a new Prober starts from them, so
	// a restart does not send an IPIP peer to VXLAN and back.
	StateFile string
	Logger    *slog.Logger
}

// Prober probes peers over IP protocol 4 and answers their probes.
type Prober struct {
	cfg     Config
	log     *slog.Logger
	conn    *net.IPConn
	changes chan struct{}
	kick    chan struct{}
	done    chan struct{}

	mu    sync.Mutex
	peers map[netip.Addr]*peerState
	saved map[netip.Addr]bool // verdicts of the previous run, for peers not seen yet
	held  map[netip.Addr]bool // peers whose verdict unanswered probes do not change

	// Counters, for tests and debug logs.
	missedProbes atomic.Uint64 // probes unanswered within their timeout
	malformed    atomic.Uint64 // protocol 4 packets that got past the filter but are no probe
	answered     atomic.Uint64 // requests answered
	rateLimited  atomic.Uint64 // requests not answered because of MaxRepliesPerSecond
}

// peerState is one peer's verdict and the probes in flight to it.
type peerState struct {
	verdict
	due         time.Time   // when the next probe goes out
	inFlight    []probeSent // oldest first
	srtt        time.Duration
	lastSendErr error
	lastICMP    string // ICMP error a probe to this peer drew since its last answer
}

// probeSent is a probe not answered yet: waiting for its timeout, or
// missed and waiting for a late answer.
type probeSent struct {
	nonce  uint64
	sentAt time.Time
	missed bool
}

// timeout is how long a probe to this peer may go unanswered before it
// counts as missed: four smoothed round trips, within [min, maxTimeout].
func (st *peerState) timeout(floor time.Duration) time.Duration {
	return max(floor, min(4*st.srtt, maxTimeout))
}

// interval is the wait before the next probe: short while the last one
// went unanswered on a path not known blocked, so that FailAfter misses
// take a fraction of a second; long while answers come, and for a path
// known blocked (getting back needs RecoverAfter answers at the normal
// pace: a flaky path does not flap).
func (st *peerState) interval(cfg Config) time.Duration {
	if st.misses > 0 && (st.works || !st.wasBlocked) {
		return cfg.FastInterval
	}
	return cfg.Interval
}

const reasonWaiting = "waiting for the first answer over IP protocol 4"

// Start opens the raw protocol 4 socket on cfg.Local in the calling thread's
// network namespace and runs the responder and the prober until ctx is done.
// It needs CAP_NET_RAW.
func Start(ctx context.Context, cfg Config) (*Prober, error) {
	if !cfg.Local.Is4() {
		return nil, fmt.Errorf("probe: Local must be an IPv4 underlay address, got %q", cfg.Local)
	}
	if cfg.Interval <= 0 {
		cfg.Interval = DefaultInterval
	}
	if cfg.FastInterval <= 0 {
		cfg.FastInterval = min(DefaultFastInterval, cfg.Interval)
	}
	if cfg.MinTimeout <= 0 {
		cfg.MinTimeout = DefaultMinTimeout
	}
	if cfg.FailAfter <= 0 {
		cfg.FailAfter = DefaultFailAfter
	}
	if cfg.RecoverAfter <= 0 {
		cfg.RecoverAfter = DefaultRecoverAfter
	}
	if cfg.MaxRepliesPerSecond <= 0 {
		cfg.MaxRepliesPerSecond = DefaultMaxRepliesPerSecond
	}
	log := cfg.Logger
	if log == nil {
		log = slog.Default()
	}
	log = log.With("component", "ipip-probe", "local", cfg.Local)

	conn, err := net.ListenIP("ip4:4", &net.IPAddr{IP: cfg.Local.AsSlice()})
	switch {
	case errors.Is(err, os.ErrPermission):
		return nil, fmt.Errorf("probe: opening a raw IP protocol 4 socket on %s needs CAP_NET_RAW: %w", cfg.Local, err)
	case errors.Is(err, unix.EADDRNOTAVAIL):
		return nil, fmt.Errorf("probe: %s is not an address of this host: %w", cfg.Local, err)
	case err != nil:
		return nil, fmt.Errorf("probe: opening a raw IP protocol 4 socket on %s: %w", cfg.Local, err)
	}
	if err := setSocketOptions(conn); err != nil {
		conn.Close()
		return nil, fmt.Errorf("probe: setting up the raw socket: %w", err)
	}

	p := &Prober{
		cfg:     cfg,
		log:     log,
		conn:    conn,
		changes: make(chan struct{}, 1),
		kick:    make(chan struct{}, 1),
		done:    make(chan struct{}),
		peers:   make(map[netip.Addr]*peerState),
		saved:   loadVerdicts(cfg.StateFile, log),
		held:    map[netip.Addr]bool{},
	}
	var loops sync.WaitGroup
	loops.Add(2)
	go func() { defer loops.Done(); p.receiveLoop() }()
	go func() { defer loops.Done(); p.probeLoop(ctx) }()
	go func() {
		<-ctx.Done()
		conn.Close() // ends receiveLoop
		loops.Wait()
		close(p.done)
	}()
	log.Info("probing IP protocol 4 paths", "interval", cfg.Interval, "fast_interval", cfg.FastInterval, "fail_after", cfg.FailAfter, "recover_after", cfg.RecoverAfter)
	return p, nil
}

// setSocketOptions attaches the magic filter and asks for ICMP errors, which
// tell a blocked path ("unreachable") from a peer without responder.
func setSocketOptions(conn *net.IPConn) error {
	raw, err := conn.SyscallConn()
	if err != nil {
		return err
	}
	filter := magicFilter()
	prog := unix.SockFprog{Len: uint16(len(filter)), Filter: unsafe.SliceData(filter)}
	var serr error
	if err := raw.Control(func(fd uintptr) {
		serr = unix.SetsockoptSockFprog(int(fd), unix.SOL_SOCKET, unix.SO_ATTACH_FILTER, &prog)
		if serr == nil {
			serr = unix.SetsockoptInt(int(fd), unix.IPPROTO_IP, unix.IP_RECVERR, 1)
		}
	}); err != nil {
		return err
	}
	return serr
}

// Done is closed when the prober has stopped after its context ended.
func (p *Prober) Done() <-chan struct{} { return p.done }

// Changes is signalled whenever a peer's verdict (IPIPWorks) changes.
// Signals are coalesced: after one, read the state of all peers.
func (p *Prober) Changes() <-chan struct{} { return p.changes }

// SetPeers sets the peers to probe: those whose host can do IPIP. New peers
// are probed at once; peers not listed are forgotten.
func (p *Prober) SetPeers(peers []netip.Addr) {
	now := time.Now()
	want := make(map[netip.Addr]bool, len(peers))
	for _, a := range peers {
		a = a.Unmap()
		if a.Is4() && a != p.cfg.Local {
			want[a] = true
		}
	}
	added := false
	p.mu.Lock()
	for a := range p.peers {
		if !want[a] {
			delete(p.peers, a)
		}
	}
	for a := range want {
		if p.peers[a] == nil {
			st := &peerState{verdict: verdict{reason: reasonWaiting, since: now}, due: now}
			if works, ok := p.saved[a]; ok {
				// Start from the previous run's verdict; probes go on as
				// usual and change it only as they would have.
				st.works, st.wasBlocked = works, !works
				st.reason = "verdict kept from before the restart"
				delete(p.saved, a)
			}
			p.peers[a] = st
			added = true
		}
	}
	p.mu.Unlock()
	if added {
		select {
		case p.kick <- struct{}{}:
		default:
		}
	}
}

// Hold freezes the verdicts of peers: unanswered probes do not change them.
// A peer whose fabricd restarts answers no probe for a few seconds although
// its path still carries IP protocol 4; its BGP session being down says so,
// and holding its verdict keeps it from flipping to VXLAN and back. Peers
// not listed are released.
func (p *Prober) Hold(peers []netip.Addr) {
	p.mu.Lock()
	defer p.mu.Unlock()
	next := map[netip.Addr]bool{}
	for _, a := range peers {
		a = a.Unmap()
		next[a] = true
		if st := p.peers[a]; st != nil && !p.held[a] {
			p.log.Info("peer not in session: holding its IPIP verdict", "peer", a, "works", st.works)
		}
	}
	for a := range p.held {
		if st := p.peers[a]; st != nil && !next[a] {
			st.misses = 0 // count afresh now that it answers again
		}
	}
	p.held = next
}

// IPIPWorks reports whether IPIP to peer is known to work. It is false for a
// peer until its first answer, so a new peer starts on VXLAN.
func (p *Prober) IPIPWorks(peer netip.Addr) bool {
	works, _, _ := p.State(peer)
	return works
}

// State reports the verdict for peer, why, and since when it holds.
func (p *Prober) State(peer netip.Addr) (works bool, reason string, since time.Time) {
	p.mu.Lock()
	defer p.mu.Unlock()
	st := p.peers[peer.Unmap()]
	if st == nil {
		return false, "not probed: not a peer that supports IPIP", time.Time{}
	}
	return st.works, st.reason, st.since
}

func (p *Prober) signalChange() {
	p.saveVerdicts()
	select {
	case p.changes <- struct{}{}:
	default:
	}
}

// probeLoop sends each peer a probe when it is due, and counts the previous
// one as missed if it is still unanswered by then.
func (p *Prober) probeLoop(ctx context.Context) {
	timer := time.NewTimer(0)
	defer timer.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-p.kick:
		case <-timer.C:
		}
		next := p.probeDue(time.Now())
		timer.Reset(time.Until(next))
	}
}

type outgoing struct {
	peer  netip.Addr
	nonce uint64
}

// probeDue counts the probes whose timeout passed unanswered, probes the
// peers that are due, and returns when something is due next.
func (p *Prober) probeDue(now time.Time) time.Time {
	var send []outgoing
	changed := false
	next := now.Add(p.cfg.Interval)

	p.mu.Lock()
	for peer, st := range p.peers {
		timeout := st.timeout(p.cfg.MinTimeout)
		for i := range st.inFlight {
			f := &st.inFlight[i]
			if f.missed {
				continue
			}
			if expiry := f.sentAt.Add(timeout); expiry.After(now) {
				next = earlier(next, expiry)
				continue
			}
			f.missed = true
			if p.missed(peer, st, now) {
				changed = true
			}
		}
		st.inFlight = slices.DeleteFunc(st.inFlight, func(f probeSent) bool { return f.missed && now.Sub(f.sentAt) > lateAnswer })
		if st.due.After(now) {
			next = earlier(next, st.due)
			continue
		}
		nonce := rand.Uint64()
		if len(st.inFlight) >= maxInFlight {
			st.inFlight = st.inFlight[1:]
		}
		st.inFlight = append(st.inFlight, probeSent{nonce: nonce, sentAt: now})
		st.due = now.Add(st.interval(p.cfg))
		next = earlier(next, st.due)
		next = earlier(next, now.Add(timeout))
		send = append(send, outgoing{peer, nonce})
	}
	p.mu.Unlock()

	for _, o := range send {
		err := p.send(o.peer, message{typ: msgRequest, sender: p.cfg.Local, nonce: o.nonce})
		if err != nil {
			p.log.Debug("sending probe failed", "peer", o.peer, "err", err)
		}
		p.mu.Lock()
		if st := p.peers[o.peer]; st != nil {
			st.lastSendErr = err
		}
		p.mu.Unlock()
	}
	if changed {
		p.signalChange()
	}
	return next
}

func earlier(a, b time.Time) time.Time {
	if b.Before(a) {
		return b
	}
	return a
}

// missed counts an unanswered probe; it reports whether the verdict changed.
// Called with p.mu held.
func (p *Prober) missed(peer netip.Addr, st *peerState, now time.Time) bool {
	p.missedProbes.Add(1)
	if p.held[peer] {
		return false // the peer itself is away, not the path
	}
	var why string
	switch {
	case st.lastSendErr != nil:
		why = fmt.Sprintf("sending: %v", st.lastSendErr)
	case st.lastICMP != "":
		why = st.lastICMP
	}
	before := st.interval(p.cfg)
	change := st.miss(why, now, p.thresholds())
	if after := st.interval(p.cfg); after < before {
		st.due = earlier(st.due, now.Add(after)) // probe again at the fast pace now
	}
	switch change {
	case nowBlocked:
		p.log.Warn("IPIP path to peer blocked, using VXLAN", "peer", peer, "reason", st.reason)
		return true
	case stillBlocked:
		p.log.Warn("IPIP path to peer blocked, staying on VXLAN", "peer", peer, "reason", st.reason)
	}
	return false
}

func (p *Prober) thresholds() thresholds {
	return thresholds{failAfter: p.cfg.FailAfter, recoverAfter: p.cfg.RecoverAfter}
}

// handleReply counts an answer from peer to one of its probes in flight,
// missed ones included: a late answer still proves the path.
func (p *Prober) handleReply(peer netip.Addr, nonce uint64, now time.Time) {
	p.mu.Lock()
	st := p.peers[peer]
	i := -1
	if st != nil {
		i = slices.IndexFunc(st.inFlight, func(f probeSent) bool { return f.nonce == nonce })
	}
	if i < 0 {
		p.mu.Unlock()
		return // unknown sender, answered already, too old, or forged
	}
	rtt := now.Sub(st.inFlight[i].sentAt)
	st.inFlight = slices.Delete(st.inFlight, i, i+1)
	if st.srtt == 0 {
		st.srtt = rtt
	} else {
		st.srtt += (rtt - st.srtt) / 8
	}
	st.lastICMP = ""
	changed := st.answer(rtt, now, p.thresholds())
	if changed {
		p.log.Info("IPIP path to peer works, using IPIP", "peer", peer, "reason", st.reason)
	}
	p.mu.Unlock()
	if changed {
		p.signalChange()
	}
}

// receiveLoop answers requests and hands replies to handleReply until the
// socket is closed.
func (p *Prober) receiveLoop() {
	limiter := newTokenBucket(p.cfg.MaxRepliesPerSecond)
	buf := make([]byte, 2048)
	for {
		n, src, err := p.conn.ReadFromIP(buf) // the kernel's outer header is already stripped
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			// With IP_RECVERR an ICMP error for one of our probes
			// surfaces as a read error; the details wait in the error queue.
			if p.readICMPErrors() == 0 {
				p.log.Debug("receiving probe failed", "err", err)
				time.Sleep(10 * time.Millisecond) // don't spin on a persistent error
			}
			continue
		}
		now := time.Now()
		from, ok := netip.AddrFromSlice(src.IP)
		from = from.Unmap()
		m, err := parseMessage(buf[:n])
		// The sender must be the packet's source: we only ever answer the
		// source address, and a mismatch means a confused or forged probe.
		if !ok || err != nil || m.sender != from {
			p.malformed.Add(1)
			continue
		}
		switch m.typ {
		case msgRequest:
			// Answer everyone: a peer may know us before we know it.
			if !limiter.allow(now) {
				p.rateLimited.Add(1)
				continue
			}
			if err := p.send(from, message{typ: msgReply, sender: p.cfg.Local, nonce: m.nonce}); err != nil {
				p.log.Debug("answering probe failed", "peer", from, "err", err)
				continue
			}
			p.answered.Add(1)
		case msgReply:
			p.handleReply(from, m.nonce, now)
		}
	}
}

// readICMPErrors drains the socket's error queue and notes each ICMP error
// with the peer the failed probe went to. It returns how many it read.
func (p *Prober) readICMPErrors() int {
	raw, err := p.conn.SyscallConn()
	if err != nil {
		return 0
	}
	count := 0
	buf := make([]byte, 256)
	oob := make([]byte, 512)
	raw.Read(func(fd uintptr) bool {
		for {
			_, oobn, _, from, err := unix.Recvmsg(int(fd), buf, oob, unix.MSG_ERRQUEUE|unix.MSG_DONTWAIT)
			if err != nil {
				return true
			}
			count++
			to, ok := from.(*unix.SockaddrInet4) // where the failed probe went
			if !ok {
				continue
			}
			msgs, _ := unix.ParseSocketControlMessage(oob[:oobn])
			for _, m := range msgs {
				if m.Header.Level == unix.IPPROTO_IP && m.Header.Type == unix.IP_RECVERR {
					p.noteICMP(netip.AddrFrom4(to.Addr), m.Data)
				}
			}
		}
	})
	return count
}

// noteICMP records an ICMP error (struct sock_extended_err, then the
// offender's address) for the peer a probe was sent to.
func (p *Prober) noteICMP(peer netip.Addr, data []byte) {
	const errLen = int(unsafe.Sizeof(unix.SockExtendedErr{}))
	if len(data) < errLen {
		return
	}
	ee := (*unix.SockExtendedErr)(unsafe.Pointer(&data[0]))
	if ee.Origin != unix.SO_EE_ORIGIN_ICMP {
		return
	}
	from := "?"
	if len(data) >= errLen+8 { // sockaddr_in: family, port, address
		from = netip.AddrFrom4([4]byte(data[errLen+4 : errLen+8])).String()
	}
	var what string
	switch {
	case ee.Type == 3 && ee.Code == 2 && from == peer.String():
		what = from + " answered ICMP protocol unreachable: neither ipip nor fabricd listens there"
	case ee.Type == 3 && (ee.Code == 9 || ee.Code == 10 || ee.Code == 13):
		what = from + " answered ICMP administratively prohibited: a firewall rejects IP protocol 4"
	default:
		what = fmt.Sprintf("%s answered ICMP type %d code %d", from, ee.Type, ee.Code)
	}
	p.mu.Lock()
	if st := p.peers[peer]; st != nil {
		st.lastICMP = what
	}
	p.mu.Unlock()
	p.log.Debug("probe drew an ICMP error", "peer", peer, "icmp", what)
}

func (p *Prober) send(to netip.Addr, m message) error {
	_, err := p.conn.WriteToIP(m.marshal(), &net.IPAddr{IP: to.AsSlice()})
	return err
}

// tokenBucket allows rate events per second, in bursts of up to rate.
type tokenBucket struct {
	rate   float64
	tokens float64
	last   time.Time
}

func newTokenBucket(perSecond int) *tokenBucket {
	return &tokenBucket{rate: float64(perSecond), tokens: float64(perSecond)}
}

func (b *tokenBucket) allow(now time.Time) bool {
	if !b.last.IsZero() {
		b.tokens = min(b.rate, b.tokens+now.Sub(b.last).Seconds()*b.rate)
	}
	b.last = now
	if b.tokens < 1 {
		return false
	}
	b.tokens--
	return true
}

func millis(d time.Duration) string {
	return fmt.Sprintf("%.2f ms", float64(d)/float64(time.Millisecond))
}

func plural(n int, one, many string) string {
	if n == 1 {
		return one
	}
	return many
}

// loadVerdicts reads the verdicts a previous run saved; a missing or
// unreadable file means starting without them.
func loadVerdicts(path string, log *slog.Logger) map[netip.Addr]bool {
	out := map[netip.Addr]bool{}
	if path == "" {
		return out
	}
	data, err := os.ReadFile(path)
	if err != nil {
		if !errors.Is(err, os.ErrNotExist) {
			log.Warn("cannot read saved probe verdicts; probing from scratch", "file", path, "err", err)
		}
		return out
	}
	var saved map[netip.Addr]bool
	if err := json.Unmarshal(data, &saved); err != nil {
		log.Warn("saved probe verdicts are malformed; probing from scratch", "file", path, "err", err)
		return out
	}
	log.Info("starting from the probe verdicts of the previous run", "file", path, "peers", len(saved))
	return saved
}

// saveVerdicts writes every peer's verdict to the state file, atomically.
func (p *Prober) saveVerdicts() {
	if p.cfg.StateFile == "" {
		return
	}
	p.mu.Lock()
	verdicts := map[netip.Addr]bool{}
	for a, st := range p.peers {
		verdicts[a] = st.works
	}
	p.mu.Unlock()
	data, _ := json.Marshal(verdicts)
	tmp := p.cfg.StateFile + ".tmp"
	err := os.MkdirAll(filepath.Dir(tmp), 0o755)
	if err == nil {
		err = os.WriteFile(tmp, data, 0o644)
	}
	if err == nil {
		err = os.Rename(tmp, p.cfg.StateFile)
	}
	if err != nil {
		p.log.Warn("cannot save probe verdicts; a restart will probe from scratch", "file", p.cfg.StateFile, "err", err)
	}
}
