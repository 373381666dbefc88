package agent

// From BGP best paths and node records to the data plane: which routes the
// kernel should hold, which learned routes are refused, and the loop that
// applies them.

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"slices"
	"sort"
	"time"

	"github.com/fabricnet/fabric/bgp"
	"github.com/fabricnet/fabric/dataplane"
	"github.com/fabricnet/fabric/registry"
)

func (a *Agent) kickDataplane() {
	select {
	case a.kick <- struct{}{}:
	default:
	}
}

// desiredRoutes turns the BGP best paths into data-plane routes, attaching
// what the registry knows about the peer that owns each next hop.
func (a *Agent) desiredRoutes() []dataplane.RemoteRoute {
	a.mu.Lock()
	nodes, routes, converged := a.nodes, a.bgpRoutes, a.converged
	var keep []registry.Node
	if !converged {
		for _, n := range nodes {
			up, ok := a.establishedAt[n.Name]
			if a.keptAtStart[n.Subnet] && (!ok || !settled(up)) {
				keep = append(keep, n)
			}
		}
	}
	a.mu.Unlock()
	byAddr := map[netip.Addr]registry.Node{}
	for _, n := range nodes {
		byAddr[n.Address] = n
	}
	var out []dataplane.RemoteRoute
	seen := map[netip.Prefix]bool{}
	for _, r := range routes {
		// Our own subnet (or a piece of it) is on the bridge; a covering
		// route such as a top-of-rack default is fine, the kernel prefers
		// the connected /24.
		if (r.Prefix.Overlaps(a.lease.Subnet) && r.Prefix.Bits() >= a.lease.Subnet.Bits()) || r.NextHop == a.underlay.Addr {
			continue
		}
		rr := dataplane.RemoteRoute{Prefix: r.Prefix, NextHop: r.NextHop, PeerName: r.PeerName}
		n, toNode := byAddr[r.NextHop]
		if why := a.refuseRoute(r, toNode); why != "" {
			a.warnOnce("route/"+r.Prefix.String()+"/"+r.NextHop.String(), "ignoring BGP route", "prefix", r.Prefix, "nexthop", r.NextHop, "peer", r.PeerName, "problem", why)
			continue
		}
		if toNode {
			rr.PeerName = n.Name
			rr.Peer = peerInfo(n)
		}
		seen[r.Prefix] = true
		out = append(out, rr)
	}
	// Keep routes that were in the kernel at start until their peer's
	// session is back.
	for _, n := range keep {
		if n.Name == a.cfg.NodeName || !n.Subnet.IsValid() || seen[n.Subnet] {
			continue
		}
		out = append(out, dataplane.RemoteRoute{Prefix: n.Subnet, NextHop: n.Address, PeerName: n.Name, Peer: peerInfo(n)})
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Prefix.String() < out[j].Prefix.String() })
	return out
}

// refuseRoute says why a learned route must not reach the kernel, or "".
// A route through a tunnel may only lead into the pool: anything else (the
// underlay, a peer's own address) would send the tunnel's outer packets into
// the tunnel. No route may take over this host's own underlay segment.
func (a *Agent) refuseRoute(r bgp.Route, toNode bool) string {
	if toNode && (!a.pool.Network.Contains(r.Prefix.Addr()) || r.Prefix.Bits() < a.pool.Network.Bits()) {
		return fmt.Sprintf("its next hop is a fabric host, so it would be tunnelled, but %s is outside the pool %s", r.Prefix, a.pool.Network)
	}
	u := a.underlay.Prefix
	if r.Prefix.Overlaps(u) && r.Prefix.Bits() >= u.Bits() {
		return fmt.Sprintf("it would take over this host's underlay segment %s", u)
	}
	return ""
}

func peerInfo(n registry.Node) *dataplane.PeerInfo {
	mac, _ := net.ParseMAC(n.VTEPMAC)
	return &dataplane.PeerInfo{Name: n.Name, Address: n.Address, VTEPMAC: mac, Encaps: slices.Clone(n.Encaps), Subnet: n.Subnet}
}

// dataplaneLoop applies the desired routes on every change and on the resync
// timer (drift repair). Apply is idempotent and cheap when nothing changed.
func (a *Agent) dataplaneLoop(ctx context.Context) error {
	t := time.NewTicker(a.cfg.Resync)
	defer t.Stop()
	retry, lastErr := 2*time.Second, ""
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-a.kick:
		case <-t.C:
		}
		a.mu.Lock()
		ready := a.nodesKnown
		a.mu.Unlock()
		if !ready {
			continue
		}
		desired := a.desiredRoutes()
		start := time.Now()
		err := a.dp.Apply(ctx, desired)
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
		}
	}
}

// protoProber hands the dataplane the probe's verdicts; without ipip support
// there is nothing to probe.
func (a *Agent) protoProber() dataplane.ProtoProber {
	if a.prober == nil {
		return nil
	}
	return a.prober
}

func (a *Agent) proberChanges() <-chan struct{} {
	if a.prober == nil {
		return nil
	}
	return a.prober.Changes()
}

// ipipPeers are the other hosts whose kernels can do ipip: the ones worth
// probing.
func ipipPeers(nodes []registry.Node, self string) []netip.Addr {
	var out []netip.Addr
	for _, n := range nodes {
		if n.Name != self && slices.Contains(n.Encaps, "ipip") {
			out = append(out, n.Address)
		}
	}
	return out
}
