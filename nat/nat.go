// Package nat keeps fabricd's NAT rules in the kernel: MASQUERADE for
// container traffic leaving the fabric and DNAT for fabric-wide published
// ports (a routing mesh like Docker swarm's, without swarm).
//
// Following Calico felix's pattern, Apply computes the whole desired state,
// reads the kernel's with one iptables-save per table, and writes only the
// difference with one `iptables-restore --noflush` per table, so every change
// is atomic and rules of other owners (dockerd, the policy package) are never
// touched. All rules live in fabricd's own chains (names start with FABRIC-)
// and carry a comment "fabric: <why>"; the built-in chains only get one jump
// each, placed before every rule that fabric does not own.
//
// Chains:
//
//	nat    FABRIC-PREROUTING  <- PREROUTING   DNAT of published ports (local destinations)
//	nat    FABRIC-OUTPUT      <- OUTPUT       the same for connections from the host itself
//	nat    FABRIC-POSTROUTING <- POSTROUTING  SNAT of published connections, MASQUERADE leaving the fabric
//	filter FABRIC-FORWARD     <- FORWARD      ACCEPT fabric traffic before dockerd's DROP policy
//
// The policy package filters traffic in its own chain (FABRIC-POLICY) whose
// jump it keeps in FORWARD before ForwardChain's: Apply accepts jumps to any
// FABRIC- chain ahead of its own and only moves its jump when a rule of
// another owner precedes it.
//
// Limits: a published port is reached through the host's non-loopback
// addresses only; 127.0.0.1:port is not forwarded (that would need
// route_localnet). Connections to a published port whose target runs on
// another host, or that come from a container of this host, are SNATed to
// this host's gateway address (the subnet's .1), so the target sees that
// address instead of the client's; connections from elsewhere to a target on
// this host keep the client's address. While a publish targets this host's
// subnet, Apply turns on hairpin mode on the bridge's ports (dockerd enables
// bridge-nf-call-iptables, so a container reaching its own published port
// needs its frame sent back out of the port it came in by); ports added later
// get it at the next Apply or Maintain tick.
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
	"sync"
	"time"
)

// Chain names. ForwardChain is shared with the policy package, which jumps to
// its own chain from FORWARD before this one.
const (
	ForwardChain     = "FABRIC-FORWARD"
	PreroutingChain  = "FABRIC-PREROUTING"
	OutputChain      = "FABRIC-OUTPUT"
	PostroutingChain = "FABRIC-POSTROUTING"

	// ChainPrefix starts the name of every chain fabric owns.
	ChainPrefix = "FABRIC-"
)

// Publish is one fabric-wide published port: HostPort on the selected hosts
// forwards to Target, which may run on any host of the fabric.
type Publish struct {
	Proto    string         // "tcp" or "udp"
	HostPort uint16         // port on every selected host's addresses
	Target   netip.AddrPort // container address:port inside the pool
	Hosts    []string       // node names; empty means every host
}

func (p Publish) String() string {
	s := fmt.Sprintf("%s/%d -> %s", p.Proto, p.HostPort, p.Target)
	if len(p.Hosts) > 0 {
		s += " on " + strings.Join(p.Hosts, ",")
	}
	return s
}

// onHost reports whether p is published on the node called node.
func (p Publish) onHost(node string) bool {
	return len(p.Hosts) == 0 || slices.Contains(p.Hosts, node)
}

// State is everything Apply needs to compute this host's rules.
type State struct {
	Pool      netip.Prefix // the whole fabric, e.g. 10.244.0.0/16
	Subnet    netip.Prefix // this host's lease, e.g. 10.244.1.0/24
	Bridge    string       // the containers' bridge, e.g. docker0
	Node      string       // this host's name, to filter Publish.Hosts
	Publishes []Publish
}

// Config configures a Manager.
type Config struct {
	// Exec builds the commands Manager runs (iptables-save/-restore, ip).
	// Nil means exec.CommandContext; tests wrap `nsenter --net=...`.
	Exec   func(ctx context.Context, name string, args ...string) *exec.Cmd
	Logger *slog.Logger
}

