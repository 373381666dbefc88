package dockernet

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/fabricnet/fabric/dockerplugin"
)

// DriverName is the name of fabric's network and IPAM driver in dockerd
// (`-d fabric --ipam-driver fabric`).
const DriverName = "fabric"

// Endpoint is a container's endpoint on a fabric network on this host.
type Endpoint struct {
	ID      string
	Network string
	Addr    netip.Addr
	AddrV6  netip.Addr // invalid: the network has no IPv6
	Link    string     // the host side of its veth pair
	Ports   []dockerplugin.PortBinding
}

// Host is what the driver needs to know of this host.
type Host struct {
	Node     string
	Pool     netip.Prefix // the fabric's container pool: no network may overlap it
	PoolV6   netip.Prefix // its IPv6 pool, invalid without: IPv6 networks need it
	Underlay netip.Prefix // the underlay segment: nor this
	// UnderlayV6 is the underlay's IPv6 segment, invalid without.
	UnderlayV6 netip.Prefix
	MTU        int // the fabric MTU, for the endpoints' links
	// Lease is the etcd lease of this host's subnet: its addresses and
	// blocks live as long as it.
	Lease func() clientv3.LeaseID
	// Routes lists prefixes this host's kernel routes that are not
	// fabric's (a network must not shadow them), with what they are.
	Routes func() (map[netip.Prefix]string, error)
}

// Driver answers dockerd's plugin calls (dockerplugin.Driver) for this host.
// Every answer is decided from etcd, read at the call, and what it grants
// is recorded there in the same transaction; what it keeps in memory is
// this host's side of it: which dockerd network ID is which network, and
// the endpoints being made.
type Driver struct {
	host  Host
	store *Store
	links *Links
	log   *slog.Logger
	// changed is signalled when the local endpoints change.
	changed chan struct{}

	mu sync.Mutex
	// networks maps dockerd's IDs of its fabric networks to them; pending
	// are the ones created here and not yet in etcd (the name arrives with
	// dockerd's listing, after CreateNetwork returned).
	networks map[string]Network
	pending  map[string]bool
	// gateways are the gateways asked for networks being created here, by
	// subnet (RequestAddress comes before CreateNetwork).
	gateways  map[netip.Prefix]netip.Addr
	endpoints map[string]*Endpoint
	joined    map[string]bool
	// removing are the networks this host's dockerd is removing fabric-wide
	// (by name): dockerd's listing may drop one before etcd has, or etcd's
	// watch tell of it after, and the sync must not make it here again
	// meanwhile.
	removing map[string]removal
}

// removal is a network this host removed fabric-wide: the one created at
// created, removed at at.
type removal struct{ created, at time.Time }

// removalMemory is how long a removal here keeps the sync from making the
// same network (same name and creation time) here again. Not until etcd's
// state first shows it gone: a later state may still show it (CI caught
// compose's network made again 60 ms after its removal), and only the
// removed network itself is held back, never a new one of that name.
const removalMemory = time.Minute

// NewDriver returns the driver for this host.
func NewDriver(host Host, store *Store, links *Links, log *slog.Logger) *Driver {
	return &Driver{host: host, store: store, links: links, log: log, changed: make(chan struct{}, 1),
		networks: map[string]Network{}, pending: map[string]bool{}, gateways: map[netip.Prefix]netip.Addr{},
		endpoints: map[string]*Endpoint{}, joined: map[string]bool{}, removing: map[string]removal{}}
}

// Changed is signalled when an endpoint is joined, left or its ports change.
func (d *Driver) Changed() <-chan struct{} { return d.changed }

func (d *Driver) signal() {
	select {
	case d.changed <- struct{}{}:
	default:
	}
}

func poolID(subnet netip.Prefix) string { return DriverName + "/" + subnet.String() }

