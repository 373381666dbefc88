package dockernet

import (
	"encoding/binary"
	"fmt"
	"math/bits"
	"net/netip"
)

// space is one family's side of a network: its subnet cut into blocks.
// Both families are cut into the same number of blocks, and block i of
// the IPv6 subnet goes with block i of the IPv4 one: a host holds both,
// through one block record, so every host can check who may route which.
type space struct {
	subnet  netip.Prefix
	gateway netip.Addr
	bits    int // the blocks' length
}

// space returns the network's IPv4 side, or its IPv6 one (invalid subnet
// when it has none).
func (n Network) space(v6 bool) space {
	v4 := space{subnet: n.Subnet, gateway: n.Gateway, bits: BlockBits(n.Subnet)}
	if !v6 {
		return v4
	}
	if !n.SubnetV6.IsValid() {
		return space{}
	}
	return space{subnet: n.SubnetV6, gateway: n.GatewayV6, bits: n.SubnetV6.Bits() + v4.bits - n.Subnet.Bits()}
}

func (sp space) blocks() int { return 1 << (sp.bits - sp.subnet.Bits()) }

// block is the i-th block.
func (sp space) block(i int) netip.Prefix { return blockAt(sp.subnet, sp.bits, i) }

// index is the number of the block holding a (in the subnet).
func (sp space) index(a netip.Addr) int {
	hi, lo := split(a)
	bhi, blo := split(sp.subnet.Addr())
	lo, borrow := bits.Sub64(lo, blo, 0)
	hi, _ = bits.Sub64(hi, bhi, borrow)
	shift := uint(a.BitLen() - sp.bits)
	if shift >= 64 {
		return int(hi >> (shift - 64))
	}
	return int(lo>>shift | hi<<(64-shift))
}

// reserved are the addresses no container gets: the gateway, the subnet's
// own address (IPv6's subnet-router anycast), and IPv4's broadcast.
func (sp space) reserved(a netip.Addr) bool {
	if a == sp.gateway || a == sp.subnet.Addr() {
		return true
	}
	if !a.Is4() {
		return false
	}
	last := sp.subnet.Addr().As4()
	host := 32 - sp.subnet.Bits()
	for i := 3; i >= 0 && host > 0; i-- {
		take := min(host, 8)
		last[i] |= byte(1<<take - 1)
		host -= take
	}
	return a == netip.AddrFrom4(last)
}

// Pick chooses the address node gives a container on network n (its IPv6
// side when v6), from the fabric-wide state s, and the block node must
// claim with it (invalid when none; always the IPv4 block, whose record
// holds both). want is an address asked for (`docker run --ip`), or
// invalid.
//
// An address comes from node's own blocks first, then from a free block it
// claims, and only when every block is held from another host's block (it
// is then routed as a /32, or /128). A wanted address is given wherever it
// lies, if no container has it; its block is claimed when no host holds
// it.
func Pick(s State, n Network, v6 bool, node string, want netip.Addr) (addr netip.Addr, claim netip.Prefix, err error) {
	sp, v4 := n.space(v6), n.space(false)
	if !sp.subnet.IsValid() {
		return netip.Addr{}, netip.Prefix{}, fmt.Errorf("network %s has no IPv6 subnet", n.Name)
	}
	granted := s.Grants[n.Name]
	holder := map[int]string{}
	for _, b := range s.Blocks[n.Name] {
		holder[v4.index(b.Prefix.Addr())] = b.Node
	}
	free := func(a netip.Addr) bool { _, taken := granted[a]; return !taken && !sp.reserved(a) }

	if want.IsValid() {
		switch g, taken := granted[want]; {
		case !sp.subnet.Contains(want):
			return netip.Addr{}, netip.Prefix{}, fmt.Errorf("address %s is not in network %s's subnet %s", want, n.Name, sp.subnet)
		case want == sp.gateway:
			return netip.Addr{}, netip.Prefix{}, fmt.Errorf("address %s is network %s's gateway", want, n.Name)
		case sp.reserved(want):
			return netip.Addr{}, netip.Prefix{}, fmt.Errorf("address %s is the network or broadcast address of %s", want, sp.subnet)
		case taken:
			return netip.Addr{}, netip.Prefix{}, fmt.Errorf("address %s on network %s is in use by a container on host %s", want, n.Name, g.Node)
		}
		if i := sp.index(want); holder[i] == "" {
			claim = v4.block(i)
		}
		return want, claim, nil
	}

	first := func(i int) (netip.Addr, bool) {
		p := sp.block(i)
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
		if a, ok := first(v4.index(b.Prefix.Addr())); ok {
			return a, netip.Prefix{}, nil
		}
	}
	for i := range sp.blocks() {
		if holder[i] != "" {
			continue
		}
		if a, ok := first(i); ok {
			return a, v4.block(i), nil
		}
	}
	for _, b := range s.Blocks[n.Name] {
		if a, ok := first(v4.index(b.Prefix.Addr())); ok {
			return a, netip.Prefix{}, nil
		}
	}
	return netip.Addr{}, netip.Prefix{}, fmt.Errorf("network %s (%s) has no free address", n.Name, sp.subnet)
}

// blockAt is the i-th block of the given length in subnet.
func blockAt(subnet netip.Prefix, length, i int) netip.Prefix {
	hi, lo := split(subnet.Addr())
	shift := uint(subnet.Addr().BitLen() - length)
	var addHi, addLo uint64
	if shift >= 64 {
		addHi = uint64(i) << (shift - 64)
	} else {
		addHi, addLo = uint64(i)>>(64-shift), uint64(i)<<shift
	}
	lo, carry := bits.Add64(lo, addLo, 0)
	hi += addHi + carry
	if subnet.Addr().Is4() {
		var b [4]byte
		binary.BigEndian.PutUint32(b[:], uint32(lo))
		return netip.PrefixFrom(netip.AddrFrom4(b), length)
	}
	var b [16]byte
	binary.BigEndian.PutUint64(b[:8], hi)
	binary.BigEndian.PutUint64(b[8:], lo)
	return netip.PrefixFrom(netip.AddrFrom16(b), length)
}

// split is a's 128 bits (an IPv4 address in its low 32).
func split(a netip.Addr) (hi, lo uint64) {
	if a.Is4() {
		b := a.As4()
		return 0, uint64(binary.BigEndian.Uint32(b[:]))
	}
	b := a.As16()
	return binary.BigEndian.Uint64(b[:8]), binary.BigEndian.Uint64(b[8:])
}
