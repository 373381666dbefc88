package dockernet

import (
	"context"
	"errors"
	"log/slog"
	"maps"
	"net/netip"
	"reflect"
	"slices"
	"time"

	"github.com/fabricnet/fabric/dockerwatch"
	"github.com/fabricnet/fabric/internal/latest"
)

// Local is the networks as this host works with them: the fabric-wide
// state, and the endpoints on this host that have their link.
type Local struct {
	Node      string
	State     State
	Endpoints []Endpoint // sorted by address
	// EndpointsKnown is false until dockerd has answered: after a restart
	// of fabricd the endpoints it lists are the ones that exist.
	EndpointsKnown bool
}

// Docker is the local dockerd, as the network sync uses it.
type Docker interface {
	CreateNetwork(ctx context.Context, driver string, n dockerwatch.Network) error
	DeleteNetwork(ctx context.Context, id string) error
}

// Sync makes this host's dockerd have exactly the fabric's networks, records
// networks created here in etcd, keeps this host's addresses in etcd equal
// to its endpoints, and removes endpoint links nothing uses. It sends the
// resulting Local after every change.
type Sync struct {
	driver *Driver
	docker Docker
	log    *slog.Logger
	out    chan Local

	state       State
	stateKnown  bool
	snap        dockerwatch.Snapshot
	dockerKnown bool
	logged      map[string]string        // what was last logged per key, to say it once
	unusedSince map[netip.Addr]time.Time // this host's addresses no endpoint uses
	lostSince   map[netip.Addr]time.Time // addresses its endpoints use that etcd lacks
	// listed are the fabric networks dockerd's listing has shown (name →
	// creation time in the fabric); gone those that then left it, since
	// when (see remakeDelay).
	listed map[string]time.Time
	gone   map[string]time.Time
	sent   *Local
}

// remakeDelay: a fabric network that leaves this dockerd's listing is
// made again only after this long. dockerd drops a network it removes
// from its listing (and releases its pool) before it calls the driver's
// DeleteNetwork, which removes it from the fabric; making it again at once
// undid `docker-compose down` (CI saw it 60 ms before the call). A network
// dockerd never listed is made at once.
const remakeDelay = 3 * time.Second

// NewSync returns the sync for driver's host.
func NewSync(driver *Driver, docker Docker, log *slog.Logger) *Sync {
	return &Sync{driver: driver, docker: docker, log: log, out: make(chan Local, 1),
		logged: map[string]string{}, unusedSince: map[netip.Addr]time.Time{}, lostSince: map[netip.Addr]time.Time{},
		listed: map[string]time.Time{}, gone: map[string]time.Time{}}
}

// Out delivers Local after every change (the newest wins).
func (s *Sync) Out() <-chan Local { return s.out }

// unusedGrace is how long an address of this host may go unused before it
// is released (dockerd asks for the address before it makes the endpoint),
// and how long one its endpoints use may be missing from etcd before it is
// claimed again (dockerd's listing lags behind the release of a removed
// container's address).
const unusedGrace = time.Minute

// Run follows etcd's state and dockerd's snapshots until ctx ends.
func (s *Sync) Run(ctx context.Context, states <-chan State, docker <-chan dockerwatch.Snapshot, repair time.Duration) error {
	t := time.NewTicker(repair)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case st, ok := <-states:
			if !ok {
				return nil
			}
			s.state, s.stateKnown = st, true
		case snap, ok := <-docker:
			if !ok {
				return nil
			}
			s.snap, s.dockerKnown = snap, true
		case <-s.driver.Changed():
		case <-t.C:
		}
		s.reconcile(ctx)
	}
}

func (s *Sync) once(key, msg string, args ...any) {
	if s.logged[key] == msg {
		return
	}
	s.logged[key] = msg
	s.log.Warn(msg, args...)
}

func (s *Sync) reconcile(ctx context.Context) {
	if !s.stateKnown {
		return
	}
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	d := s.driver
	if s.dockerKnown {
		s.networks(ctx)
		s.addresses(ctx)
	}
	local := Local{Node: d.host.Node, State: s.state, Endpoints: s.endpoints(), EndpointsKnown: s.dockerKnown}
	if s.sent == nil || local.EndpointsKnown != s.sent.EndpointsKnown ||
		!slices.EqualFunc(local.Endpoints, s.sent.Endpoints, endpointEqual) || !stateEqual(local.State, s.sent.State) {
		s.sent = &local
		latest.Put(s.out, local)
	}
}

