// Package ipam hands out one subnet of a shared pool to each host. The pool
// configuration and the subnet leases live in etcd:
//
//	<prefix>/config                  {"network":"10.244.0.0/16","subnetLen":24}
//	<prefix>/subnets/<a.b.c.d-len>   {"node":...,"machineID":...,"hostAddr":...,"leaseID":...}
//
// Each subnet key is attached to a long etcd lease that the owning agent
// renews, so the subnet of a host that died is freed once the lease expires,
// while a normal agent restart keeps the same subnet.
package ipam

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"

	clientv3 "go.etcd.io/etcd/client/v3"
)

// DefaultPrefix is the etcd key prefix used when none is configured.
const DefaultPrefix = "/fabric/v1"

// DefaultSubnetLen is the per-host subnet length callers apply when the user
// gave none.
const DefaultSubnetLen = 24

// maxSubnetLen keeps at least two usable addresses (gateway + one container).
const maxSubnetLen = 30

// ErrNoPool is returned (wrapped) when the pool configuration key is absent.
var ErrNoPool = errors.New("no pool configured")

// Pool is the address range hosts take their subnets from.
type Pool struct {
	Network   netip.Prefix `json:"network"`
	SubnetLen int          `json:"subnetLen"`
	// NetworkV6 is the IPv6 pool, invalid when the fabric is IPv4 only. A
	// host's IPv6 subnet is not leased on its own: it is the /64 with the
	// same index in NetworkV6 as the host's IPv4 subnet in Network
	// (SubnetV6), so it has the IPv4 lease's owner, lifetime and
	// reservation, and every host can check a peer's without asking etcd.
	NetworkV6 netip.Prefix `json:"networkV6,omitzero"`
}

// SubnetLenV6 is the length of each host's IPv6 subnet: a /64, what
// dockerd's --fixed-cidr-v6 and address autoconfiguration expect.
const SubnetLenV6 = 64

// Validate checks that the pool is an IPv4 network split into subnets of a
// usable length.
func (p Pool) Validate() error {
	if !p.Network.IsValid() {
		return fmt.Errorf("pool network is not set or not a CIDR")
	}
	if !p.Network.Addr().Is4() {
		return fmt.Errorf("pool network %s is not IPv4: only IPv4 pools are supported", p.Network)
	}
	if p.Network.Masked() != p.Network {
		return fmt.Errorf("pool network %s has host bits set; did you mean %s?", p.Network, p.Network.Masked())
	}
	if p.SubnetLen <= p.Network.Bits() || p.SubnetLen > maxSubnetLen {
		return fmt.Errorf("pool subnet length /%d is out of range for network %s: want /%d to /%d",
			p.SubnetLen, p.Network, p.Network.Bits()+1, maxSubnetLen)
	}
	if p.NetworkV6.IsValid() {
		return p.validateV6()
	}
	return nil
}

func (p Pool) validateV6() error {
	v6 := p.NetworkV6
	indexBits := p.SubnetLen - p.Network.Bits()
	switch {
	case !v6.Addr().Is6() || v6.Addr().Is4In6():
		return fmt.Errorf("IPv6 pool %s is not an IPv6 network", v6)
	case v6.Masked() != v6:
		return fmt.Errorf("IPv6 pool %s has host bits set; did you mean %s?", v6, v6.Masked())
	case !v6.Addr().IsGlobalUnicast() || v6.Addr().IsLinkLocalUnicast():
		return fmt.Errorf("IPv6 pool %s is not a unicast range (want a unique local fd00::/8 range or a global one)", v6)
	case v6.Bits()+indexBits > SubnetLenV6:
		return fmt.Errorf("IPv6 pool %s has fewer /%d subnets than the IPv4 pool %s has /%d subnets (%d): "+
			"every host gets the /%d with its IPv4 subnet's index, so the IPv6 pool must be /%d or larger",
			v6, SubnetLenV6, p.Network, p.SubnetLen, p.Size(), SubnetLenV6, SubnetLenV6-indexBits)
	}
	return nil
}

