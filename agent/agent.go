// Package agent wires fabricd together: the lease from ipam, the node record
// in the registry, the BGP speaker, the data plane and the host side. Each
// concern keeps its own reconcile loop; the agent hands values between them.
package agent

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/coreos/go-systemd/v22/daemon"
	"github.com/vishvananda/netlink"
	clientv3 "go.etcd.io/etcd/client/v3"
	"golang.org/x/sys/unix"

	"github.com/fabricnet/fabric/backend"
	"github.com/fabricnet/fabric/backend/encaps"
	"github.com/fabricnet/fabric/bfd"
	"github.com/fabricnet/fabric/bgp"
	"github.com/fabricnet/fabric/bridge"
	"github.com/fabricnet/fabric/config"
	"github.com/fabricnet/fabric/dataplane"
	"github.com/fabricnet/fabric/dockernet"
	"github.com/fabricnet/fabric/dockeropts"
	"github.com/fabricnet/fabric/dockerwatch"
	"github.com/fabricnet/fabric/fabricdns"
	"github.com/fabricnet/fabric/flowoffload"
	"github.com/fabricnet/fabric/ingress"
	"github.com/fabricnet/fabric/internal/etcdclient"
	"github.com/fabricnet/fabric/internal/ipsets"
	"github.com/fabricnet/fabric/ipam"
	"github.com/fabricnet/fabric/ipip"
	"github.com/fabricnet/fabric/iptables"
	"github.com/fabricnet/fabric/localapi"
	"github.com/fabricnet/fabric/names"
	"github.com/fabricnet/fabric/nat"
	"github.com/fabricnet/fabric/planner"
	"github.com/fabricnet/fabric/policy"
	"github.com/fabricnet/fabric/probe"
	"github.com/fabricnet/fabric/registry"
	"github.com/fabricnet/fabric/version"
	"github.com/fabricnet/fabric/wireguard"
)

// Agent is one running fabricd, drawn as the design is: what this host is
// (its lease and underlay), its inputs (snapshots the watchers hand in),
// the pure decisions of the planner, and the owners that apply them, each
// of one kind of kernel object. The loops meet only through in (under its
// mutex) and wake (a wake-up says "an input you use changed: decide again").
type Agent struct {
	cfg     *config.Config
	log     *slog.Logger
	etcd    *clientv3.Client
	started time.Time

	// What this host is, fixed once fabricd runs.
	underlay underlay
	pool     ipam.Pool
	lease    ipam.Lease
	ipamMgr  *ipam.Manager
	ipipOK   bool          // this kernel can run ipip: answer peers' probes
	kinds    []encaps.Kind // the encapsulations this host runs

	in   inputs
	wake wakeups
	own  owners

	warned map[string]bool // refusals already logged (under in.mu)

	// Main loop only.
	ownRecordSeen bool // our record was seen with our address
	departed      map[string]planner.Departed
	nodesRecheck  time.Time // when the node set changes with time alone; zero: never
	leaveRequest  chan struct{}
}

// inputs are the newest snapshots of what the watchers report, each
// replaced whole.
type inputs struct {
	mu sync.Mutex
	// registryNodes are the records in etcd; nodes is what the agent works
	// with: the valid records plus departed hosts still in session.
	registryNodes []registry.Node
	held          ipam.Holdings // subnets leased to each node; nil until etcd's first answer
	nodes         []registry.Node
	// nodesKnown turns true with the registry's first snapshot; before it
	// the data plane is not touched, since a route set computed without
	// node records would sweep every route fabricd installed before a restart.
	nodesKnown bool
	// peersKnown turns true once the speaker has the peers of a known
	// node set: before it, a speaker with no peers has not been told of
	// them yet (seen in the qemu guest: the start-up grace ended on an
	// empty peer list and dropped a kept route for 0.9 s).
	peersKnown bool
	bgpRoutes  []bgp.Route
	grace      planner.Grace
	// containers are the fabric's containers whose records passed
	// names.Trusted, for policy's container and label selectors;
	// containersKnown turns true once etcd answered for records and leases.
	containers      []policy.Container
	containersKnown bool
	// containerRefusals counts the refused records of the last view, for
	// metrics (the trusted ones are containers).
	containerRefusals int
	// networks is the Docker networks' picture (dockernet.Sync); until it
	// is known the data plane and the mesh wait, so a restart keeps the
	// endpoints' routes and advertises their blocks before sessions form.
	networks      dockernet.Local
	networksKnown bool
	// dataplaneApplied turns true with the first data-plane apply that
	// succeeded: /readyz.
	dataplaneApplied bool
	// bfdPeers are the peers with BFD sessions, by address.
	bfdPeers map[netip.Addr]planner.BFDPeer
}