func parsePoolID(id string) (netip.Prefix, error) {
	s, ok := strings.CutPrefix(id, DriverName+"/")
	p, err := netip.ParsePrefix(s)
	if !ok || err != nil {
		return netip.Prefix{}, fmt.Errorf("fabric: unknown address pool %q", id)
	}
	return p, nil
}

func (d *Driver) read(ctx context.Context) (State, error) {
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	s, _, err := d.store.Read(ctx)
	if err != nil {
		return State{}, fmt.Errorf("fabric: %w (is etcd reachable from this host?)", err)
	}
	return s, nil
}

// RequestPool checks a network's subnet: a fabric network needs one given
// (--subnet), IPv4, not overlapping the fabric's pool, the underlay, a
// route of this host or another network; with --ipv6 an IPv6 subnet as
// well (a second --subnet), under the same rules. The subnet of a network
// that exists in the fabric (the network sync making it here) is its own.
func (d *Driver) RequestPool(ctx context.Context, req dockerplugin.PoolRequest) (dockerplugin.PoolResponse, error) {
	switch {
	case req.V6 && req.Pool == "":
		return dockerplugin.PoolResponse{}, errors.New("a fabric network with --ipv6 needs its IPv6 subnet too: docker network create -d fabric --ipam-driver fabric --ipv6 --subnet 172.16.1.0/24 --subnet fd00:16:1::/64 NAME")
	case req.V6 && !d.host.PoolV6.IsValid():
		return dockerplugin.PoolResponse{}, errors.New("IPv6 on fabric networks needs the fabric's IPv6 pool (setting poolV6, or `fabricctl ipam init --pool-v6`): the networks' IPv6 blocks are routed between the hosts' IPv6 subnets")
	case req.Pool == "":
		return dockerplugin.PoolResponse{}, errors.New("a fabric network needs its subnet: docker network create -d fabric --ipam-driver fabric --subnet 172.16.1.0/24 NAME")
	case req.SubPool != "":
		return dockerplugin.PoolResponse{}, errors.New("fabric networks do not take --ip-range: each host hands out addresses of the whole subnet")
	}
	subnet, err := netip.ParsePrefix(req.Pool)
	switch {
	case req.V6 && err != nil:
		return dockerplugin.PoolResponse{}, fmt.Errorf("IPv6 subnet %q is not an IPv6 prefix", req.Pool)
	case req.V6:
		// Its size against the IPv4 subnet's is checked when the network
		// is created (CheckSubnetV6): dockerd asks for this pool alone.
		if err := checkPrefixV6(subnet, 0); err != nil {
			return dockerplugin.PoolResponse{}, err
		}
	case err != nil || !subnet.Addr().Is4():
		return dockerplugin.PoolResponse{}, fmt.Errorf("subnet %q is not an IPv4 prefix", req.Pool)
	case subnet.Masked() != subnet:
		return dockerplugin.PoolResponse{}, fmt.Errorf("subnet %s has host bits set: did you mean %s?", subnet, subnet.Masked())
	case subnet.Bits() > 30:
		return dockerplugin.PoolResponse{}, fmt.Errorf("subnet %s is too small for a network (at most /30)", subnet)
	}
	s, err := d.read(ctx)
	if err != nil {
		return dockerplugin.PoolResponse{}, err
	}
	if _, exists := s.NetworkBySubnet(subnet); !exists {
		if err := d.checkSubnet(s, subnet); err != nil {
			return dockerplugin.PoolResponse{}, err
		}
	}
	return dockerplugin.PoolResponse{PoolID: poolID(subnet), Pool: subnet.String(), Data: map[string]string{}}, nil
}

