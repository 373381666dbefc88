// Package iptables is the one owner of fabric's iptables rules on a host.
//
// Following Calico felix's table owner, renderers (the nat and policy
// packages) only say what they want, as a Section of chains and jumps; this
// package reads the kernel with one iptables-save, computes the difference
// for every table (plan, a pure function) and writes it with one
// `iptables-restore --noflush` per table, so every change is atomic and rules
// of other owners (dockerd, the administrator) are never touched. It alone
// decides the order of fabric's jumps in the built-in chains (Rank): the
// policy jump and the accept jump are always placed in the same transaction,
// policy first. Every chain named FABRIC-* in any table is fabric's: what no
// section wants is removed, so leftovers of an older fabricd go at start and
// on --cleanup.
//
// Nothing is written until every section named in Config.Sections has been
// set once: after a restart the kernel keeps the previous run's rules, policy
// included, until this run knows all of them.
package iptables

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"os/exec"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	goipt "github.com/coreos/go-iptables/iptables"
)

// Config configures a Manager.
type Config struct {
	// Exec builds the commands the Manager runs. Nil means
	// exec.CommandContext; tests wrap `nsenter --net=...`.
	Exec func(ctx context.Context, name string, args ...string) *exec.Cmd
	// Sections names every section that will be Set; see the package doc.
	Sections []string
	// NetnsPath is the network namespace the rules live in, for the ruleset
	// generation check of the nf_tables backend. Empty is this process's
	// namespace when Exec is nil; with Exec set and no NetnsPath the check
	// is off (the commands may run anywhere) and every repair tick reads the
	// rules.
	NetnsPath string
	// IPv6 makes the Manager own ip6tables instead: the same sections,
	// chains and jumps, in the IPv6 tables (one owner per family).
	IPv6   bool
	Logger *slog.Logger
}

// Manager owns every FABRIC-* chain and every jump into one.
type Manager struct {
	exec        func(ctx context.Context, name string, args ...string) *exec.Cmd
	log         *slog.Logger
	save        string // iptables-save binary of the chosen backend
	restore     string // iptables-restore binary of the chosen backend
	backend     string // "nf_tables" or "legacy"
	randomFully bool

	// genCheck is on when the kernel's ruleset generation tells whether
	// anything changed (nf_tables backend, namespace known).
	genCheck bool
	nsPath   string

	mu       sync.Mutex
	declared []string
	sections map[string]Section
	writes   uint64
	reads    atomic.Uint64 // Rules reads without mu
	// matched is set when the last apply found the kernel as wanted, at
	// ruleset generation matchedGen: until the generation moves, there is
	// nothing to repair.
	matched    bool
	matchedGen uint32
}

// New detects the iptables backend that plain `iptables` uses (the one
// dockerd uses too) and returns a Manager for it. It writes nothing.
func New(cfg Config) (*Manager, error) {
	m := &Manager{exec: cfg.Exec, log: cfg.Logger, declared: slices.Clone(cfg.Sections), sections: map[string]Section{},
		nsPath: cfg.NetnsPath, genCheck: cfg.Exec == nil || cfg.NetnsPath != ""}
	if m.exec == nil {
		m.exec = exec.CommandContext
	}
	if m.log == nil {
		m.log = slog.Default()
	}
	m.log = m.log.With("component", "iptables")

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	tool := "iptables"
	if cfg.IPv6 {
		tool = "ip6tables"
		m.log = m.log.With("family", "ipv6")
	}
	out, err := m.exec(ctx, tool, "--version").CombinedOutput()
	if err != nil {
		return nil, fmt.Errorf("%s not usable (install the iptables package): %v: %s", tool, err, strings.TrimSpace(string(out)))
	}
	version := strings.TrimSpace(string(out))
	switch {
	case strings.Contains(version, "(nf_tables)"):
		m.backend = "nf_tables"
		m.save, m.restore = pickBinary(tool+"-nft-save", tool+"-save"), pickBinary(tool+"-nft-restore", tool+"-restore")
	case strings.Contains(version, "(legacy)"):
		m.backend = "legacy"
		m.save, m.restore = pickBinary(tool+"-legacy-save", tool+"-save"), pickBinary(tool+"-legacy-restore", tool+"-restore")
	default:
		// Old iptables (< 1.8) prints no backend: it is legacy and has only
		// the plain names.
		m.backend = "legacy"
		m.save, m.restore = tool+"-save", tool+"-restore"
	}
	if m.backend != "nf_tables" {
		m.genCheck = false // legacy tables have no generation
	}
	if m.genCheck {
		if _, err := rulesetGeneration(m.nsPath); err != nil {
			m.log.Info("nf_tables ruleset generation unavailable: every repair tick reads the rules", "err", err)
			m.genCheck = false
		}
	}
	for _, bin := range []string{m.save, m.restore} {
		if _, err := exec.LookPath(bin); err != nil {
			return nil, fmt.Errorf("%s (backend %s of %q) not found: %v", bin, m.backend, version, err)
		}
	}
	// go-iptables knows which iptables versions take --random-fully; it
	// only reads the binary's version, whatever the namespace.
	if ipt, err := goipt.New(); err == nil {
		m.randomFully = ipt.HasRandomFully()
	}
	m.log.Debug("iptables backend detected", "version", version, "save", m.save, "restore", m.restore, "randomFully", m.randomFully)
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

// RandomFully reports whether MASQUERADE may use --random-fully (fully
// randomised source ports avoid SNAT port collisions under load).
func (m *Manager) RandomFully() bool { return m.randomFully }

// Writes counts the iptables-restore runs so far; an apply that finds the
// kernel already right does not add to it.
func (m *Manager) Writes() uint64 {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.writes
}

// Reads counts the iptables-save runs so far; a repair tick that finds the
// ruleset generation unchanged does not add to it.
func (m *Manager) Reads() uint64 { return m.reads.Load() }

// Set replaces what section wants and, once every declared section is
// known, brings the kernel in line with all of them before it returns.
func (m *Manager) Set(ctx context.Context, section string, s Section) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if !slices.Contains(m.declared, section) {
		m.declared = append(m.declared, section)
	}
	if old, ok := m.sections[section]; ok && equalSections(old, s) && m.unchanged() {
		return nil // the repair ticks of policy and ingress, on an idle host
	}
	m.sections[section] = s
	if missing := m.pending(); len(missing) > 0 {
		m.log.Info("keeping the kernel's rules until every section is known", "set", section, "waitingFor", missing)
		return nil
	}
	return m.apply(ctx)
}

