// Package nat keeps fabricd's NAT rules in the kernel: MASQUERADE for
// container traffic leaving the fabric and DNAT for fabric-wide published
// ports (a routing mesh like Docker swarm's, without swarm).
//
// nat only renders its chains; the iptables package owns the kernel tables:
// it diffs, writes atomically, orders the jumps in the built-in chains and
// repairs drift. All rules live in fabricd's own chains (names start with
// FABRIC-) and carry a comment "fabric: <why>"; the built-in chains only get
// one jump each, placed before every rule that fabric does not own.
//
// Chains:
//
//	nat    FABRIC-PREROUTING  <- PREROUTING   DNAT of published ports (local destinations)
//	nat    FABRIC-OUTPUT      <- OUTPUT       the same for connections from the host itself
//	nat    FABRIC-POSTROUTING <- POSTROUTING  SNAT of published connections, MASQUERADE leaving the fabric
//	filter FABRIC-FORWARD     <- FORWARD      ACCEPT fabric traffic before dockerd's DROP policy
//
// The policy package's FABRIC-POLICY jump precedes FABRIC-FORWARD's in
// FORWARD; the iptables owner places both in one transaction.
//
// With an IPv6 pool the IPv6 tables' owner gets the same chains: NAT66
// (MASQUERADE leaving the IPv6 pool) and, for each publish whose target
// container has an IPv6 address (State.AddressesV6), its IPv6 side.
//
// Limits: a published port is reached through the host's non-loopback
// addresses only; 127.0.0.1:port is not forwarded (that would need
// route_localnet). Connections to a published port whose target runs on
// another host, or that come from a container of this host, are SNATed to
// this host's gateway address (the subnet's .1), so the target sees that
// address instead of the client's; connections from elsewhere to a target on
// this host keep the client's address. While a publish targets this host's
// subnet, the bridge's ports need hairpin mode (NeedsHairpin; the bridge
// package sets it): dockerd enables bridge-nf-call-iptables, so a container
// reaching its own published port needs its frame sent back out of the port
// it came in by.
//
// FABRIC-FORWARD runs before dockerd's DOCKER-USER chain: fabric traffic is
// accepted there, so restrictions on it belong in the policy package.
//
// Removing a publish stops new connections at once; conntrack entries of
// flows already NATed (long-lived UDP flows, for instance) live until they
// expire.
package nat

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"os/exec"
	"slices"
	"strings"

	"github.com/fabricnet/fabric/iptables"
)

// Chain names. ForwardChain is shared with the policy package, which jumps to
// its own chain from FORWARD before this one. EstablishedChain's jump comes
// before both and only takes established connections between containers.
const (
	EstablishedChain = "FABRIC-ESTABLISHED"
	ForwardChain     = "FABRIC-FORWARD"
	PreroutingChain  = "FABRIC-PREROUTING"
	OutputChain      = "FABRIC-OUTPUT"
	PostroutingChain = "FABRIC-POSTROUTING"
	// SourceCheckChain (IPv6's raw table) drops what a container on a
	// fabric network sends from an address that is not its own.
	SourceCheckChain = "FABRIC-SOURCE-CHECK"
)

// PublishedPort is one fabric-wide published port: HostPort on the selected hosts
// forwards to Target, which may run on any host of the fabric.
type PublishedPort struct {
	Proto    string         // "tcp" or "udp"
	HostPort uint16         // port on every selected host's addresses
	Target   netip.AddrPort // container address:port inside the pool
	Hosts    []string       // node names; empty means every host
}

func (p PublishedPort) String() string {
	s := fmt.Sprintf("%s/%d -> %s", p.Proto, p.HostPort, p.Target)
	if len(p.Hosts) > 0 {
		s += " on " + strings.Join(p.Hosts, ",")
	}
	return s
}

// onHost reports whether p is published on the node called node.
func (p PublishedPort) onHost(node string) bool {
	return len(p.Hosts) == 0 || slices.Contains(p.Hosts, node)
}

// State is everything Apply needs to compute this host's rules.
type State struct {
	Pool   netip.Prefix // the whole fabric, e.g. 10.244.0.0/16
	Subnet netip.Prefix // this host's lease, e.g. 10.244.1.0/24
	// PoolV6 and SubnetV6 are their IPv6 counterparts (invalid: no IPv6).
	PoolV6   netip.Prefix
	SubnetV6 netip.Prefix
	Bridge   string // the containers' bridge, e.g. docker0
	// UnderlayDev and Tunnels are the interfaces fabric traffic crosses;
	// FABRIC-FORWARD accepts only between them and Bridge.
	UnderlayDev string
	Tunnels     []string
	Node        string // this host's name, to filter PublishedPort.Hosts
	Publishes   []PublishedPort
	// Reserved are this host's own ports (its BGP and VXLAN ports) that no
	// publish may take, besides DefaultReserved.
	Reserved Reserved
	// Networks are the subnets of the fabric's Docker networks,
	// EndpointLinks matches this host's endpoint links on them (as
	// iptables takes it: "fnep+"), and LocalPorts are the ports their
	// containers publish on this host (docker run -p).
	Networks      []netip.Prefix
	EndpointLinks string
	LocalPorts    []LocalPort
	// AddressesV6 maps a container's IPv4 address to its IPv6 one (from
	// the trusted name records): a publish to a container's IPv4 address
	// is served on the hosts' IPv6 addresses too, to the same container,
	// as dockerd's -p serves both families.
	AddressesV6 map[netip.Addr]netip.Addr
}

