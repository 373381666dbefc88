package policy

import (
	"cmp"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"net/netip"
	"slices"
	"strings"
)

// Ruleset is the policy as one host enforces it: selectors resolved to
// prefixes, rules that cannot reach the local subnet dropped, in evaluation
// order. It is backend neutral; enforcers decide how to express it.
type Ruleset struct {
	Local         netip.Prefix // this host's container subnet
	DefaultAction string       // allow or deny
	Rules         []CompiledRule
	// Warnings lists selectors that resolved to nothing (e.g. a node that
	// holds no subnet lease); such a selector matches no traffic.
	Warnings []string `json:",omitempty"`
}

// CompiledRule is one rule with resolved addresses.
type CompiledRule struct {
	Name     string
	Action   string
	Sources  []netip.Prefix // nil = any source
	Dests    []netip.Prefix // never empty: always inside Local
	Protocol string
	Ports    []PortRange
}

// Hash identifies the ruleset's content; equal rulesets have equal hashes.
func (rs Ruleset) Hash() string {
	b, _ := json.Marshal(struct {
		Local         string
		DefaultAction string
		Rules         []CompiledRule
	}{rs.Local.String(), rs.DefaultAction, rs.Rules})
	sum := sha256.Sum256(b)
	return hex.EncodeToString(sum[:])
}

// SortRules orders rules for evaluation: ascending Order, then Name.
func SortRules(rules []Rule) {
	slices.SortStableFunc(rules, func(a, b Rule) int {
		return cmp.Or(cmp.Compare(a.Order, b.Order), cmp.Compare(a.Name, b.Name))
	})
}

// Directory is what selectors are resolved against; callers recompile when
// it changes, so rules follow leases and containers.
type Directory struct {
	Nodes      map[string]netip.Prefix // node name -> its current subnet
	Containers []Container             // the fabric's containers, every host's
}

// Container is one container as policy sees it.
type Container struct {
	Name    string
	Address netip.Addr
	Labels  map[string]string
}

// UsesContainers reports whether any rule selects containers by name or
// label: such rules cannot be compiled before the containers are known.
func UsesContainers(rules []Rule) bool {
	for _, r := range rules {
		for _, s := range append(slices.Clone(r.From), r.To...) {
			if s.selectsContainers() {
				return true
			}
		}
	}
	return false
}

// Compile resolves rules for the host whose container subnet is local.
// defaultAction "" means allow.
func Compile(rules []Rule, defaultAction string, dir Directory, local netip.Prefix) (Ruleset, error) {
	if defaultAction == "" {
		defaultAction = ActionAllow
	}
	if err := ValidateAction(defaultAction); err != nil {
		return Ruleset{}, fmt.Errorf("default %w", err)
	}
	if !local.IsValid() || !local.Addr().Is4() {
		return Ruleset{}, fmt.Errorf("local subnet %s: want an IPv4 prefix", local)
	}
	local = local.Masked()
	rs := Ruleset{Local: local, DefaultAction: defaultAction}
	sorted := slices.Clone(rules)
	SortRules(sorted)
	seen := map[string]bool{}
	for _, r := range sorted {
		if err := r.Validate(); err != nil {
			return Ruleset{}, err
		}
		if seen[r.Name] {
			return Ruleset{}, fmt.Errorf("rule %q: duplicate name", r.Name)
		}
		seen[r.Name] = true

		var sources []netip.Prefix
		if len(r.From) > 0 {
			sources = rs.resolve(r.Name, "from", r.From, dir)
			if len(sources) == 0 {
				// Every selector resolved to nothing: the rule matches no
				// traffic. Dropping it is exact; treating it as "any source"
				// would turn a narrow rule into a wide one.
				continue
			}
		}
		dests := []netip.Prefix{local}
		if len(r.To) > 0 {
			dests = nil
			for _, p := range rs.resolve(r.Name, "to", r.To, dir) {
				if p.Bits() <= local.Bits() && p.Contains(local.Addr()) {
					dests = append(dests, local)
				} else if local.Bits() <= p.Bits() && local.Contains(p.Addr()) {
					dests = append(dests, p)
				}
			}
			dests = normalize(dests)
			if len(dests) == 0 {
				continue // not about this host's containers
			}
		}
		rs.Rules = append(rs.Rules, CompiledRule{
			Name:     r.Name,
			Action:   r.Action,
			Sources:  sources,
			Dests:    dests,
			Protocol: r.Protocol,
			Ports:    slices.Clone(r.Ports),
		})
	}
	return rs, nil
}

// resolve turns selectors into prefixes, recording selectors that resolve to
// nothing as warnings.
func (rs *Ruleset) resolve(rule, side string, sels []Selector, dir Directory) []netip.Prefix {
	var out []netip.Prefix
	for _, s := range sels {
		switch {
		case s.CIDR != "":
			out = append(out, netip.MustParsePrefix(s.CIDR)) // validated
		case s.Address != "":
			out = append(out, netip.PrefixFrom(netip.MustParseAddr(s.Address), 32))
		case s.Container != "" || s.Label != "":
			// No container selected is normal (none started yet): the
			// selector matches nothing, without a warning.
			key, value, _ := strings.Cut(s.Label, "=")
			for _, c := range dir.Containers {
				if s.Container != "" && c.Name == s.Container {
					out = append(out, netip.PrefixFrom(c.Address, 32))
				}
				if v, ok := c.Labels[key]; s.Label != "" && ok && v == value {
					out = append(out, netip.PrefixFrom(c.Address, 32))
				}
			}
		case s.Node != "":
			p, ok := dir.Nodes[s.Node]
			if !ok || !p.IsValid() {
				rs.Warnings = append(rs.Warnings, fmt.Sprintf("rule %q: %s: node %q has no subnet; matches nothing", rule, side, s.Node))
				continue
			}
			out = append(out, p.Masked())
		}
	}
	return normalize(out)
}

// normalize sorts prefixes and removes those covered by another one.
func normalize(ps []netip.Prefix) []netip.Prefix {
	slices.SortFunc(ps, func(a, b netip.Prefix) int {
		return cmp.Or(cmp.Compare(a.Bits(), b.Bits()), a.Addr().Compare(b.Addr()))
	})
	var out []netip.Prefix
next:
	for _, p := range ps {
		for _, q := range out {
			if q.Contains(p.Addr()) { // q is at most as long as p
				continue next
			}
		}
		out = append(out, p)
	}
	slices.SortFunc(out, func(a, b netip.Prefix) int {
		return cmp.Or(a.Addr().Compare(b.Addr()), cmp.Compare(a.Bits(), b.Bits()))
	})
	return out
}
