// Package dockernet puts Docker networks on the fabric: `docker network
// create -d fabric --ipam-driver fabric --subnet S NAME` on any host makes
// NAME exist on every host, and containers on it reach each other across
// hosts, routed (no L2 between hosts).
//
// The fabric-wide state lives in etcd:
//
//	<prefix>/networks/<name>                 the network: subnets, gateways (permanent)
//	<prefix>/netblocks/<name>/<a.b.c.d-len>  a block of its addresses one host hands out
//	<prefix>/netaddrs/<name>/<address>       an address given to a container
//
// Blocks and addresses are attached to their host's subnet lease, so they
// are freed with it (`fabricctl ipam release`, or the subnet TTL after the
// host died). An address is taken with a transaction that succeeds only if
// its key does not exist: no address is ever given twice fabric-wide. A
// host advertises its blocks over BGP, and a /32 for an address it holds
// outside them (`docker run --ip` into another host's block); other hosts
// accept exactly those routes from it (planner.Networks).
//
// A network created with --ipv6 has an IPv6 subnet too, cut into as many
// blocks as the IPv4 one: the holder of IPv4 block i holds IPv6 block i
// (one record), and IPv6 addresses are granted as IPv4 ones are.
package dockernet

import (
	"encoding/json"
	"fmt"
	"net/netip"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"time"
)

// Network is one fabric network, the same on every host.
type Network struct {
	Name    string       `json:"name"`
	Subnet  netip.Prefix `json:"subnet"`
	Gateway netip.Addr   `json:"gateway"`
	// SubnetV6 and GatewayV6 are its IPv6 side (--ipv6), invalid without.
	SubnetV6  netip.Prefix `json:"subnetV6,omitzero"`
	GatewayV6 netip.Addr   `json:"gatewayV6,omitzero"`
	Created   time.Time    `json:"created"`
	CreatedOn string       `json:"createdOn"` // the host whose dockerd it was created on
	// Labels are the network's labels where it was created, given to it on
	// every host (docker-compose finds its networks by them).
	Labels map[string]string `json:"labels,omitempty"`
}

// subnets says the network's subnets: "172.16.1.0/24", or with IPv6
// "172.16.1.0/24 and fd00:16:1::/64".
func (n Network) subnets() string {
	if n.SubnetV6.IsValid() {
		return n.Subnet.String() + " and " + n.SubnetV6.String()
	}
	return n.Subnet.String()
}

// checkPrefixV6 names the first problem of p as an IPv6 subnet cut into
// 2^blockBits blocks of 256 addresses or more, whatever the IPv4 side.
func checkPrefixV6(p netip.Prefix, blockBits int) error {
	switch {
	case !p.IsValid() || !p.Addr().Is6() || p.Addr().Is4In6():
		return fmt.Errorf("IPv6 subnet %v is not an IPv6 prefix", p)
	case p.Masked() != p:
		return fmt.Errorf("IPv6 subnet %s has host bits set (want %s)", p, p.Masked())
	case p.Addr().IsLinkLocalUnicast() || p.Addr().IsMulticast() || p.Addr().IsLoopback() || p.Bits() < 8:
		return fmt.Errorf("IPv6 subnet %s is link-local, multicast, loopback or too large", p)
	case p.Bits()+blockBits > 120:
		return fmt.Errorf("IPv6 subnet %s is too small: at most /%d", p, 120-blockBits)
	}
	return nil
}

// namePattern is what Docker accepts as a network name.
var namePattern = regexp.MustCompile(`^[a-zA-Z0-9][a-zA-Z0-9_.-]*$`)

// Validate names the first problem of a network record.
func (n Network) Validate() error {
	switch {
	case !namePattern.MatchString(n.Name) || len(n.Name) > 128:
		return fmt.Errorf("network name %q: want letters, digits, '_', '.', '-'", n.Name)
	case !n.Subnet.IsValid() || !n.Subnet.Addr().Is4():
		return fmt.Errorf("network %s: subnet %v is not an IPv4 prefix", n.Name, n.Subnet)
	case n.Subnet.Masked() != n.Subnet:
		return fmt.Errorf("network %s: subnet %s has host bits set (want %s)", n.Name, n.Subnet, n.Subnet.Masked())
	case n.Subnet.Bits() > 30:
		return fmt.Errorf("network %s: subnet %s is too small (at most /30)", n.Name, n.Subnet)
	case !n.Subnet.Contains(n.Gateway):
		return fmt.Errorf("network %s: gateway %v is not in its subnet %s", n.Name, n.Gateway, n.Subnet)
	}
	if !n.SubnetV6.IsValid() {
		if n.GatewayV6.IsValid() {
			return fmt.Errorf("network %s: IPv6 gateway %s without an IPv6 subnet", n.Name, n.GatewayV6)
		}
		return nil
	}
	if err := CheckSubnetV6(n.SubnetV6, n.Subnet); err != nil {
		return fmt.Errorf("network %s: %w", n.Name, err)
	}
	if !n.SubnetV6.Contains(n.GatewayV6) || n.GatewayV6 == n.SubnetV6.Addr() {
		return fmt.Errorf("network %s: IPv6 gateway %v is not a host address of its IPv6 subnet %s", n.Name, n.GatewayV6, n.SubnetV6)
	}
	return nil
}

