// Package ingress lets only fabric hosts send tunnel packets to this host.
// A tunnel device decapsulates whatever reaches it: without a filter, any
// host on the underlay could inject packets with a forged inner source (a
// container of another host) past "from node X" policy rules. Like Calico's
// set of all hosts, an ipset holds the underlay addresses of the fabric's
// hosts, kept from the node registry, and a chain in INPUT drops every
// encapsulated packet (each backend's Ingress match) from any other source.
package ingress

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"sync"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netlink/nl"
	"golang.org/x/sys/unix"

	"github.com/fabricnet/fabric/internal/ipsets"
	"github.com/fabricnet/fabric/internal/nfnetlink"
	"github.com/fabricnet/fabric/iptables"
)

// Names of what the Limiter installs.
const (
	Section = "ingress"
	Chain   = "FABRIC-INPUT"
	SetName = "fabric-nodes"
	// tmpSet is the name earlier versions filled before swapping it in;
	// --cleanup still removes one a killed run left.
	tmpSet  = "fabric-nodes-new"
	setType = "hash:ip"
)

// Config configures a Limiter.
type Config struct {
	Tables *iptables.Manager
	// Matches select the encapsulated packets of every tunnel this host
	// runs (backend.Backend.Ingress), e.g. "-p udp -m udp --dport 4789".
	Matches []string
	// NetnsPath is the network namespace of the set ("" is this
	// process's); tests point it at theirs.
	NetnsPath string
	Logger    *slog.Logger
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

// Section is the chain that drops tunnel packets from outside the node set.
func (l *Limiter) Section() iptables.Section {
	var rules []string
	for _, m := range l.cfg.Matches {
		rules = append(rules, fmt.Sprintf("%s -m set ! --match-set %s src %s -j DROP", m, SetName,
			iptables.Comment("fabric: tunnel packets only from fabric hosts")))
	}
	return iptables.Section{
		Chains: []iptables.Chain{{Table: "filter", Name: Chain, Rules: rules}},
		Jumps: []iptables.Jump{{Table: "filter", From: "INPUT", To: Chain,
			Why: "tunnel packets only from fabric hosts", Rank: iptables.RankIngress}},
	}
}

// Apply makes the node set exactly nodes and has the iptables owner keep the
// chain. It reads the set over netlink and writes only the difference (new
// hosts added before departed ones are removed), so neither the repair tick
// nor a joining host, to which every host reacts, runs a command.
func (l *Limiter) Apply(ctx context.Context, nodes []netip.Addr) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	want := map[netip.Addr]bool{}
	for _, a := range nodes {
		if a.Is4() {
			want[a] = true
		}
	}
	have, err := l.members()
	if err != nil {
		return fmt.Errorf("ingress: node set %s: %w", SetName, err)
	}
	var add, del []netip.Addr
	for a := range want {
		if !have[a] {
			add = append(add, a)
		}
	}
	for a := range have {
		if !want[a] {
			del = append(del, a)
		}
	}
	if have == nil || len(add) > 0 || len(del) > 0 {
		if err := l.write(have == nil, add, del); err != nil {
			return fmt.Errorf("ingress: node set %s: %w", SetName, err)
		}
	}
	if err := l.cfg.Tables.Set(ctx, Section, l.Section()); err != nil {
		return fmt.Errorf("ingress: %w", err)
	}
	if len(add) > 0 || len(del) > 0 {
		l.log.Info("tunnel packets accepted only from fabric hosts", "hosts", len(want), "added", len(add), "removed", len(del), "set", SetName)
	}
	return nil
}

// write creates the set if asked to, then adds before it removes. A new set
// is filled before the chain that uses it is written (after write), so it is
// never in use while half filled.
func (l *Limiter) write(create bool, add, del []netip.Addr) error {
	h, err := nfnetlink.Handle(l.cfg.NetnsPath)
	if err != nil {
		return err
	}
	defer h.Close()
	if create {
		if err := h.IpsetCreate(SetName, setType, netlink.IpsetCreateOptions{Family: unix.AF_INET}); err != nil {
			return fmt.Errorf("create: %w", err)
		}
	}
	exists := nl.IPSetError(nl.IPSET_ERR_EXIST) // already added, already removed
	for _, a := range add {
		if err := h.IpsetAdd(SetName, &netlink.IPSetEntry{IP: a.AsSlice()}); err != nil && !errors.Is(err, exists) {
			return fmt.Errorf("add %s: %w", a, err)
		}
		l.writes++
	}
	for _, a := range del {
		if err := h.IpsetDel(SetName, &netlink.IPSetEntry{IP: a.AsSlice()}); err != nil && !errors.Is(err, exists) {
			return fmt.Errorf("remove %s: %w", a, err)
		}
		l.writes++
	}
	return nil
}

// Writes counts the entries Apply added or removed since New.
func (l *Limiter) Writes() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.writes
}

// members returns the addresses in the node set, or nil when there is no
// such set. A set of that name of another type is an error: fabric did not
// make it and will not guess whose it is.
func (l *Limiter) members() (map[netip.Addr]bool, error) {
	set, err := ipsets.Read(l.cfg.NetnsPath, SetName)
	if err != nil || set == nil {
		return nil, err
	}
	if set.Type != setType || set.Family != unix.AF_INET {
		return nil, fmt.Errorf("exists as %s (family %d), not %s inet: remove it (ipset destroy %s) or free the name", set.Type, set.Family, setType, SetName)
	}
	out := map[netip.Addr]bool{}
	for _, a := range set.Addrs {
		out[a.Unmap()] = true
	}
	return out, nil
}

// DestroySet removes the node set (and a leftover of an earlier version's
// swap) in the namespace at netnsPath ("" is this process's); the chain using
// it must be gone. --cleanup uses it after the iptables owner's Cleanup.
func DestroySet(netnsPath string) error {
	h, err := nfnetlink.Handle(netnsPath)
	if err != nil {
		return fmt.Errorf("ingress: %w", err)
	}
	defer h.Close()
	for _, name := range []string{SetName, tmpSet} {
		if err := h.IpsetDestroy(name); err != nil && !errors.Is(err, unix.ENOENT) {
			return fmt.Errorf("ingress: destroy ipset %s: %w", name, err)
		}
	}
	return nil
}