// wakeups wake the loop that reads each (see kick): an input it decides
// from changed.
type wakeups struct {
	dataplane chan struct{} // routes, nodes, networks or probe verdicts
	policy    chan struct{} // nodes, containers or networks
	ingress   chan struct{} // nodes
	nat       chan struct{} // networks (their subnets and published ports)
	names     chan struct{} // leases or networks: recheck container records
	mesh      chan struct{} // the networks are known: the mesh may form
}

func newWakeups() wakeups {
	w := func() chan struct{} { return make(chan struct{}, 1) }
	return wakeups{dataplane: w(), policy: w(), ingress: w(), nat: w(), names: w(), mesh: w()}
}

// owners apply the decisions, each the one writer of its kind of kernel
// object (or of the BGP speaker's paths and peers).
type owners struct {
	speaker   *bgp.Speaker
	dataplane *dataplane.Manager // routes with fabric's protocol
	backends  []backend.Backend  // each its tunnel device and per-peer entries
	prober    *probe.Prober      // nil without ipip support
	tables    *iptables.Manager  // every FABRIC- chain and jump
	tables6   *iptables.Manager  // the same in the IPv6 tables; nil without IPv6
	nat       *nat.Manager       // renders NAT and forwarding for tables
	policy    *policy.IptablesEnforcer
	ingress   *ingress.Limiter
	bfd       *bfd.Server         // nil with BFD off
	record    *registry.Heartbeat // this host's node record
}

