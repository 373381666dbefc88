package agent

// Docker networks on the fabric: the plugin endpoint dockerd calls, the
// sync of the fabric's networks with the local dockerd, and what they hand
// to the rest of fabricd (routes, advertised blocks, rules, names).

import (
	"context"
	"fmt"
	"net/netip"
	"time"

	"github.com/vishvananda/netlink"
	clientv3 "go.etcd.io/etcd/client/v3"
	"golang.org/x/sys/unix"

	"github.com/fabricnet/fabric/dockernet"
	"github.com/fabricnet/fabric/dockerplugin"
	"github.com/fabricnet/fabric/dockerwatch"
	"github.com/fabricnet/fabric/planner"
)

// networksLoop serves dockerd's plugin calls and keeps the networks in
// step; every change of the local picture goes to the loops that use it.
// Without a plugin socket (Docker networks off) the picture is empty, and
// known at once.
func (a *Agent) networksLoop(ctx context.Context, docker <-chan dockerwatch.Snapshot) error {
	if a.cfg.DockerPluginSocket == "" {
		a.setNetworks(ctx, dockernet.Local{Node: a.cfg.NodeName})
		return nil
	}
	log := a.log.With("component", "networks")
	store := dockernet.NewStore(a.etcd, a.cfg.EtcdPrefix)
	driver := dockernet.NewDriver(dockernet.Host{
		Node:       a.cfg.NodeName,
		Pool:       a.pool.Network,
		PoolV6:     a.pool.NetworkV6,
		Underlay:   a.underlay.Prefix,
		UnderlayV6: a.underlay.V6.Masked(),
		MTU:        a.own.dataplane.MTU(),
		Lease: func() clientv3.LeaseID {
			l, _ := a.ipamMgr.Lease()
			return l.LeaseID
		},
		Routes: foreignRoutes(a.cfg.RouteProtocol),
	}, store, dockernet.NewLinks(nil), log)
	go func() {
		if err := dockerplugin.Serve(ctx, a.cfg.DockerPluginSocket, driver, log); err != nil {
			log.Error("cannot serve Docker's network plugin API: `docker network create -d fabric` will fail on this host", "socket", a.cfg.DockerPluginSocket, "err", err)
		}
	}()
	sync := dockernet.NewSync(driver, dockerwatch.New(a.cfg.DockerSocket), log)
	go sync.Run(ctx, store.Watch(ctx, log), docker, min(a.cfg.Resync, 10*time.Second))
	for {
		select {
		case <-ctx.Done():
			return nil
		case local := <-sync.Out():
			a.setNetworks(ctx, local)
		}
	}
}

// setNetworks hands a new picture of the networks on: this host's blocks
// to BGP, routes to the data plane, subnets and ports to NAT and policy,
// and the trust of names.
func (a *Agent) setNetworks(ctx context.Context, local dockernet.Local) {
	a.in.mu.Lock()
	a.in.networks, a.in.networksKnown = local, true
	a.in.mu.Unlock()
	advertise, _ := planner.NetworkRoutes(local)
	if err := a.own.speaker.Advertise(ctx, a.nextHops(), append(a.ownSubnets(), advertise...)...); err != nil {
		a.log.Error("advertise network blocks", "err", err)
	}
	a.kickDataplane()
	a.kickPolicy()
	kick(a.wake.nat)
	kick(a.wake.names)
	kick(a.wake.mesh) // the mesh waits for the networks' blocks to be advertised
}

// foreignRoutes lists the kernel's routes that are not fabric's, which a new
// network's subnet must not shadow.
func foreignRoutes(protocol int) func() (map[netip.Prefix]string, error) {
	return func() (map[netip.Prefix]string, error) {
		routes, err := netlink.RouteListFiltered(unix.AF_UNSPEC, &netlink.Route{Table: unix.RT_TABLE_MAIN}, netlink.RT_FILTER_TABLE)
		if err != nil {
			return nil, err
		}
		out := map[netip.Prefix]string{}
		for _, r := range routes {
			if int(r.Protocol) == protocol || r.Dst == nil || r.Dst.IP.IsLinkLocalUnicast() || r.Dst.IP.IsMulticast() {
				continue
			}
			addr, ok := netip.AddrFromSlice(r.Dst.IP)
			ones, _ := r.Dst.Mask.Size()
			if !ok {
				continue
			}
			what := "route"
			if link, err := netlink.LinkByIndex(r.LinkIndex); err == nil {
				what = "on " + link.Attrs().Name
			}
			out[netip.PrefixFrom(addr.Unmap(), ones).Masked()] = fmt.Sprintf("%s, protocol %d", what, r.Protocol)
		}
		return out, nil
	}
}
