package planner

import (
	"net/netip"

	"github.com/fabricnet/fabric/dataplane"
	"github.com/fabricnet/fabric/dockernet"
	"github.com/fabricnet/fabric/nat"
)

// NetworkOwnership is what route decisions need of the networks' state.
func NetworkOwnership(s dockernet.State) Networks {
	return Networks{Subnets: s.Subnets(), Owners: s.Owners()}
}

// NetworkRoutes is this host's part in the fabric's Docker networks: the
// prefixes it advertises (its blocks, and a /32 for an address it holds
// outside them), and its local routes: each endpoint's address on its link,
// and each network's subnet unreachable, so an address nobody holds gets an
// ICMP error here instead of following the default route out of the fabric
// (the routes of every host's blocks are longer, and win).
func NetworkRoutes(l dockernet.Local) (advertise []netip.Prefix, local []dataplane.LocalRoute) {
	advertise = l.State.Routes(l.Node)
	for _, s := range l.State.Subnets() {
		local = append(local, dataplane.LocalRoute{Prefix: s})
		if !l.EndpointsKnown {
			// After a restart, before dockerd answers: the endpoints'
			// routes in the kernel are the best there is.
			local = append(local, dataplane.LocalRoute{Prefix: s, KeepInside: true})
		}
	}
	for _, ep := range l.Endpoints {
		local = append(local, dataplane.LocalRoute{Prefix: netip.PrefixFrom(ep.Addr, 32), Dev: ep.Link})
		if ep.AddrV6.IsValid() {
			local = append(local, dataplane.LocalRoute{Prefix: netip.PrefixFrom(ep.AddrV6, 128), Dev: ep.Link})
		}
	}
	return advertise, local
}

// NetworkNAT is what NAT needs of the networks: their subnets (traffic
// between the fabric's spaces keeps its addresses; leaving them, it is
// masqueraded), and the ports this host's containers on them publish.
func NetworkNAT(l dockernet.Local) ([]netip.Prefix, []nat.LocalPort) {
	var ports []nat.LocalPort
	for _, ep := range l.Endpoints {
		for _, p := range ep.Ports {
			proto := map[int]string{6: "tcp", 17: "udp"}[p.Proto]
			if proto == "" || p.HostPort == 0 {
				continue // refused when dockerd asked
			}
			hostIP, _ := netip.ParseAddr(p.HostIP)
			ports = append(ports, nat.LocalPort{Proto: proto, HostIP: hostIP, HostPort: p.HostPort, Target: netip.AddrPortFrom(ep.Addr, p.Port)})
		}
	}
	return l.State.Subnets(), ports
}