// Run starts fabricd and blocks until ctx is cancelled or `fabricctl leave`
// asks it to. A cancel is a restart (see stopForRestart): nothing is
// withdrawn and peers keep this host's routes under graceful restart; with
// graceful restart off, and on leave or a lost lease, the subnet and node
// record are withdrawn at once (see leave). Kernel state stays either way.
func Run(ctx context.Context, cfg *config.Config, log *slog.Logger) error {
	a := &Agent{cfg: cfg, log: log, started: time.Now(), wake: newWakeups(), leaveRequest: make(chan struct{}, 1),
		departed: map[string]planner.Departed{}, warned: map[string]bool{}}
	cli, err := etcdclient.New(cfg.EtcdEndpoints, cfg.EtcdTLSFiles(), cfg.EtcdTimeout, quietZap())
	if err != nil {
		return err // names the endpoints, or the TLS file and its problem
	}
	defer cli.Close()
	a.etcd = cli

	if a.underlay, err = findUnderlay(cfg.UnderlayInterface, cfg.UnderlayAddr); err != nil {
		return err
	}
	log.Info("underlay", "device", a.underlay.Dev, "address", a.underlay.Addr, "mtu", a.underlay.MTU)

	// Before anything is taken from etcd or the kernel.
	if err := localapi.CheckFree(cfg.SocketPath()); err != nil {
		return err
	}
	if err := a.detectKernel(); err != nil {
		return err
	}
	if err := a.acquireLease(ctx); err != nil {
		return err
	}
	if a.ipipOK {
		// The prober answers peers' probes in every mode and decides per
		// peer in auto mode whether IP protocol 4 passes.
		if a.own.prober, err = probe.Start(ctx, probe.Config{
			Local:        a.underlay.Addr,
			Interval:     cfg.ProbeInterval,
			FastInterval: cfg.ProbeInterval / 8,
			MinTimeout:   cfg.ProbeInterval / 4,
			StateFile:    cfg.ProbeStatePath(),
			Logger:       log.With("component", "probe"),
		}); err != nil {
			return err
		}
	}
	if err := a.checkIPv6(); err != nil {
		return err
	}
	if err := a.setupDataplane(); err != nil {
		return err
	}
	// One owner for every iptables table; it writes nothing until nat,
	// policy and ingress have all said what they want, so a restart keeps
	// the previous run's rules, policy included, until then.
	if a.own.tables, err = iptables.New(iptables.Config{Sections: []string{nat.Section, policy.Section, ingress.Section}, Logger: log}); err != nil {
		return err
	}
	// IPv6 has its own tables and so its own owner: NAT66, the IPv6 side of
	// published ports and policy write there with an IPv6 pool, the
	// ingress filter on an IPv6 underlay.
	pool6, underlay6 := a.subnetV6().IsValid(), a.underlay.Addr.Is6()
	var sections6 []string
	if pool6 {
		sections6 = append(sections6, nat.Section, policy.Section)
	}
	if underlay6 {
		sections6 = append(sections6, ingress.Section)
	}
	if len(sections6) > 0 {
		if a.own.tables6, err = iptables.New(iptables.Config{IPv6: true, Sections: sections6, Logger: log}); err != nil {
			return fmt.Errorf("IPv6 tables: %w", err)
		}
	}
	var pool6Tables, underlay6Tables *iptables.Manager
	if pool6 {
		pool6Tables = a.own.tables6
	}
	if underlay6 {
		underlay6Tables = a.own.tables6
	}
	if a.own.nat, err = nat.New(nat.Config{Tables: a.own.tables, Tables6: pool6Tables, Logger: log}); err != nil {
		return err
	}
	sets := ipsets.NewOwner("")
	if a.own.policy, err = policy.New(policy.IptablesConfig{Bridge: cfg.Bridge, EndpointLinks: dockernet.LinkPrefix + "+", Tables: a.own.tables,
		Tables6: pool6Tables, Sets: sets, Logger: log}); err != nil {
		return err
	}
	var tunnels []string
	for _, b := range a.own.backends {
		tunnels = append(tunnels, b.Ingress())
	}
	a.own.ingress = ingress.New(ingress.Config{Tables: a.own.tables, Tables6: underlay6Tables, Sets: sets, Matches: tunnels, Logger: log})
	gw := netip.PrefixFrom(a.lease.Gateway(), a.lease.Subnet.Bits())
	if err := bridge.Ensure(nil, cfg.Bridge, gw, a.own.dataplane.MTU(), log); err != nil {
		return err
	}
	if err := a.writeDockerOpts(); err != nil {
		return fmt.Errorf("docker options file %s: %w", cfg.DockerOptsFile, err)
	}
	// The lease, the bridge and the docker options exist: dockerd, ordered
	// after fabricd.service, can start now.
	a.notify(daemon.SdNotifyReady)
	a.notify(fmt.Sprintf("STATUS=subnet %s leased, bridge %s up; starting BGP", a.lease.Subnet, cfg.Bridge))

	a.own.speaker, err = bgp.Start(ctx, bgp.Config{
		RouterID:          a.nextHops().IPv4,
		ASN:               cfg.ASN,
		ListenAddress:     a.underlay.Addr,
		ListenPort:        cfg.BGPPort,
		HoldTime:          cfg.HoldTime,
		KeepaliveInterval: cfg.KeepaliveInterval,
		// A restart finds its own routes in the kernel: peers are told we
		// kept forwarding state, and keep our routes until our End-of-RIB.
		GracefulRestartTime: cfg.GracefulRestartTime,
		IPv6:                a.pool.NetworkV6.IsValid(),
		Restarting:          len(a.in.grace.KeptAtStart) > 0,
		APISocket:           cfg.GoBGPSocketPath(),
		Logger:              log.With("component", "bgp"),
	})
	if err != nil {
		return err
	}
	defer a.own.speaker.Stop()
	if err := a.own.speaker.Advertise(ctx, a.nextHops(), a.ownSubnets()...); err != nil {
		return fmt.Errorf("advertise %v: %w", a.ownSubnets(), err)
	}
	log.Info("advertising subnet", "subnet", a.lease.Subnet, "subnetV6", a.subnetV6(), "nexthop", a.nextHops().IPv4, "nexthopV6", a.nextHops().For(a.subnetV6()))

	if err := a.startBFD(); err != nil {
		return err
	}
	// External peers are known now; mesh peers follow from the registry.
	if err := a.setPeers(ctx, nil); err != nil {
		return err
	}

	var dns *fabricdns.Server // container names on the gateway
	if cfg.ContainerDNS {
		if dns, err = fabricdns.New(fabricdns.Config{
			Listen: netip.AddrPortFrom(a.lease.Gateway(), 53),
			Domain: cfg.DNSDomain,
			Pool:   a.pool.Network,
			Logger: log.With("component", "dns"),
		}); err != nil {
			return err
		}
	}

	runCtx, stop := context.WithCancel(ctx)
	defer stop()
	var wg sync.WaitGroup
	goLoop := func(name string, f func(context.Context) error) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := f(runCtx); err != nil && runCtx.Err() == nil {
				log.Error("loop ended", "loop", name, "err", err)
			}
		}()
	}

	// Losing the subnet for good (its lease expired while etcd was away and
	// another host took it) ends fabricd: advertising a subnet another host
	// owns would split traffic. A supervisor restarts it with a new lease.
	leaseLost := make(chan error, 1)
	wg.Add(1)
	go func() {
		defer wg.Done()
		if err := a.ipamMgr.KeepAlive(runCtx); err != nil && runCtx.Err() == nil {
			leaseLost <- err
		}
	}()
	heartbeat := registry.NewHeartbeat(cli, cfg.EtcdPrefix, cfg.NodeTTL, log.With("component", "registry"))
	a.own.record = heartbeat
	goLoop("node-record", func(ctx context.Context) error { return heartbeat.Run(ctx, a.selfNode()) })
	goLoop("local-api", func(ctx context.Context) error { return localapi.Serve(ctx, cfg.SocketPath(), a, log) })
	goLoop("dataplane", a.dataplaneLoop)
	goLoop("host", a.hostLoop)
	goLoop("nat", a.natLoop)
	goLoop("iptables", func(ctx context.Context) error { return a.own.tables.Maintain(ctx, 2*time.Second) })
	if a.own.tables6 != nil {
		goLoop("ip6tables", func(ctx context.Context) error { return a.own.tables6.Maintain(ctx, 2*time.Second) })
	}
	goLoop("policy", a.policyLoop)
	if cfg.FlowOffload {
		goLoop("flow-offload", func(ctx context.Context) error {
			flowoffload.New("", log.With("component", "flow-offload")).Run(ctx, a.flowOffloadState(), cfg.Resync)
			return nil
		})
	} else if err := flowoffload.Cleanup(""); err != nil { // turned off: the table of an earlier run goes
		log.Error("remove the flowtable of an earlier run", "err", err)
	}
	goLoop("ingress", a.ingressLoop)
	goLoop("probe-hold", a.probeHoldLoop)
	goLoop("metrics", a.metricsLoop)
	goLoop("bfd", a.bfdLoop)
	goLoop("systemd", a.systemdLoop)
	containerNames := names.NewPublisher(cli, cfg.EtcdPrefix, cfg.NodeName, cfg.NodeTTL, log.With("component", "names"))
	// One follower of the local dockerd, for the container names and the
	// Docker networks.
	dockerForNames, dockerForNetworks := fanOut(runCtx, dockerwatch.Watch(runCtx, cfg.DockerSocket,
		dockerwatch.Filter{Subnet: a.lease.Subnet, Driver: dockernet.DriverName}, log.With("component", "docker")))
	goLoop("container-names", func(ctx context.Context) error { return a.containerNamesLoop(ctx, containerNames, dockerForNames) })
	goLoop("docker-networks", func(ctx context.Context) error { return a.networksLoop(ctx, dockerForNetworks) })
	if dns != nil {
		goLoop("dns", func(ctx context.Context) error { return a.dnsLoop(ctx, dns) })
	}
	goLoop("names-view", func(ctx context.Context) error { return a.namesViewLoop(ctx, dns) })

	nodes := registry.Watch(runCtx, cli, cfg.EtcdPrefix, log.With("component", "registry"))
	held := ipam.Watch(runCtx, cli, cfg.EtcdPrefix, log.With("component", "ipam"))
	// BGP routes and the start-up grace have loops of their own: a call to
	// GoBGP waits while it works through a router's full table, and no such
	// wait may hold the next route set back.
	goLoop("bgp-routes", a.bgpRoutesLoop)
	goLoop("start-up-grace", a.graceLoop)
	// Departed hosts are dropped once their sessions are down (a session
	// event) or they have been away for subnetTTL (the node set's Recheck).
	sessions := a.own.speaker.WatchSessions()
	departedCheck := time.NewTimer(time.Hour)
	departedCheck.Stop()
	defer departedCheck.Stop()
	for {
		if a.nodesRecheck.IsZero() {
			departedCheck.Stop()
		} else {
			departedCheck.Reset(time.Until(a.nodesRecheck))
		}
		select {
		case <-ctx.Done():
			if cfg.GracefulRestartTime > 0 {
				a.stopForRestart()
				// The record lives as long as peers keep the routes: a
				// restart slower than nodeTTL is still a restart.
				hctx, hcancel := context.WithTimeout(context.Background(), cfg.EtcdTimeout)
				if err := heartbeat.HandOver(hctx, cfg.GracefulRestartTime); err != nil {
					log.Warn("node record not kept for the restart: it expires after nodeTTL, and peers may take this host for dead if the restart takes longer", "err", err)
				}
				hcancel()
			} else {
				a.leave(heartbeat, containerNames)
			}
			stop()
			wg.Wait()
			return nil
		case <-a.leaveRequest:
			a.log.Warn("leaving the fabric on request: withdrawing this host's subnet and node record", "subnet", a.lease.Subnet)
			a.leave(heartbeat, containerNames)
			stop()
			wg.Wait()
			return nil
		case err := <-leaseLost:
			log.Error("subnet lease lost; withdrawing and exiting", "subnet", a.lease.Subnet, "err", err)
			a.leave(heartbeat, containerNames)
			stop()
			wg.Wait()
			return fmt.Errorf("subnet %s: %w", a.lease.Subnet, err)
		case ns, ok := <-nodes:
			if !ok {
				nodes = nil // closed only when stopping
				continue
			}
			a.in.mu.Lock()
			a.in.registryNodes = ns
			a.in.mu.Unlock()
			a.refreshNodes(runCtx)
		case other := <-heartbeat.Conflicts():
			err := fmt.Errorf("node %s: machine %s (underlay %s) writes this host's node record too, with machine id %s (this host's: %s): "+
				"cloned machines take each other's subnet; give each machine its own /etc/machine-id and node name",
				other.Name, other.Address, a.underlay.Addr, other.MachineID, a.cfg.MachineID)
			log.Error("refusing to run: another machine is this host's clone", "err", err)
			a.stopForRestart() // withdraw nothing: the clone may be the one that stays
			stop()
			wg.Wait()
			return err
		case h, ok := <-held:
			if !ok {
				held = nil
				continue
			}
			if other := holderOf(h, a.lease.Subnet); other != "" && other != cfg.NodeName {
				// Another host holds our subnet: do not wait for the next
				// renewal to notice; two hosts advertising it split traffic.
				// The lease-lost case above does the exit.
				select {
				case leaseLost <- fmt.Errorf("%w: etcd leases %s to %s", ipam.ErrSubnetLost, a.lease.Subnet, other):
				default: // the renewal reported it already
				}
				continue
			}
			a.in.mu.Lock()
			a.in.held = h
			a.in.mu.Unlock()
			a.refreshNodes(runCtx)
			kick(a.wake.names)
		case <-departedCheck.C:
			a.refreshNodes(runCtx)
		case <-sessions:
			a.refreshNodes(runCtx)
		case <-a.wake.mesh:
			a.refreshNodes(runCtx)
		case <-a.proberChanges():
			a.kickDataplane()
		}
	}
}

