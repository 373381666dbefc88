package policy

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"log/slog"
	"maps"
	"net/netip"
	"os/exec"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"
)

// Enforcer makes the kernel enforce a Ruleset. Implementations: iptables +
// ipset (IptablesEnforcer); nftables may follow.
type Enforcer interface {
	// Apply replaces the enforced policy atomically: there is no moment
	// when neither the old nor the new rules are in place. Applying an
	// unchanged Ruleset changes nothing.
	Apply(ctx context.Context, rs Ruleset) error
	// Cleanup removes everything Apply installed.
	Cleanup(ctx context.Context) error
}

// Names of what IptablesEnforcer installs.
const (
	ChainName     = "FABRIC-POLICY"
	commentPrefix = "fabric policy: "
	setNamePrefix = "fabric-"
	// maxInlineCIDRs is the most prefixes one rule side is written with as
	// separate iptables rules; more go into an ipset.
	maxInlineCIDRs = 2
	// maxMultiportEntries is xt_multiport's limit; a range counts twice.
	maxMultiportEntries = 15
)

// policySetName matches sets this package creates (and may destroy).
var policySetName = regexp.MustCompile(`^fabric-[0-9a-f]{16}$`)

// IptablesConfig configures an IptablesEnforcer.
type IptablesConfig struct {
	// Exec builds commands; nil means exec.CommandContext. Tests wrap it
	// with nsenter to work in a network namespace.
	Exec func(ctx context.Context, name string, args ...string) *exec.Cmd
	// Bridge, if set, limits enforcement to packets leaving through it
	// (the containers' bridge, e.g. docker0) and makes Apply turn on
	// net.bridge.bridge-nf-call-iptables, without which traffic between
	// containers on the same bridge never reaches FORWARD.
	Bridge string
	// Legacy selects iptables-legacy-save/-restore instead of
	// iptables-save/-restore (nf_tables on Debian 12). Use the same
	// variant as the rest of the host.
	Legacy bool
	// SaveCommand and RestoreCommand, when set, override Legacy: fabricd
	// passes the ones the nat package detected, so both owners of rules
	// always use the same backend.
	SaveCommand, RestoreCommand string
	Logger                      *slog.Logger
}

// IptablesEnforcer enforces a Ruleset with a filter-table chain
// FABRIC-POLICY, jumped to from FORWARD position 1, and hash:net ipsets for
// long address lists.
//
// The local-subnet match lives inside the chain (first rule: RETURN unless
// the destination is the local subnet), so the FORWARD jump never changes
// and a new lease is applied in the same atomic commit as the rules.
type IptablesEnforcer struct {
	cfg IptablesConfig
	log *slog.Logger
	mu  sync.Mutex
}

var _ Enforcer = (*IptablesEnforcer)(nil)