// SubnetV6 is the IPv6 subnet of the host holding IPv4 subnet s: the /64 of
// NetworkV6 with s's index. ok is false without an IPv6 pool, or when s is
// not one of the pool's subnets.
func (p Pool) SubnetV6(s netip.Prefix) (netip.Prefix, bool) {
	if !p.NetworkV6.IsValid() || !p.Contains(s) {
		return netip.Prefix{}, false
	}
	a, n := p.Network.Addr().As4(), s.Addr().As4()
	index := (uint64(n[0])<<24 | uint64(n[1])<<16 | uint64(n[2])<<8 | uint64(n[3])) -
		(uint64(a[0])<<24 | uint64(a[1])<<16 | uint64(a[2])<<8 | uint64(a[3]))
	index >>= 32 - p.SubnetLen
	b := p.NetworkV6.Addr().As16()
	// The index goes into the bits just above the /64's interface half.
	hi := uint64(b[0])<<56 | uint64(b[1])<<48 | uint64(b[2])<<40 | uint64(b[3])<<32 |
		uint64(b[4])<<24 | uint64(b[5])<<16 | uint64(b[6])<<8 | uint64(b[7])
	hi |= index
	for i := range 8 {
		b[i] = byte(hi >> (56 - 8*i))
	}
	return netip.PrefixFrom(netip.AddrFrom16(b), SubnetLenV6), true
}

// Size is the number of subnets in the pool.
func (p Pool) Size() int {
	return 1 << (p.SubnetLen - p.Network.Bits())
}

// Subnet returns the i-th subnet of the pool (0 <= i < Size()).
func (p Pool) Subnet(i int) netip.Prefix {
	base := p.Network.Addr().As4()
	v := uint32(base[0])<<24 | uint32(base[1])<<16 | uint32(base[2])<<8 | uint32(base[3])
	v += uint32(i) << (32 - p.SubnetLen)
	addr := netip.AddrFrom4([4]byte{byte(v >> 24), byte(v >> 16), byte(v >> 8), byte(v)})
	return netip.PrefixFrom(addr, p.SubnetLen)
}

// Contains reports whether s is one of the pool's subnets.
func (p Pool) Contains(s netip.Prefix) bool {
	return s.Bits() == p.SubnetLen && p.Network.Contains(s.Addr()) && s.Masked() == s
}

// SubnetsV6 maps each node of held (node -> its leased subnets) to the IPv6
// subnets paired with them; empty without an IPv6 pool.
func (p Pool) SubnetsV6(held map[string][]netip.Prefix) map[string][]netip.Prefix {
	out := map[string][]netip.Prefix{}
	for node, subnets := range held {
		for _, s := range subnets {
			if v6, ok := p.SubnetV6(s); ok {
				out[node] = append(out[node], v6)
			}
		}
	}
	return out
}

// CheckUnderlay names the first of the host's underlay networks (the
// prefixes of its underlay addresses, either family) that the pool
// overlaps: a subnet leased there would shadow the network the hosts
// reach each other over.
func (p Pool) CheckUnderlay(underlay []netip.Prefix) error {
	for _, u := range underlay {
		for _, pool := range []netip.Prefix{p.Network, p.NetworkV6} {
			if pool.IsValid() && u.IsValid() && pool.Overlaps(u.Masked()) {
				return fmt.Errorf("the pool %s overlaps this host's underlay network %s: fabric subnets there would shadow the hosts' own network; choose a pool outside it (fabricctl ipam init, or --pool/--pool-v6 on a new fabric)", pool, u.Masked())
			}
		}
	}
	return nil
}

func (p Pool) String() string {
	if p.NetworkV6.IsValid() {
		return fmt.Sprintf("%s /%d and %s /%d", p.Network, p.SubnetLen, p.NetworkV6, SubnetLenV6)
	}
	return fmt.Sprintf("%s /%d", p.Network, p.SubnetLen)
}

func configKey(prefix string) string { return normPrefix(prefix) + "/config" }

func normPrefix(prefix string) string {
	if prefix == "" {
		return DefaultPrefix
	}
	for len(prefix) > 1 && prefix[len(prefix)-1] == '/' {
		prefix = prefix[:len(prefix)-1]
	}
	return prefix
}

// poolJSON is the stored form, read with plain fields so errors can say which
// value is wrong.
type poolJSON struct {
	Network   string `json:"network"`
	SubnetLen int    `json:"subnetLen"`
	NetworkV6 string `json:"networkV6,omitempty"`
}

func encodePool(p Pool) ([]byte, error) {
	raw := poolJSON{Network: p.Network.String(), SubnetLen: p.SubnetLen}
	if p.NetworkV6.IsValid() {
		raw.NetworkV6 = p.NetworkV6.String()
	}
	return json.Marshal(raw)
}

