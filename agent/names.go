package agent

import (
	"context"
	"log/slog"
	"net/netip"
	"time"

	"github.com/fabricnet/fabric/dockerwatch"
	"github.com/fabricnet/fabric/fabricdns"
	"github.com/fabricnet/fabric/ipam"
	"github.com/fabricnet/fabric/names"
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
			select { // newest wins
			case <-lists:
			default:
			}
			lists <- rs
			log.Debug("containers on the bridge", "count", len(rs))
		}
	}()
	return pub.Run(ctx, lists)
}

// dnsLoop answers <container>.<domain> on the bridge gateway from the
// fabric-wide directory, and forwards other names to the host's resolvers.
// It keeps trying to listen: the gateway address may not be on the bridge
// yet, or another server may hold port 53 there for a while.
func (a *Agent) dnsLoop(ctx context.Context) error {
	log := a.log.With("component", "dns")
	srv, err := fabricdns.New(fabricdns.Config{
		Listen: netip.AddrPortFrom(a.lease.Gateway(), 53),
		Domain: a.cfg.DNSDomain,
		Pool:   a.pool.Network,
		Logger: log,
	})
	if err != nil {
		return err
	}
	go a.followNames(ctx, srv, log)
	backoff := time.Second
	for {
		err := srv.Run(ctx)
		if ctx.Err() != nil {
			return nil
		}
		log.Error("cannot answer container names; retrying", "err", err, "in", backoff)
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(backoff):
		}
		backoff = min(2*backoff, 30*time.Second)
	}
}

// followNames keeps the responder's view: the directory's records whose
// address lies in their own node's lease (names.Trusted), each refusal
// logged once.
func (a *Agent) followNames(ctx context.Context, srv *fabricdns.Server, log *slog.Logger) {
	records := names.Watch(ctx, a.etcd, a.cfg.EtcdPrefix, log)
	leases := ipam.Watch(ctx, a.etcd, a.cfg.EtcdPrefix, log)
	var rs []names.Record
	var held ipam.Holdings // nil until etcd answers: nothing trusted
	logged := map[string]string{}
	for {
		select {
		case r, ok := <-records:
			if !ok {
				return
			}
			rs = r
		case h, ok := <-leases:
			if !ok {
				return
			}
			held = h
		}
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
		srv.SetView(names.NewView(kept))
	}
}
