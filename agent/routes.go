package agent

// From BGP best paths and node records to the data plane: which routes the
// kernel should hold, which learned routes are refused, and the loop that
// applies them.

import (
	"context"
	"net/netip"
	"slices"
	"time"

	"github.com/fabricnet/fabric/dataplane"
	"github.com/fabricnet/fabric/ipip"
	"github.com/fabricnet/fabric/planner"
	"github.com/fabricnet/fabric/registry"
)

func (a *Agent) kickDataplane() { kick(a.wake.dataplane) }

// kick wakes the loop that reads ch; a wake-up already pending covers this
// one too.
func kick(ch chan struct{}) {
	select {
	case ch <- struct{}{}:
	default:
	}
}

// bgpRoutesLoop hands each new set of BGP best paths to the data plane.
func (a *Agent) bgpRoutesLoop(ctx context.Context) error {
	routes := a.own.speaker.Routes()
	for {
		select {
		case <-ctx.Done():
			return nil
		case rs, ok := <-routes:
			if !ok {
				return nil
			}
			a.in.mu.Lock()
			a.in.bgpRoutes = rs
			a.in.mu.Unlock()
			a.kickDataplane()
		}
	}
}

// desiredRoutes asks the planner which routes the kernel should hold now:
// the routes to other hosts, and the local ones of Docker networks.
func (a *Agent) desiredRoutes() ([]dataplane.RemoteRoute, []dataplane.LocalRoute) {
	a.in.mu.Lock()
	nodes, routes, grace, nets := a.in.nodes, a.in.bgpRoutes, a.in.grace, a.in.networks
	a.in.mu.Unlock()
	out, refused := planner.Routes(a.host(), nodes, routes, grace, planner.NetworkOwnership(nets.State))
	a.warnRefused(refused)
	_, local := planner.NetworkRoutes(nets)
	return out, local
}

// dataplaneLoop applies the desired routes on every change, against the data
// plane's view of the kernel, and on the resync timer against the kernel
// itself (drift repair). Apply is idempotent and cheap when nothing changed.
func (a *Agent) dataplaneLoop(ctx context.Context) error {
	t := time.NewTicker(a.cfg.Resync)
	defer t.Stop()
	retry, lastErr := 2*time.Second, ""
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-a.wake.dataplane:
		case <-t.C:
			a.own.dataplane.Reread() // drift repair: compare with the kernel itself, not the view
		}
		a.in.mu.Lock()
		ready := a.in.nodesKnown
		a.in.mu.Unlock()
		if !ready {
			continue
		}
		desired, local := a.desiredRoutes()
		start := time.Now()
		err := a.own.dataplane.Apply(ctx, desired, local...)
		dataplaneApplySeconds.Observe(time.Since(start).Seconds())
		if err != nil {
			dataplaneApplyErrors.Inc()
			// Retry sooner than the resync, backing off: some errors clear
			// (a device being recreated), others last until the input
			// changes (a route another owner holds) and must not spin.
			if msg := err.Error(); msg != lastErr {
				a.log.Error("apply data plane", "err", err, "retryIn", retry)
				lastErr = msg
			}
			time.AfterFunc(retry, a.kickDataplane)
			retry = min(2*retry, time.Minute)
		} else {
			retry, lastErr = 2*time.Second, ""
			a.in.mu.Lock()
			a.in.dataplaneApplied = true
			a.in.mu.Unlock()
		}
	}
}

func (a *Agent) proberChanges() <-chan struct{} {
	if a.own.prober == nil {
		return nil
	}
	return a.own.prober.Changes()
}

// probeHoldLoop keeps the probe from judging the path to a peer whose BGP
// session is down: that peer's fabricd is away (restarting, say), so its
// probes go unanswered although IP protocol 4 still passes.
func (a *Agent) probeHoldLoop(ctx context.Context) error {
	if a.own.prober == nil {
		return nil
	}
	sessions := a.own.speaker.WatchSessions()
	var retry <-chan time.Time
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-sessions:
		case <-retry:
		}
		retry = nil
		peers, err := a.own.speaker.Peers(ctx)
		if err != nil {
			a.log.Warn("probe: cannot read the BGP sessions to hold the probes of peers that are away; trying again", "err", err, "in", time.Second)
			retry = time.After(time.Second)
			continue
		}
		var away []netip.Addr
		for _, p := range peers {
			if p.Type.FabricHost() && !p.Up() {
				away = append(away, p.Address)
			}
		}
		a.own.prober.Hold(away)
	}
}

// ipipPeers are the other hosts whose kernels can do ipip: the ones worth
// probing.
func ipipPeers(nodes []registry.Node, self string) []netip.Addr {
	var out []netip.Addr
	for _, n := range nodes {
		if n.Name != self && slices.Contains(n.Encaps, ipip.Name) {
			out = append(out, n.Address)
		}
	}
	return out
}