// CheckSubnetV6 names the first problem of p as the IPv6 subnet of a
// network whose IPv4 subnet is v4: it must be cut into as many blocks as
// v4 is, of 256 addresses or more.
func CheckSubnetV6(p, v4 netip.Prefix) error {
	if err := checkPrefixV6(p, 0); err != nil {
		return err
	}
	if blocks := BlockBits(v4) - v4.Bits(); p.Bits()+blocks > 120 {
		return fmt.Errorf("IPv6 subnet %s is too small: it is cut into as many blocks as the IPv4 subnet %s (%d), so at most /%d", p, v4, 1<<blocks, 120-blocks)
	}
	return nil
}

// BlockBits is the length of the blocks a network's subnet is handed out
// in: 16 addresses for a /24, 64 for a /16 or larger, single addresses for
// the smallest subnets.
func BlockBits(subnet netip.Prefix) int {
	return min(32, max(subnet.Bits()+4, 26))
}

// Grant is an address given to a container on a host.
type Grant struct {
	Network string     `json:"network"`
	Address netip.Addr `json:"address"`
	Node    string     `json:"node"`
	// Endpoint is dockerd's endpoint ID, once the endpoint exists (the
	// address is requested before it).
	Endpoint string `json:"endpoint,omitempty"`
}

// Block is a piece of a network's subnet that one host hands out.
type Block struct {
	Network string       `json:"network"`
	Prefix  netip.Prefix `json:"prefix"`
	Node    string       `json:"node"`
}

// State is the fabric-wide state of every network.
type State struct {
	Networks map[string]Network
	Blocks   map[string][]Block              // by network, sorted by prefix
	Grants   map[string]map[netip.Addr]Grant // by network, then address
	// Problems are keys that could not be read, with what is wrong.
	Problems map[string]string
}

// NetworkBySubnet returns the network whose subnet (or IPv6 subnet) is p.
func (s State) NetworkBySubnet(p netip.Prefix) (Network, bool) {
	for _, n := range s.Networks {
		if n.Subnet == p || (p.IsValid() && n.SubnetV6 == p) {
			return n, true
		}
	}
	return Network{}, false
}

// NetworkOf returns the network whose subnet (or IPv6 subnet) holds a.
func (s State) NetworkOf(a netip.Addr) (Network, bool) {
	for _, n := range s.Networks {
		if n.Subnet.Contains(a) || n.SubnetV6.Contains(a) {
			return n, true
		}
	}
	return Network{}, false
}

// Routes are the prefixes node must advertise: its blocks (of both
// families), and a /32 (or /128) for each address it holds outside them.
func (s State) Routes(node string) []netip.Prefix {
	var out []netip.Prefix
	for p, owner := range s.Owners() {
		if owner != node {
			continue
		}
		if p.IsSingleIP() && containedIn(s.blocksOf(node), p.Addr()) {
			continue // inside its own block: the block's route covers it
		}
		out = append(out, p)
	}
	sortPrefixes(out)
	return out
}

// blocksOf are node's blocks of every network, both families.
func (s State) blocksOf(node string) []netip.Prefix {
	var out []netip.Prefix
	for name, n := range s.Networks {
		for _, b := range s.Blocks[name] {
			if b.Node == node {
				out = append(out, n.BlockPrefixes(b)...)
			}
		}
	}
	return out
}

// BlockPrefixes are block b's prefixes: its IPv4 one, and the IPv6 block
// that goes with it when the network has IPv6.
func (n Network) BlockPrefixes(b Block) []netip.Prefix {
	out := []netip.Prefix{b.Prefix}
	if v6 := n.space(true); v6.subnet.IsValid() {
		out = append(out, v6.block(n.space(false).index(b.Prefix.Addr())))
	}
	return out
}

// Owners maps every prefix a host may advertise for a network to that host:
// the planner accepts a route inside a network's subnet only from there.
func (s State) Owners() map[netip.Prefix]string {
	out := map[netip.Prefix]string{}
	for name, n := range s.Networks {
		for _, b := range s.Blocks[name] {
			for _, p := range n.BlockPrefixes(b) {
				out[p] = b.Node
			}
		}
		for a, g := range s.Grants[name] {
			out[netip.PrefixFrom(a, a.BitLen())] = g.Node
		}
	}
	return out
}

// Subnets are the subnets of every network, both families, sorted.
func (s State) Subnets() []netip.Prefix {
	out := make([]netip.Prefix, 0, len(s.Networks))
	for _, n := range s.Networks {
		out = append(out, n.Subnet)
		if n.SubnetV6.IsValid() {
			out = append(out, n.SubnetV6)
		}
	}
	sortPrefixes(out)
	return out
}

