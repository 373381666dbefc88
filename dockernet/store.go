package dockernet

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"net/netip"
	"slices"
	"strings"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/fabricnet/fabric/internal/etcdwatch"
)

// Store reads and writes the networks under one etcd prefix.
type Store struct {
	cli    *clientv3.Client
	prefix string
}

// NewStore returns the store of networks under prefix ("/fabric/v1").
func NewStore(cli *clientv3.Client, prefix string) *Store {
	return &Store{cli: cli, prefix: normPrefix(prefix)}
}

// statePrefix covers networks/, netblocks/ and netaddrs/ and nothing else.
func (st *Store) statePrefix() string { return st.prefix + "/net" }

// Read returns the fabric-wide state and the etcd revision it was read at.
func (st *Store) Read(ctx context.Context) (State, int64, error) {
	resp, err := st.cli.Get(ctx, st.statePrefix(), clientv3.WithPrefix())
	if err != nil {
		return State{}, 0, fmt.Errorf("read networks from etcd: %w", err)
	}
	kvs := map[string][]byte{}
	for _, kv := range resp.Kvs {
		kvs[string(kv.Key)] = kv.Value
	}
	return decodeState(st.prefix, kvs), resp.Header.Revision, nil
}

// Watch sends the state at start and after every change until ctx ends.
func (st *Store) Watch(ctx context.Context, log *slog.Logger) <-chan State {
	logged := map[string]string{}
	return etcdwatch.Watch(ctx, st.cli, st.statePrefix(), log, func(kvs etcdwatch.KVs) (State, bool) {
		s := decodeState(st.prefix, kvs)
		for key, problem := range s.Problems {
			if logged[key] != problem {
				logged[key] = problem
				log.Warn("skipping invalid network record", "key", key, "problem", problem)
			}
		}
		return s, true
	})
}

// ErrConflict is returned by Create for a name that is taken or a subnet
// that overlaps another network's.
var ErrConflict = errors.New("conflicts with a fabric network")

// Create records network n fabric-wide. It fails when the name is taken or
// the subnet overlaps another network's, checked and written in one
// transaction: two hosts creating at once cannot both succeed.
func (st *Store) Create(ctx context.Context, n Network) error {
	if err := n.Validate(); err != nil {
		return err
	}
	for attempt := 0; attempt < 5; attempt++ {
		resp, err := st.cli.Get(ctx, networksDir(st.prefix), clientv3.WithPrefix())
		if err != nil {
			return fmt.Errorf("read networks from etcd: %w", err)
		}
		for _, kv := range resp.Kvs {
			var other Network
			if json.Unmarshal(kv.Value, &other) != nil || !other.Subnet.IsValid() {
				continue
			}
			if other.Name == n.Name {
				return fmt.Errorf("%w: network %s exists with subnet %s", ErrConflict, n.Name, other.Subnet)
			}
			if other.Subnet.Overlaps(n.Subnet) {
				return fmt.Errorf("%w: subnet %s overlaps network %s (%s)", ErrConflict, n.Subnet, other.Name, other.Subnet)
			}
		}
		value, _ := json.Marshal(n)
		key := networkKey(st.prefix, n.Name)
		txn, err := st.cli.Txn(ctx).
			If(clientv3.Compare(clientv3.CreateRevision(key), "=", 0),
				// Nothing under networks/ changed since the read: no
				// overlapping network slipped in.
				clientv3.Compare(clientv3.ModRevision(networksDir(st.prefix)), "<", resp.Header.Revision+1).WithPrefix()).
			Then(clientv3.OpPut(key, string(value))).
			Commit()
		if err != nil {
			return fmt.Errorf("record network %s in etcd: %w", n.Name, err)
		}
		if txn.Succeeded {
			return nil
		}
	}
	return fmt.Errorf("record network %s: networks changed on every attempt; try again", n.Name)
}

// Delete removes network name fabric-wide with its blocks. It is refused
// while a container on any host has an address on it, with the hosts.
func (st *Store) Delete(ctx context.Context, name string) error {
	s, _, err := st.Read(ctx)
	if err != nil {
		return err
	}
	if _, ok := s.Networks[name]; !ok {
		return nil
	}
	if grants := s.Grants[name]; len(grants) > 0 {
		return fmt.Errorf("network %s has containers attached: %s; remove or disconnect them first", name, whereGranted(grants))
	}
	grants := grantsDir(st.prefix) + name + "/"
	txn, err := st.cli.Txn(ctx).
		If(clientv3.Compare(clientv3.CreateRevision(grants), "=", 0).WithPrefix()). // no address given meanwhile
		Then(clientv3.OpDelete(networkKey(st.prefix, name)),
			clientv3.OpDelete(blocksDir(st.prefix)+name+"/", clientv3.WithPrefix())).
		Commit()
	if err != nil {
		return fmt.Errorf("delete network %s from etcd: %w", name, err)
	}
	if !txn.Succeeded {
		s, _, err := st.Read(ctx)
		if err != nil {
			return err
		}
		return fmt.Errorf("network %s has containers attached: %s; remove or disconnect them first", name, whereGranted(s.Grants[name]))
	}
	return nil
}

// whereGranted says how many containers each host has: "2 on host2, 1 on host3".
func whereGranted(grants map[netip.Addr]Grant) string {
	count := map[string]int{}
	for _, g := range grants {
		count[g.Node]++
	}
	var parts []string
	for _, node := range slices.Sorted(maps.Keys(count)) {
		parts = append(parts, fmt.Sprintf("%d on %s", count[node], node))
	}
	return strings.Join(parts, ", ")
}