// Manager owns fabric's NAT and forward chains on one host.
type Manager struct {
	exec    func(ctx context.Context, name string, args ...string) *exec.Cmd
	log     *slog.Logger
	save    string // iptables-save binary of the chosen backend
	restore string // iptables-restore binary of the chosen backend
	backend string // "nf_tables" or "legacy"

	mu     sync.Mutex // serialises Apply, Cleanup and Maintain
	last   *State     // last state applied, re-applied by Maintain
	writes uint64     // iptables-restore runs, for tests and debugging
}

// New detects the iptables backend that plain `iptables` uses (the one
// dockerd uses too) and returns a Manager for it.
func New(cfg Config) (*Manager, error) {
	m := &Manager{exec: cfg.Exec, log: cfg.Logger}
	if m.exec == nil {
		m.exec = exec.CommandContext
	}
	if m.log == nil {
		m.log = slog.Default()
	}
	m.log = m.log.With("component", "nat")

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	out, err := m.exec(ctx, "iptables", "--version").CombinedOutput()
	if err != nil {
		return nil, fmt.Errorf("nat: iptables not usable (install the iptables package): %v: %s", err, strings.TrimSpace(string(out)))
	}
	version := strings.TrimSpace(string(out))
	switch {
	case strings.Contains(version, "(nf_tables)"):
		m.backend = "nf_tables"
		m.save, m.restore = pickBinary("iptables-nft-save", "iptables-save"), pickBinary("iptables-nft-restore", "iptables-restore")
	case strings.Contains(version, "(legacy)"):
		m.backend = "legacy"
		m.save, m.restore = pickBinary("iptables-legacy-save", "iptables-save"), pickBinary("iptables-legacy-restore", "iptables-restore")
	default:
		// Old iptables (< 1.8) prints no backend: it is legacy and has only
		// the plain names.
		m.backend = "legacy"
		m.save, m.restore = "iptables-save", "iptables-restore"
	}
	for _, bin := range []string{m.save, m.restore} {
		if _, err := exec.LookPath(bin); err != nil {
			return nil, fmt.Errorf("nat: %s (backend %s of %q) not found: %v", bin, m.backend, version, err)
		}
	}
	m.log.Debug("iptables backend detected", "version", version, "save", m.save, "restore", m.restore)
	return m, nil
}

// pickBinary returns preferred when it is installed, else fallback: the
// backend-specific names keep save/restore on the same backend as iptables
// even when alternatives point elsewhere.
func pickBinary(preferred, fallback string) string {
	if _, err := exec.LookPath(preferred); err == nil {
		return preferred
	}
	return fallback
}

// Backend is "nf_tables" or "legacy": the iptables backend in use.
func (m *Manager) Backend() string { return m.backend }

// Binaries are the iptables-save and iptables-restore commands of the
// detected backend, for other owners of rules (policy) to use the same.
func (m *Manager) Binaries() (save, restore string) { return m.save, m.restore }

// Writes counts the iptables-restore runs so far; an Apply that finds the
// kernel already right does not add to it.
func (m *Manager) Writes() uint64 {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.writes
}

// Apply makes the kernel's fabric chains match st. It is idempotent and,
// when nothing changed, costs one iptables-save per table.
func (m *Manager) Apply(ctx context.Context, st State) error {
	if err := checkState(st); err != nil {
		return err
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if err := m.apply(ctx, st); err != nil {
		return err
	}
	saved := st
	saved.Publishes = slices.Clone(st.Publishes)
	m.last = &saved
	return nil
}

func (m *Manager) apply(ctx context.Context, st State) error {
	publishes := m.selectPublishes(st)
	for _, want := range desiredTables(st, publishes) {
		have, err := m.readTable(ctx, want.name)
		if err != nil {
			return err
		}
		payload := diffTable(want, have)
		if payload == "" {
			m.log.Debug("chains up to date", "table", want.name)
			continue
		}
		if err := m.restoreTable(ctx, want.name, payload); err != nil {
			return err
		}
		m.log.Info("rules written", "table", want.name, "publishes", len(publishes))
	}
	if st.Bridge != "" && hasLocalTarget(st, publishes) {
		// Hairpin lets a container reach its own published port through the
		// host; failing it only loses that case, so it is not fatal.
		if err := m.ensureHairpin(ctx, st.Bridge); err != nil {
			m.log.Warn("cannot enable hairpin on bridge ports; a container cannot reach its own published port", "bridge", st.Bridge, "err", err)
		}
	}
	return nil
}

// Maintain re-applies the last applied State every interval until ctx ends,
// so chains or jumps deleted by hand or by another program come back within
// one interval. It returns ctx's error.
func (m *Manager) Maintain(ctx context.Context, interval time.Duration) error {
	if interval <= 0 {
		interval = 5 * time.Second
	}
	ticker := time.NewTicker(interval)
	defer ticker.Stop()
	for {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-ticker.C:
		}
		m.mu.Lock()
		if m.last != nil {
			if err := m.apply(ctx, *m.last); err != nil && ctx.Err() == nil {
				m.log.Warn("re-applying rules failed; retrying", "err", err, "in", interval)
			}
		}
		m.mu.Unlock()
	}
}