func equalSections(a, b Section) bool {
	return slices.Equal(a.Jumps, b.Jumps) && slices.EqualFunc(a.Chains, b.Chains, func(x, y Chain) bool {
		return x.Table == y.Table && x.Name == y.Name && slices.Equal(x.Rules, y.Rules)
	})
}

// pending lists declared sections not set yet.
func (m *Manager) pending() []string {
	var out []string
	for _, s := range m.declared {
		if _, ok := m.sections[s]; !ok {
			out = append(out, s)
		}
	}
	return out
}

func (m *Manager) apply(ctx context.Context) error {
	m.matched = false
	want, err := merge(m.sections)
	if err != nil {
		return err
	}
	// The generation before the read: a change made while reading moves it
	// past this number, so the next tick reads again.
	gen, genOK := m.generation()
	have, err := m.read(ctx)
	if err != nil {
		return err
	}
	payloads := plan(want, have)
	if len(payloads) == 0 && genOK {
		m.matched, m.matchedGen = true, gen
	}
	return m.write(ctx, payloads)
}

// generation is the kernel's ruleset generation, when the check is on and
// the kernel answers.
func (m *Manager) generation() (uint32, bool) {
	if !m.genCheck {
		return 0, false
	}
	gen, err := rulesetGeneration(m.nsPath)
	if err != nil {
		m.log.Debug("reading the rules: no ruleset generation", "err", err)
		return 0, false
	}
	return gen, true
}

// unchanged reports whether the kernel's rules are provably as the last
// apply found and wanted them: nothing to repair, nothing to read.
func (m *Manager) unchanged() bool {
	if !m.matched {
		return false
	}
	gen, ok := m.generation()
	return ok && gen == m.matchedGen
}

func (m *Manager) write(ctx context.Context, payloads map[string]string) error {
	var errs []error
	for _, table := range slices.Sorted(maps.Keys(payloads)) {
		if err := m.restoreTable(ctx, table, payloads[table]); err != nil {
			errs = append(errs, err)
			continue
		}
		m.log.Info("rules written", "table", table)
	}
	return errors.Join(errs...)
}

// Maintain re-applies every section each interval until ctx ends, so chains
// or jumps deleted or displaced by hand or by another program (a dockerd
// restart inserts DOCKER-USER at the top of FORWARD) are repaired within one
// interval. On nf_tables a tick first asks the kernel for its ruleset
// generation and reads the rules only when it moved since they were last
// found right: an idle host runs no iptables-save. It returns ctx's error.
func (m *Manager) Maintain(ctx context.Context, interval time.Duration) error {
	if interval <= 0 {
		interval = 2 * time.Second
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
		if len(m.pending()) == 0 && !m.unchanged() {
			if err := m.apply(ctx); err != nil && ctx.Err() == nil {
				m.log.Warn("repairing rules failed; retrying", "err", err, "in", interval)
			}
		}
		m.mu.Unlock()
	}
}

// Cleanup removes every FABRIC-* chain in every table and every rule that
// jumps to one, and forgets the sections. It is safe when nothing is there.
func (m *Manager) Cleanup(ctx context.Context) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.sections = map[string]Section{}
	m.declared = nil
	m.matched = false
	have, err := m.read(ctx)
	if err != nil {
		return err
	}
	return m.write(ctx, plan(nil, have))
}

// Rules lists fabric's current rules as "-t TABLE -A CHAIN ..." lines: the
// jumps in built-in chains and the contents of fabric's chains.
func (m *Manager) Rules(ctx context.Context) ([]string, error) {
	have, err := m.read(ctx)
	if err != nil {
		return nil, err
	}
	return fabricRules(have), nil
}

// read dumps every table at once: in a fresh network namespace a table may
// not exist yet, which `-t TABLE` reports as an error.
func (m *Manager) read(ctx context.Context) (map[string]savedTable, error) {
	m.reads.Add(1)
	cmd := m.exec(ctx, m.save)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return nil, fmt.Errorf("reading iptables with %s: %v: %s", m.save, err, strings.TrimSpace(stderr.String()))
	}
	t, err := parseSave(out)
	if err != nil {
		return nil, fmt.Errorf("reading iptables: %w", err)
	}
	return t, nil
}

func (m *Manager) restoreTable(ctx context.Context, table, payload string) error {
	m.log.Debug("iptables-restore", "table", table, "input", payload)
	cmd := m.exec(ctx, m.restore, "--noflush", "--wait")
	cmd.Stdin = strings.NewReader(payload)
	out, err := cmd.CombinedOutput()
	m.writes++
	if err != nil {
		return fmt.Errorf("writing table %s with %s: %v: %s\ninput was:\n%s", table, m.restore, err, strings.TrimSpace(string(out)), payload)
	}
	return nil
}
