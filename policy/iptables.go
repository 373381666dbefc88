package policy

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
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

	"github.com/fabricnet/fabric/internal/ipsets"
	"github.com/fabricnet/fabric/iptables"
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
	ChainName = "FABRIC-POLICY"
	// InChain holds the rules; ChainName only sends it the traffic into
	// this host's containers: on the bridge, and on fabric networks'
	// endpoint links.
	InChain       = "FABRIC-POLICY-IN"
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
	// Exec builds commands (ipset, sysctl, and iptables when Tables is
	// nil); nil means exec.CommandContext. Tests wrap it with nsenter to
	// work in a network namespace.
	Exec func(ctx context.Context, name string, args ...string) *exec.Cmd
	// Bridge, if set, limits enforcement to packets leaving through it
	// (the containers' bridge, e.g. docker0) and makes Apply turn on
	// net.bridge.bridge-nf-call-iptables, without which traffic between
	// containers on the same bridge never reaches FORWARD.
	Bridge string
	// EndpointLinks matches the links of this host's containers on fabric
	// networks, as iptables takes it ("fnep+"); "" when there are none.
	EndpointLinks string
	// Tables is the host's iptables owner, shared with the nat package, so
	// the policy jump is placed before nat's accept rules in the same
	// transaction (required: every table has one owner).
	Tables *iptables.Manager
	// Sets is the host's owner of fabric's ipsets (required).
	Sets *ipsets.Owner
	// Tables6 is the host's ip6tables owner when the fabric has IPv6 (else
	// nil): the rules' IPv6 prefixes are enforced there, for traffic into
	// the ruleset's LocalV6.
	Tables6 *iptables.Manager
	Logger  *slog.Logger
}

// Section is the name policy's rules go by in the iptables owner.
const Section = "policy"

// IptablesEnforcer enforces a Ruleset with a filter-table chain
// FABRIC-POLICY, jumped to from FORWARD ahead of every other fabric jump,
// and hash:net ipsets for long address lists.
//
// The local-subnet match lives inside the chain (first rule: RETURN unless
// the destination is the local subnet), so the FORWARD jump never changes
// and a new lease is applied in the same atomic commit as the rules.
type IptablesEnforcer struct {
	cfg    IptablesConfig
	log    *slog.Logger
	tables *iptables.Manager
	mu     sync.Mutex
	marker string // ruleset last applied, to log changes once
}

var _ Enforcer = (*IptablesEnforcer)(nil)