// stopForRestart is a plain stop (SIGTERM, systemctl restart, an upgrade):
// nothing is withdrawn. The kernel's routes, devices, bridge and rules stay,
// the node record lives on until its lease ends (a restarted fabricd writes
// it again before that), and the BGP sessions end with the process without
// a NOTIFICATION, so graceful-restart peers keep this host's routes until it
// is back.
func (a *Agent) stopForRestart() {
	a.stopBFD()
	a.own.speaker.Detach()
	a.log.Info("stopped for a restart: routes, devices, rules and the node record are kept; peers keep this host's routes while it restarts",
		"subnet", a.lease.Subnet, "peersWaitUpTo", a.cfg.GracefulRestartTime)
}

// stopBFD tells the BFD peers this host stops on purpose (AdminDown): no
// peer takes it for dead.
func (a *Agent) stopBFD() {
	if a.own.bfd != nil {
		a.own.bfd.Stop()
	}
}

// leave withdraws this host from the fabric at once: its path (peers drop
// the route now), its sessions, then its node record. Kernel state stays
// until `fabricd --cleanup`.
func (a *Agent) leave(heartbeat *registry.Heartbeat, containerNames *names.Publisher) {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	if err := a.own.speaker.Withdraw(ctx); err != nil {
		a.log.Warn("withdraw subnet", "err", err)
	}
	// Give the withdrawal a moment to leave, then close the sessions before
	// the node record goes: peers that see the record vanish while a
	// session is still up would keep this host as a departed peer.
	time.Sleep(300 * time.Millisecond)
	a.stopBFD()
	a.own.speaker.Stop()
	if err := heartbeat.Withdraw(ctx); err != nil {
		a.log.Warn("withdraw node record", "err", err)
	}
	if err := containerNames.Withdraw(ctx); err != nil {
		a.log.Warn("withdraw container names", "err", err)
	}
	a.log.Info("left the fabric: subnet withdrawn from every peer and node record deleted; the subnet stays leased to this host, kernel routes and links stay until --cleanup",
		"subnet", a.lease.Subnet)
}