// checkSubnet refuses a new network's subnet that would collide with
// something on the fabric or this host.
func (d *Driver) checkSubnet(s State, subnet netip.Prefix) error {
	for _, pool := range []netip.Prefix{d.host.Pool, d.host.PoolV6} {
		if pool.IsValid() && pool.Overlaps(subnet) {
			return fmt.Errorf("subnet %s overlaps the fabric's container pool %s", subnet, pool)
		}
	}
	for _, u := range []netip.Prefix{d.host.Underlay, d.host.UnderlayV6} {
		if u.IsValid() && u.Overlaps(subnet) {
			return fmt.Errorf("subnet %s overlaps the hosts' underlay %s", subnet, u)
		}
	}
	for _, n := range s.Networks {
		for _, p := range []netip.Prefix{n.Subnet, n.SubnetV6} {
			if p.IsValid() && p.Overlaps(subnet) {
				return fmt.Errorf("subnet %s overlaps fabric network %s (%s)", subnet, n.Name, p)
			}
		}
	}
	if d.host.Routes != nil {
		routes, err := d.host.Routes()
		if err != nil {
			return fmt.Errorf("read this host's routes: %w", err)
		}
		for p, what := range routes {
			if p.Bits() > 0 && p.Overlaps(subnet) {
				return fmt.Errorf("subnet %s overlaps this host's route to %s (%s)", subnet, p, what)
			}
		}
	}
	return nil
}

// ReleasePool has nothing to free: a network's subnet is freed when the
// network is deleted fabric-wide.
func (d *Driver) ReleasePool(context.Context, string) error { return nil }

// RequestAddress gives the gateway of a network, or a container an address
// no other container of the fabric has (Store.Grant).
func (d *Driver) RequestAddress(ctx context.Context, req dockerplugin.AddressRequest) (string, error) {
	subnet, err := parsePoolID(req.PoolID)
	if err != nil {
		return "", err
	}
	var want netip.Addr
	if req.Address != "" {
		if want, err = netip.ParseAddr(req.Address); err != nil {
			return "", fmt.Errorf("address %q: %w", req.Address, err)
		}
	}
	s, err := d.read(ctx)
	if err != nil {
		return "", err
	}
	v6 := subnet.Addr().Is6()
	n, exists := s.NetworkBySubnet(subnet)
	if req.Options[dockerplugin.OptionAddressType] == dockerplugin.AddressTypeGateway {
		if exists {
			gw := n.space(v6).gateway
			if want.IsValid() && want != gw {
				return "", fmt.Errorf("network %s's gateway is %s, not %s", n.Name, gw, want)
			}
			return netip.PrefixFrom(gw, subnet.Bits()).String(), nil
		}
		gw := subnet.Addr().Next()
		if want.IsValid() {
			if !subnet.Contains(want) || (space{subnet: subnet}).reserved(want) {
				return "", fmt.Errorf("gateway %s is not a host address of %s", want, subnet)
			}
			gw = want
		}
		d.mu.Lock()
		d.gateways[subnet] = gw
		d.mu.Unlock()
		return netip.PrefixFrom(gw, subnet.Bits()).String(), nil
	}
	if !exists {
		// Created here a moment ago: its record follows dockerd's listing.
		n, exists = d.waitPublished(ctx, subnet)
	}
	if !exists {
		return "", fmt.Errorf("subnet %s is not a fabric network (yet): see `fabricctl networks`", subnet)
	}
	addr, err := d.store.Grant(ctx, GrantRequest{Network: n.Name, V6: v6, Node: d.host.Node, Want: want, Lease: d.host.Lease()})
	if err != nil {
		return "", err
	}
	d.log.Info("gave a container an address", "network", n.Name, "address", addr)
	if v6 {
		// A /128: the container sends everything to its gateway, this
		// host, which routes it; IPv6 has no proxy ARP for a whole subnet
		// to make its neighbours on the subnet reachable otherwise.
		return netip.PrefixFrom(addr, 128).String(), nil
	}
	return netip.PrefixFrom(addr, subnet.Bits()).String(), nil
}