// New returns an IptablesEnforcer. It touches nothing until Apply.
func New(cfg IptablesConfig) *IptablesEnforcer {
	if cfg.Exec == nil {
		cfg.Exec = exec.CommandContext
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	return &IptablesEnforcer{cfg: cfg, log: cfg.Logger.With("component", "policy")}
}

// rendered is a Ruleset expressed for iptables.
type rendered struct {
	marker string              // ruleset hash, carried in the first rule's comment
	rules  []string            // rule specs appended to the chain, in order
	sets   map[string][]string // ipset name -> CIDRs
}

// Apply installs rs. See Enforcer.
func (e *IptablesEnforcer) Apply(ctx context.Context, rs Ruleset) error {
	e.mu.Lock()
	defer e.mu.Unlock()
	start := time.Now()
	want, err := e.render(rs)
	if err != nil {
		return err
	}
	have, err := e.readState(ctx)
	if err != nil {
		return err
	}
	if have.matches(want) {
		e.log.Debug("policy unchanged", "ruleset", want.marker)
		return nil
	}

	e.ensureBridgeNetfilter(ctx)

	// 1. Sets first, under names derived from their content, so the old
	// chain keeps using the old sets until the commit below.
	if len(want.sets) > 0 {
		var b strings.Builder
		for _, name := range slices.Sorted(maps.Keys(want.sets)) {
			cidrs := want.sets[name]
			fmt.Fprintf(&b, "create %s hash:net family inet hashsize 1024 maxelem %d\n", name, max(65536, len(cidrs)))
			for _, c := range cidrs {
				fmt.Fprintf(&b, "add %s %s\n", name, c)
			}
		}
		// -exist: a set left by an earlier run is completed, not refused.
		if _, err := e.run(ctx, b.String(), "ipset", "-exist", "restore"); err != nil {
			return fmt.Errorf("apply policy: create ipsets: %w", err)
		}
	}

	// 2. One iptables-restore commit: declaring the chain flushes it, the
	// -A lines refill it, the jump is (re)placed at FORWARD position 1.
	var b strings.Builder
	b.WriteString("*filter\n")
	fmt.Fprintf(&b, ":%s - [0:0]\n", ChainName)
	if !have.jumpFirstAndOnly() {
		for _, j := range have.jumps {
			b.WriteString("-D" + strings.TrimPrefix(have.forward[j], "-A") + "\n")
		}
		fmt.Fprintf(&b, "-I FORWARD 1 %s -j %s\n", comment("enforce fabric policy for local containers"), ChainName)
	}
	for _, r := range want.rules {
		fmt.Fprintf(&b, "-A %s %s\n", ChainName, r)
	}
	b.WriteString("COMMIT\n")
	if _, err := e.run(ctx, b.String(), e.restoreCmd(), "-w", "--noflush"); err != nil {
		return fmt.Errorf("apply policy: chain %s: %w", ChainName, err)
	}

	// 3. Sets the new chain no longer uses.
	e.destroySets(ctx, have.sets, want.sets)
	e.log.Info("policy applied", "ruleset", want.marker, "rules", len(rs.Rules),
		"iptables_rules", len(want.rules), "ipsets", len(want.sets), "default", rs.DefaultAction,
		"local", rs.Local, "took", time.Since(start))
	return nil
}

// Cleanup removes the FORWARD jump, the chain and this package's ipsets.
func (e *IptablesEnforcer) Cleanup(ctx context.Context) error {
	e.mu.Lock()
	defer e.mu.Unlock()
	have, err := e.readState(ctx)
	if err != nil {
		return err
	}
	if have.chainExists || len(have.jumps) > 0 {
		var b strings.Builder
		b.WriteString("*filter\n")
		for _, j := range have.jumps {
			b.WriteString("-D" + strings.TrimPrefix(have.forward[j], "-A") + "\n")
		}
		if have.chainExists {
			fmt.Fprintf(&b, ":%s - [0:0]\n-X %s\n", ChainName, ChainName)
		}
		b.WriteString("COMMIT\n")
		if _, err := e.run(ctx, b.String(), e.restoreCmd(), "-w", "--noflush"); err != nil {
			return fmt.Errorf("remove policy chain %s: %w", ChainName, err)
		}
	}
	if left := e.destroySets(ctx, have.sets, nil); len(left) > 0 {
		return fmt.Errorf("remove policy ipsets: could not destroy %s", strings.Join(left, ", "))
	}
	if have.chainExists || len(have.jumps) > 0 {
		e.log.Info("policy removed", "chain", ChainName)
	}
	return nil
}

const bridgeNetfilterSysctl = "net.bridge.bridge-nf-call-iptables"

// ensureBridgeNetfilter turns on iptables for bridged traffic. It is left on
// by Cleanup: Docker wants it on as well. Failure is not fatal (forwarded
// traffic is still enforced) but is logged every time, since same-bridge
// traffic then passes unchecked.
func (e *IptablesEnforcer) ensureBridgeNetfilter(ctx context.Context) {
	if e.cfg.Bridge == "" {
		return
	}
	if v, err := e.run(ctx, "", "sysctl", "-n", bridgeNetfilterSysctl); err == nil && strings.TrimSpace(v) == "1" {
		return
	}
	if _, err := e.run(ctx, "", "sysctl", "-qw", bridgeNetfilterSysctl+"=1"); err != nil {
		e.log.Error("cannot enable bridge netfilter: policy is NOT enforced between containers on the same bridge",
			"bridge", e.cfg.Bridge, "sysctl", bridgeNetfilterSysctl, "err", err)
		return
	}
	e.log.Info("enabled bridge netfilter so same-bridge traffic is enforced", "sysctl", bridgeNetfilterSysctl)
}

// destroySets destroys this package's sets in have that are not in keep and
// returns the names it could not destroy.
func (e *IptablesEnforcer) destroySets(ctx context.Context, have []string, keep map[string][]string) []string {
	var left []string
	for _, name := range have {
		if _, ok := keep[name]; ok || !policySetName.MatchString(name) {
			continue
		}
		if _, err := e.run(ctx, "", "ipset", "destroy", name); err != nil {
			e.log.Warn("could not destroy unused policy ipset", "set", name, "err", err)
			left = append(left, name)
		}
	}
	return left
}

func (e *IptablesEnforcer) restoreCmd() string {
	if e.cfg.RestoreCommand != "" {
		return e.cfg.RestoreCommand
	}
	if e.cfg.Legacy {
		return "iptables-legacy-restore"
	}
	return "iptables-restore"
}

func (e *IptablesEnforcer) saveCmd() string {
	if e.cfg.SaveCommand != "" {
		return e.cfg.SaveCommand
	}
	if e.cfg.Legacy {
		return "iptables-legacy-save"
	}
	return "iptables-save"
}

// kernelState is what iptables-save and ipset report about our objects.
type kernelState struct {
	forward     []string // FORWARD rules as saved ("-A FORWARD ...")
	jumps       []int    // indexes in forward of jumps to our chain
	chainExists bool
	chain       []string // our chain's rules as saved
	sets        []string // all ipset names
}

func (s kernelState) jumpFirstAndOnly() bool {
	return len(s.jumps) == 1 && s.jumps[0] == 0
}

// matches reports whether the kernel already enforces want. The first rule
// carries the ruleset hash; the rule count catches rules added or removed
// by hand; set names are content hashes.
func (s kernelState) matches(want rendered) bool {
	if !s.chainExists || !s.jumpFirstAndOnly() || len(s.chain) != len(want.rules) || len(s.chain) == 0 {
		return false
	}
	if !strings.Contains(s.chain[0], "ruleset "+want.marker) {
		return false
	}
	for name := range want.sets {
		if !slices.Contains(s.sets, name) {
			return false
		}
	}
	return true
}

func (e *IptablesEnforcer) readState(ctx context.Context) (kernelState, error) {
	var s kernelState
	// The whole dump, not -t filter: in a fresh network namespace the
	// filter table may not exist yet, which -t filter reports as an error.
	out, err := e.run(ctx, "", e.saveCmd())
	if err != nil {
		return s, fmt.Errorf("read iptables state: %w", err)
	}
	inFilter := false
	for _, line := range strings.Split(out, "\n") {
		switch {
		case strings.HasPrefix(line, "*"):
			inFilter = line == "*filter"
		case !inFilter:
		case strings.HasPrefix(line, ":"+ChainName+" "):
			s.chainExists = true
		case strings.HasPrefix(line, "-A FORWARD "):
			if strings.HasSuffix(line, "-j "+ChainName) {
				s.jumps = append(s.jumps, len(s.forward))
			}
			s.forward = append(s.forward, line)
		case strings.HasPrefix(line, "-A "+ChainName+" "):
			s.chain = append(s.chain, line)
		}
	}
	sets, err := e.run(ctx, "", "ipset", "list", "-n")
	if err != nil {
		return s, fmt.Errorf("read ipsets: %w", err)
	}
	s.sets = strings.Fields(sets)
	return s, nil
}

// render turns rs into chain rules and ipsets.
func (e *IptablesEnforcer) render(rs Ruleset) (rendered, error) {
	if !rs.Local.IsValid() {
		return rendered{}, fmt.Errorf("apply policy: ruleset has no local subnet")
	}
	if err := ValidateAction(rs.DefaultAction); err != nil {
		return rendered{}, fmt.Errorf("apply policy: default %w", err)
	}
	hash := rs.Hash()
	if e.cfg.Bridge != "" {
		// The bridge is part of what is enforced, so part of the marker.
		sum := sha256.Sum256([]byte(hash + "|" + e.cfg.Bridge))
		hash = hex.EncodeToString(sum[:])
	}
	r := rendered{marker: hash[:16], sets: map[string][]string{}}
	local := rs.Local.String()
	r.rules = append(r.rules,
		fmt.Sprintf("! -d %s %s -j RETURN", local, comment("only traffic to local containers; ruleset "+r.marker)))
	if e.cfg.Bridge != "" {
		r.rules = append(r.rules,
			fmt.Sprintf("! -o %s %s -j RETURN", e.cfg.Bridge, comment("only traffic into bridge "+e.cfg.Bridge)))
	}
	r.rules = append(r.rules,
		fmt.Sprintf("-m conntrack --ctstate RELATED,ESTABLISHED %s -j ACCEPT", comment("replies of allowed connections")))

	for _, cr := range rs.Rules {
		srcs := r.addressMatches(cr.Sources, "-s", "src", nil)
		dsts := r.addressMatches(cr.Dests, "-d", "dst", &rs.Local)
		protos := protoMatches(cr.Protocol, cr.Ports)
		for _, src := range srcs {
			for _, dst := range dsts {
				for _, proto := range protos {
					for _, target := range targets(cr.Action, cr.Protocol) {
						r.rules = append(r.rules, joinSpec(src, dst, target.proto, proto, comment(cr.Name), target.jump))
					}
				}
			}
		}
	}
	for _, target := range targets(rs.DefaultAction, ProtocolAny) {
		jump := target.jump
		if rs.DefaultAction == ActionAllow {
			jump = "-j RETURN" // let the host's other FORWARD rules decide
		}
		r.rules = append(r.rules, joinSpec(target.proto, comment("default "+rs.DefaultAction), jump))
	}
	return r, nil
}

// addressMatches returns the iptables matches for one side of a rule: no
// match for "any", one rule per prefix for short lists, an ipset for long
// ones. A destination equal to the local subnet needs no match: the chain's
// first rule already requires it.
func (r *rendered) addressMatches(ps []netip.Prefix, flag, dir string, local *netip.Prefix) []string {
	if len(ps) == 0 || (len(ps) == 1 && (ps[0].Bits() == 0 || (local != nil && ps[0] == *local))) {
		return []string{""}
	}
	if len(ps) <= maxInlineCIDRs {
		out := make([]string, len(ps))
		for i, p := range ps {
			out[i] = flag + " " + p.String()
		}
		return out
	}
	cidrs := make([]string, len(ps))
	for i, p := range ps {
		cidrs[i] = p.String()
	}
	sum := sha256.Sum256([]byte(strings.Join(cidrs, ",")))
	name := setNamePrefix + hex.EncodeToString(sum[:])[:16]
	r.sets[name] = cidrs
	return []string{fmt.Sprintf("-m set --match-set %s %s", name, dir)}
}

// protoMatches returns protocol and port matches, split so no multiport
// match exceeds its 15 entries.
func protoMatches(proto string, ports []PortRange) []string {
	if proto == ProtocolAny {
		return []string{""}
	}
	if len(ports) == 0 {
		return []string{"-p " + proto}
	}
	var out, chunk []string
	weight := 0
	flush := func() {
		out = append(out, fmt.Sprintf("-p %s -m multiport --dports %s", proto, strings.Join(chunk, ",")))
		chunk, weight = nil, 0
	}
	for _, p := range ports {
		w, s := 1, strconv.Itoa(int(p.From))
		if p.To != p.From {
			w, s = 2, fmt.Sprintf("%d:%d", p.From, p.To)
		}
		if weight+w > maxMultiportEntries {
			flush()
		}
		chunk = append(chunk, s)
		weight += w
	}
	flush()
	return out
}

type target struct {
	proto string // extra protocol match this target needs ("" = none)
	jump  string
}

// targets returns the verdict for an action. Deny rejects rather than drops
// so clients fail fast: TCP with a reset, everything else with ICMP port
// unreachable. A deny for any protocol needs two rules for that.
func targets(action, proto string) []target {
	if action == ActionAllow {
		return []target{{jump: "-j ACCEPT"}}
	}
	switch proto {
	case ProtocolTCP:
		return []target{{jump: "-j REJECT --reject-with tcp-reset"}}
	case ProtocolAny:
		return []target{
			{proto: "-p tcp", jump: "-j REJECT --reject-with tcp-reset"},
			{jump: "-j REJECT --reject-with icmp-port-unreachable"},
		}
	default:
		return []target{{jump: "-j REJECT --reject-with icmp-port-unreachable"}}
	}
}

func comment(text string) string {
	return fmt.Sprintf("-m comment --comment %q", commentPrefix+text)
}

func joinSpec(parts ...string) string {
	var nonEmpty []string
	for _, p := range parts {
		if p != "" {
			nonEmpty = append(nonEmpty, p)
		}
	}
	return strings.Join(nonEmpty, " ")
}

var restoreFailedLine = regexp.MustCompile(`line:? (\d+)`)

// run runs a command with stdin and returns its stdout; errors carry
// stderr and, for a failed restore, the offending input line.
func (e *IptablesEnforcer) run(ctx context.Context, stdin, name string, args ...string) (string, error) {
	cmd := e.cfg.Exec(ctx, name, args...)
	if stdin != "" {
		cmd.Stdin = strings.NewReader(stdin)
	}
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		msg := strings.TrimSpace(stderr.String())
		if m := restoreFailedLine.FindStringSubmatch(msg); m != nil && stdin != "" {
			if n, _ := strconv.Atoi(m[1]); n >= 1 {
				if lines := strings.Split(stdin, "\n"); n <= len(lines) {
					msg += fmt.Sprintf(" (input line %d: %s)", n, lines[n-1])
				}
			}
		}
		return "", fmt.Errorf("%s %s: %w: %s", name, strings.Join(args, " "), err, msg)
	}
	return stdout.String(), nil
}