// LocalPort is a port a container on a fabric network publishes on this
// host, as dockerd does on its bridges.
type LocalPort struct {
	Proto    string     // "tcp" or "udp"
	HostIP   netip.Addr // only this address of the host; invalid: every address
	HostPort uint16
	Target   netip.AddrPort
}

// Config configures a Manager.
type Config struct {
	// Exec builds the commands Manager runs (ip, and iptables when Tables
	// is nil). Nil means exec.CommandContext; tests wrap `nsenter --net=...`.
	Exec func(ctx context.Context, name string, args ...string) *exec.Cmd
	// Tables is the host's iptables owner, shared with the policy package
	// (required: every table has one owner).
	Tables *iptables.Manager
	// Tables6 is the owner of the IPv6 tables when the fabric has IPv6
	// (else nil): containers' IPv6 leaving the pool is masqueraded there.
	Tables6 *iptables.Manager
	Logger  *slog.Logger
}

// Manager renders fabric's NAT and forward chains on one host and hands them
// to the iptables owner.
type Manager struct {
	exec    func(ctx context.Context, name string, args ...string) *exec.Cmd
	log     *slog.Logger
	tables  *iptables.Manager
	tables6 *iptables.Manager
}

// New returns a Manager. It writes nothing.
func New(cfg Config) (*Manager, error) {
	m := &Manager{exec: cfg.Exec, log: cfg.Logger, tables: cfg.Tables, tables6: cfg.Tables6}
	if m.exec == nil {
		m.exec = exec.CommandContext
	}
	if m.log == nil {
		m.log = slog.Default()
	}
	m.log = m.log.With("component", "nat")
	if m.tables == nil {
		return nil, errors.New("nat: no iptables owner (Config.Tables): the host has exactly one")
	}
	return m, nil
}

// Backend is "nf_tables" or "legacy": the iptables backend in use.
func (m *Manager) Backend() string { return m.tables.Backend() }

// Writes counts the iptables-restore runs of the iptables owner.
func (m *Manager) Writes() uint64 { return m.tables.Writes() }

// Apply makes the kernel's NAT chains match st. It is idempotent and,
// when nothing changed, costs one iptables-save.
func (m *Manager) Apply(ctx context.Context, st State) error {
	if err := checkState(st); err != nil {
		return err
	}
	publishes := m.selectPublishes(st)
	if err := m.tables.Set(ctx, Section, render(st, publishes, m.tables.RandomFully())); err != nil {
		return fmt.Errorf("nat: %w", err)
	}
	if m.tables6 != nil {
		if err := m.tables6.Set(ctx, Section, renderIPv6(st, publishes, m.tables6.RandomFully())); err != nil {
			return fmt.Errorf("nat: IPv6: %w", err)
		}
	}
	return nil
}

// Cleanup withdraws nat's rules. It is safe when nothing is there.
func (m *Manager) Cleanup(ctx context.Context) error {
	if m.tables6 != nil {
		if err := m.tables6.Set(ctx, Section, iptables.Section{}); err != nil {
			return err
		}
	}
	return m.tables.Set(ctx, Section, iptables.Section{})
}

// NeedsHairpin reports whether the bridge's ports need hairpin mode: while
// a publish of this host targets one of its own containers, a container
// reaching its own published port needs its frames sent back out of the
// port they came in by (dockerd enables bridge-nf-call-iptables). The
// bridge package sets it (bridge.Hairpin).
func NeedsHairpin(st State) bool {
	// Not selectPublishes: that logs every invalid publish, and this runs
	// every few seconds; hairpin for one is harmless.
	var here []PublishedPort
	for _, p := range st.Publishes {
		if p.onHost(st.Node) {
			here = append(here, p)
		}
	}
	return st.Bridge != "" && hasLocalTarget(st, here)
}

// Rules lists fabric's current rules as "-t TABLE -A CHAIN ..." lines.
func (m *Manager) Rules(ctx context.Context) ([]string, error) { return m.tables.Rules(ctx) }

