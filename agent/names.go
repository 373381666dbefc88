package agent

import (
	"context"
	"net/netip"
	"time"

	"github.com/fabricnet/fabric/dockerwatch"
	"github.com/fabricnet/fabric/fabricdns"
	"github.com/fabricnet/fabric/internal/latest"
	"github.com/fabricnet/fabric/names"
	"github.com/fabricnet/fabric/policy"
)

// containerNamesLoop publishes the names of the containers on this host's
// bridge, as the local dockerd reports them, under the node TTL's lease.
func (a *Agent) containerNamesLoop(ctx context.Context, pub *names.Publisher, docker <-chan dockerwatch.Snapshot) error {
	log := a.log.With("component", "names")
	lists := make(chan []names.Record, 1)
	go func() {
		defer close(lists)
		for snap := range docker {
			var rs []names.Record
			for _, c := range snap.Containers {
				if c.Addr.IsValid() {
					rs = append(rs, names.Record{Name: c.Name, Address: c.Addr, AddressV6: c.AddrV6, Node: a.cfg.NodeName, ID: c.ID, Labels: c.Labels, Created: c.Created})
				}
				for _, n := range c.Networks {
					rs = append(rs, names.Record{Name: c.Name, Address: n.Addr, AddressV6: n.AddrV6, Node: a.cfg.NodeName, ID: c.ID, Labels: c.Labels, Created: c.Created,
						Network: n.Network, Aliases: n.Aliases})
				}
			}
			latest.Put(lists, rs)
			log.Debug("containers on the bridge and on fabric networks", "records", len(rs))
		}
	}()
	return pub.Run(ctx, lists)
}

// fanOut hands every snapshot of in to two readers, the newest winning for
// each.
func fanOut[T any](ctx context.Context, in <-chan T) (<-chan T, <-chan T) {
	a, b := make(chan T, 1), make(chan T, 1)
	go func() {
		defer close(a)
		defer close(b)
		for {
			select {
			case <-ctx.Done():
				return
			case v, ok := <-in:
				if !ok {
					return
				}
				latest.Put(a, v)
				latest.Put(b, v)
			}
		}
	}()
	return a, b
}

// dnsLoop answers <container>.<domain> on the bridge gateway from the
// trusted view namesViewLoop keeps, and forwards other names to the host's
// resolvers. It keeps trying to listen: the gateway address may not be on
// the bridge yet, or another server may hold port 53 there for a while.
func (a *Agent) dnsLoop(ctx context.Context, srv *fabricdns.Server) error {
	backoff := time.Second
	for {
		err := srv.Run(ctx)
		if ctx.Err() != nil {
			return nil
		}
		a.log.Error("cannot answer container names; retrying", "component", "dns", "err", err, "in", backoff)
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(backoff):
		}
		backoff = min(2*backoff, 30*time.Second)
	}
}

// namesViewLoop follows the directory of container names; with the leases
// the main loop keeps (a.in.held, nil until etcd answered: nothing trusted),
// the records whose address lies in their own node's lease (names.Trusted)
// go to the DNS responder (srv, nil without container DNS) and to policy's
// container and label selectors. Each refusal is logged once.
func (a *Agent) namesViewLoop(ctx context.Context, srv *fabricdns.Server) error {
	log := a.log.With("component", "names")
	records := names.Watch(ctx, a.etcd, a.cfg.EtcdPrefix, log)
	var rs []names.Record
	recordsKnown := false
	logged := map[string]string{}
	for {
		select {
		case <-ctx.Done():
			return nil
		case r, ok := <-records:
			if !ok {
				return nil
			}
			rs, recordsKnown = r, true
		case <-a.wake.names:
		}
		a.in.mu.Lock()
		held, nets, netsKnown := a.in.held, a.in.networks.State, a.in.networksKnown
		a.in.mu.Unlock()
		kept, refused := names.Trusted(rs, held, nets.Owns)
		kept, refusedV6 := names.TrustIPv6(kept, a.pool.SubnetsV6(held), nets.Owns)
		refused = append(refused, refusedV6...)
		seen := map[string]bool{}
		for _, r := range refused {
			key := r.Record.Node + "/" + r.Record.Name
			seen[key] = true
			if held != nil && (netsKnown || r.Record.Network == "") && logged[key] != r.Reason {
				logged[key] = r.Reason
				log.Warn("not answering a container name (or its IPv6 address): the address is not its node's", "node", r.Record.Node, "name", r.Record.Name, "address", r.Record.Address, "reason", r.Reason)
			}
		}
		for key := range logged {
			if !seen[key] {
				delete(logged, key)
			}
		}
		if srv != nil {
			subnets := map[string]netip.Prefix{}
			for name, n := range nets.Networks {
				subnets[name] = n.Subnet
			}
			srv.SetView(names.NewView(kept, subnets))
		}
		containers := make([]policy.Container, 0, len(kept))
		for _, r := range kept {
			containers = append(containers, policy.Container{Name: r.Name, Address: r.Address, AddressV6: r.AddressV6, Labels: r.Labels})
		}
		a.in.mu.Lock()
		a.in.containers = containers
		a.in.containersKnown = recordsKnown && held != nil
		a.in.containerRefusals = len(refused)
		a.in.mu.Unlock()
		a.kickPolicy()
		kick(a.wake.nat) // ports published to a container follow its IPv6 address
	}
}
