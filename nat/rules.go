package nat

import (
	"fmt"
	"net/netip"
	"slices"
	"strconv"

	"github.com/fabricnet/fabric/iptables"
)

// Section is the name nat's rules go by in the iptables owner.
const Section = "nat"

// render computes every rule nat wants on this host.
func render(st State, publishes []PublishedPort, randomFully bool) iptables.Section {
	pool := st.Pool.Masked()
	subnet := st.Subnet.Masked()

	// Replies of published connections (DNATed here) on any interface; other
	// replies are Docker's to accept, so DOCKER-USER stays in force.
	c := chains{forward: []string{publishedReplies}}
	for _, p := range publishes {
		c.publish(p, netip.AddrPortFrom(p.Target.Addr().Unmap(), p.Target.Port()), subnet)
	}
	for _, lp := range st.LocalPorts {
		if !lp.HostIP.IsValid() || lp.HostIP.Is4() {
			c.localPort(lp, lp.Target)
		}
	}
	prerouting, output, postrouting, forward := c.prerouting, c.output, c.postrouting, c.forward
	masqueradeOptions := ""
	if randomFully {
		masqueradeOptions = " --random-fully"
	}
	// Everything that is the fabric's: the bridges' pool and the networks.
	networks := family(st.Networks, false)
	spaces := append([]netip.Prefix{pool}, networks...)
	for _, src := range spaces {
		for _, dst := range spaces {
			// ACCEPT, not RETURN: it also ends the nat POSTROUTING walk, so a
			// MASQUERADE of dockerd (run without --ip-masq=false) cannot hide
			// container addresses from each other either.
			postrouting = append(postrouting, fmt.Sprintf("-s %s -d %s %s -j ACCEPT", src, dst, comment("traffic between containers keeps its addresses")))
		}
	}
	postrouting = append(postrouting,
		fmt.Sprintf("-s %s ! -d %s %s -j MASQUERADE%s", subnet, pool, comment("containers leaving the fabric use the host address"), masqueradeOptions))
	postrouting = append(postrouting, networksLeaving(networks, masqueradeOptions)...)
	// Fabric traffic only: between this host's bridge and its tunnels, and
	// between the bridge and the underlay for pool-to-pool traffic (direct
	// routes to peers on the same segment). Nothing else: a container on
	// docker0 reaching a user-defined Docker network, or going out to the
	// world, is Docker's to allow or refuse (DOCKER-ISOLATION, DOCKER-USER).
	if st.Bridge != "" {
		for _, t := range st.Tunnels {
			forward = append(forward,
				fmt.Sprintf("-d %s -i %s -o %s %s -j ACCEPT", subnet, t, st.Bridge, comment("fabric tunnel to local containers")),
				fmt.Sprintf("-s %s -i %s -o %s %s -j ACCEPT", subnet, st.Bridge, t, comment("local containers to the fabric tunnel")))
		}
		if st.UnderlayDev != "" {
			forward = append(forward,
				fmt.Sprintf("-s %s -d %s -i %s -o %s %s -j ACCEPT", pool, subnet, st.UnderlayDev, st.Bridge, comment("fabric peers on this segment to local containers")),
				fmt.Sprintf("-s %s -d %s -i %s -o %s %s -j ACCEPT", subnet, pool, st.Bridge, st.UnderlayDev, comment("local containers to fabric peers on this segment")))
		}
	}
	if len(networks) > 0 {
		forward = append(forward, endpointsForward(st, spaces)...)
	}

	return iptables.Section{
		Chains: []iptables.Chain{
			{Table: "filter", Name: EstablishedChain, Rules: []string{"-j ACCEPT"}},
			{Table: "nat", Name: PreroutingChain, Rules: prerouting},
			{Table: "nat", Name: OutputChain, Rules: output},
			{Table: "nat", Name: PostroutingChain, Rules: postrouting},
			{Table: "filter", Name: ForwardChain, Rules: forward},
		},
		Jumps: []iptables.Jump{
			// Only container to container, only established: a connection's
			// first packet always meets policy, and other traffic (to the
			// world, to Docker's networks) stays Docker's to judge.
			{Table: "filter", From: "FORWARD", To: EstablishedChain, Why: "connections between containers, after their first packet",
				Match: fmt.Sprintf("-s %s -d %s -m conntrack --ctstate ESTABLISHED", pool, pool), Rank: iptables.RankEstablished},
			preroutingJump, outputJump, postroutingJump, forwardJump,
		},
	}
}