func containedIn(ps []netip.Prefix, a netip.Addr) bool {
	for _, p := range ps {
		if p.Contains(a) {
			return true
		}
	}
	return false
}

func sortPrefixes(ps []netip.Prefix) {
	slices.SortFunc(ps, func(a, b netip.Prefix) int {
		if c := a.Addr().Compare(b.Addr()); c != 0 {
			return c
		}
		return a.Bits() - b.Bits()
	})
}

func normPrefix(prefix string) string {
	if prefix == "" {
		return "/fabric"
	}
	return strings.TrimRight(prefix, "/")
}

func networksDir(prefix string) string { return normPrefix(prefix) + "/networks/" }
func blocksDir(prefix string) string   { return normPrefix(prefix) + "/netblocks/" }
func grantsDir(prefix string) string   { return normPrefix(prefix) + "/netaddrs/" }

func networkKey(prefix, name string) string { return networksDir(prefix) + name }

func blockKey(prefix, network string, p netip.Prefix) string {
	return blocksDir(prefix) + network + "/" + p.Addr().String() + "-" + strconv.Itoa(p.Bits())
}

func grantKey(prefix, network string, a netip.Addr) string {
	return grantsDir(prefix) + network + "/" + a.String()
}

// decodeState reads the three directories' keys (key -> value).
func decodeState(prefix string, kvs map[string][]byte) State {
	s := State{Networks: map[string]Network{}, Blocks: map[string][]Block{}, Grants: map[string]map[netip.Addr]Grant{}, Problems: map[string]string{}}
	for key, value := range kvs {
		switch {
		case strings.HasPrefix(key, networksDir(prefix)):
			var n Network
			err := json.Unmarshal(value, &n)
			if err == nil {
				err = n.Validate()
			}
			if err == nil && networkKey(prefix, n.Name) != key {
				err = fmt.Errorf("network %s stored under the wrong key (want %s)", n.Name, networkKey(prefix, n.Name))
			}
			if err != nil {
				s.Problems[key] = err.Error()
				continue
			}
			s.Networks[n.Name] = n
		case strings.HasPrefix(key, blocksDir(prefix)):
			var b Block
			err := json.Unmarshal(value, &b)
			if err == nil && (b.Node == "" || !b.Prefix.IsValid() || blockKey(prefix, b.Network, b.Prefix) != key) {
				err = fmt.Errorf("block record %s does not match its key", value)
			}
			if err != nil {
				s.Problems[key] = err.Error()
				continue
			}
			s.Blocks[b.Network] = append(s.Blocks[b.Network], b)
		case strings.HasPrefix(key, grantsDir(prefix)):
			var g Grant
			err := json.Unmarshal(value, &g)
			if err == nil && (g.Node == "" || !g.Address.IsValid() || g.Address.Is4In6() || g.Address.Zone() != "" || grantKey(prefix, g.Network, g.Address) != key) {
				err = fmt.Errorf("address record %s does not match its key", value)
			}
			if err != nil {
				s.Problems[key] = err.Error()
				continue
			}
			if s.Grants[g.Network] == nil {
				s.Grants[g.Network] = map[netip.Addr]Grant{}
			}
			s.Grants[g.Network][g.Address] = g
		}
	}
	// Blocks and grants of a network that is gone (a deletion half seen)
	// count for nothing.
	for name, bs := range s.Blocks {
		n, ok := s.Networks[name]
		if !ok {
			delete(s.Blocks, name)
			continue
		}
		// A block is one of the network's IPv4 blocks: the IPv6 one that
		// goes with it is found by its place in the subnet.
		bs = slices.DeleteFunc(bs, func(b Block) bool {
			if b.Prefix.Masked() == b.Prefix && b.Prefix.Bits() == BlockBits(n.Subnet) && n.Subnet.Contains(b.Prefix.Addr()) {
				return false
			}
			s.Problems[blockKey(prefix, name, b.Prefix)] = fmt.Sprintf("%s is not a block of network %s (%s)", b.Prefix, name, n.Subnet)
			return true
		})
		s.Blocks[name] = bs
		slices.SortFunc(bs, func(a, b Block) int { return a.Prefix.Addr().Compare(b.Prefix.Addr()) })
	}
	for name, grants := range s.Grants {
		n, ok := s.Networks[name]
		if !ok {
			delete(s.Grants, name)
			continue
		}
		for a := range grants {
			if !n.Subnet.Contains(a) && !n.SubnetV6.Contains(a) {
				s.Problems[grantKey(prefix, name, a)] = fmt.Sprintf("address %s is not in network %s's subnets", a, name)
				delete(grants, a)
			}
		}
	}
	return s
}

// Owns reports whether address a on network is given to node's container.
func (s State) Owns(network, node string, a netip.Addr) bool {
	g, ok := s.Grants[network][a]
	return ok && g.Node == node
}
