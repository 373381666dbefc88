// Package agent wires fabricd together: the lease from ipam, the node record
// in the registry, the BGP speaker, the data plane and the host side. Each
// concern keeps its own reconcile loop; the agent hands values between them.
package agent

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"slices"
	"sort"
	"sync"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/fabricnet/fabric/bgp"
	"github.com/fabricnet/fabric/bridge"
	"github.com/fabricnet/fabric/config"
	"github.com/fabricnet/fabric/dataplane"
	"github.com/fabricnet/fabric/dockeropts"
	"github.com/fabricnet/fabric/internal/etcdclient"
	"github.com/fabricnet/fabric/ipam"
	"github.com/fabricnet/fabric/ipip"
	"github.com/fabricnet/fabric/localapi"
	"github.com/fabricnet/fabric/nat"
	"github.com/fabricnet/fabric/policy"
	"github.com/fabricnet/fabric/probe"
	"github.com/fabricnet/fabric/registry"
	"github.com/fabricnet/fabric/vxlanfallback"
)

// Version is set at build time with -ldflags "-X .../agent.Version=...".
var Version = "dev"

// Tunnel device names fabricd owns.
const (
	VXLANDevice = "fabric.vxlan"
	IPIPDevice  = "fabric.ipip"
)

// Agent is one running fabricd.
type Agent struct {
	cfg      *config.Config
	log      *slog.Logger
	etcd     *clientv3.Client
	underlay underlay
	pool     ipam.Pool
	lease    ipam.Lease
	ipamMgr  *ipam.Manager
	ipipOK   bool
	speaker  *bgp.Speaker
	dp       *dataplane.Manager
	vxlan    *vxlanfallback.Backend // nil in ipip mode
	started  time.Time

	mu sync.Mutex
	// registryNodes are the records in etcd; nodes is what the agent works
	// with: the valid records plus departed hosts still in session.
	registryNodes []registry.Node
	nodes         []registry.Node
	departed      map[string]departedNode // main loop only
	warned        map[string]bool
	bgpRoutes     []bgp.Route
	// Start-up grace: routes already in the kernel when fabricd started
	// (keptAtStart) stay for peers whose BGP session has not come up yet
	// (establishedAt), until graceUntil. A restart of fabricd so does not
	// flap routes that are still valid, while a new or dead peer gets nothing
	// from the grace: it only keeps what was there.
	converged     bool
	graceUntil    time.Time
	keptAtStart   map[netip.Prefix]bool
	establishedAt map[string]time.Time
	// nodesKnown turns true with the registry's first snapshot; before it
	// the data plane is not touched, since a route set computed without
	// node records would sweep every route fabricd installed before a restart.
	nodesKnown bool

	kick       chan struct{}
	policyKick chan struct{}
	prober     *probe.Prober // nil without ipip support
	natMgr     *nat.Manager
	enforcer   *policy.IptablesEnforcer
}

