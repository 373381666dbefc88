// Package ingress lets only fabric hosts send tunnel packets to this host.
// A tunnel device decapsulates whatever reaches it: without a filter, any
// host on the underlay could inject packets with a forged inner source (a
// container of another host) past "from node X" policy rules. Like Calico's
// set of all hosts, an ipset holds the underlay addresses of the fabric's
// hosts, kept from the node registry, and a chain in INPUT drops every
// encapsulated packet (each backend's Ingress match) from any other source.
package ingress

import (
	"bytes"
	"context"
	"fmt"
	"log/slog"
	"net/netip"
	"os/exec"
	"slices"
	"strings"
	"sync"

	"github.com/fabricnet/fabric/iptables"
)

// Names of what the Limiter installs.
const (
	Section = "ingress"
	Chain   = "FABRIC-INPUT"
	SetName = "fabric-nodes"
	tmpSet  = "fabric-nodes-new"
)

// Config configures a Limiter.
type Config struct {
	Tables *iptables.Manager
	// Matches select the encapsulated packets of every tunnel this host
	// runs (backend.Backend.Ingress), e.g. "-p udp -m udp --dport 4789".
	Matches []string
	// Exec builds the ipset commands; nil means exec.CommandContext.
	Exec   func(ctx context.Context, name string, args ...string) *exec.Cmd
	Logger *slog.Logger
}

// Limiter keeps the node set and the INPUT chain.
type Limiter struct {
	cfg  Config
	log  *slog.Logger
	mu   sync.Mutex
	last []netip.Addr
}

// New returns a Limiter. It touches nothing until Apply.
func New(cfg Config) *Limiter {
	if cfg.Exec == nil {
		cfg.Exec = exec.CommandContext
	}
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

// Apply makes the node set exactly nodes (swapped in whole, so there is no
// moment with a partial set) and has the iptables owner keep the chain.
func (l *Limiter) Apply(ctx context.Context, nodes []netip.Addr) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	nodes = slices.Clone(nodes)
	slices.SortFunc(nodes, func(a, b netip.Addr) int { return a.Compare(b) })
	nodes = slices.Compact(nodes)
	var b strings.Builder
	fmt.Fprintf(&b, "create %s hash:ip family inet\n", SetName)
	fmt.Fprintf(&b, "create %s hash:ip family inet\n", tmpSet)
	fmt.Fprintf(&b, "flush %s\n", tmpSet)
	for _, a := range nodes {
		if a.Is4() {
			fmt.Fprintf(&b, "add %s %s\n", tmpSet, a)
		}
	}
	fmt.Fprintf(&b, "swap %s %s\n", tmpSet, SetName)
	fmt.Fprintf(&b, "destroy %s\n", tmpSet)
	if err := l.run(ctx, b.String(), "ipset", "-exist", "restore"); err != nil {
		return fmt.Errorf("ingress: node set %s: %w", SetName, err)
	}
	if err := l.cfg.Tables.Set(ctx, Section, l.Section()); err != nil {
		return fmt.Errorf("ingress: %w", err)
	}
	if !slices.Equal(nodes, l.last) {
		l.log.Info("tunnel packets accepted only from fabric hosts", "hosts", len(nodes), "set", SetName)
		l.last = nodes
	}
	return nil
}

// DestroySet removes the node set; the chain using it must be gone.
// --cleanup uses it after the iptables owner's Cleanup.
func DestroySet(ctx context.Context, run func(ctx context.Context, name string, args ...string) *exec.Cmd) error {
	l := New(Config{Exec: run})
	out, err := l.output(ctx, "ipset", "list", "-n")
	if err != nil {
		return fmt.Errorf("ingress: list ipsets: %w", err)
	}
	for _, name := range []string{SetName, tmpSet} {
		if slices.Contains(strings.Fields(out), name) {
			if err := l.run(ctx, "", "ipset", "destroy", name); err != nil {
				return fmt.Errorf("ingress: %w", err)
			}
		}
	}
	return nil
}

func (l *Limiter) run(ctx context.Context, stdin, name string, args ...string) error {
	cmd := l.cfg.Exec(ctx, name, args...)
	if stdin != "" {
		cmd.Stdin = strings.NewReader(stdin)
	}
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("%s %s: %v: %s", name, strings.Join(args, " "), err, strings.TrimSpace(string(out)))
	}
	return nil
}

func (l *Limiter) output(ctx context.Context, name string, args ...string) (string, error) {
	cmd := l.cfg.Exec(ctx, name, args...)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return "", fmt.Errorf("%s: %v: %s", name, err, strings.TrimSpace(stderr.String()))
	}
	return string(out), nil
}