// selectPublishes keeps the valid publishes of this node, sorted, the first
// of any two claiming the same proto/port winning.
func (m *Manager) selectPublishes(st State) []PublishedPort {
	var out []PublishedPort
	for _, p := range st.Publishes {
		if !p.onHost(st.Node) {
			continue
		}
		if err := ValidatePublish(p, append([]netip.Prefix{st.Pool}, st.Networks...), out, st.Reserved); err != nil {
			m.log.Warn("publish skipped", "publish", p.String(), "err", err)
			continue
		}
		out = append(out, p)
	}
	slices.SortFunc(out, func(a, b PublishedPort) int {
		if c := strings.Compare(a.Proto, b.Proto); c != 0 {
			return c
		}
		return int(a.HostPort) - int(b.HostPort)
	})
	return out
}

func hasLocalTarget(st State, publishes []PublishedPort) bool {
	for _, p := range publishes {
		if st.Subnet.Contains(p.Target.Addr().Unmap()) {
			return true
		}
	}
	return false
}

func checkState(st State) error {
	if !st.Pool.IsValid() || !st.Pool.Addr().Is4() {
		return fmt.Errorf("nat: pool %v is not an IPv4 prefix", st.Pool)
	}
	if !st.Subnet.IsValid() || !st.Subnet.Addr().Is4() {
		return fmt.Errorf("nat: subnet %v is not an IPv4 prefix", st.Subnet)
	}
	if st.Subnet.Bits() < st.Pool.Bits() || !st.Pool.Contains(st.Subnet.Addr()) {
		return fmt.Errorf("nat: subnet %v is not inside pool %v", st.Subnet, st.Pool)
	}
	if st.Subnet.Bits() > 30 {
		return fmt.Errorf("nat: subnet %v has no room for a gateway address", st.Subnet)
	}
	return nil
}

// Reserved maps "proto/port" to what uses that port on fabric hosts.
type Reserved map[string]string

// DefaultReserved are ports a published port must never take: DNAT of every
// host's BGP port would cut its sessions, of BFD's its failure detection,
// of the VXLAN port its tunnels, of etcd's ports the fabric's state, of SSH
// the operator.
var DefaultReserved = Reserved{
	"tcp/179":  "BGP",
	"udp/3784": "BFD",
	"udp/4789": "VXLAN (the IANA port)",
	"udp/8472": "VXLAN (the Linux kernel's and flannel's port)",
	"tcp/2379": "etcd clients",
	"tcp/2380": "etcd peers",
	"tcp/22":   "SSH",
}

// why says what uses proto/port, or "".
func (r Reserved) why(proto string, port uint16) string {
	key := fmt.Sprintf("%s/%d", proto, port)
	if w := DefaultReserved[key]; w != "" {
		return w
	}
	return r[key]
}

// ValidatePublish checks p before fabricctl stores it: a known protocol, non-zero
// ports, a host port nothing of the fabric uses (DefaultReserved and
// reserved), a target inside the fabric (fabric: the pool, then the
// Docker networks' subnets), and no overlap with an existing publish
// of the same protocol and host port on a common host.
func ValidatePublish(p PublishedPort, fabric []netip.Prefix, existing []PublishedPort, reserved Reserved) error {
	if p.Proto != "tcp" && p.Proto != "udp" {
		return fmt.Errorf("publish %s: protocol %q is not tcp or udp", p, p.Proto)
	}
	if p.HostPort == 0 {
		return fmt.Errorf("publish %s: host port 0 is not a port", p)
	}
	if what := reserved.why(p.Proto, p.HostPort); what != "" {
		return fmt.Errorf("publish %s: %s/%d is reserved for %s on fabric hosts; publishing it would take that port on every host", p, p.Proto, p.HostPort, what)
	}
	if !p.Target.IsValid() || p.Target.Port() == 0 {
		return fmt.Errorf("publish %s: target %v needs an address and a non-zero port", p, p.Target)
	}
	addr := p.Target.Addr().Unmap()
	if !addr.Is4() {
		return fmt.Errorf("publish %s: target %v is not IPv4", p, addr)
	}
	if !slices.ContainsFunc(fabric, func(s netip.Prefix) bool { return s.Contains(addr) }) {
		where := "the fabric pool " + fabric[0].String()
		if len(fabric) > 1 {
			where += fmt.Sprintf(" and the networks %v", fabric[1:])
		}
		return fmt.Errorf("publish %s: target %v is outside %s", p, addr, where)
	}
	for _, h := range p.Hosts {
		if h == "" {
			return fmt.Errorf("publish %s: empty host name", p)
		}
	}
	for _, e := range existing {
		if e.Proto == p.Proto && e.HostPort == p.HostPort && hostsOverlap(e.Hosts, p.Hosts) {
			return fmt.Errorf("publish %s: %s/%d is already published (%s)", p, p.Proto, p.HostPort, e)
		}
	}
	return nil
}

func hostsOverlap(a, b []string) bool {
	if len(a) == 0 || len(b) == 0 {
		return true
	}
	for _, h := range a {
		if slices.Contains(b, h) {
			return true
		}
	}
	return false
}