// Leave implements localapi.Provider: `fabricctl leave`.
func (a *Agent) Leave(context.Context) (localapi.LeaveResult, error) {
	select {
	case a.leaveRequest <- struct{}{}:
	default: // already leaving
	}
	return localapi.LeaveResult{Node: a.cfg.NodeName, Subnet: a.lease.Subnet.String(),
		Done: "withdrawing the subnet from every peer and deleting the node record; fabricd then exits. " +
			"The subnet stays leased to this host (free it with `fabricctl ipam release " + a.cfg.NodeName + "`); " +
			"kernel state stays until `fabricd --cleanup`."}, nil
}

// acquireLease makes sure the pool exists and takes this host's subnet,
// waiting for etcd while it is unreachable.
func (a *Agent) acquireLease(ctx context.Context) error {
	underlay, err := underlayNetworks(a.underlay.Dev)
	if err != nil {
		return err
	}
	var want *ipam.Pool
	if a.cfg.Pool != "" {
		want = &ipam.Pool{Network: a.cfg.PoolPrefix, SubnetLen: a.cfg.SubnetLen, NetworkV6: a.cfg.PoolV6Prefix}
		// Before it is stored: a pool that clashes here is no one's.
		if err := want.CheckUnderlay(underlay); err != nil {
			return err
		}
	}
	backoff := time.Second
	for {
		err := func() error {
			c, cancel := context.WithTimeout(ctx, a.cfg.EtcdTimeout)
			defer cancel()
			pool, err := ipam.EnsurePool(c, a.etcd, a.cfg.EtcdPrefix, want)
			if err != nil {
				return err
			}
			a.pool = pool
			// The fabric's pool, stored by another host, may clash here.
			if err := pool.CheckUnderlay(underlay); err != nil {
				return err
			}
			if a.ipamMgr == nil {
				if a.ipamMgr, err = ipam.New(a.ipamOptions()); err != nil {
					return err
				}
			}
			a.lease, err = a.ipamMgr.Acquire(c)
			return err
		}()
		if err == nil {
			a.log.Info("subnet lease", "subnet", a.lease.Subnet, "pool", a.pool.Network, "expires", a.lease.Expires.Format(time.RFC3339))
			return nil
		}
		if !etcdclient.Unavailable(err) || ctx.Err() != nil {
			return err
		}
		// No answer, not a refusal: etcd may be down, too slow or
		// electing a leader.
		a.log.Warn("etcd unreachable, retrying: no answer to taking the subnet lease within etcdTimeout", "endpoints", a.cfg.EtcdEndpoints, "etcdTimeout", a.cfg.EtcdTimeout, "in", backoff)
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(backoff):
		}
		backoff = min(2*backoff, 15*time.Second)
	}
}