// renderIPv6 is NAT66 as dockerd does it for IPv6: containers' traffic
// leaving the IPv6 pool takes the host's address; between containers it
// keeps its own. A publish whose target container has an IPv6 address
// (st.AddressesV6) is served on this host's IPv6 addresses as well, with
// the rules of the IPv4 one and this host's IPv6 gateway.
func renderIPv6(st State, publishes []PublishedPort, randomFully bool) iptables.Section {
	if !st.PoolV6.IsValid() || !st.SubnetV6.IsValid() {
		return iptables.Section{}
	}
	masqueradeOptions := ""
	if randomFully {
		masqueradeOptions = " --random-fully"
	}
	pool, subnet := st.PoolV6.Masked(), st.SubnetV6.Masked()
	networks := family(st.Networks, true)
	spaces := append([]netip.Prefix{pool}, networks...)
	// A target's IPv6 address, from the trusted name records, when it is
	// one of the fabric's (the bridges' pool or a network's).
	targetV6 := func(v4 netip.AddrPort) (netip.AddrPort, bool) {
		a, ok := st.AddressesV6[v4.Addr().Unmap()]
		return netip.AddrPortFrom(a, v4.Port()), ok && slices.ContainsFunc(spaces, func(p netip.Prefix) bool { return p.Contains(a) })
	}
	var c chains
	for _, p := range publishes {
		if target, ok := targetV6(p.Target); ok {
			c.publish(p, target, subnet)
		}
	}
	for _, lp := range st.LocalPorts {
		if target, ok := targetV6(lp.Target); ok && (!lp.HostIP.IsValid() || lp.HostIP.Is6() || lp.HostIP.IsUnspecified()) {
			c.localPort(lp, target)
		}
	}
	prerouting, output, postrouting, forward := c.prerouting, c.output, c.postrouting, c.forward
	for _, src := range spaces {
		for _, dst := range spaces {
			postrouting = append(postrouting, fmt.Sprintf("-s %s -d %s %s -j ACCEPT", src, dst, comment("traffic between containers keeps its addresses")))
		}
	}
	postrouting = append(postrouting,
		fmt.Sprintf("-s %s ! -d %s %s -j MASQUERADE%s", subnet, pool, comment("containers leaving the fabric use the host address"), masqueradeOptions))
	postrouting = append(postrouting, networksLeaving(networks, masqueradeOptions)...)
	s := iptables.Section{
		Chains: []iptables.Chain{{Table: "nat", Name: PostroutingChain, Rules: postrouting}},
		Jumps:  []iptables.Jump{postroutingJump},
	}
	if len(prerouting) > 0 {
		forward = append([]string{publishedReplies}, forward...)
		s.Chains = append(s.Chains,
			iptables.Chain{Table: "nat", Name: PreroutingChain, Rules: prerouting},
			iptables.Chain{Table: "nat", Name: OutputChain, Rules: output})
		s.Jumps = append(s.Jumps, preroutingJump, outputJump)
	}
	if len(networks) > 0 && st.EndpointLinks != "" {
		forward = append(forward, endpointsForward(st, spaces)...)
		// The kernel's rp_filter is IPv4's: a container's IPv6 packets
		// must come from its own address (the one routed to its link)
		// so that no container speaks with another's address.
		s.Chains = append(s.Chains, iptables.Chain{Table: "raw", Name: SourceCheckChain, Rules: []string{
			fmt.Sprintf("-i %s -m rpfilter --invert %s -j DROP", st.EndpointLinks, comment("containers on fabric networks send from their own addresses")),
		}})
		s.Jumps = append(s.Jumps, iptables.Jump{Table: "raw", From: "PREROUTING", To: SourceCheckChain, Why: "containers' IPv6 source addresses", Rank: iptables.RankIngress})
	}
	if len(forward) > 0 {
		s.Chains = append(s.Chains, iptables.Chain{Table: "filter", Name: ForwardChain, Rules: forward})
		s.Jumps = append(s.Jumps, forwardJump)
	}
	return s
}