// New returns an IptablesEnforcer. It touches nothing until Apply.
func New(cfg IptablesConfig) (*IptablesEnforcer, error) {
	if cfg.Exec == nil {
		cfg.Exec = exec.CommandContext
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	e := &IptablesEnforcer{cfg: cfg, log: cfg.Logger.With("component", "policy"), tables: cfg.Tables}
	if e.tables == nil || cfg.Sets == nil {
		return nil, errors.New("policy: no iptables or ipset owner (IptablesConfig.Tables, .Sets): the host has exactly one of each")
	}
	return e, nil
}

// rendered is a Ruleset expressed for iptables.
type rendered struct {
	marker string                    // ruleset hash, carried in the first rule's comment
	scope  []string                  // ChainName: what traffic InChain judges
	rules  []string                  // InChain's rule specs, in order
	sets   map[string][]netip.Prefix // ipset name -> its prefixes
}

// section is what the iptables owner writes for these rules.
func (r rendered) section() iptables.Section {
	if len(r.scope) == 0 {
		return iptables.Section{} // nothing of this family here
	}
	return iptables.Section{
		Chains: []iptables.Chain{{Table: "filter", Name: ChainName, Rules: r.scope}, {Table: "filter", Name: InChain, Rules: r.rules}},
		Jumps: []iptables.Jump{{Table: "filter", From: "FORWARD", To: ChainName,
			Why: "enforce fabric policy for local containers", Rank: iptables.RankPolicy}},
	}
}

// Apply installs rs. See Enforcer.
func (e *IptablesEnforcer) Apply(ctx context.Context, rs Ruleset) error {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.apply(ctx, rs)
}

func (e *IptablesEnforcer) apply(ctx context.Context, rs Ruleset) error {
	start := time.Now()
	want, err := e.render(rs, ipv4)
	if err != nil {
		return err
	}
	var want6 rendered
	if e.cfg.Tables6 != nil {
		if want6, err = e.render(rs, ipv6); err != nil {
			return err
		}
	}
	if want.marker == e.marker {
		// In force already (a repair tick, or a node set change that
		// changes no rule): the sets are there, since the kernel refuses
		// to destroy a set a rule uses, and the iptables owner repairs the
		// chain, without running a command when nothing changed. Only if
		// the chain and a set were both removed does that repair fail:
		// then the sets are made again below.
		err := e.setChains(ctx, want, want6)
		if err == nil {
			return nil
		}
		e.log.Warn("policy chain could not be restored as it was; making its ipsets again", "err", err)
		e.marker = ""
	}
	have, err := e.listSets(ctx)
	if err != nil {
		return err
	}
	e.ensureBridgeNetfilter(ctx) // on a change, not on every repair tick

	// 1. Sets first, under names derived from their content, so the old
	// chain keeps using the old sets until the commit below. A set left
	// half-made by an earlier run is completed.
	sets := maps.Clone(want.sets)
	maps.Copy(sets, want6.sets)
	for _, name := range slices.Sorted(maps.Keys(sets)) {
		if slices.Contains(have, name) {
			continue
		}
		if err := e.cfg.Sets.SetNets(name, sets[name]); err != nil {
			return fmt.Errorf("apply policy: %w", err)
		}
	}

	// 2. The chain and its jump, in one transaction of the iptables owner
	// per family.
	if err := e.setChains(ctx, want, want6); err != nil {
		return err
	}

	// 3. Sets the new chains no longer use.
	e.destroySets(ctx, have, sets)
	e.marker = want.marker
	e.log.Info("policy applied", "ruleset", want.marker, "rules", len(rs.Rules),
		"iptables_rules", len(want.rules), "ipsets", len(want.sets), "default", rs.DefaultAction,
		"local", rs.Local, "took", time.Since(start))
	return nil
}

// setChains hands each family's chains to its iptables owner. IPv4 goes
// first and alone when IPv6 fails: each family's rules stand by themselves.
func (e *IptablesEnforcer) setChains(ctx context.Context, want, want6 rendered) error {
	if err := e.tables.Set(ctx, Section, want.section()); err != nil {
		return fmt.Errorf("apply policy: chain %s: %w", ChainName, err)
	}
	if e.cfg.Tables6 == nil {
		return nil
	}
	if err := e.cfg.Tables6.Set(ctx, Section, want6.section()); err != nil {
		return fmt.Errorf("apply policy: IPv6 chain %s: %w", ChainName, err)
	}
	return nil
}

// Cleanup removes the FORWARD jump, the chain and this package's ipsets.
func (e *IptablesEnforcer) Cleanup(ctx context.Context) error {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.marker = ""
	if err := e.tables.Set(ctx, Section, iptables.Section{}); err != nil {
		return fmt.Errorf("remove policy chain %s: %w", ChainName, err)
	}
	if e.cfg.Tables6 != nil {
		if err := e.cfg.Tables6.Set(ctx, Section, iptables.Section{}); err != nil {
			return fmt.Errorf("remove IPv6 policy chain %s: %w", ChainName, err)
		}
	}
	have, err := e.listSets(ctx)
	if err != nil {
		return err
	}
	if left := e.destroySets(ctx, have, nil); len(left) > 0 {
		return fmt.Errorf("remove policy ipsets: could not destroy %s", strings.Join(left, ", "))
	}
	return nil
}

// listSets lists this package's sets.
func (e *IptablesEnforcer) listSets(context.Context) ([]string, error) {
	names, err := e.cfg.Sets.Names()
	if err != nil {
		return nil, fmt.Errorf("read ipsets: %w", err)
	}
	return slices.DeleteFunc(names, func(n string) bool { return !policySetName.MatchString(n) }), nil
}

const (
	bridgeNetfilterSysctl  = "net.bridge.bridge-nf-call-iptables"
	bridgeNetfilterSysctl6 = "net.bridge.bridge-nf-call-ip6tables"
)

// ensureBridgeNetfilter turns on iptables for bridged traffic. It is left on
// by Cleanup: Docker wants it on as well. Failure is not fatal (forwarded
// traffic is still enforced) but is logged every time, since same-bridge
// traffic then passes unchecked.
func (e *IptablesEnforcer) ensureBridgeNetfilter(ctx context.Context) {
	if e.cfg.Bridge == "" {
		return
	}
	keys := []string{bridgeNetfilterSysctl}
	if e.cfg.Tables6 != nil {
		keys = append(keys, bridgeNetfilterSysctl6)
	}
	for _, key := range keys {
		v, err := e.run(ctx, "", "sysctl", "-n", key)
		if err == nil && strings.TrimSpace(v) == "1" {
			continue
		}
		if err != nil {
			// No such key: br_netfilter is not loaded (dockerd loads it when it
			// starts; fabricd may be first).
			if _, merr := e.run(ctx, "", "modprobe", "br_netfilter"); merr != nil {
				e.log.Warn("cannot load br_netfilter", "err", merr)
			}
		}
		if _, err := e.run(ctx, "", "sysctl", "-qw", key+"=1"); err != nil {
			e.log.Error("cannot enable bridge netfilter: policy is NOT enforced between containers on the same bridge",
				"bridge", e.cfg.Bridge, "sysctl", key, "err", err)
			continue
		}
		e.log.Info("enabled bridge netfilter so same-bridge traffic is enforced", "sysctl", key)
	}
}

// destroySets destroys this package's sets in have that are not in keep and
// returns the names it could not destroy.
func (e *IptablesEnforcer) destroySets(ctx context.Context, have []string, keep map[string][]netip.Prefix) []string {
	var left []string
	for _, name := range have {
		if _, ok := keep[name]; ok || !policySetName.MatchString(name) {
			continue
		}
		if err := e.cfg.Sets.Destroy(name); err != nil {
			e.log.Warn("could not destroy unused policy ipset", "set", name, "err", err)
			left = append(left, name)
		}
	}
	return left
}

// family is the address family one chain is rendered for.
type family bool

const (
	ipv4 family = false
	ipv6 family = true
)

// of keeps the prefixes of this family.
func (f family) of(ps []netip.Prefix) []netip.Prefix {
	var out []netip.Prefix
	for _, p := range ps {
		if p.Addr().Is6() == bool(f) {
			out = append(out, p)
		}
	}
	return out
}

// render turns rs into one family's chain rules and ipsets. A rule whose
// sources or destinations are all of the other family matches nothing of
// this one and is left out; a rule from anywhere applies to both.
func (e *IptablesEnforcer) render(rs Ruleset, fam family) (rendered, error) {
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
	r := rendered{marker: hash[:16], sets: map[string][]netip.Prefix{}}
	in := "-o " + e.cfg.Bridge + " "
	if e.cfg.Bridge == "" {
		in = ""
	}
	local := rs.Local
	if fam == ipv6 {
		local = rs.LocalV6
		if !local.IsValid() {
			return r, nil // no IPv6 subnet here: no chain
		}
	}
	networks := fam.of(rs.Networks)
	r.scope = append(r.scope,
		fmt.Sprintf("-d %s %s%s -j %s", local, in, comment("traffic to local containers; ruleset "+r.marker), InChain))
	if e.cfg.EndpointLinks != "" {
		for _, n := range networks {
			r.scope = append(r.scope, fmt.Sprintf("-d %s -o %s %s -j %s", n, e.cfg.EndpointLinks, comment("traffic to local containers on network "+n.String()), InChain))
		}
	}
	r.rules = append(r.rules,
		fmt.Sprintf("-m conntrack --ctstate RELATED,ESTABLISHED %s -j ACCEPT", comment("replies of allowed connections")))
	if fam == ipv6 {
		// IPv6 finds its neighbours through the bridge with ICMPv6, which
		// a default deny must not stop (ARP, for IPv4, is not IP).
		for _, typ := range []int{135, 136} {
			r.rules = append(r.rules, fmt.Sprintf("-p ipv6-icmp -m icmp6 --icmpv6-type %d %s -j ACCEPT", typ, comment("neighbour discovery")))
		}
	}

	spaces := append([]netip.Prefix{local}, networks...)
	for _, cr := range rs.Rules {
		sources, dests := fam.of(cr.Sources), fam.of(cr.Dests)
		if (cr.Sources != nil && len(sources) == 0) || len(dests) == 0 {
			continue // only the other family's addresses: no traffic of this one
		}
		srcs := r.addressMatches(sources, "-s", "src", nil)
		dsts := r.addressMatches(dests, "-d", "dst", spaces)
		protos := protoMatches(cr.Protocol, cr.Ports, fam)
		for _, src := range srcs {
			for _, dst := range dsts {
				for _, proto := range protos {
					for _, target := range targets(cr.Action, cr.Protocol, fam) {
						r.rules = append(r.rules, joinSpec(src, dst, target.proto, proto, comment(cr.Name), target.jump))
					}
				}
			}
		}
	}
	for _, target := range targets(rs.DefaultAction, ProtocolAny, fam) {
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
// ones. Destinations that are every space the chain sees (in) need no
// match: the scope rules already require it.
func (r *rendered) addressMatches(ps []netip.Prefix, flag, dir string, in []netip.Prefix) []string {
	if len(ps) == 0 || (len(ps) == 1 && ps[0].Bits() == 0) || (in != nil && slices.Equal(normalize(slices.Clone(in)), ps)) {
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
	r.sets[name] = ps
	return []string{fmt.Sprintf("-m set --match-set %s %s", name, dir)}
}

// protoMatches returns protocol and port matches, split so no multiport
// match exceeds its 15 entries.
func protoMatches(proto string, ports []PortRange, fam family) []string {
	if proto == ProtocolAny {
		return []string{""}
	}
	if proto == ProtocolICMP && fam == ipv6 {
		proto = "ipv6-icmp"
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
func targets(action, proto string, fam family) []target {
	if action == ActionAllow {
		return []target{{jump: "-j ACCEPT"}}
	}
	unreachable := "-j REJECT --reject-with icmp-port-unreachable"
	if fam == ipv6 {
		unreachable = "-j REJECT --reject-with icmp6-port-unreachable"
	}
	switch proto {
	case ProtocolTCP:
		return []target{{jump: "-j REJECT --reject-with tcp-reset"}}
	case ProtocolAny:
		return []target{
			{proto: "-p tcp", jump: "-j REJECT --reject-with tcp-reset"},
			{jump: unreachable},
		}
	default:
		return []target{{jump: unreachable}}
	}
}

func comment(text string) string { return iptables.Comment(commentPrefix + text) }

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
