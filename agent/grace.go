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
	a.grace = planner.Grace{
		Until:         time.Now().Add(2*a.cfg.HoldTime + 5*time.Second),
		KeptAtStart:   map[netip.Prefix]bool{},
		EstablishedAt: map[string]time.Time{},
	}
	if a.dp == nil {
		return
	}
	owned, err := a.dp.Owned()
	if err != nil {
		a.log.Warn("read owned routes at start", "err", err)
		return
	}
	for _, r := range owned {
		a.grace.KeptAtStart[r.Prefix] = true
	}
	if len(owned) > 0 {
		a.log.Info("keeping routes found in the kernel until their peers are back", "routes", len(owned), "until", a.grace.Until.Format(time.RFC3339))
	}
}

// checkConverged feeds the peers' session states to the grace and reports
// whether it is over.
func (a *Agent) checkConverged(ctx context.Context) bool {
	peers, err := a.speaker.Peers(ctx)
	var established []string
	all := err == nil
	for _, p := range peers {
		if p.State == "established" {
			established = append(established, p.Name)
		} else {
			all = false
		}
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.grace.Over {
		return true
	}
	a.grace = a.grace.Observe(established, all && len(a.nodes) > 0, time.Now())
	if a.grace.Over {
		a.log.Info("start-up grace over; BGP alone decides routes from now on", "allEstablished", all)
	}
	return a.grace.Over
}