func (a *Agent) ipamOptions() ipam.Options {
	return ipam.Options{
		Client:    a.etcd,
		Prefix:    a.cfg.EtcdPrefix,
		Node:      a.cfg.NodeName,
		MachineID: a.cfg.MachineID,
		HostAddr:  a.underlay.Addr,
		TTL:       a.cfg.SubnetTTL,
		Logger:    a.log.With("component", "ipam"),
	}
}

// detectKernel finds which encapsulations this kernel can run and refuses a
// mode it cannot, before anything is taken from etcd.
func (a *Agent) detectKernel() error {
	supported := map[string]bool{}
	for _, k := range encaps.Kinds {
		ok, err := k.Supported(nil)
		if err != nil {
			if a.cfg.Encapsulation == k.Name {
				return fmt.Errorf("encapsulation %s: cannot tell whether this kernel supports it: %w", k.Name, err)
			}
			a.log.Warn("cannot tell whether this kernel supports an encapsulation; assuming it does not", "encapsulation", k.Name, "err", err)
		}
		supported[k.Name] = ok
		if !ok && a.cfg.Encapsulation == encaps.Auto {
			a.log.Info(fmt.Sprintf("this kernel has no %s support: peers use the other encapsulations", k.Name), "encapsulation", k.Name, "vxlanPort", a.cfg.VXLANPort)
		}
	}
	if a.underlay.Addr.Is6() && supported[ipip.Name] {
		// IPIP's outer header is IPv4 (ip6tnl is another device).
		if a.cfg.Encapsulation == ipip.Name {
			return fmt.Errorf("encapsulation ipip needs an IPv4 underlay, and this host's is IPv6 (%s): use vxlan or auto", a.underlay.Addr)
		}
		supported[ipip.Name] = false
		a.log.Info("the underlay is IPv6: peers use VXLAN (or WireGuard) over IPv6, not IPIP", "underlay", a.underlay.Addr)
	}
	a.ipipOK = supported[ipip.Name]
	if a.cfg.Encryption != encaps.EncryptionOff && a.cfg.WireGuardImplementation == wireguard.Kernel {
		if ok, err := wireguard.KernelSupported(nil); !ok {
			return fmt.Errorf("wireguardImplementation kernel: this kernel has no WireGuard (%v); load the wireguard module, or use auto to run wireguard-go", err)
		}
	}
	var err error
	a.kinds, err = encaps.Select(a.cfg.Encapsulation, a.cfg.Encryption, supported)
	return err
}

// checkIPv6 refuses to start a host of an IPv6 fabric whose kernel has
// IPv6 turned off: its containers would get addresses nothing can reach.
func (a *Agent) checkIPv6() error {
	if !a.subnetV6().IsValid() {
		if a.cfg.UnderlayAddrV6.IsValid() {
			a.log.Warn("underlayAddressV6 is set, but the pool has no IPv6: ignored", "underlayAddressV6", a.cfg.UnderlayAddrV6)
		}
		return nil
	}
	const key = "/proc/sys/net/ipv6/conf/all/disable_ipv6"
	v, err := os.ReadFile(key)
	switch {
	case errors.Is(err, os.ErrNotExist):
		return fmt.Errorf("the pool has IPv6 (%s), but this kernel has no IPv6 (%s is missing): boot without ipv6.disable=1, or give the fabric no IPv6 pool", a.pool.NetworkV6, key)
	case err == nil && strings.TrimSpace(string(v)) == "1":
		return fmt.Errorf("the pool has IPv6 (%s), but this host has IPv6 turned off (%s is 1): sysctl -w net.ipv6.conf.all.disable_ipv6=0", a.pool.NetworkV6, key)
	}
	if a.underlay.Addr.Is6() {
		return nil // V6 is the underlay address (findUnderlay)
	}
	if a.underlay.V6, err = findUnderlayV6(a.underlay.Dev, a.cfg.UnderlayAddrV6); err != nil {
		return err
	}
	if a.underlay.V6.IsValid() {
		a.log.Info("underlay IPv6: the next hop of this host's IPv6 subnet", "device", a.underlay.Dev, "address", a.underlay.V6.Addr())
	} else {
		a.log.Info("no global IPv6 address on the underlay: this host's IPv6 subnet goes with its IPv4 address as next hop, which fabric hosts use and routers cannot", "device", a.underlay.Dev)
	}
	return nil
}

