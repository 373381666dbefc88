package ipam

import (
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"net/netip"
	"slices"
	"sort"
	"strconv"
	"strings"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/fabricnet/fabric/internal/etcdwatch"
)

// Lease is one host's subnet.
type Lease struct {
	Subnet    netip.Prefix     `json:"subnet"`
	Node      string           `json:"node"`
	MachineID string           `json:"machineID"`
	HostAddr  netip.Addr       `json:"hostAddr"`
	Expires   time.Time        `json:"expires"`
	LeaseID   clientv3.LeaseID `json:"leaseID"`
}

// Gateway is the first address of the subnet, used by the host's bridge.
func (l Lease) Gateway() netip.Addr {
	return l.Subnet.Masked().Addr().Next()
}

// BadEntry is a subnet key whose name or value cannot be understood. Its
// subnet stays taken; it is never overwritten.
type BadEntry struct {
	Key     string `json:"key"`
	Problem string `json:"problem"`
}

// leaseJSON is the stored value of a subnet key.
type leaseJSON struct {
	Node      string `json:"node"`
	MachineID string `json:"machineID"`
	HostAddr  string `json:"hostAddr,omitempty"`
	LeaseID   int64  `json:"leaseID"`
}

func subnetsPrefix(prefix string) string { return normPrefix(prefix) + "/subnets/" }

func subnetKey(prefix string, s netip.Prefix) string {
	return subnetsPrefix(prefix) + s.Addr().String() + "-" + strconv.Itoa(s.Bits())
}

// parseSubnetKey turns "<prefix>/subnets/10.244.3.0-24" into 10.244.3.0/24.
func parseSubnetKey(prefix, key string) (netip.Prefix, error) {
	name := strings.TrimPrefix(key, subnetsPrefix(prefix))
	addr, bits, ok := strings.Cut(name, "-")
	if !ok {
		return netip.Prefix{}, fmt.Errorf("key name %q is not <address>-<length>", name)
	}
	p, err := netip.ParsePrefix(addr + "/" + bits)
	if err != nil || !p.Addr().Is4() || p.Masked() != p {
		return netip.Prefix{}, fmt.Errorf("key name %q is not an IPv4 subnet like 10.244.3.0-24", name)
	}
	return p, nil
}

func encodeLease(l Lease) string {
	v := leaseJSON{Node: l.Node, MachineID: l.MachineID, LeaseID: int64(l.LeaseID)}
	if l.HostAddr.IsValid() {
		v.HostAddr = l.HostAddr.String()
	}
	b, _ := json.Marshal(v)
	return string(b)
}

// entry is one subnet key as read from etcd.
type entry struct {
	key         string
	subnet      netip.Prefix // valid when the key name parsed
	lease       Lease        // valid when problem == ""
	problem     string
	modRevision int64
	etcdLease   clientv3.LeaseID // lease the key is attached to
}

func decodeEntry(prefix string, key string, value []byte, modRev int64, attached clientv3.LeaseID) entry {
	e := entry{key: key, modRevision: modRev, etcdLease: attached}
	subnet, err := parseSubnetKey(prefix, key)
	if err != nil {
		e.problem = err.Error()
		return e
	}
	e.subnet = subnet
	var raw leaseJSON
	if err := json.Unmarshal(value, &raw); err != nil {
		e.problem = fmt.Sprintf("value is not valid JSON: %v", err)
		return e
	}
	if raw.Node == "" {
		e.problem = "value has no \"node\""
		return e
	}
	l := Lease{Subnet: subnet, Node: raw.Node, MachineID: raw.MachineID, LeaseID: attached}
	if raw.HostAddr != "" {
		a, err := netip.ParseAddr(raw.HostAddr)
		if err != nil {
			e.problem = fmt.Sprintf("hostAddr %q is not an IP address", raw.HostAddr)
			return e
		}
		l.HostAddr = a
	}
	e.lease = l
	return e
}

