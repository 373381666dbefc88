// Package registry keeps the list of fabric hosts in etcd. Each host
// publishes its record under <prefix>/nodes/<name>, attached to a short
// liveness lease, and every host watches the whole set.
package registry

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"sort"
	"strings"
	"unicode"

	clientv3 "go.etcd.io/etcd/client/v3"
)

// DefaultPrefix is the etcd key prefix used when none is configured.
const DefaultPrefix = "/fabric/v1"

// Node is one host's record.
type Node struct {
	Name    string       `json:"name"`
	Address netip.Addr   `json:"address"`
	ASN     uint32       `json:"asn"`
	Subnet  netip.Prefix `json:"subnet"`
	// SubnetV6 is the host's IPv6 subnet when the fabric has an IPv6 pool:
	// the /64 paired with Subnet (ipam.Pool.SubnetV6), checked by peers.
	SubnetV6 netip.Prefix `json:"subnetV6,omitzero"`
	// AddressV6 is the host's IPv6 address on its underlay, where it has
	// one in an IPv6 fabric: the next hop of its IPv6 subnet, so routers
	// on a dual-stack network route the /64 natively.
	AddressV6 netip.Addr `json:"addressV6,omitzero"`
	VTEPMAC   string     `json:"vtepMAC,omitempty"`
	Encaps    []string   `json:"encaps"` // encapsulations this host's kernel supports: "ipip", "vxlan"
	Version   string     `json:"version"`
	// RouteReflector: this host reflects routes for the fabric; once any
	// host does, the others peer only with the reflectors (no full mesh).
	RouteReflector bool   `json:"routeReflector,omitempty"`
	MachineID      string `json:"machineID"`
	// WireGuardKey is the host's WireGuard public key (base64) when it
	// encrypts; peers check it before they use it (planner.AcceptNodes).
	WireGuardKey string `json:"wireguardKey,omitempty"`
}

// Validate checks that a record can be used to reach the host.
func (n Node) Validate() error {
	if err := validateName(n.Name); err != nil {
		return err
	}
	if !n.Address.IsValid() {
		return fmt.Errorf("node %q: address is missing", n.Name)
	}
	if n.Address.Is4In6() || n.Address.Zone() != "" || n.Address.Is6() && !n.Address.IsGlobalUnicast() {
		return fmt.Errorf("node %q: address %s is neither IPv4 nor a global IPv6 address (an IPv6-only underlay)", n.Name, n.Address)
	}
	if n.ASN == 0 {
		return fmt.Errorf("node %q: asn is 0", n.Name)
	}
	if !n.Subnet.IsValid() {
		return fmt.Errorf("node %q: subnet is missing", n.Name)
	}
	if !n.Subnet.Addr().Is4() || n.Subnet.Masked() != n.Subnet {
		return fmt.Errorf("node %q: subnet %s is not an IPv4 network address", n.Name, n.Subnet)
	}
	if n.SubnetV6.IsValid() && (!n.SubnetV6.Addr().Is6() || n.SubnetV6.Addr().Is4In6() || n.SubnetV6.Masked() != n.SubnetV6) {
		return fmt.Errorf("node %q: subnetV6 %s is not an IPv6 network address", n.Name, n.SubnetV6)
	}
	if n.AddressV6.IsValid() && (!n.AddressV6.Is6() || n.AddressV6.Is4In6() || !n.AddressV6.IsGlobalUnicast() || n.AddressV6.Zone() != "") {
		return fmt.Errorf("node %q: addressV6 %s is not a global IPv6 address", n.Name, n.AddressV6)
	}
	if n.VTEPMAC != "" {
		if mac, err := net.ParseMAC(n.VTEPMAC); err != nil || len(mac) != 6 {
			return fmt.Errorf("node %q: vtepMAC %q is not a MAC address", n.Name, n.VTEPMAC)
		}
	}
	for _, e := range n.Encaps {
		// Unknown names are allowed: newer hosts may offer more.
		if e == "" || strings.ToLower(e) != e || strings.ContainsFunc(e, unicode.IsSpace) {
			return fmt.Errorf("node %q: encapsulation %q is not a lowercase name like \"vxlan\"", n.Name, e)
		}
	}
	return nil
}

func validateName(name string) error {
	if name == "" {
		return errors.New("node name is empty")
	}
	if strings.ContainsFunc(name, func(r rune) bool { return r == '/' || unicode.IsSpace(r) || !unicode.IsPrint(r) }) {
		return fmt.Errorf("node name %q contains '/', spaces or control characters", name)
	}
	return nil
}

// BadRecord is a node key whose value cannot be used.
type BadRecord struct {
	Key     string `json:"key"`
	Problem string `json:"problem"`
}

func normPrefix(prefix string) string {
	if prefix == "" {
		return DefaultPrefix
	}
	return strings.TrimRight(prefix, "/")
}

func nodesPrefix(prefix string) string { return normPrefix(prefix) + "/nodes/" }

func nodeKey(prefix, name string) string { return nodesPrefix(prefix) + name }

// decodeNode parses and validates the value stored at key.
func decodeNode(prefix, key string, value []byte) (Node, error) {
	var n Node
	if err := json.Unmarshal(value, &n); err != nil {
		return Node{}, fmt.Errorf("not a valid node record: %v", err)
	}
	if err := n.Validate(); err != nil {
		return Node{}, err
	}
	if keyName := strings.TrimPrefix(key, nodesPrefix(prefix)); keyName != n.Name {
		return Node{}, fmt.Errorf("record names node %q but is stored under the name %q", n.Name, keyName)
	}
	return n, nil
}

func sortNodes(nodes []Node) {
	sort.Slice(nodes, func(i, j int) bool { return nodes[i].Name < nodes[j].Name })
}

// List returns the valid node records sorted by name, and the invalid ones.
func List(ctx context.Context, cli *clientv3.Client, prefix string) ([]Node, []BadRecord, error) {
	nodes, bad, _, err := list(ctx, cli, prefix)
	return nodes, bad, err
}

func list(ctx context.Context, cli *clientv3.Client, prefix string) ([]Node, []BadRecord, int64, error) {
	resp, err := cli.Get(ctx, nodesPrefix(prefix), clientv3.WithPrefix())
	if err != nil {
		return nil, nil, 0, fmt.Errorf("read node records under %s from etcd: %w", nodesPrefix(prefix), err)
	}
	var nodes []Node
	var bad []BadRecord
	for _, kv := range resp.Kvs {
		n, err := decodeNode(prefix, string(kv.Key), kv.Value)
		if err != nil {
			bad = append(bad, BadRecord{Key: string(kv.Key), Problem: err.Error()})
			continue
		}
		nodes = append(nodes, n)
	}
	sortNodes(nodes)
	return nodes, bad, resp.Header.Revision, nil
}