func decodePool(key string, value []byte) (Pool, error) {
	var raw poolJSON
	if err := json.Unmarshal(value, &raw); err != nil {
		return Pool{}, fmt.Errorf("etcd key %s: pool config is not valid JSON (%v); want {\"network\":\"10.244.0.0/16\",\"subnetLen\":24}", key, err)
	}
	network, err := netip.ParsePrefix(raw.Network)
	if err != nil {
		return Pool{}, fmt.Errorf("etcd key %s: network %q is not a CIDR, want e.g. 10.244.0.0/16", key, raw.Network)
	}
	p := Pool{Network: network, SubnetLen: raw.SubnetLen}
	if raw.NetworkV6 != "" {
		if p.NetworkV6, err = netip.ParsePrefix(raw.NetworkV6); err != nil {
			return Pool{}, fmt.Errorf("etcd key %s: networkV6 %q is not a CIDR, want e.g. fd00:10:244::/48", key, raw.NetworkV6)
		}
	}
	if err := p.Validate(); err != nil {
		return Pool{}, fmt.Errorf("etcd key %s: %w", key, err)
	}
	return p, nil
}

// GetPool reads and validates the pool configuration.
func GetPool(ctx context.Context, cli *clientv3.Client, prefix string) (Pool, error) {
	key := configKey(prefix)
	resp, err := cli.Get(ctx, key)
	if err != nil {
		return Pool{}, fmt.Errorf("read pool config %s from etcd: %w", key, err)
	}
	if len(resp.Kvs) == 0 {
		return Pool{}, fmt.Errorf("%w: etcd key %s is absent; create it with `fabricctl ipam init --pool 10.244.0.0/16` or start fabricd with --pool", ErrNoPool, key)
	}
	return decodePool(key, resp.Kvs[0].Value)
}

// EnsurePool creates the pool configuration if it is absent and returns the
// pool in effect. A stored pool that differs from want is an error: hosts
// must agree on one pool. With want == nil the pool must already exist.
func EnsurePool(ctx context.Context, cli *clientv3.Client, prefix string, want *Pool) (Pool, error) {
	key := configKey(prefix)
	if want == nil {
		return GetPool(ctx, cli, prefix)
	}
	if err := want.Validate(); err != nil {
		return Pool{}, fmt.Errorf("configured pool: %w", err)
	}
	value, err := encodePool(*want)
	if err != nil {
		return Pool{}, err
	}
	resp, err := cli.Txn(ctx).
		If(clientv3.Compare(clientv3.CreateRevision(key), "=", 0)).
		Then(clientv3.OpPut(key, string(value))).
		Else(clientv3.OpGet(key)).
		Commit()
	if err != nil {
		return Pool{}, fmt.Errorf("create pool config %s in etcd: %w", key, err)
	}
	if resp.Succeeded {
		return *want, nil
	}
	kvs := resp.Responses[0].GetResponseRange().Kvs
	if len(kvs) == 0 {
		// Deleted between compare and read; let the caller retry.
		return Pool{}, fmt.Errorf("pool config %s changed while being created; retry", key)
	}
	have, err := decodePool(key, kvs[0].Value)
	if err != nil {
		return Pool{}, err
	}
	if have.Network == want.Network && have.SubnetLen == want.SubnetLen && !have.NetworkV6.IsValid() && want.NetworkV6.IsValid() {
		// IPv6 added to a running IPv4 fabric: the first host configured
		// with it stores it, once (compared by revision), for every host.
		return addPoolV6(ctx, cli, key, kvs[0].ModRevision, *want)
	}
	merged := *want
	if !merged.NetworkV6.IsValid() {
		// A host configured without an IPv6 pool follows the fabric's.
		merged.NetworkV6 = have.NetworkV6
	}
	if have != merged {
		return Pool{}, fmt.Errorf("pool conflict: etcd key %s holds %s, this agent is configured with %s; "+
			"remove --pool to use the stored pool, or change the stored pool only after all hosts released their subnets",
			key, have, want)
	}
	return have, nil
}

func addPoolV6(ctx context.Context, cli *clientv3.Client, key string, rev int64, want Pool) (Pool, error) {
	value, err := encodePool(want)
	if err != nil {
		return Pool{}, err
	}
	resp, err := cli.Txn(ctx).
		If(clientv3.Compare(clientv3.ModRevision(key), "=", rev)).
		Then(clientv3.OpPut(key, string(value))).
		Commit()
	if err != nil {
		return Pool{}, fmt.Errorf("add IPv6 pool %s to %s in etcd: %w", want.NetworkV6, key, err)
	}
	if !resp.Succeeded {
		return Pool{}, fmt.Errorf("pool config %s changed while adding the IPv6 pool; retry", key)
	}
	return want, nil
}