// nextHops are this host's next hops for the routes it advertises. On an
// IPv6-only underlay the IPv4 one (and the BGP router ID, which is 32 bits)
// is the network address of the host's IPv4 subnet: the pool leases it to
// this host alone, and fabric hosts take it for this host
// (planner.Routes); routers cannot forward IPv4 over that underlay anyway.
func (a *Agent) nextHops() bgp.NextHops {
	v4 := a.underlay.Addr
	if !v4.Is4() {
		v4 = a.lease.Subnet.Masked().Addr()
	}
	return bgp.NextHops{IPv4: v4, IPv6: a.underlay.V6.Addr()}
}

func (a *Agent) setupDataplane() error {
	cfg := a.cfg
	// One route-netlink socket for every kernel write of the data plane: a
	// zero Handle opens, binds and closes a socket per request, which was a
	// third of the time to install 10,000 routes (make bench). Requests on
	// it are serialised by the library.
	h, err := netlink.NewHandle(unix.NETLINK_ROUTE)
	if err != nil {
		return fmt.Errorf("netlink: %w", err)
	}
	settings := encaps.Settings{
		Handle:       h,
		UnderlayAddr: a.underlay.Addr, UnderlayDev: a.underlay.Dev, Subnet: a.lease.Subnet,
		VXLANVNI: cfg.VXLANVNI, VXLANPort: cfg.VXLANPort, Logger: a.log,
	}
	crossSubnet := cfg.CrossSubnet
	if cfg.Encryption != encaps.EncryptionOff {
		if settings.WireGuardKey, err = wireguard.LoadOrCreateKey(cfg.WireGuardKeyPath()); err != nil {
			return err
		}
		settings.WireGuardPort = cfg.WireGuardPort
		if cfg.WireGuardImplementation != "auto" {
			settings.WireGuardImplementation = cfg.WireGuardImplementation
		}
		if crossSubnet {
			a.log.Info("crossSubnet is ignored while encryption is on: peers on this host's subnet get WireGuard too", "encryption", cfg.Encryption)
			crossSubnet = false
		}
	}
	if len(a.kinds) > 1 && a.own.prober != nil {
		settings.PathWorks = a.own.prober.IPIPWorks
	}
	a.own.backends = nil
	for _, k := range a.kinds {
		b, err := k.New(settings)
		if err != nil {
			return err
		}
		a.own.backends = append(a.own.backends, b)
	}
	defer a.rememberStartRoutes()
	a.own.dataplane, err = dataplane.New(dataplane.Config{
		Handle:       h,
		Backends:     a.own.backends,
		CrossSubnet:  crossSubnet,
		Protocol:     cfg.RouteProtocol,
		UnderlayDev:  a.underlay.Dev,
		UnderlayAddr: a.underlay.Addr,
		UnderlayMTU:  a.underlay.MTU,
		Logger:       a.log.With("component", "dataplane"),
	})
	return err
}

// vtepMAC is the device MAC peers need to reach this host (VXLAN's), if an
// encapsulation this host runs needs one.
func (a *Agent) vtepMAC() string {
	for _, b := range a.own.backends {
		if m, ok := b.(backend.MACAdvertiser); ok {
			return m.MAC().String()
		}
	}
	return ""
}

// wireGuardKey is this host's WireGuard public key, when it encrypts.
func (a *Agent) wireGuardKey() string {
	for _, b := range a.own.backends {
		if k, ok := b.(backend.KeyAdvertiser); ok {
			return k.PublicKey()
		}
	}
	return ""
}

func (a *Agent) selfNode() registry.Node {
	// Only what this host runs: a peer in auto mode must not pick an
	// encapsulation this host has no device for.
	var names []string
	for _, k := range a.kinds {
		names = append(names, k.Name)
	}
	return registry.Node{
		Name:         a.cfg.NodeName,
		Address:      a.underlay.Addr,
		ASN:          a.cfg.ASN,
		Subnet:       a.lease.Subnet,
		SubnetV6:     a.subnetV6(),
		AddressV6:    a.underlay.V6.Addr(),
		VTEPMAC:      a.vtepMAC(),
		Encaps:       names,
		WireGuardKey: a.wireGuardKey(),
		Version:      version.String(),
		// Peers see it and peer with the reflectors only.
		RouteReflector: a.cfg.RouteReflector,
		MachineID:      a.cfg.MachineID,
	}
}