// family keeps the prefixes of one family.
func family(ps []netip.Prefix, v6 bool) []netip.Prefix {
	var out []netip.Prefix
	for _, p := range ps {
		if p.Addr().Is6() == v6 {
			out = append(out, p.Masked())
		}
	}
	return out
}

// networksLeaving masquerades the fabric networks' containers leaving the
// fabric (the rules before it accepted traffic between the fabric's spaces).
func networksLeaving(networks []netip.Prefix, masqueradeOptions string) []string {
	var out []string
	for _, n := range networks {
		out = append(out, fmt.Sprintf("-s %s %s -j MASQUERADE%s", n, comment("containers of network "+n.String()+" leaving the fabric use the host address"), masqueradeOptions))
	}
	return out
}

// endpointsForward accepts the traffic of containers on fabric networks:
// Docker has no rules for a network of a plugin driver, and its FORWARD
// policy drops, so fabric accepts their traffic here, after policy (which
// judges what enters them). spaces are the fabric's prefixes of the
// family (the pool, the networks).
func endpointsForward(st State, spaces []netip.Prefix) []string {
	links := st.EndpointLinks
	if links == "" {
		return nil
	}
	forward := []string{
		fmt.Sprintf("-i %s %s -j ACCEPT", links, comment("containers on fabric networks, outbound")),
		fmt.Sprintf("-o %s -m conntrack --ctstate RELATED,ESTABLISHED %s -j ACCEPT", links, comment("replies to containers on fabric networks")),
		fmt.Sprintf("-o %s -m conntrack --ctstate DNAT %s -j ACCEPT", links, comment("ports published by containers on fabric networks")),
	}
	for _, t := range st.Tunnels {
		forward = append(forward, fmt.Sprintf("-i %s -o %s %s -j ACCEPT", t, links, comment("fabric tunnel to local containers on fabric networks")))
	}
	if st.UnderlayDev != "" {
		for _, src := range spaces {
			forward = append(forward, fmt.Sprintf("-s %s -i %s -o %s %s -j ACCEPT", src, st.UnderlayDev, links, comment("fabric peers on this segment to local containers on fabric networks")))
		}
	}
	if st.Bridge != "" {
		forward = append(forward, fmt.Sprintf("-i %s -o %s %s -j ACCEPT", st.Bridge, links, comment("the bridge's containers to fabric networks (policy isolates them)")))
	}
	return forward
}

// The jumps into nat's chains, the same in both families' tables.
var (
	preroutingJump  = iptables.Jump{Table: "nat", From: "PREROUTING", To: PreroutingChain, Why: "published ports", Rank: iptables.RankNAT}
	outputJump      = iptables.Jump{Table: "nat", From: "OUTPUT", To: OutputChain, Why: "published ports from this host", Rank: iptables.RankNAT}
	postroutingJump = iptables.Jump{Table: "nat", From: "POSTROUTING", To: PostroutingChain, Why: "masquerade and published replies", Rank: iptables.RankNAT}
	forwardJump     = iptables.Jump{Table: "filter", From: "FORWARD", To: ForwardChain, Why: "accept fabric traffic", Rank: iptables.RankAccept}
)

// publishedReplies accepts the replies of connections DNATed here.
var publishedReplies = "-m conntrack --ctstate RELATED,ESTABLISHED -m conntrack --ctstate DNAT " + comment("replies of published connections") + " -j ACCEPT"