// Cleanup removes fabric's chains and every rule that jumps to them. It is
// safe when nothing is there.
func (m *Manager) Cleanup(ctx context.Context) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.last = nil
	var errs []error
	for _, tbl := range []string{"nat", "filter"} {
		have, err := m.readTable(ctx, tbl)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		payload := cleanupPayload(tbl, have)
		if payload == "" {
			continue
		}
		if err := m.restoreTable(ctx, tbl, payload); err != nil {
			errs = append(errs, err)
			continue
		}
		m.log.Info("chains removed", "table", tbl)
	}
	return errors.Join(errs...)
}

// Rules lists fabric's current rules as "-t TABLE -A CHAIN ..." lines: the
// jumps in built-in chains and the contents of fabric's chains.
func (m *Manager) Rules(ctx context.Context) ([]string, error) {
	var lines []string
	for _, tbl := range []string{"nat", "filter"} {
		have, err := m.readTable(ctx, tbl)
		if err != nil {
			return nil, err
		}
		for _, chain := range have.order {
			for _, rule := range have.rules[chain] {
				if ownedChain(tbl, chain) || ownedChain(tbl, ruleTarget(rule)) {
					lines = append(lines, fmt.Sprintf("-t %s -A %s %s", tbl, chain, rule))
				}
			}
		}
	}
	return lines, nil
}

// selectPublishes keeps the valid publishes of this node, sorted, the first
// of any two claiming the same proto/port winning.
func (m *Manager) selectPublishes(st State) []Publish {
	var out []Publish
	for _, p := range st.Publishes {
		if !p.onHost(st.Node) {
			continue
		}
		if err := ValidatePublish(p, st.Pool, out); err != nil {
			m.log.Warn("publish skipped", "publish", p.String(), "err", err)
			continue
		}
		out = append(out, p)
	}
	slices.SortFunc(out, func(a, b Publish) int {
		if c := strings.Compare(a.Proto, b.Proto); c != 0 {
			return c
		}
		return int(a.HostPort) - int(b.HostPort)
	})
	return out
}

func hasLocalTarget(st State, publishes []Publish) bool {
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

// ValidatePublish checks p before fabricctl stores it: a known protocol, non-zero
// ports, a target inside pool, and no overlap with an existing publish of
// the same protocol and host port on a common host.
func ValidatePublish(p Publish, pool netip.Prefix, existing []Publish) error {
	if p.Proto != "tcp" && p.Proto != "udp" {
		return fmt.Errorf("publish %s: protocol %q is not tcp or udp", p, p.Proto)
	}
	if p.HostPort == 0 {
		return fmt.Errorf("publish %s: host port 0 is not a port", p)
	}
	if !p.Target.IsValid() || p.Target.Port() == 0 {
		return fmt.Errorf("publish %s: target %v needs an address and a non-zero port", p, p.Target)
	}
	addr := p.Target.Addr().Unmap()
	if !addr.Is4() {
		return fmt.Errorf("publish %s: target %v is not IPv4", p, addr)
	}
	if !pool.Contains(addr) {
		return fmt.Errorf("publish %s: target %v is outside the fabric pool %v", p, addr, pool)
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
