package agent

import (
	"context"
	"fmt"
	"net/netip"
	"time"

	"github.com/fabricnet/fabric/backend/encaps"
	"github.com/fabricnet/fabric/bridge"
	"github.com/fabricnet/fabric/dockernet"
	"github.com/fabricnet/fabric/flowoffload"
	"github.com/fabricnet/fabric/nat"
	"github.com/fabricnet/fabric/planner"
	"github.com/fabricnet/fabric/policy"
	"github.com/fabricnet/fabric/publish"
)

// natLoop renders MASQUERADE and the published ports on every change of the
// published ports in etcd; the iptables owner's Maintain repairs deleted
// rules within seconds, and the tick here gives new bridge ports hairpin.
func (a *Agent) natLoop(ctx context.Context) error {
	pubs := publish.Watch(ctx, a.etcd, a.cfg.EtcdPrefix, a.log.With("component", "publish"))
	hairpin := time.NewTicker(2 * time.Second)
	defer hairpin.Stop()
	var tunnels []string
	for _, b := range a.own.backends {
		tunnels = append(tunnels, b.Device())
	}
	st := nat.State{Pool: a.pool.Network, Subnet: a.lease.Subnet, PoolV6: a.pool.NetworkV6, SubnetV6: a.subnetV6(), Bridge: a.cfg.Bridge, Node: a.cfg.NodeName,
		UnderlayDev: a.underlay.Dev, Tunnels: tunnels, EndpointLinks: dockernet.LinkPrefix + "+",
		Reserved: nat.Reserved{
			fmt.Sprintf("tcp/%d", a.cfg.BGPPort):   "this host's BGP port",
			fmt.Sprintf("udp/%d", a.cfg.VXLANPort): "this host's VXLAN port",
		}}
	if a.cfg.Encryption != encaps.EncryptionOff {
		st.Reserved[fmt.Sprintf("udp/%d", a.cfg.WireGuardPort)] = "this host's WireGuard port"
	}
	networksKnown := false
	apply := func() {
		if !networksKnown {
			return // rendered without the networks, their containers' rules would go for a moment
		}
		if err := a.own.nat.Apply(ctx, st); err != nil {
			natApplyErrors.Inc()
			a.log.Error("apply NAT rules", "err", err)
		}
		a.repairHairpin(st)
	}
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-hairpin.C:
			a.repairHairpin(st)
		case p, ok := <-pubs:
			if !ok {
				return nil
			}
			st.Publishes = p
			apply()
		case <-a.wake.nat:
			a.in.mu.Lock()
			nets, known, containers := a.in.networks, a.in.networksKnown, a.in.containers
			a.in.mu.Unlock()
			st.Networks, st.LocalPorts = planner.NetworkNAT(nets)
			networksKnown = known // MASQUERADE does not wait for the published ports
			st.AddressesV6 = addressesV6(containers)
			apply()
		}
	}
}

// flowOffloadState is what the flowtable covers: connections inside the
// pools between the bridge and the tunnel devices, the packets
// FABRIC-ESTABLISHED would accept.
func (a *Agent) flowOffloadState() flowoffload.State {
	st := flowoffload.State{Pools: []netip.Prefix{a.pool.Network, a.pool.NetworkV6}, Devices: []string{a.cfg.Bridge}}
	for _, b := range a.own.backends {
		st.Devices = append(st.Devices, b.Device())
	}
	return st
}

// addressesV6 maps each container's IPv4 address to its IPv6 one, for
// publishing its ports over IPv6 too.
func addressesV6(containers []policy.Container) map[netip.Addr]netip.Addr {
	out := map[netip.Addr]netip.Addr{}
	for _, c := range containers {
		if c.AddressV6.IsValid() {
			out[c.Address] = c.AddressV6
		}
	}
	return out
}