// waitPublished waits a little for a network created on this host to reach
// etcd.
func (d *Driver) waitPublished(ctx context.Context, subnet netip.Prefix) (Network, bool) {
	d.mu.Lock()
	_, pending := d.gateways[subnet]
	d.mu.Unlock()
	for i := 0; pending && i < 50 && ctx.Err() == nil; i++ {
		time.Sleep(100 * time.Millisecond)
		if s, err := d.read(ctx); err == nil {
			if n, ok := s.NetworkBySubnet(subnet); ok {
				return n, true
			}
		}
	}
	return Network{}, false
}

// ReleaseAddress frees a container's address fabric-wide.
func (d *Driver) ReleaseAddress(ctx context.Context, pool, address string) error {
	subnet, err := parsePoolID(pool)
	if err != nil {
		return err
	}
	a, err := netip.ParseAddr(strings.Split(address, "/")[0])
	if err != nil {
		return fmt.Errorf("address %q: %w", address, err)
	}
	s, err := d.read(ctx)
	if err != nil {
		return err
	}
	n, ok := s.NetworkBySubnet(subnet)
	if !ok || a == n.Gateway || a == n.GatewayV6 {
		return nil
	}
	return d.store.Release(ctx, n.Name, a, d.host.Node)
}

// CreateNetwork accepts a network whose addresses come from fabric's IPAM.
// A network new to the fabric is recorded in etcd once dockerd's listing
// gives its name (Sync).
func (d *Driver) CreateNetwork(ctx context.Context, req dockerplugin.CreateNetworkRequest) error {
	if len(req.IPv4Data) != 1 {
		return fmt.Errorf("a fabric network has exactly one IPv4 subnet, got %d", len(req.IPv4Data))
	}
	if len(req.IPv6Data) > 1 {
		return fmt.Errorf("a fabric network has at most one IPv6 subnet, got %d", len(req.IPv6Data))
	}
	subnet, gw, err := ipamData(req.IPv4Data[0])
	if err != nil {
		return err
	}
	var subnetV6, gwV6 netip.Prefix
	if len(req.IPv6Data) == 1 {
		if subnetV6, gwV6, err = ipamData(req.IPv6Data[0]); err != nil {
			return err
		}
		if err := CheckSubnetV6(subnetV6, subnet); err != nil {
			return err
		}
	}
	s, err := d.read(ctx)
	if err != nil {
		return err
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if n, ok := s.NetworkBySubnet(subnet); ok {
		d.networks[req.NetworkID] = n
		return nil
	}
	d.networks[req.NetworkID] = Network{Subnet: subnet, Gateway: gw.Addr(), SubnetV6: subnetV6, GatewayV6: gwV6.Addr(), CreatedOn: d.host.Node}
	d.pending[req.NetworkID] = true
	return nil
}

// ipamData is the subnet and gateway of one of a new network's IPAM data.
func ipamData(data dockerplugin.IPAMData) (subnet, gateway netip.Prefix, err error) {
	if data.AddressSpace != dockerplugin.AddressSpace {
		return subnet, gateway, errors.New("a fabric network needs fabric's IPAM driver (--ipam-driver fabric): with Docker's default IPAM every host would hand out the same addresses")
	}
	if subnet, err = netip.ParsePrefix(data.Pool); err != nil {
		return subnet, gateway, fmt.Errorf("subnet %q: %w", data.Pool, err)
	}
	if gateway, err = netip.ParsePrefix(data.Gateway); err != nil {
		return subnet, gateway, fmt.Errorf("gateway %q: %w", data.Gateway, err)
	}
	return subnet, gateway, nil
}

// DeleteNetwork removes the network fabric-wide; refused while a container
// on any host is attached, with where they are. A network already gone
// from etcd (removed on another host, and now here by the sync) is fine.
// dockerd 20.10 logs a driver's refusal ("driver error deleting network")
// and removes its own copy anyway; the sync then makes it again, since the
// fabric still has it.
func (d *Driver) DeleteNetwork(ctx context.Context, id string) error {
	d.mu.Lock()
	n, known := d.networks[id]
	pending := d.pending[id]
	d.mu.Unlock()
	if known && !pending && n.Name != "" {
		d.mu.Lock()
		d.removing[n.Name] = removal{created: n.Created, at: time.Now()}
		d.mu.Unlock()
		if err := d.store.Delete(ctx, n.Name); err != nil {
			d.mu.Lock()
			delete(d.removing, n.Name)
			d.mu.Unlock()
			d.signal() // dockerd may drop it anyway: the sync makes it again
			d.log.Warn("network not removed from the fabric; if dockerd removes it here anyway, fabricd makes it again", "network", n.Name, "err", err)
			return err
		}
		d.log.Info("network removed fabric-wide", "network", n.Name, "subnet", n.Subnet)
	}
	d.mu.Lock()
	delete(d.networks, id)
	delete(d.pending, id)
	delete(d.gateways, n.Subnet)
	d.mu.Unlock()
	return nil
}

// removingHere says whether n is a network this host removed fabric-wide
// (within removalMemory), and forgets older removals and those whose name
// the fabric's state s now gives to a new network.
func (d *Driver) removingHere(s State, n Network) bool {
	d.mu.Lock()
	defer d.mu.Unlock()
	for name, r := range d.removing {
		if now, ok := s.Networks[name]; (ok && !now.Created.Equal(r.created)) || time.Since(r.at) > removalMemory {
			delete(d.removing, name)
		}
	}
	r, ok := d.removing[n.Name]
	return ok && r.created.Equal(n.Created)
}

func (d *Driver) network(id string) (Network, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	n, ok := d.networks[id]
	if !ok || n.Name == "" {
		return Network{}, fmt.Errorf("fabric: network %s is not known to fabricd yet; try again in a moment", shortID(id))
	}
	return n, nil
}

// CreateEndpoint notes the endpoint with the address fabric's IPAM gave it.
func (d *Driver) CreateEndpoint(ctx context.Context, req dockerplugin.CreateEndpointRequest) (dockerplugin.CreateEndpointResponse, error) {
	n, err := d.network(req.NetworkID)
	if err != nil {
		return dockerplugin.CreateEndpointResponse{}, err
	}
	if req.Interface == nil || req.Interface.Address == "" {
		return dockerplugin.CreateEndpointResponse{}, fmt.Errorf("network %s: the endpoint has no address (a fabric network needs --ipam-driver fabric)", n.Name)
	}
	p, err := netip.ParsePrefix(req.Interface.Address)
	if err != nil || !n.Subnet.Contains(p.Addr()) {
		return dockerplugin.CreateEndpointResponse{}, fmt.Errorf("network %s: address %q is not in %s", n.Name, req.Interface.Address, n.Subnet)
	}
	var v6 netip.Addr
	if req.Interface.AddressIPv6 != "" {
		p6, err := netip.ParsePrefix(req.Interface.AddressIPv6)
		if err != nil || !n.SubnetV6.Contains(p6.Addr()) {
			return dockerplugin.CreateEndpointResponse{}, fmt.Errorf("network %s: IPv6 address %q is not in %v", n.Name, req.Interface.AddressIPv6, n.SubnetV6)
		}
		v6 = p6.Addr()
	}
	d.mu.Lock()
	d.endpoints[req.EndpointID] = &Endpoint{ID: req.EndpointID, Network: n.Name, Addr: p.Addr(), AddrV6: v6, Link: HostLink(req.EndpointID)}
	d.mu.Unlock()
	return dockerplugin.CreateEndpointResponse{}, nil
}

// DeleteEndpoint forgets the endpoint (its address is released by dockerd).
func (d *Driver) DeleteEndpoint(_ context.Context, _, endpointID string) error {
	d.mu.Lock()
	delete(d.endpoints, endpointID)
	delete(d.joined, endpointID)
	d.mu.Unlock()
	d.links.Delete(endpointID)
	d.signal()
	return nil
}

// EndpointOperInfo has nothing to add to what dockerd knows.
func (d *Driver) EndpointOperInfo(context.Context, string, string) (map[string]any, error) {
	return map[string]any{}, nil
}

// Join makes the endpoint's veth pair: the container gets one end (as
// ethN), with the network's gateway as its default route; this host routes
// the container's address to the other end.
func (d *Driver) Join(ctx context.Context, req dockerplugin.JoinRequest) (dockerplugin.JoinResponse, error) {
	n, err := d.network(req.NetworkID)
	if err != nil {
		return dockerplugin.JoinResponse{}, err
	}
	d.mu.Lock()
	ep, ok := d.endpoints[req.EndpointID]
	d.mu.Unlock()
	if !ok {
		return dockerplugin.JoinResponse{}, fmt.Errorf("network %s: endpoint %s was not created through fabricd (was fabricd restarted meanwhile?); start the container again", n.Name, shortID(req.EndpointID))
	}
	ipv6 := ep.AddrV6.IsValid()
	temp, err := d.links.Create(req.EndpointID, n.Gateway, ipv6, d.host.MTU)
	if err != nil {
		return dockerplugin.JoinResponse{}, fmt.Errorf("network %s: %w", n.Name, err)
	}
	d.mu.Lock()
	d.joined[req.EndpointID] = true
	d.mu.Unlock()
	d.signal()
	d.log.Info("container joined a fabric network", "network", n.Name, "address", ep.Addr, "addressV6", ep.AddrV6, "link", ep.Link)
	resp := dockerplugin.JoinResponse{
		InterfaceName: dockerplugin.InterfaceName{SrcName: temp, DstPrefix: "eth"},
		Gateway:       n.Gateway.String(),
	}
	if ipv6 {
		// The host side's link-local address, on the link (the container's
		// address is a /128: everything goes to it).
		resp.GatewayIPv6 = GatewayV6.String()
		resp.StaticRoutes = append(resp.StaticRoutes, dockerplugin.StaticRoute{Destination: netip.PrefixFrom(GatewayV6, 128).String(), RouteType: dockerplugin.RouteConnected})
	}
	return resp, nil
}

// Leave removes the endpoint's veth pair.
func (d *Driver) Leave(_ context.Context, _, endpointID string) error {
	d.mu.Lock()
	delete(d.joined, endpointID)
	d.mu.Unlock()
	err := d.links.Delete(endpointID)
	d.signal()
	return err
}

// ProgramExternalConnectivity publishes the endpoint's ports (`docker run
// -p`) on this host, as dockerd does on its own bridges.
func (d *Driver) ProgramExternalConnectivity(_ context.Context, _, endpointID string, ports []dockerplugin.PortBinding) error {
	for _, p := range ports {
		if p.HostPort == 0 {
			return fmt.Errorf("publish port %d: a fabric network needs the host port given (-p HOSTPORT:%d)", p.Port, p.Port)
		}
		if p.HostPortEnd != 0 && p.HostPortEnd != p.HostPort {
			return fmt.Errorf("publish port %d: host port ranges are not supported on fabric networks", p.Port)
		}
		if p.Proto != 6 && p.Proto != 17 {
			return fmt.Errorf("publish port %d: only tcp and udp", p.Port)
		}
	}
	d.mu.Lock()
	if ep, ok := d.endpoints[endpointID]; ok {
		ep.Ports = slices.Clone(ports)
	}
	d.mu.Unlock()
	d.signal()
	return nil
}

// RevokeExternalConnectivity unpublishes the endpoint's ports.
func (d *Driver) RevokeExternalConnectivity(_ context.Context, _, endpointID string) error {
	d.mu.Lock()
	if ep, ok := d.endpoints[endpointID]; ok {
		ep.Ports = nil
	}
	d.mu.Unlock()
	d.signal()
	return nil
}

var _ dockerplugin.Driver = (*Driver)(nil)
