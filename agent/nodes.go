package agent

import (
	"context"
	"fmt"
	"net/netip"
	"reflect"
	"sort"
	"time"

	"github.com/fabricnet/fabric/registry"
)

// departedNode is a host whose node record is gone from etcd while its BGP
// session is still up. Its record may only have expired because that host,
// or etcd, is cut off from etcd for a while; its data plane still works, so
// the mesh keeps it until its session drops.
type departedNode struct {
	node  registry.Node
	since time.Time
}

// acceptNodes drops node records that would break the mesh for everyone:
// one bad record must not stop this host from peering with the others.
func (a *Agent) acceptNodes(ns []registry.Node) []registry.Node {
	owner := map[netip.Addr]string{}
	var out []registry.Node
	for _, n := range ns {
		if n.Name == a.cfg.NodeName {
			out = append(out, n)
			continue
		}
		var why string
		switch {
		case n.ASN != a.cfg.ASN:
			why = fmt.Sprintf("its ASN %d differs from this host's %d; mesh peers share one ASN", n.ASN, a.cfg.ASN)
		case !n.Address.Is4() || !n.Address.IsGlobalUnicast():
			why = fmt.Sprintf("its address %v cannot be a peer", n.Address)
		case n.Address == a.underlay.Addr:
			why = fmt.Sprintf("it claims this host's underlay address %s", n.Address)
		case owner[n.Address] != "":
			why = fmt.Sprintf("node %s already has address %s", owner[n.Address], n.Address)
		}
		if why != "" {
			a.warnOnce("node/"+n.Name+"/"+why, "ignoring node record", "node", n.Name, "key", a.cfg.EtcdPrefix+"/nodes/"+n.Name, "problem", why)
			continue
		}
		owner[n.Address] = n.Name
		out = append(out, n)
	}
	return out
}

// warnOnce logs a problem the first time it is seen, not on every update.
func (a *Agent) warnOnce(key, msg string, args ...any) {
	a.mu.Lock()
	seen := a.warned[key]
	a.warned[key] = true
	a.mu.Unlock()
	if !seen {
		a.log.Warn(msg, args...)
	}
}

// refreshNodes recomputes the node set the agent works with, the registry's
// valid records plus departed hosts whose sessions are still up, and hands it
// to BGP, the prober, the data plane and policy when it changed. It runs only
// on the main loop, which owns a.departed.
func (a *Agent) refreshNodes(ctx context.Context) {
	established := map[string]bool{}
	if peers, err := a.speaker.Peers(ctx); err == nil {
		for _, p := range peers {
			established[p.Name] = p.State == "established"
		}
	}
	a.mu.Lock()
	reg, prev, known := a.registryNodes, a.nodes, a.nodesKnown
	a.mu.Unlock()

	valid := a.acceptNodes(reg)
	inRegistry := map[string]bool{}
	for _, n := range valid {
		inRegistry[n.Name] = true
	}
	now := time.Now()
	for _, n := range prev {
		if _, kept := a.departed[n.Name]; !inRegistry[n.Name] && !kept && n.Name != a.cfg.NodeName && established[n.Name] {
			a.departed[n.Name] = departedNode{node: n, since: now}
			a.log.Info("node record gone from etcd; keeping the peer while its BGP session is up", "node", n.Name)
		}
	}
	effective := valid
	for name, d := range a.departed {
		switch {
		case inRegistry[name]:
			delete(a.departed, name)
		case !established[name] || now.Sub(d.since) > a.cfg.SubnetTTL:
			delete(a.departed, name)
			a.log.Info("departed node's session is down; removing the peer", "node", name)
		default:
			effective = append(effective, d.node)
		}
	}
	sort.Slice(effective, func(i, j int) bool { return effective[i].Name < effective[j].Name })
	if known && reflect.DeepEqual(prev, effective) {
		return
	}
	a.mu.Lock()
	a.nodes = effective
	a.nodesKnown = true
	a.mu.Unlock()
	if err := a.speaker.SetPeers(ctx, a.desiredPeers(effective)); err != nil {
		a.log.Error("set BGP peers", "err", err)
	}
	if a.prober != nil {
		a.prober.SetPeers(ipipPeers(effective, a.cfg.NodeName))
	}
	a.kickDataplane()
	a.kickPolicy()
}