// networks makes dockerd's fabric networks match the fabric's, and records
// the networks created here.
func (s *Sync) networks(ctx context.Context) {
	d := s.driver
	local := map[string]dockerwatch.Network{}
	for _, n := range s.snap.Networks {
		local[n.Name] = n
	}
	inUse := map[string]bool{}
	for _, c := range s.snap.Containers {
		for _, a := range c.Networks {
			inUse[a.NetworkID] = true
		}
	}
	for _, ln := range s.snap.Networks {
		d.mu.Lock()
		pending := d.pending[ln.ID]
		created := d.networks[ln.ID]
		d.mu.Unlock()
		fabric, inEtcd := s.state.Networks[ln.Name]
		switch {
		case pending && inEtcd && fabric.Subnet == ln.Subnet && fabric.SubnetV6 == ln.SubnetV6:
			// Created here and on another host at once, alike.
			s.known(ln.ID, fabric)
		case pending && inEtcd:
			s.refuse(ctx, ln, "network "+ln.Name+" exists in the fabric with subnets "+fabric.subnets())
		case pending:
			n := Network{Name: ln.Name, Subnet: ln.Subnet, Gateway: created.Gateway, SubnetV6: ln.SubnetV6, GatewayV6: created.GatewayV6,
				Created: time.Now().UTC(), CreatedOn: d.host.Node, Labels: ln.Labels}
			if !n.Gateway.IsValid() {
				n.Gateway = ln.Gateway
			}
			if !n.GatewayV6.IsValid() {
				n.GatewayV6 = ln.GatewayV6
			}
			if err := d.store.Create(ctx, n); err != nil {
				if errors.Is(err, ErrConflict) {
					s.refuse(ctx, ln, err.Error())
				} else {
					s.once("publish/"+ln.Name, "cannot record the network created here in etcd; retrying", "network", ln.Name, "err", err)
				}
				continue
			}
			s.log.Info("network created fabric-wide", "network", n.Name, "subnet", n.Subnet, "gateway", n.Gateway)
			s.known(ln.ID, n)
		case !inEtcd:
			// Removed fabric-wide (on another host): remove it here too.
			if err := s.docker.DeleteNetwork(ctx, ln.ID); err != nil {
				s.once("delete/"+ln.Name, "network removed from the fabric, but dockerd keeps it here", "network", ln.Name, "err", err)
				continue
			}
			s.log.Info("network removed fabric-wide; removed it here", "network", ln.Name)
		case fabric.Subnet != ln.Subnet || fabric.SubnetV6 != ln.SubnetV6:
			if inUse[ln.ID] {
				s.once("conflict/"+ln.Name, "dockerd's network has other subnets than the fabric's network of that name, and containers on it; leaving it",
					"network", ln.Name, "here", ln.Subnet, "hereV6", ln.SubnetV6, "fabric", fabric.subnets())
				continue
			}
			if err := s.docker.DeleteNetwork(ctx, ln.ID); err == nil {
				delete(local, ln.Name) // made again below
			}
		default:
			s.known(ln.ID, fabric)
		}
	}
	for name := range s.listed {
		if n, ok := s.state.Networks[name]; !ok || !n.Created.Equal(s.listed[name]) {
			delete(s.listed, name)
			delete(s.gone, name)
		}
	}
	for _, name := range slices.Sorted(maps.Keys(s.state.Networks)) {
		n := s.state.Networks[name]
		if _, ok := local[name]; ok {
			s.listed[name] = n.Created
			delete(s.gone, name)
			continue
		}
		if d.removingHere(s.state, n) {
			continue // going away, by this host's dockerd; etcd is behind
		}
		if _, ok := s.listed[name]; ok {
			since, ok := s.gone[name]
			if !ok {
				since = time.Now()
				s.gone[name] = since
				time.AfterFunc(remakeDelay, d.signal) // look again then
			}
			if time.Since(since) < remakeDelay {
				continue // dockerd may be removing it: its DeleteNetwork comes next
			}
		}
		spec := dockerwatch.Network{Name: n.Name, Subnet: n.Subnet, Gateway: n.Gateway, SubnetV6: n.SubnetV6, GatewayV6: n.GatewayV6, IPAM: DriverName, Labels: n.Labels}
		if err := s.docker.CreateNetwork(ctx, DriverName, spec); err != nil {
			s.once("create/"+name, "cannot make the fabric's network on this host's dockerd; retrying", "network", name, "err", err)
			continue
		}
		delete(s.logged, "create/"+name)
		s.log.Info("made the fabric's network on this host", "network", name, "subnet", n.Subnet)
	}
}

func (s *Sync) known(id string, n Network) {
	d := s.driver
	d.mu.Lock()
	d.networks[id] = n
	delete(d.pending, id)
	delete(d.gateways, n.Subnet)
	d.mu.Unlock()
}

