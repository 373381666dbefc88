package agent

// The start-up grace (planner.Grace): routes present in the kernel when
// fabricd starts stay until their peers' sessions are back, so an agent
// restart does not flap them.

import (
	"context"
	"net/netip"
	"time"

	"github.com/fabricnet/fabric/planner"
)

// rememberStartRoutes notes the owned routes already in the kernel, which the
// start-up grace keeps until their peers are back.
func (a *Agent) rememberStartRoutes() {
	// A peer that never comes back keeps what it had for as long as the
	// other hosts keep its routes under graceful restart.
	a.in.grace = planner.Grace{
		Until:       time.Now().Add(max(2*a.cfg.HoldTime+5*time.Second, a.cfg.GracefulRestartTime)),
		KeptAtStart: map[netip.Prefix]netip.Addr{},
	}
	if a.own.dataplane == nil {
		return
	}
	owned, err := a.own.dataplane.Owned()
	if err != nil {
		a.log.Warn("read owned routes at start", "err", err)
		return
	}
	for _, r := range owned {
		a.in.grace.KeptAtStart[r.Prefix] = r.Via
	}
	if len(owned) > 0 {
		a.log.Info("keeping routes found in the kernel until their peers are back", "routes", len(owned), "until", a.in.grace.Until.Format(time.RFC3339))
	}
}

// graceLoop checks every second whether the start-up grace is over; during
// it the kept set shrinks as sessions come up, so the data plane re-applies.
func (a *Agent) graceLoop(ctx context.Context) error {
	t := time.NewTicker(time.Second)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
		}
		over := a.checkConverged(ctx)
		a.kickDataplane()
		if over {
			return nil
		}
	}
}

// checkConverged feeds the peers' session states to the grace and reports
// whether it is over; then the speaker stops telling new peers it restarts.
func (a *Agent) checkConverged(ctx context.Context) bool {
	// Read before the peer list: once true, the list has every peer.
	a.in.mu.Lock()
	peersKnown := a.in.peersKnown
	a.in.mu.Unlock()
	peers, err := a.own.speaker.Peers(ctx)
	if err != nil {
		return false
	}
	var syncs []planner.PeerSync
	for _, p := range peers {
		syncs = append(syncs, planner.PeerSync{Name: p.Name, Established: p.Up(),
			GracefulRestart: p.GracefulRestart, EndOfRIB: p.EndOfRIB})
	}
	a.in.mu.Lock()
	wasOver := a.in.grace.Over
	a.in.grace = a.in.grace.Observe(syncs, peersKnown, time.Now())
	over := a.in.grace.Over
	a.in.mu.Unlock()
	if over && !wasOver {
		a.own.speaker.EndRestart()
		a.log.Info("start-up grace over: every peer has sent its routes (or the wait ended); BGP alone decides routes from now on")
	}
	return over
}
