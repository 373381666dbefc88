package agent

import (
	"context"
	"net/netip"
	"reflect"
	"time"

	"github.com/fabricnet/fabric/planner"
)

func (a *Agent) host() planner.Host {
	return planner.Host{Name: a.cfg.NodeName, ASN: a.cfg.ASN, Underlay: netip.PrefixFrom(a.underlay.Addr, a.underlay.Prefix.Bits()),
		Subnet: a.lease.Subnet, Pool: a.pool.Network, SubnetV6: a.subnetV6(), PoolV6: a.pool, UnderlayV6: a.underlay.V6,
		Imports: planner.Imports(a.cfg.Peers), WireGuardKey: a.wireGuardKey()}
}

// ownSubnets are this host's subnet and, with an IPv6 pool, its IPv6 one.
func (a *Agent) ownSubnets() []netip.Prefix {
	if s := a.subnetV6(); s.IsValid() {
		return []netip.Prefix{a.lease.Subnet, s}
	}
	return []netip.Prefix{a.lease.Subnet}
}

// subnetV6 is this host's IPv6 subnet, invalid when the pool has no IPv6.
func (a *Agent) subnetV6() netip.Prefix {
	s, _ := a.pool.SubnetV6(a.lease.Subnet)
	return s
}

// warnRefused logs each refusal the first time it is seen, not on every update.
func (a *Agent) warnRefused(refused []planner.Refusal) {
	for _, r := range refused {
		a.in.mu.Lock()
		seen := a.warned[r.Key]
		a.warned[r.Key] = true
		a.in.mu.Unlock()
		if seen {
			continue
		}
		if r.What == "node record" {
			a.log.Warn("ignoring node record", "node", r.Name, "key", a.cfg.EtcdPrefix+"/nodes/"+r.Name, "problem", r.Why)
		} else {
			a.log.Warn("ignoring BGP route", "route", r.Name, "problem", r.Why)
		}
	}
}

// refreshNodes recomputes the node set the agent works with (the planner's
// Nodes) and hands it to BGP, the prober, the data plane and policy when it
// changed. It runs only on the main loop, which owns a.departed and
// a.nodesRecheck.
func (a *Agent) refreshNodes(ctx context.Context) {
	// In session: established. A host whose record expired and whose session
	// is down is dead, not restarting: a restarting fabricd keeps its record
	// alive (it writes it again on start, within nodeTTL), so graceful
	// restart must not keep a dead host's routes for the whole restart time.
	inSession := map[string]bool{}
	if peers, err := a.own.speaker.Peers(ctx); err == nil {
		for _, p := range peers {
			inSession[p.Name] = p.Up()
		}
	}
	a.in.mu.Lock()
	reg, held, prev, known, networksKnown := a.in.registryNodes, a.in.held, a.in.nodes, a.in.nodesKnown, a.in.networksKnown
	a.in.mu.Unlock()
	if reg == nil || held == nil || !networksKnown {
		return // the node set is known only once records, leases and networks are read
	}

	accepted, refused := planner.AcceptNodes(a.host(), reg, held)
	a.warnRefused(refused)
	set := planner.Nodes(a.host(), accepted, prev, a.departed, inSession, a.cfg.SubnetTTL, time.Now())
	a.departed, a.nodesRecheck = set.Departed, set.Recheck
	for _, e := range set.Events {
		a.log.Info(e)
	}
	if known && reflect.DeepEqual(prev, set.Nodes) {
		return
	}
	// The prober first: the data plane may apply as soon as the node set is
	// known, and a peer the prober does not know yet counts as "no IPIP"
	// (after a restart its saved verdict is only taken up by SetPeers).
	if a.own.prober != nil {
		a.own.prober.SetPeers(ipipPeers(set.Nodes, a.cfg.NodeName))
	}
	a.in.mu.Lock()
	a.in.nodes = set.Nodes
	a.in.nodesKnown = true
	a.in.mu.Unlock()
	if err := a.setPeers(ctx, set.Nodes); err != nil {
		a.log.Error("set BGP peers", "err", err)
	} else {
		a.in.mu.Lock()
		a.in.peersKnown = true
		a.in.mu.Unlock()
	}
	a.kickDataplane()
	a.kickPolicy()
}
