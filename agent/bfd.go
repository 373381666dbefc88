package agent

// BFD with the BGP peers: a fabric host or router that goes silent is
// found within bfdMultiplier × bfdInterval, not the BGP hold time, and its
// routes go at once instead of being kept for a graceful restart.

import (
	"context"
	"fmt"
	"net/netip"
	"time"

	"github.com/fabricnet/fabric/bfd"
	"github.com/fabricnet/fabric/internal/echo"
	"github.com/fabricnet/fabric/planner"
	"github.com/fabricnet/fabric/registry"
)

// echoTiming is how long a fabric host whose BFD went silent has to answer
// ICMP echo, and how often it is asked: its kernel answers within a
// millisecond or two when it lives, so four tries over 200 ms tell
// "fabricd restarting" from "host or path dead". An operator who chose a
// slower BFD interval (a busy or distant host) gives the kernel as long as
// one interval: a host slow enough to miss BFD packets must not lose its
// routes because its echo reply was slow too.
func (a *Agent) echoTiming() (gap, wait time.Duration) {
	wait = max(200*time.Millisecond, a.cfg.BFDInterval)
	return wait / 4, wait
}

// startBFD opens the BFD sockets (bfdInterval 0: none).
func (a *Agent) startBFD() error {
	if a.cfg.BFDInterval == 0 {
		return nil
	}
	s, err := bfd.Listen(a.underlay.Addr, bfd.Port, a.log.With("component", "bfd"))
	if err != nil {
		return fmt.Errorf("%w (is another BFD daemon running on this host? bfdInterval: 0 runs fabricd without BFD)", err)
	}
	a.own.bfd = s
	return nil
}

// setPeers makes the BGP peers, and the BFD sessions, those of the node set.
func (a *Agent) setPeers(ctx context.Context, nodes []registry.Node) error {
	peers := a.desiredPeers(nodes)
	if a.own.bfd != nil {
		cfg := bfd.Config{Interval: a.cfg.BFDInterval, Multiplier: uint8(a.cfg.BFDMultiplier)}
		byAddr := map[netip.Addr]planner.BFDPeer{}
		var sessions []bfd.Peer
		for _, p := range planner.BFDPeers(peers, a.cfg.Peers) {
			byAddr[p.Addr] = p
			sessions = append(sessions, bfd.Peer{Addr: p.Addr, Config: cfg})
		}
		a.in.mu.Lock()
		a.in.bfdPeers = byAddr
		a.in.mu.Unlock()
		a.own.bfd.SetPeers(sessions)
	}
	return a.own.speaker.SetPeers(ctx, peers)
}

// bfdLoop runs the sessions and acts on each failure of one that was up.
func (a *Agent) bfdLoop(ctx context.Context) error {
	s := a.own.bfd
	if s == nil {
		return nil
	}
	go s.Run(ctx)
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-s.Changed():
		}
		for _, c := range s.Changes() {
			if c.Failed() {
				// The echo takes up to a BFD interval; other failures
				// must not wait for it.
				go a.bfdFailed(ctx, c)
			}
		}
	}
}

// bfdFailed drops the routes of a peer whose BFD session failed, unless it
// is a fabric host whose kernel still answers: then only its fabricd is
// away (a crash, a restart without AdminDown), the kernel forwards, and
// graceful restart keeps its routes as it should.
func (a *Agent) bfdFailed(ctx context.Context, c bfd.Change) {
	a.in.mu.Lock()
	peer, ok := a.in.bfdPeers[c.Peer]
	a.in.mu.Unlock()
	if !ok {
		return // no longer a peer
	}
	log := a.log.With("component", "bfd", "peer", peer.Name, "address", c.Peer, "diag", c.Diag.String())
	if peer.FabricHost {
		gap, wait := a.echoTiming()
		alive, err := echo.Answers(ctx, a.underlay.Addr, c.Peer, gap, wait)
		switch {
		case err != nil:
			// Unable to ask: keep the routes; BGP's hold time and the node
			// record decide, as without BFD.
			log.Error("bfd session failed and its kernel cannot be asked; keeping its routes for BGP to decide", "err", err)
			bfdFailures.WithLabelValues("unknown").Inc()
			return
		case alive:
			log.Info("bfd session failed but the host's kernel answers: its fabricd is restarting; graceful restart keeps its routes")
			bfdFailures.WithLabelValues("kept").Inc()
			return
		}
	}
	if a.bfdUp(c.Peer) {
		return // back while we asked
	}
	if err := a.own.speaker.DropRoutes(ctx, c.Peer); err != nil {
		log.Error("bfd session failed; cannot drop the peer's routes", "err", err)
		return
	}
	bfdFailures.WithLabelValues("dropped").Inc()
	log.Warn("bfd session failed and the peer does not answer: dropped its routes", "after", time.Since(c.At).Round(time.Millisecond))
}

func (a *Agent) bfdUp(addr netip.Addr) bool {
	for _, st := range a.own.bfd.Status() {
		if st.Peer == addr {
			return st.State == bfd.Up
		}
	}
	return false
}

// bfdStatus is the BFD side of each peer for fabricctl and metrics.
func (a *Agent) bfdStatus() map[netip.Addr]bfd.Status {
	out := map[netip.Addr]bfd.Status{}
	if a.own.bfd == nil {
		return out
	}
	for _, st := range a.own.bfd.Status() {
		out[st.Peer] = st
	}
	return out
}