func readEntries(ctx context.Context, cli *clientv3.Client, prefix string) ([]entry, int64, error) {
	resp, err := cli.Get(ctx, subnetsPrefix(prefix), clientv3.WithPrefix())
	if err != nil {
		return nil, 0, fmt.Errorf("read subnet leases under %s from etcd: %w", subnetsPrefix(prefix), err)
	}
	entries := make([]entry, 0, len(resp.Kvs))
	for _, kv := range resp.Kvs {
		entries = append(entries, decodeEntry(prefix, string(kv.Key), kv.Value, kv.ModRevision, clientv3.LeaseID(kv.Lease)))
	}
	return entries, resp.Header.Revision, nil
}

// List returns all subnet leases sorted by subnet, with their expiry taken
// from the etcd lease, and the keys that could not be understood.
func List(ctx context.Context, cli *clientv3.Client, prefix string) ([]Lease, []BadEntry, error) {
	entries, _, err := readEntries(ctx, cli, prefix)
	if err != nil {
		return nil, nil, err
	}
	var leases []Lease
	var bad []BadEntry
	expires := map[clientv3.LeaseID]time.Time{}
	for _, e := range entries {
		if e.problem != "" {
			bad = append(bad, BadEntry{Key: e.key, Problem: e.problem})
			continue
		}
		l := e.lease
		if l.LeaseID != 0 {
			exp, ok := expires[l.LeaseID]
			if !ok {
				ttl, err := cli.TimeToLive(ctx, l.LeaseID)
				if err != nil {
					return nil, nil, fmt.Errorf("read etcd lease %x of %s: %w", int64(l.LeaseID), e.key, err)
				}
				if ttl.TTL > 0 {
					exp = time.Now().Add(time.Duration(ttl.TTL) * time.Second)
				}
				expires[l.LeaseID] = exp
			}
			l.Expires = exp
		}
		leases = append(leases, l)
	}
	sort.Slice(leases, func(i, j int) bool {
		return leases[i].Subnet.Addr().Less(leases[j].Subnet.Addr())
	})
	return leases, bad, nil
}

// ReleaseNode frees the subnet held by node, for a host that was
// decommissioned. Its etcd lease is revoked as well.
func ReleaseNode(ctx context.Context, cli *clientv3.Client, prefix, node string) error {
	entries, _, err := readEntries(ctx, cli, prefix)
	if err != nil {
		return err
	}
	released := 0
	for _, e := range entries {
		if e.problem != "" || e.lease.Node != node {
			continue
		}
		resp, err := cli.Txn(ctx).
			If(clientv3.Compare(clientv3.ModRevision(e.key), "=", e.modRevision)).
			Then(clientv3.OpDelete(e.key)).
			Commit()
		if err != nil {
			return fmt.Errorf("delete %s: %w", e.key, err)
		}
		if !resp.Succeeded {
			return fmt.Errorf("subnet key %s changed while being released; run the release again", e.key)
		}
		if e.etcdLease != 0 {
			// The lease carries only this key; an already expired lease is fine.
			_, _ = cli.Revoke(ctx, e.etcdLease)
		}
		released++
	}
	if released == 0 {
		return fmt.Errorf("node %q holds no subnet under %s (see `fabricctl ipam show`)", node, subnetsPrefix(prefix))
	}
	return nil
}

// Holdings maps a node name to the subnets leased to it.
type Holdings map[string][]netip.Prefix

// Watch sends which subnets every node holds, at start and after every
// change, until ctx ends. Keys that cannot be understood are left out (and
// reported by List): a node whose lease cannot be read holds nothing.
func Watch(ctx context.Context, cli *clientv3.Client, prefix string, log *slog.Logger) <-chan Holdings {
	return etcdwatch.Watch(ctx, cli, subnetsPrefix(prefix), log, func(kvs etcdwatch.KVs) (Holdings, bool) {
		out := Holdings{}
		for key, value := range kvs {
			e := decodeEntry(prefix, key, value, 0, 0)
			if e.problem != "" {
				continue
			}
			out[e.lease.Node] = append(out[e.lease.Node], e.subnet)
		}
		for _, subnets := range out {
			slices.SortFunc(subnets, func(a, b netip.Prefix) int { return a.Addr().Compare(b.Addr()) })
		}
		return out, true
	})
}
