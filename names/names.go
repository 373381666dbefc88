// Package names keeps the fabric-wide directory of container names: each
// host publishes the containers on its bridge under
// <prefix>/containers/<node>/<container> with a lease of the node TTL (a
// host that dies takes its names with it), and every host follows the whole
// directory to answer DNS.
//
// Two containers of one name on two hosts are a conflict, answered the same
// way everywhere: the container created first wins, then the node name, then
// the container ID decide.
package names

import (
	"cmp"
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"net/netip"
	"slices"
	"strings"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/fabricnet/fabric/internal/etcdwatch"
)

// DefaultPrefix matches the registry's.
const DefaultPrefix = "/fabric"

// Record is one container's entry in the directory: on the fabric bridge
// (Network ""), or on a fabric network, where it also answers to its
// aliases (compose's service name, --network-alias) and only to queries
// from that network.
type Record struct {
	Name    string     `json:"name"`
	Address netip.Addr `json:"address"`
	// AddressV6 is the container's IPv6 address on the bridge (AAAA),
	// invalid when it has none.
	AddressV6 netip.Addr        `json:"addressV6,omitzero"`
	Node      string            `json:"node"`
	ID        string            `json:"id"`
	Labels    map[string]string `json:"labels,omitempty"`
	Created   time.Time         `json:"created"`
	Network   string            `json:"network,omitempty"`
	Aliases   []string          `json:"aliases,omitempty"`
}

// Validate names the first problem of a record.
func (r Record) Validate() error {
	switch {
	case r.Name == "" || strings.ContainsAny(r.Name, "/ "):
		return fmt.Errorf("container name %q is empty or holds '/' or a space", r.Name)
	case r.Node == "" || strings.Contains(r.Node, "/"):
		return fmt.Errorf("node %q is empty or holds '/'", r.Node)
	case strings.ContainsAny(r.Network, "/@ "):
		return fmt.Errorf("network %q holds '/', '@' or a space", r.Network)
	case !r.Address.Is4():
		return fmt.Errorf("address %v is not an IPv4 address", r.Address)
	case r.AddressV6.IsValid() && (!r.AddressV6.Is6() || r.AddressV6.Is4In6()):
		return fmt.Errorf("addressV6 %v is not an IPv6 address", r.AddressV6)
	}
	return nil
}

func normPrefix(prefix string) string {
	if prefix == "" {
		return DefaultPrefix
	}
	return strings.TrimRight(prefix, "/")
}

func containersPrefix(prefix string) string { return normPrefix(prefix) + "/containers/" }

func nodePrefix(prefix, node string) string { return containersPrefix(prefix) + node + "/" }

// Key is where a record is stored: <node>/<name>, and <node>/<name>@<network>
// for a record on a fabric network ('@' is in no container name).
func Key(prefix string, r Record) string {
	if r.Network != "" {
		return nodePrefix(prefix, r.Node) + r.Name + "@" + r.Network
	}
	return nodePrefix(prefix, r.Node) + r.Name
}

// decode parses the value at key and checks that it matches its key.
func decode(prefix, key string, value []byte) (Record, error) {
	var r Record
	if err := json.Unmarshal(value, &r); err != nil {
		return r, fmt.Errorf("not a container record: %w", err)
	}
	if err := r.Validate(); err != nil {
		return r, err
	}
	if want := Key(prefix, r); want != key {
		return r, fmt.Errorf("record of %s on %s stored under the wrong key (want %s)", r.Name, r.Node, want)
	}
	return r, nil
}

// before orders the records of one name: the winner first.
func before(a, b Record) int {
	if c := a.Created.Compare(b.Created); c != 0 {
		return c
	}
	if c := cmp.Compare(a.Node, b.Node); c != 0 {
		return c
	}
	return cmp.Compare(a.ID, b.ID)
}

// lookupKey is the case-insensitive form DNS asks in.
func lookupKey(name string) string { return strings.ToLower(name) }