// Run starts fabricd and blocks until ctx is cancelled, then shuts down
// gracefully: it withdraws its subnet and node record but leaves the kernel
// state in place, so containers keep talking across an agent restart.
func Run(ctx context.Context, cfg *config.Config, log *slog.Logger) error {
	a := &Agent{cfg: cfg, log: log, started: time.Now(), kick: make(chan struct{}, 1), policyKick: make(chan struct{}, 1),
		departed: map[string]departedNode{}, warned: map[string]bool{}}
	cli, err := etcdclient.New(cfg.EtcdEndpoints, cfg.EtcdTLSFiles(), cfg.EtcdTimeout, quietZap())
	if err != nil {
		return err // names the endpoints, or the TLS file and its problem
	}
	defer cli.Close()
	a.etcd = cli

	if a.underlay, err = findUnderlay(cfg.UnderlayInterface, cfg.UnderlayAddress); err != nil {
		return err
	}
	log.Info("underlay", "device", a.underlay.Dev, "address", a.underlay.Addr, "mtu", a.underlay.MTU)

	// Two agents on one host would fight over every route and rule.
	if c, err := net.DialTimeout("unix", cfg.SocketPath(), time.Second); err == nil {
		c.Close()
		return fmt.Errorf("another fabricd is running on this host: its local API answers on %s", cfg.SocketPath())
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
		if a.prober, err = probe.Start(ctx, probe.Config{Local: a.underlay.Addr, Logger: log.With("component", "probe")}); err != nil {
			return err
		}
	}
	if err := a.setupDataplane(); err != nil {
		return err
	}
	if a.natMgr, err = nat.New(nat.Config{Logger: log.With("component", "nat")}); err != nil {
		return err
	}
	save, restore := a.natMgr.Binaries()
	a.enforcer = policy.New(policy.IptablesConfig{Bridge: cfg.Bridge, SaveCommand: save, RestoreCommand: restore, Logger: log.With("component", "policy")})
	gw := netip.PrefixFrom(a.lease.Gateway(), a.lease.Subnet.Bits())
	if err := bridge.Ensure(nil, cfg.Bridge, gw, a.dp.MTU(), log); err != nil {
		return err
	}
	a.writeDockerOpts()

	a.speaker, err = bgp.Start(ctx, bgp.Config{
		RouterID:          a.underlay.Addr,
		ASN:               cfg.ASN,
		ListenAddress:     a.underlay.Addr,
		ListenPort:        cfg.BGPPort,
		HoldTime:          cfg.HoldTime,
		KeepaliveInterval: cfg.KeepaliveInterval,
		APISocket:         cfg.GoBGPSocketPath(),
		Logger:            log.With("component", "bgp"),
	})
	if err != nil {
		return err
	}
	defer a.speaker.Stop()
	if err := a.speaker.Advertise(ctx, a.lease.Subnet, a.underlay.Addr); err != nil {
		return fmt.Errorf("advertise %s: %w", a.lease.Subnet, err)
	}
	log.Info("advertising subnet", "subnet", a.lease.Subnet, "nexthop", a.underlay.Addr)

	// External peers are known now; mesh peers follow from the registry.
	if err := a.speaker.SetPeers(ctx, a.desiredPeers(nil)); err != nil {
		return err
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
	publisher := registry.NewPublisher(cli, cfg.EtcdPrefix, cfg.NodeTTL, log.With("component", "registry"))
	goLoop("node-record", func(ctx context.Context) error { return publisher.Run(ctx, a.selfNode()) })
	goLoop("local-api", func(ctx context.Context) error { return localapi.Serve(ctx, cfg.SocketPath(), a, log) })
	goLoop("dataplane", a.dataplaneLoop)
	goLoop("host", a.hostLoop)
	goLoop("nat", a.natLoop)
	goLoop("policy", a.policyLoop)
	goLoop("metrics", a.metricsLoop)

	nodes := registry.Watch(runCtx, cli, cfg.EtcdPrefix, log.With("component", "registry"))
	routes := a.speaker.Routes()
	convergeCheck := time.NewTicker(time.Second)
	defer convergeCheck.Stop()
	// Departed hosts are dropped once their sessions are down.
	departedCheck := time.NewTicker(2 * time.Second)
	defer departedCheck.Stop()
	for {
		select {
		case <-ctx.Done():
			a.shutdown(publisher)
			stop()
			wg.Wait()
			return nil
		case err := <-leaseLost:
			log.Error("subnet lease lost; withdrawing and exiting", "subnet", a.lease.Subnet, "err", err)
			a.shutdown(publisher)
			stop()
			wg.Wait()
			return fmt.Errorf("subnet %s: %w", a.lease.Subnet, err)
		case ns, ok := <-nodes:
			if !ok {
				nodes = nil // closed only when stopping
				continue
			}
			a.mu.Lock()
			a.registryNodes = ns
			a.mu.Unlock()
			a.refreshNodes(runCtx)
		case <-departedCheck.C:
			a.refreshNodes(runCtx)
		case rs := <-routes:
			a.mu.Lock()
			a.bgpRoutes = rs
			a.mu.Unlock()
			a.kickDataplane()
		case <-a.proberChanges():
			a.kickDataplane()
		case <-convergeCheck.C:
			// During the grace the kept set shrinks as sessions come up.
			if a.checkConverged(runCtx) {
				convergeCheck.Stop()
			}
			a.kickDataplane()
		}
	}
}

func (a *Agent) shutdown(publisher *registry.Publisher) {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	if err := a.speaker.Withdraw(ctx); err != nil {
		a.log.Warn("withdraw subnet", "err", err)
	}
	if err := publisher.Withdraw(ctx); err != nil {
		a.log.Warn("withdraw node record", "err", err)
	}
	// Give the withdrawal a moment to leave before the sessions close.
	time.Sleep(300 * time.Millisecond)
	a.log.Info("stopped; kernel routes and links are kept until --cleanup")
}

// acquireLease makes sure the pool exists and takes this host's subnet,
// waiting for etcd while it is unreachable.
func (a *Agent) acquireLease(ctx context.Context) error {
	var want *ipam.Pool
	if a.cfg.Pool != "" {
		want = &ipam.Pool{Network: netip.MustParsePrefix(a.cfg.Pool), SubnetLen: a.cfg.SubnetLen}
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
		if !errors.Is(err, context.DeadlineExceeded) || ctx.Err() != nil {
			return err
		}
		a.log.Warn("etcd unreachable, retrying", "endpoints", a.cfg.EtcdEndpoints, "in", backoff)
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

// detectKernel finds which encapsulations this kernel can do and refuses a
// mode it cannot, before anything is taken from etcd.
func (a *Agent) detectKernel() error {
	var err error
	a.ipipOK, err = ipip.Supported(nil)
	mode := dataplane.Mode(a.cfg.Encapsulation)
	if err != nil {
		if mode == dataplane.ModeIPIP {
			return fmt.Errorf("encapsulation ipip: cannot tell whether this kernel supports ipip: %w", err)
		}
		a.log.Warn("cannot tell whether this kernel supports ipip; assuming it does not", "err", err)
	}
	if mode == dataplane.ModeIPIP && !a.ipipOK {
		return fmt.Errorf("encapsulation ipip: this kernel has no ipip support (no ipip module); use --encapsulation=auto to fall back to VXLAN, or vxlan")
	}
	if mode == dataplane.ModeAuto && !a.ipipOK {
		a.log.Info("this kernel has no ipip support: every peer will use VXLAN", "encapsulation", "auto", "vxlanPort", a.cfg.VXLANPort)
	}
	return nil
}

func (a *Agent) setupDataplane() error {
	cfg := a.cfg
	mode := dataplane.Mode(cfg.Encapsulation)
	var err error
	var ipipB *ipip.Backend
	if a.ipipOK && mode != dataplane.ModeVXLAN {
		if ipipB, err = ipip.New(ipip.Config{Device: IPIPDevice, UnderlayAddr: a.underlay.Addr, Subnet: a.lease.Subnet, Logger: a.log}); err != nil {
			return err
		}
	}
	var vx *vxlanfallback.Backend
	if mode != dataplane.ModeIPIP {
		if vx, err = vxlanfallback.New(vxlanfallback.Config{
			Device: VXLANDevice, VNI: cfg.VXLANVNI, Port: cfg.VXLANPort,
			UnderlayAddr: a.underlay.Addr, UnderlayDev: a.underlay.Dev, Subnet: a.lease.Subnet, Logger: a.log,
		}); err != nil {
			return err
		}
	}
	a.vxlan = vx
	defer a.rememberStartRoutes()
	a.dp, err = dataplane.New(dataplane.Config{
		Mode:         mode,
		CrossSubnet:  cfg.CrossSubnet,
		Protocol:     cfg.RouteProtocol,
		UnderlayDev:  a.underlay.Dev,
		UnderlayAddr: a.underlay.Addr,
		UnderlayMTU:  a.underlay.MTU,
		IPIP:         ipipB,
		VXLAN:        vx,
		Prober:       a.protoProber(),
		Logger:       a.log.With("component", "dataplane"),
	})
	return err
}

// rememberStartRoutes notes the owned routes already in the kernel, which the
// start-up grace keeps until their peers are back.
func (a *Agent) rememberStartRoutes() {
	a.keptAtStart = map[netip.Prefix]bool{}
	a.establishedAt = map[string]time.Time{}
	a.graceUntil = time.Now().Add(2*a.cfg.HoldTime + 5*time.Second)
	if a.dp == nil {
		return
	}
	owned, err := a.dp.Owned()
	if err != nil {
		a.log.Warn("read owned routes at start", "err", err)
		return
	}
	for _, r := range owned {
		a.keptAtStart[r.Prefix] = true
	}
	if len(owned) > 0 {
		a.log.Info("keeping routes found in the kernel until their peers are back", "routes", len(owned), "until", a.graceUntil.Format(time.RFC3339))
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

func (a *Agent) vtepMAC() string {
	if a.vxlan == nil {
		return ""
	}
	return a.vxlan.MAC().String()
}

func (a *Agent) selfNode() registry.Node {
	encaps := []string{"vxlan"}
	if a.ipipOK {
		encaps = []string{"ipip", "vxlan"}
	}
	return registry.Node{
		Name:      a.cfg.NodeName,
		Address:   a.underlay.Addr,
		ASN:       a.cfg.ASN,
		Subnet:    a.lease.Subnet,
		VTEPMAC:   a.vtepMAC(),
		Encaps:    encaps,
		Version:   Version,
		MachineID: a.cfg.MachineID,
	}
}

// desiredPeers is the whole BGP peer set: every other fabric host (full
// mesh) plus the configured external peers.
func (a *Agent) desiredPeers(nodes []registry.Node) []bgp.Peer {
	var peers []bgp.Peer
	external := map[netip.Addr]bool{}
	for _, p := range a.cfg.Peers {
		addr := netip.MustParseAddr(p.Address)
		external[addr] = true
		typ := bgp.PeerExternal
		switch p.Type {
		case "route-reflector":
			typ = bgp.PeerRouteReflector
		case "rr-client":
			typ = bgp.PeerRRClient
		}
		name := p.Name
		if name == "" {
			name = p.Address
		}
		peers = append(peers, bgp.Peer{Name: name, Address: addr, ASN: p.ASN, Port: p.Port, Password: p.Password, Multihop: p.Multihop, Type: typ})
	}
	if a.cfg.Mesh {
		for _, n := range nodes {
			if n.Name == a.cfg.NodeName || n.Address == a.underlay.Addr || external[n.Address] {
				continue
			}
			peers = append(peers, bgp.Peer{Name: n.Name, Address: n.Address, ASN: n.ASN, Port: uint16(a.cfg.BGPPort), Type: bgp.PeerMesh})
		}
	}
	return peers
}

// checkConverged records which peers have established since start and
// reports whether the start-up grace period is over: every mesh peer came
// up, or graceUntil has passed.
func (a *Agent) checkConverged(ctx context.Context) bool {
	peers, err := a.speaker.Peers(ctx)
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.converged {
		return true
	}
	all := err == nil && len(a.nodes) > 0
	for _, p := range peers {
		if p.State == "established" {
			up, ok := a.establishedAt[p.Name]
			if !ok {
				a.establishedAt[p.Name] = time.Now()
				all = false
			} else if time.Since(up) < 3*time.Second {
				all = false
			}
		} else {
			all = false
		}
	}
	if all || time.Now().After(a.graceUntil) {
		a.converged = true
		a.log.Info("start-up grace over; BGP alone decides routes from now on", "allEstablished", all)
	}
	return a.converged
}

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
			// A session just established may not have sent its UPDATE yet:
			// keep its route a little longer.
			up, ok := a.establishedAt[n.Name]
			if a.keptAtStart[n.Subnet] && (!ok || time.Since(up) < 3*time.Second) {
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
		if r.Prefix.Overlaps(a.lease.Subnet) || r.NextHop == a.underlay.Addr {
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
		if err := bridge.Ensure(nil, a.cfg.Bridge, gw, a.dp.MTU(), a.log); err != nil {
			a.log.Error("repair bridge", "err", err)
		}
		a.writeDockerOpts()
	}
}

func (a *Agent) writeDockerOpts() {
	opts := dockeropts.Options{Pool: a.pool.Network, Subnet: a.lease.Subnet, Gateway: a.lease.Gateway(), MTU: a.dp.MTU(), Bridge: a.cfg.Bridge}
	changed, err := dockeropts.WriteEnv(a.cfg.DockerOptsFile, opts)
	if err != nil {
		a.log.Error("write docker options", "file", a.cfg.DockerOptsFile, "err", err)
	} else if changed {
		a.log.Info("wrote docker options", "file", a.cfg.DockerOptsFile, "bip", opts.BIP(), "mtu", opts.MTU)
	}
}

// Peers implements localapi.Provider.
func (a *Agent) Peers(ctx context.Context) ([]localapi.Peer, error) {
	ps, err := a.speaker.Peers(ctx)
	if err != nil {
		return nil, err
	}
	encaps := a.dp.Encapsulations()
	reasons := a.dp.EncapsulationReasons()
	out := make([]localapi.Peer, 0, len(ps))
	for _, p := range ps {
		e := encaps[p.Name]
		switch {
		case e != "":
		case p.Type == bgp.PeerRouteReflector:
			e = "-" // it reflects routes; traffic goes to their originators
		case p.Type != bgp.PeerMesh:
			e = "direct"
		}
		out = append(out, localapi.Peer{
			Name: p.Name, Address: p.Address.String(), ASN: p.ASN, Type: string(p.Type), State: p.State,
			Since: p.Since, Received: p.Received, Accepted: p.Accepted, Encap: e, EncapReason: reasons[p.Name],
		})
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out, nil
}

// Routes implements localapi.Provider.
func (a *Agent) Routes(ctx context.Context) ([]localapi.Route, error) {
	owned, err := a.dp.Owned()
	if err != nil {
		return nil, err
	}
	a.mu.Lock()
	types := map[netip.Prefix]string{}
	for _, r := range a.bgpRoutes {
		types[r.Prefix] = string(r.PeerType)
	}
	a.mu.Unlock()
	out := make([]localapi.Route, 0, len(owned))
	for _, r := range owned {
		typ := types[r.Prefix]
		if typ == "" {
			typ = "registry (start-up grace)"
		}
		via := ""
		if r.Via.IsValid() {
			via = r.Via.String()
		}
		out = append(out, localapi.Route{Prefix: r.Prefix.String(), Via: via, Dev: r.Dev, Encap: r.Encap, Peer: r.PeerName, PeerType: typ})
	}
	return out, nil
}

// Status implements localapi.Provider.
func (a *Agent) Status(ctx context.Context) (localapi.Status, error) {
	c, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	_, etcdErr := a.etcd.Get(c, a.cfg.EtcdPrefix+"/config")
	return localapi.Status{
		Node: a.cfg.NodeName, Version: Version, Subnet: a.lease.Subnet.String(), Gateway: a.lease.Gateway().String(),
		Underlay: a.underlay.Addr.String(), UnderlayDev: a.underlay.Dev, ASN: a.cfg.ASN,
		Encapsulation: a.cfg.Encapsulation, MTU: a.dp.MTU(), Bridge: a.cfg.Bridge, Started: a.started,
		EtcdHealthy: etcdErr == nil,
	}, nil
}

// Cleanup removes everything fabricd owns on this host: its routes, tunnel
// devices, the bridge and the docker options file.
func Cleanup(cfg *config.Config, log *slog.Logger) error {
	var errs []error
	if err := dataplane.Cleanup(nil, cfg.RouteProtocol, VXLANDevice, IPIPDevice); err != nil {
		errs = append(errs, err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if natMgr, err := nat.New(nat.Config{Logger: log}); err != nil {
		errs = append(errs, err)
	} else {
		if err := natMgr.Cleanup(ctx); err != nil {
			errs = append(errs, fmt.Errorf("NAT rules: %w", err))
		}
		save, restore := natMgr.Binaries()
		enf := policy.New(policy.IptablesConfig{SaveCommand: save, RestoreCommand: restore, Logger: log})
		if err := enf.Cleanup(ctx); err != nil {
			errs = append(errs, fmt.Errorf("policy rules: %w", err))
		}
	}
	if err := sweepFabricChains(log); err != nil {
		errs = append(errs, fmt.Errorf("leftover iptables chains: %w", err))
	}
	if err := bridge.Remove(nil, cfg.Bridge); err != nil {
		errs = append(errs, fmt.Errorf("bridge %s: %w", cfg.Bridge, err))
	}
	if err := os.Remove(cfg.DockerOptsFile); err != nil && !errors.Is(err, os.ErrNotExist) {
		errs = append(errs, err)
	}
	for _, s := range []string{cfg.SocketPath(), cfg.GoBGPSocketPath()} {
		os.Remove(s)
	}
	if err := errors.Join(errs...); err != nil {
		return err
	}
	log.Info("removed everything fabricd owns", "routeProtocol", cfg.RouteProtocol, "devices", []string{VXLANDevice, IPIPDevice, cfg.Bridge})
	return nil
}