// chains are the rules of nat's chains, one list per chain.
type chains struct {
	prerouting, output, postrouting, forward []string
	localPorts                               map[string]bool // rendered, to render once
}

// localPort adds the rules of a port a container on a fabric network
// publishes on this host (`docker run -p`), forwarded to target (its
// address of the rules' family).
func (c *chains) localPort(lp LocalPort, target netip.AddrPort) {
	name := fmt.Sprintf("%s/%d to %s", lp.Proto, lp.HostPort, target)
	dst := "-m addrtype --dst-type LOCAL"
	if lp.HostIP.IsValid() && !lp.HostIP.IsUnspecified() {
		dst = "-d " + netip.PrefixFrom(lp.HostIP, lp.HostIP.BitLen()).String()
	}
	dnat := fmt.Sprintf("-p %s %s -m %s --dport %d %s -j DNAT --to-destination %s",
		lp.Proto, dst, lp.Proto, lp.HostPort, comment("container port "+name), target)
	loopback := "127.0.0.0/8"
	if target.Addr().Is6() {
		loopback = "::1/128"
	}
	if c.localPorts[dnat] {
		return // dockerd binds both 0.0.0.0 and ::, and IPv6 takes either
	}
	if c.localPorts == nil {
		c.localPorts = map[string]bool{}
	}
	c.localPorts[dnat] = true
	c.prerouting = append(c.prerouting, dnat)
	c.output = append(c.output, "! -d "+loopback+" "+dnat)
}

// publish adds the rules of publish p, forwarded to target; subnet is this
// host's subnet of target's family, whose first address (the bridge's,
// routed back to this host by the fabric) is the source of SNATed
// connections.
func (c *chains) publish(p PublishedPort, target netip.AddrPort, subnet netip.Prefix) {
	gateway := subnet.Addr().Next()
	port := strconv.Itoa(int(target.Port()))
	hostPort := strconv.Itoa(int(p.HostPort))
	name := fmt.Sprintf("%s/%d to %s", p.Proto, p.HostPort, target)
	dnat := fmt.Sprintf("-p %s -m addrtype --dst-type LOCAL -m %s --dport %s %s -j DNAT --to-destination %s",
		p.Proto, p.Proto, hostPort, comment("publish "+name), target)
	c.prerouting = append(c.prerouting, dnat)
	// Loopback destinations are excluded: DNAT of 127.0.0.1 to another
	// address needs route_localnet, which fabric does not turn on (and
	// the kernel never routes ::1 off the host).
	loopback := "127.0.0.0/8"
	if target.Addr().Is6() {
		loopback = "::1/128"
	}
	c.output = append(c.output, "! -d "+loopback+" "+dnat)

	// Matches the connection after DNAT by its original port, so only
	// this publish's connections are touched, not dockerd's -p ones.
	published := fmt.Sprintf("-d %s -p %s -m %s --dport %s -m conntrack --ctstate DNAT --ctorigdstport %s",
		netip.PrefixFrom(target.Addr(), target.Addr().BitLen()), p.Proto, p.Proto, port, hostPort)
	if subnet.Contains(target.Addr()) {
		// A local target answers clients from elsewhere through this host
		// anyway; only a container of this bridge (hairpin) would be
		// answered directly, so only it is SNATed.
		c.postrouting = append(c.postrouting, fmt.Sprintf("-s %s %s %s -j SNAT --to-source %s",
			subnet, published, comment("hairpin of publish "+name), gateway))
	} else {
		// A remote target would answer the client directly; SNAT to our
		// gateway makes the reply come back through this host's conntrack.
		c.postrouting = append(c.postrouting, fmt.Sprintf("%s %s -j SNAT --to-source %s",
			published, comment("replies of publish "+name+" return through this host"), gateway))
	}
	c.forward = append(c.forward, fmt.Sprintf("%s %s -j ACCEPT", published, comment("forward publish "+name)))
}

// comment renders nat's comment match the way iptables-save prints it.
func comment(why string) string { return iptables.Comment("fabric: " + why) }
