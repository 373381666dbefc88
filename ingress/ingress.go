// Package ingress lets only fabric hosts send tunnel packets to this host.
// A tunnel device decapsulates whatever reaches it: without a filter, any
// host on the underlay could inject packets with a forged inner source (a
// container of another host) past "from node X" policy rules. Like Calico's
// set of all hosts, an ipset holds the underlay addresses of the fabric's
// hosts, kept from the node registry, and a chain in INPUT drops every
// encapsulated packet (each backend's Ingress match) from any other source.
// On an IPv6 underlay tunnel packets come over IPv6: a second set and the
// same chain in the IPv6 tables do the same there.
package ingress

import (
	"context"
	"fmt"
	"log/slog"
	"net/netip"
	"sync"

	"golang.org/x/sys/unix"

	"github.com/fabricnet/fabric/internal/ipsets"
	"github.com/fabricnet/fabric/iptables"
)

// Names of what the Limiter installs.
const (
	Section = "ingress"
	Chain   = "FABRIC-INPUT"
	SetName = "fabric-nodes"
	// SetName6 holds the IPv6 underlay addresses (Config.Tables6).
	SetName6 = "fabric-nodes6"
)

// Config configures a Limiter.
type Config struct {
	Tables *iptables.Manager
	// Tables6 is the owner of the IPv6 tables where tunnel packets come
	// over IPv6 (an IPv6 underlay); nil: none do.
	Tables6 *iptables.Manager
	// Sets is the host's owner of fabric's ipsets (required).
	Sets *ipsets.Owner
	// Matches select the encapsulated packets of every tunnel this host
	// runs (backend.Backend.Ingress), e.g. "-p udp -m udp --dport 4789".
	Matches []string
	Logger  *slog.Logger
}

// Limiter keeps the node set and the INPUT chain.
type Limiter struct {
	cfg    Config
	log    *slog.Logger
	mu     sync.Mutex
	writes int
}

// New returns a Limiter. It touches nothing until Apply.
func New(cfg Config) *Limiter {
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	return &Limiter{cfg: cfg, log: cfg.Logger.With("component", "ingress")}
}

// Section is the chain that drops tunnel packets from outside the node set
// named set.
func (l *Limiter) Section(set string) iptables.Section {
	var rules []string
	for _, m := range l.cfg.Matches {
		rules = append(rules, fmt.Sprintf("%s -m set ! --match-set %s src %s -j DROP", m, set,
			iptables.Comment("fabric: tunnel packets only from fabric hosts")))
	}
	return iptables.Section{
		Chains: []iptables.Chain{{Table: "filter", Name: Chain, Rules: rules}},
		Jumps: []iptables.Jump{{Table: "filter", From: "INPUT", To: Chain,
			Why: "tunnel packets only from fabric hosts", Rank: iptables.RankIngress}},
	}
}

// Apply makes the node set exactly nodes and has the iptables owner keep the
// chain. The set's owner reads it over netlink and writes only the
// difference (new hosts added before departed ones are removed), so neither
// the repair tick nor a joining host, to which every host reacts, runs a
// command.
func (l *Limiter) Apply(ctx context.Context, nodes []netip.Addr) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	var want, want6 []netip.Addr
	for _, a := range nodes {
		if a.Is4() {
			want = append(want, a)
		} else if a.Is6() && !a.Is4In6() {
			want6 = append(want6, a)
		}
	}
	if err := l.apply(ctx, l.cfg.Tables, SetName, unix.AF_INET, want); err != nil {
		return err
	}
	if l.cfg.Tables6 != nil {
		return l.apply(ctx, l.cfg.Tables6, SetName6, unix.AF_INET6, want6)
	}
	return nil
}

func (l *Limiter) apply(ctx context.Context, tables *iptables.Manager, set string, family uint8, want []netip.Addr) error {
	writes, err := l.cfg.Sets.SetIPs(set, family, want)
	if err != nil {
		return fmt.Errorf("ingress: node set: %w", err)
	}
	l.writes += writes
	if err := tables.Set(ctx, Section, l.Section(set)); err != nil {
		return fmt.Errorf("ingress: %w", err)
	}
	if writes > 0 {
		l.log.Info("tunnel packets accepted only from these fabric hosts", "hosts", len(want), "entriesWritten", writes, "set", set)
	}
	return nil
}

// Writes counts the entries Apply added or removed since New.
func (l *Limiter) Writes() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.writes
}