// desiredPeers is the whole BGP peer set: every other fabric host (full
// mesh, or the reflectors) plus the configured external peers.
func (a *Agent) desiredPeers(nodes []registry.Node) []bgp.Peer {
	return planner.Peers(a.host(), a.cfg.Peers, a.cfg.Mesh, a.cfg.RouteReflector, nodes, uint16(a.cfg.BGPPort))
}

// hostLoop repairs the bridge and the docker options file.
func (a *Agent) hostLoop(ctx context.Context) error {
	t := time.NewTicker(min(a.cfg.Resync, 5*time.Second))
	defer t.Stop()
	gw := netip.PrefixFrom(a.lease.Gateway(), a.lease.Subnet.Bits())
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
		}
		if err := bridge.Ensure(nil, a.cfg.Bridge, gw, a.own.dataplane.MTU(), a.log); err != nil {
			a.log.Error("repair bridge", "err", err)
		}
		a.writeDockerOpts() // logged; retried on the next tick
	}
}

func (a *Agent) writeDockerOpts() error {
	opts := dockeropts.Options{Pool: a.pool.Network, Subnet: a.lease.Subnet, Gateway: a.lease.Gateway(), SubnetV6: a.subnetV6(), MTU: a.own.dataplane.MTU(), Bridge: a.cfg.Bridge}
	if a.cfg.ContainerDNS {
		opts.DNSDomain = a.cfg.DNSDomain
	}
	changed, err := dockeropts.WriteEnv(a.cfg.DockerOptsFile, opts)
	if err != nil {
		a.log.Error("write docker options", "file", a.cfg.DockerOptsFile, "err", err)
		return err
	}
	if changed {
		a.log.Info("wrote docker options", "file", a.cfg.DockerOptsFile, "bip", opts.BIP(), "mtu", opts.MTU)
	}
	return nil
}

// Cleanup removes everything fabricd owns on this host: its routes, tunnel
// devices, the bridge and the docker options file.
func Cleanup(cfg *config.Config, log *slog.Logger) error {
	// Removing a running fabricd's bridge, routes and sockets would cut
	// every container of the host off while fabricd puts them back.
	if err := localapi.CheckFree(cfg.SocketPath()); err != nil {
		return fmt.Errorf("%w; stop it first (systemctl stop fabricd), then run --cleanup", err)
	}
	var errs []error
	if err := dataplane.Cleanup(nil, cfg.RouteProtocol); err != nil {
		errs = append(errs, err)
	}
	for _, k := range encaps.Kinds {
		if err := k.Cleanup(nil); err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", k.Name, err))
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if tables, err := iptables.New(iptables.Config{Logger: log}); err != nil {
		errs = append(errs, err)
	} else if err := tables.Cleanup(ctx); err != nil {
		errs = append(errs, fmt.Errorf("iptables rules: %w", err))
	} else if err := ipsets.NewOwner("").Cleanup(); err != nil { // the rules using them are gone
		errs = append(errs, err)
	}
	// IPv6 chains, where the host has ip6tables (a fabric with IPv6).
	if tables6, err := iptables.New(iptables.Config{IPv6: true, Logger: log}); err == nil {
		if err := tables6.Cleanup(ctx); err != nil {
			errs = append(errs, fmt.Errorf("ip6tables rules: %w", err))
		}
	}
	if err := flowoffload.Cleanup(""); err != nil {
		errs = append(errs, fmt.Errorf("nftables table inet %s: %w", flowoffload.TableName, err))
	}
	if err := dockernet.NewLinks(nil).Cleanup(); err != nil {
		errs = append(errs, fmt.Errorf("links of containers on fabric networks: %w", err))
	}
	if err := bridge.Remove(nil, cfg.Bridge); err != nil {
		errs = append(errs, fmt.Errorf("bridge %s: %w", cfg.Bridge, err))
	}
	if err := os.Remove(cfg.DockerOptsFile); err != nil && !errors.Is(err, os.ErrNotExist) {
		errs = append(errs, err)
	}
	for _, s := range []string{cfg.SocketPath(), cfg.GoBGPSocketPath(), cfg.ProbeStatePath()} {
		os.Remove(s)
	}
	if err := errors.Join(errs...); err != nil {
		return err
	}
	log.Info("removed everything fabricd owns", "routeProtocol", cfg.RouteProtocol, "devices", append(encaps.Devices(), cfg.Bridge))
	return nil
}

// holderOf returns the node etcd leases subnet to, or "".
func holderOf(h ipam.Holdings, subnet netip.Prefix) string {
	for node, subnets := range h {
		if slices.Contains(subnets, subnet) {
			return node
		}
	}
	return ""
}