// GrantRequest asks for an address on a network for a container on Node.
type GrantRequest struct {
	Network string
	V6      bool // an address of its IPv6 subnet
	Node    string
	Want    netip.Addr // --ip (--ip6), or invalid
	// Lease is the etcd lease the address and any claimed block are
	// attached to: the host's subnet lease.
	Lease clientv3.LeaseID
}

// Grant takes an address (Pick) and records it, with the block it claims,
// in one transaction that fails if another host took either meanwhile; it
// then picks again from a fresh read.
func (st *Store) Grant(ctx context.Context, req GrantRequest) (netip.Addr, error) {
	for attempt := 0; attempt < 10; attempt++ {
		s, _, err := st.Read(ctx)
		if err != nil {
			return netip.Addr{}, err
		}
		n, ok := s.Networks[req.Network]
		if !ok {
			return netip.Addr{}, fmt.Errorf("network %s does not exist in the fabric", req.Network)
		}
		addr, claim, err := Pick(s, n, req.V6, req.Node, req.Want)
		if err != nil {
			return netip.Addr{}, err
		}
		gkey := grantKey(st.prefix, n.Name, addr)
		gval, _ := json.Marshal(Grant{Network: n.Name, Address: addr, Node: req.Node})
		conds := []clientv3.Cmp{
			clientv3.Compare(clientv3.CreateRevision(gkey), "=", 0),
			clientv3.Compare(clientv3.CreateRevision(networkKey(st.prefix, n.Name)), ">", 0),
		}
		ops := []clientv3.Op{clientv3.OpPut(gkey, string(gval), leaseOpt(req.Lease)...)}
		if claim.IsValid() {
			bkey := blockKey(st.prefix, n.Name, claim)
			bval, _ := json.Marshal(Block{Network: n.Name, Prefix: claim, Node: req.Node})
			conds = append(conds, clientv3.Compare(clientv3.CreateRevision(bkey), "=", 0))
			ops = append(ops, clientv3.OpPut(bkey, string(bval), leaseOpt(req.Lease)...))
		}
		txn, err := st.cli.Txn(ctx).If(conds...).Then(ops...).Commit()
		if err != nil {
			return netip.Addr{}, fmt.Errorf("record address %s on network %s in etcd: %w", addr, n.Name, err)
		}
		if txn.Succeeded {
			return addr, nil
		}
	}
	return netip.Addr{}, fmt.Errorf("network %s: every address tried was taken by another host meanwhile; try again", req.Network)
}

// Claim records an address node already uses (a container dockerd kept
// across a restart of fabricd or of etcd's lease) if no other host has it.
// It reports whether the address is node's now.
func (st *Store) Claim(ctx context.Context, g Grant, lease clientv3.LeaseID) (bool, error) {
	key := grantKey(st.prefix, g.Network, g.Address)
	value, _ := json.Marshal(g)
	txn, err := st.cli.Txn(ctx).
		If(clientv3.Compare(clientv3.CreateRevision(key), "=", 0),
			clientv3.Compare(clientv3.CreateRevision(networkKey(st.prefix, g.Network)), ">", 0)).
		Then(clientv3.OpPut(key, string(value), leaseOpt(lease)...)).
		Else(clientv3.OpGet(key)).
		Commit()
	if err != nil {
		return false, err
	}
	if txn.Succeeded {
		return true, nil
	}
	if kvs := txn.Responses[0].GetResponseRange().GetKvs(); len(kvs) == 1 {
		var have Grant
		if json.Unmarshal(kvs[0].Value, &have) == nil && have.Node == g.Node {
			return true, nil
		}
	}
	return false, nil
}

// Release frees address a of network, if node holds it.
func (st *Store) Release(ctx context.Context, network string, a netip.Addr, node string) error {
	key := grantKey(st.prefix, network, a)
	resp, err := st.cli.Get(ctx, key)
	if err != nil {
		return fmt.Errorf("release %s on network %s: %w", a, network, err)
	}
	if len(resp.Kvs) == 0 {
		return nil
	}
	var g Grant
	if json.Unmarshal(resp.Kvs[0].Value, &g) == nil && g.Node != node {
		return nil // another host's: never ours to free
	}
	_, err = st.cli.Txn(ctx).
		If(clientv3.Compare(clientv3.ModRevision(key), "=", resp.Kvs[0].ModRevision)).
		Then(clientv3.OpDelete(key)).
		Commit()
	if err != nil {
		return fmt.Errorf("release %s on network %s: %w", a, network, err)
	}
	return nil
}

// ReleaseNode frees every block and address node holds, for a host that
// was decommissioned (`fabricctl ipam release`).
func (st *Store) ReleaseNode(ctx context.Context, node string) error {
	s, _, err := st.Read(ctx)
	if err != nil {
		return err
	}
	var ops []clientv3.Op
	for name, bs := range s.Blocks {
		for _, b := range bs {
			if b.Node == node {
				ops = append(ops, clientv3.OpDelete(blockKey(st.prefix, name, b.Prefix)))
			}
		}
	}
	for name, gs := range s.Grants {
		for a, g := range gs {
			if g.Node == node {
				ops = append(ops, clientv3.OpDelete(grantKey(st.prefix, name, a)))
			}
		}
	}
	for len(ops) > 0 {
		n := min(len(ops), 100) // etcd's default limit of operations per transaction is 128
		if _, err := st.cli.Txn(ctx).Then(ops[:n]...).Commit(); err != nil {
			return fmt.Errorf("free the network addresses of %s: %w", node, err)
		}
		ops = ops[n:]
	}
	return nil
}

func leaseOpt(id clientv3.LeaseID) []clientv3.OpOption {
	if id == 0 {
		return nil
	}
	return []clientv3.OpOption{clientv3.WithLease(id)}
}
