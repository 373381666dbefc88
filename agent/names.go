package agent

import (
	"context"
	"time"

	"github.com/fabricnet/fabric/dockerwatch"
	"github.com/fabricnet/fabric/fabricdns"
	"github.com/fabricnet/fabric/internal/latest"
	"github.com/fabricnet/fabric/names"
	"github.com/fabricnet/fabric/policy"
)

// containerNamesLoop publishes the names of the containers on this host's
// bridge, as the local dockerd reports them, under the node TTL's lease.
func (a *Agent) containerNamesLoop(ctx context.Context, pub *names.Publisher) error {
	log := a.log.With("component", "names")
	containers := dockerwatch.Watch(ctx, a.cfg.DockerSocket, a.lease.Subnet, log)
	lists := make(chan []names.Record, 1)
	go func() {
		defer close(lists)
		for cs := range containers {
			rs := make([]names.Record, 0, len(cs))
			for _, c := range cs {
				rs = append(rs, names.Record{Name: c.Name, Address: c.Addr, Node: a.cfg.NodeName, ID: c.ID, Labels: c.Labels, Created: c.Created})
			}
			latest.Put(lists, rs)
			log.Debug("containers on the bridge", "count", len(rs))
		}
	}()
	return pub.Run(ctx, lists)
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
// the main loop keeps (a.held, nil until etcd answered: nothing trusted),
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
		case <-a.namesKick:
		}
		a.mu.Lock()
		held := a.held
		a.mu.Unlock()
		kept, refused := names.Trusted(rs, held)
		seen := map[string]bool{}
		for _, r := range refused {
			key := r.Record.Node + "/" + r.Record.Name
			seen[key] = true
			if held != nil && logged[key] != r.Reason {
				logged[key] = r.Reason
				log.Warn("not answering a container name: its address is not its node's", "node", r.Record.Node, "name", r.Record.Name, "address", r.Record.Address, "reason", r.Reason)
			}
		}
		for key := range logged {
			if !seen[key] {
				delete(logged, key)
			}
		}
		if srv != nil {
			srv.SetView(names.NewView(kept))
		}
		containers := make([]policy.Container, 0, len(kept))
		for _, r := range kept {
			containers = append(containers, policy.Container{Name: r.Name, Address: r.Address, Labels: r.Labels})
		}
		a.mu.Lock()
		a.containers = containers
		a.containersKnown = recordsKnown && held != nil
		a.containerRefusals = len(refused)
		a.mu.Unlock()
		a.kickPolicy()
	}
}