// Sort orders records by name (case-insensitively, as DNS sees them), the
// winner of each name first.
func Sort(rs []Record) {
	slices.SortFunc(rs, func(a, b Record) int {
		if c := cmp.Compare(lookupKey(a.Name), lookupKey(b.Name)); c != 0 {
			return c
		}
		return before(a, b)
	})
}

// View answers lookups from one snapshot of the directory.
type View struct {
	byName   map[string][]Record // scope + lookup key -> records, winner first
	byAddr   map[netip.Addr]Record
	all      []Record
	networks map[string]netip.Prefix
}

// scope is the index key of a name in a network ("" is the bridge).
func scope(network, name string) string { return network + "\x00" + lookupKey(name) }

// NewView indexes records (any order); networks are the fabric networks'
// subnets by name, for NetworkOf.
func NewView(records []Record, networks map[string]netip.Prefix) *View {
	rs := slices.Clone(records)
	Sort(rs)
	v := &View{byName: map[string][]Record{}, byAddr: map[netip.Addr]Record{}, all: rs, networks: networks}
	for _, r := range rs {
		for _, name := range append([]string{r.Name}, r.Aliases...) {
			k := scope(r.Network, name)
			v.byName[k] = append(v.byName[k], r)
		}
		if _, taken := v.byAddr[r.Address]; !taken {
			v.byAddr[r.Address] = r
		}
	}
	for k, rs := range v.byName {
		slices.SortStableFunc(rs, before) // an alias's records in the same order as a name's
		v.byName[k] = rs
	}
	return v
}

// Lookup returns the container on the fabric bridge that answers for name
// (case-insensitive).
func (v *View) Lookup(name string) (Record, bool) { return v.LookupIn("", name) }

// LookupIn returns the container that answers for name (or an alias) on
// network ("" for the bridge).
func (v *View) LookupIn(network, name string) (Record, bool) {
	rs := v.byName[scope(network, name)]
	if len(rs) == 0 {
		return Record{}, false
	}
	return rs[0], true
}

// NetworkOf returns the fabric network whose subnet holds a: where a
// query from a comes from.
func (v *View) NetworkOf(a netip.Addr) (string, bool) {
	for name, subnet := range v.networks {
		if subnet.Contains(a) {
			return name, true
		}
	}
	return "", false
}

// Reverse returns the container with address a.
func (v *View) Reverse(a netip.Addr) (Record, bool) {
	r, ok := v.byAddr[a]
	return r, ok
}

// Entry is a record as `fabricctl containers` shows it.
type Entry struct {
	Record
	// ShadowedBy is the node of the record that answers for this name when
	// another host has a container of the same name that wins.
	ShadowedBy string `json:"shadowedBy,omitempty"`
	// Refused says why DNS does not answer with this record at all
	// (see Trusted).
	Refused string `json:"refused,omitempty"`
}

// Entries lists every record, the winner of each name first, each loser
// marked with the node that wins.
func (v *View) Entries() []Entry {
	out := make([]Entry, 0, len(v.all))
	for _, r := range v.all {
		e := Entry{Record: r}
		if w := v.byName[scope(r.Network, r.Name)][0]; w.Node != r.Node || w.ID != r.ID {
			e.ShadowedBy = w.Node
		}
		out = append(out, e)
	}
	return out
}

// List reads the directory once, skipping records that do not decode (each
// returned as a problem naming its key).
func List(ctx context.Context, cli *clientv3.Client, prefix string) ([]Record, []error, error) {
	resp, err := cli.Get(ctx, containersPrefix(prefix), clientv3.WithPrefix())
	if err != nil {
		return nil, nil, err
	}
	var rs []Record
	var problems []error
	for _, kv := range resp.Kvs {
		r, err := decode(normPrefix(prefix), string(kv.Key), kv.Value)
		if err != nil {
			problems = append(problems, fmt.Errorf("%s: %w", kv.Key, err))
			continue
		}
		rs = append(rs, r)
	}
	Sort(rs)
	return rs, problems, nil
}

