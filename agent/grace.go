package agent

// The start-up grace: routes present in the kernel when fabricd starts stay
// until their peers' sessions are back, so an agent restart does not flap them.

import (
	"context"
	"net/netip"
	"time"
)

// rememberStartRoutes notes the owned routes already in the kernel, which the
// start-up grace keeps until their peers are back.
func (a *Agent) rememberStartRoutes() {
	a.keptAtStart = map[netip.Prefix]bool{}
	a.establishedAt = map[string]time.Time{}
	a.graceUntil = time.Now().Add(2*a.cfg.HoldTime + 5*time.Second)
	if a.dp == nil {
		return
	}
	owned, err := a.dp.Owned()
	if err != nil {
		a.log.Warn("read owned routes at start", "err", err)
		return
	}
	for _, r := range owned {
		a.keptAtStart[r.Prefix] = true
	}
	if len(owned) > 0 {
		a.log.Info("keeping routes found in the kernel until their peers are back", "routes", len(owned), "until", a.graceUntil.Format(time.RFC3339))
	}
}

// checkConverged records which peers have established since start and
// reports whether the start-up grace period is over: every mesh peer came
// up, or graceUntil has passed.
func (a *Agent) checkConverged(ctx context.Context) bool {
	peers, err := a.speaker.Peers(ctx)
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.converged {
		return true
	}
	all := err == nil && len(a.nodes) > 0
	for _, p := range peers {
		if p.State == "established" {
			up, ok := a.establishedAt[p.Name]
			if !ok {
				a.establishedAt[p.Name] = time.Now()
				all = false
			} else if !settled(up) {
				all = false
			}
		} else {
			all = false
		}
	}
	if all || time.Now().After(a.graceUntil) {
		a.converged = true
		a.log.Info("start-up grace over; BGP alone decides routes from now on", "allEstablished", all)
	}
	return a.converged
}

// sessionSettle is how long a session must have been up before the grace
// stops keeping its peer's route: a session just established may not have
// sent its UPDATE yet.
const sessionSettle = 3 * time.Second

// settled reports whether a session established at up has had time to send
// its routes.
func settled(up time.Time) bool { return time.Since(up) >= sessionSettle }
