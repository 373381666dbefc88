package dockernet

import (
	"fmt"
	"net/netip"
)

// Pick chooses the address node gives a container on network n, from the
// fabric-wide state s, and the block node must claim with it (invalid when
// none). want is an address asked for (`docker run --ip`), or invalid.
//
// An address comes from node's own blocks first, then from a free block it
// claims, and only when every block is held from another host's block (it
// is then routed as a /32). A wanted address is given wherever it lies, if
// no container has it; its block is claimed when no host holds it.
func Pick(s State, n Network, node string, want netip.Addr) (addr netip.Addr, claim netip.Prefix, err error) {
	granted := s.Grants[n.Name]
	holder := map[netip.Prefix]string{}
	for _, b := range s.Blocks[n.Name] {
		holder[b.Prefix] = b.Node
	}
	bits := BlockBits(n.Subnet)
	blockOf := func(a netip.Addr) netip.Prefix { p, _ := a.Prefix(bits); return p }
	free := func(a netip.Addr) bool { _, taken := granted[a]; return !taken && !reserved(n, a) }

	if want.IsValid() {
		switch g, taken := granted[want]; {
		case !n.Subnet.Contains(want):
			return netip.Addr{}, netip.Prefix{}, fmt.Errorf("address %s is not in network %s's subnet %s", want, n.Name, n.Subnet)
		case want == n.Gateway:
			return netip.Addr{}, netip.Prefix{}, fmt.Errorf("address %s is network %s's gateway", want, n.Name)
		case reserved(n, want):
			return netip.Addr{}, netip.Prefix{}, fmt.Errorf("address %s is the network or broadcast address of %s", want, n.Subnet)
		case taken:
			return netip.Addr{}, netip.Prefix{}, fmt.Errorf("address %s on network %s is in use by a container on host %s", want, n.Name, g.Node)
		}
		if _, held := holder[blockOf(want)]; !held {
			claim = blockOf(want)
		}
		return want, claim, nil
	}

	blocks := 1 << (bits - n.Subnet.Bits())
	first := func(p netip.Prefix) (netip.Addr, bool) {
		for a := p.Addr(); p.Contains(a); a = a.Next() {
			if free(a) {
				return a, true
			}
		}
		return netip.Addr{}, false
	}
	for _, b := range s.Blocks[n.Name] {
		if b.Node != node {
			continue
		}
		if a, ok := first(b.Prefix); ok {
			return a, netip.Prefix{}, nil
		}
	}
	for i := range blocks {
		p := blockAt(n.Subnet, bits, i)
		if _, held := holder[p]; held {
			continue
		}
		if a, ok := first(p); ok {
			return a, p, nil
		}
	}
	for _, b := range s.Blocks[n.Name] {
		if a, ok := first(b.Prefix); ok {
			return a, netip.Prefix{}, nil
		}
	}
	return netip.Addr{}, netip.Prefix{}, fmt.Errorf("network %s (%s) has no free address", n.Name, n.Subnet)
}

// reserved are the addresses no container gets: the gateway, and the
// network and broadcast addresses of the subnet.
func reserved(n Network, a netip.Addr) bool {
	if a == n.Gateway || a == n.Subnet.Addr() {
		return true
	}
	last := n.Subnet.Addr().As4()
	host := 32 - n.Subnet.Bits()
	for i := 3; i >= 0 && host > 0; i-- {
		take := min(host, 8)
		last[i] |= byte(1<<take - 1)
		host -= take
	}
	return a == netip.AddrFrom4(last)
}

// blockAt is the i-th block of length bits in subnet.
func blockAt(subnet netip.Prefix, bits, i int) netip.Prefix {
	base := subnet.Addr().As4()
	v := uint32(base[0])<<24 | uint32(base[1])<<16 | uint32(base[2])<<8 | uint32(base[3])
	v += uint32(i) << (32 - bits)
	return netip.PrefixFrom(netip.AddrFrom4([4]byte{byte(v >> 24), byte(v >> 16), byte(v >> 8), byte(v)}), bits)
}