// Watch sends the whole directory, sorted, at start and after every change.
// Invalid records are skipped and logged once per key and problem.
func Watch(ctx context.Context, cli *clientv3.Client, prefix string, logger *slog.Logger) <-chan []Record {
	if logger == nil {
		logger = slog.Default()
	}
	prefix = normPrefix(prefix)
	logged := map[string]string{}
	return etcdwatch.Watch(ctx, cli, containersPrefix(prefix), logger, func(kvs etcdwatch.KVs) ([]Record, bool) {
		rs := etcdwatch.EachValid(kvs, logged, logger, "container record", func(key string, value []byte) (Record, error) {
			return decode(prefix, key, value)
		})
		Sort(rs)
		return rs, true
	})
}

// Refusal is a record left out of the view, and why.
type Refusal struct {
	Record Record
	Reason string
}

// Trusted keeps the records whose address is their own node's: on the
// bridge, in a subnet leased to the node (held: node -> subnets, from
// ipam); on a fabric network, an address given to the node (owns, from the
// networks' state). Any etcd client of the fabric can write a record;
// without this check one host could point a name at another host's
// container, a host address or the outside world. With held unknown (nil)
// nothing is trusted: security decisions fail closed.
func Trusted(records []Record, held map[string][]netip.Prefix, owns func(network, node string, a netip.Addr) bool) (kept []Record, refused []Refusal) {
	for _, r := range records {
		if r.Network != "" {
			if held != nil && owns != nil && owns(r.Network, r.Node, r.Address) {
				kept = append(kept, r)
				continue
			}
			refused = append(refused, Refusal{Record: r, Reason: fmt.Sprintf("address %s on network %s is not given to %s", r.Address, r.Network, r.Node)})
			continue
		}
		subnets := held[r.Node]
		if slices.ContainsFunc(subnets, func(p netip.Prefix) bool { return p.Contains(r.Address) }) {
			kept = append(kept, r)
			continue
		}
		reason := fmt.Sprintf("address %s is not in a subnet leased to %s", r.Address, r.Node)
		if len(subnets) == 0 {
			reason = fmt.Sprintf("node %s holds no subnet", r.Node)
		}
		refused = append(refused, Refusal{Record: r, Reason: reason})
	}
	return kept, refused
}

// TrustIPv6 clears the IPv6 address of every record whose address is not in
// its node's IPv6 subnet (heldV6: node -> the /64 paired with its lease),
// or for a record on a fabric network not given to its node there (owns,
// as for Trusted), so no record can point a name's AAAA at another host's
// container; the record still answers for its (trusted) IPv4 address. It
// returns the records and one refusal per cleared address.
func TrustIPv6(records []Record, heldV6 map[string][]netip.Prefix, owns func(network, node string, a netip.Addr) bool) ([]Record, []Refusal) {
	out := slices.Clone(records)
	var refused []Refusal
	for i := range out {
		r := &out[i]
		if !r.AddressV6.IsValid() {
			continue
		}
		reason := fmt.Sprintf("IPv6 address %s is not in the IPv6 subnet of %s; answered for IPv4 only", r.AddressV6, r.Node)
		if r.Network != "" {
			if owns != nil && owns(r.Network, r.Node, r.AddressV6) {
				continue
			}
			reason = fmt.Sprintf("IPv6 address %s on network %s is not given to %s; answered for IPv4 only", r.AddressV6, r.Network, r.Node)
		} else if slices.ContainsFunc(heldV6[r.Node], func(p netip.Prefix) bool { return p.Contains(r.AddressV6) }) {
			continue
		}
		refused = append(refused, Refusal{Record: *r, Reason: reason})
		r.AddressV6 = netip.Addr{}
	}
	return out, refused
}