// policyLoop compiles the fabric's policy for this host's subnet and enforces
// it. It recompiles when the policy or the node set changes (a rule naming a
// node follows that node's lease) and repairs drift on a timer.
func (a *Agent) policyLoop(ctx context.Context) error {
	policies := policy.WatchPolicy(ctx, a.etcd, a.cfg.EtcdPrefix, a.log.With("component", "policy"))
	// Changes wake the loop; the timer only backs them up (rules deleted
	// by hand are the iptables owner's to repair, every 2 s).
	repair := time.NewTicker(a.cfg.Resync)
	defer repair.Stop()
	var current *policy.Policy
	for {
		select {
		case <-ctx.Done():
			return nil
		case p, ok := <-policies:
			if !ok {
				return nil
			}
			current = &p
		case <-a.wake.policy:
		case <-repair.C:
		}
		if current == nil {
			continue
		}
		a.in.mu.Lock()
		dir := policy.Directory{Nodes: map[string]netip.Prefix{}, NodesV6: map[string]netip.Prefix{}, Containers: a.in.containers,
			Pool: a.pool.Network, PoolV6: a.pool.NetworkV6, Networks: map[string]netip.Prefix{}, NetworksV6: map[string]netip.Prefix{}}
		for _, n := range a.in.nodes {
			dir.Nodes[n.Name] = n.Subnet
			dir.NodesV6[n.Name] = n.SubnetV6 // checked on import: its /24's pair
		}
		for name, n := range a.in.networks.State.Networks {
			dir.Networks[name] = n.Subnet
			if n.SubnetV6.IsValid() {
				dir.NetworksV6[name] = n.SubnetV6
			}
		}
		containersKnown, networksKnown := a.in.containersKnown, a.in.networksKnown
		a.in.mu.Unlock()
		if !networksKnown {
			continue // without the networks there is no isolation between them: wait
		}
		dir.Nodes[a.cfg.NodeName] = a.lease.Subnet
		dir.NodesV6[a.cfg.NodeName] = a.subnetV6()
		if !containersKnown && policy.UsesContainers(current.Rules) {
			// Compiled without the containers, a deny rule by label would
			// match nothing: keep what is in force until they are known.
			continue
		}
		rs, err := policy.Compile(current.Rules, current.DefaultAction, dir, a.lease.Subnet, a.subnetV6())
		if err != nil {
			policyApplyErrors.Inc()
			a.log.Error("compile policy; keeping the rules in force", "err", err)
			continue
		}
		for _, w := range rs.Warnings {
			a.log.Warn("policy", "warning", w)
		}
		if err := a.own.policy.Apply(ctx, rs); err != nil {
			policyApplyErrors.Inc()
			a.log.Error("enforce policy", "err", err)
		}
	}
}

func (a *Agent) kickPolicy() {
	kick(a.wake.policy)
	kick(a.wake.ingress)
}

// ingressLoop keeps the set of fabric hosts allowed to send tunnel packets
// in step with the node set, and repairs it on a timer.
func (a *Agent) ingressLoop(ctx context.Context) error {
	repair := time.NewTicker(10 * time.Second)
	defer repair.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-a.wake.ingress:
		case <-repair.C:
		}
		a.in.mu.Lock()
		known := a.in.nodesKnown
		var addrs []netip.Addr
		for _, n := range a.in.nodes {
			addrs = append(addrs, n.Address)
		}
		a.in.mu.Unlock()
		if !known {
			continue // no node set yet: keep what the kernel has
		}
		if err := a.own.ingress.Apply(ctx, addrs); err != nil {
			a.log.Error("limit tunnel ingress to fabric hosts", "err", err)
		}
	}
}

// repairHairpin gives the bridge's ports hairpin mode while NAT needs it;
// failing it only loses a container reaching its own published port.
func (a *Agent) repairHairpin(st nat.State) {
	if !nat.NeedsHairpin(st) {
		return
	}
	if err := bridge.Hairpin(nil, st.Bridge); err != nil {
		a.log.Warn("cannot enable hairpin on bridge ports; a container cannot reach its own published port", "bridge", st.Bridge, "err", err)
	}
}