// refuse removes a network created here that cannot be the fabric's.
func (s *Sync) refuse(ctx context.Context, ln dockerwatch.Network, why string) {
	s.log.Error("network created on this host refused; removing it here", "network", ln.Name, "subnet", ln.Subnet, "reason", why)
	d := s.driver
	d.mu.Lock()
	delete(d.pending, ln.ID)
	delete(d.networks, ln.ID)
	d.mu.Unlock()
	if err := s.docker.DeleteNetwork(ctx, ln.ID); err != nil {
		s.log.Warn("remove refused network", "network", ln.Name, "err", err)
	}
}

// addresses keeps this host's addresses in etcd equal to what its
// endpoints use: an address dockerd's containers hold is claimed again if
// etcd lost it (a lease that ended while etcd was away), and one nothing
// uses for a while is freed (a container removed while fabricd was down).
func (s *Sync) addresses(ctx context.Context) {
	d := s.driver
	used := map[netip.Addr]string{}
	for _, c := range s.snap.Containers {
		for _, a := range c.Networks {
			if _, ok := s.state.Networks[a.Network]; ok {
				used[a.Addr] = a.Network
				if a.AddrV6.IsValid() {
					used[a.AddrV6] = a.Network
				}
			}
		}
	}
	d.mu.Lock()
	for _, ep := range d.endpoints {
		used[ep.Addr] = ep.Network
		if ep.AddrV6.IsValid() {
			used[ep.AddrV6] = ep.Network
		}
	}
	d.mu.Unlock()
	now := time.Now()
	for a := range s.lostSince {
		if _, ok := used[a]; !ok {
			delete(s.lostSince, a)
		}
	}
	for a, network := range used {
		g, ok := s.state.Grants[network][a]
		switch {
		case ok && g.Node == d.host.Node:
			delete(s.lostSince, a)
		case ok:
			s.once("taken/"+a.String(), "a container here has an address etcd gives another host's container", "network", network, "address", a, "other", g.Node)
		default:
			since, seen := s.lostSince[a]
			if !seen {
				s.lostSince[a] = now
				continue
			}
			if now.Sub(since) < unusedGrace {
				continue
			}
			if mine, err := d.store.Claim(ctx, Grant{Network: network, Address: a, Node: d.host.Node}, d.host.Lease()); err != nil || !mine {
				s.once("claim/"+a.String(), "cannot record a container's address in etcd", "network", network, "address", a, "err", err)
			}
		}
	}
	for network, grants := range s.state.Grants {
		for a, g := range grants {
			if g.Node != d.host.Node {
				continue
			}
			if _, ok := used[a]; ok {
				delete(s.unusedSince, a)
				continue
			}
			since, seen := s.unusedSince[a]
			if !seen {
				s.unusedSince[a] = now
				continue
			}
			if now.Sub(since) >= unusedGrace {
				if err := d.store.Release(ctx, network, a, d.host.Node); err == nil {
					s.log.Info("freed an address no container here uses", "network", network, "address", a)
					delete(s.unusedSince, a)
				}
			}
		}
	}
}

// endpoints are this host's joined endpoints with their links, and the
// ones dockerd lists (after a restart of fabricd); links of neither are
// removed.
func (s *Sync) endpoints() []Endpoint {
	d := s.driver
	// The links first: one Join makes after this is not swept below.
	names, err := d.links.Names()
	if err != nil {
		s.once("links", "cannot list endpoint links", "err", err)
		return nil
	}
	byID := map[string]Endpoint{}
	for _, c := range s.snap.Containers {
		for _, a := range c.Networks {
			if _, ok := s.state.Networks[a.Network]; ok && a.EndpointID != "" {
				byID[a.EndpointID] = Endpoint{ID: a.EndpointID, Network: a.Network, Addr: a.Addr, AddrV6: a.AddrV6, Link: HostLink(a.EndpointID)}
			}
		}
	}
	keep := map[string]bool{}
	d.mu.Lock()
	for id, ep := range d.endpoints {
		keep[ep.Link] = true
		if d.joined[id] {
			byID[id] = *ep
		}
	}
	d.mu.Unlock()
	have := map[string]bool{}
	for _, n := range names {
		have[n] = true
	}
	var out []Endpoint
	for _, ep := range byID {
		keep[ep.Link] = true
		if have[ep.Link] {
			out = append(out, ep)
		}
	}
	if s.dockerKnown {
		if err := d.links.Sweep(names, keep); err != nil {
			s.once("sweep", "cannot remove endpoint links nothing uses", "err", err)
		}
	}
	slices.SortFunc(out, func(a, b Endpoint) int { return a.Addr.Compare(b.Addr) })
	return out
}

func endpointEqual(a, b Endpoint) bool {
	return a.ID == b.ID && a.Network == b.Network && a.Addr == b.Addr && a.AddrV6 == b.AddrV6 && a.Link == b.Link && slices.Equal(a.Ports, b.Ports)
}

func stateEqual(a, b State) bool { return reflect.DeepEqual(a, b) }
