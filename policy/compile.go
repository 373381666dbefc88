package policy

import (
	"cmp"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"maps"
	"net/netip"
	"slices"
	"strings"
)

// Ruleset is the policy as one host enforces it: selectors resolved to
// prefixes, rules that cannot reach the local subnet dropped, in evaluation
// order. It is backend neutral; enforcers decide how to express it.
type Ruleset struct {
	Local netip.Prefix // this host's container subnet (on the bridge)
	// LocalV6 is its IPv6 subnet on the bridge (invalid: no IPv6). Rules
	// hold prefixes of both families; each family's enforcer takes its own.
	LocalV6 netip.Prefix `json:",omitzero"`
	// Networks are the subnets of the fabric's Docker networks: traffic
	// into one through an endpoint link of this host is judged too.
	Networks      []netip.Prefix `json:",omitempty"`
	DefaultAction string         // allow or deny
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
	Dests    []netip.Prefix // never empty: always inside Local, LocalV6 or a network
	Protocol string
	Ports    []PortRange
}

// Hash identifies the ruleset's content; equal rulesets have equal hashes.
func (rs Ruleset) Hash() string {
	b, _ := json.Marshal(struct {
		Local         string
		LocalV6       netip.Prefix `json:",omitzero"`
		Networks      []netip.Prefix
		DefaultAction string
		Rules         []CompiledRule
	}{rs.Local.String(), rs.LocalV6, rs.Networks, rs.DefaultAction, rs.Rules})
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
	NodesV6    map[string]netip.Prefix // node name -> its IPv6 subnet, if it has one
	Containers []Container             // the fabric's containers, every host's
	// Pool is the fabric's container pool (the bridges' subnets), and
	// Networks the fabric's Docker networks by name: each is isolated
	// from the others unless a rule allows the traffic. PoolV6 and
	// NetworksV6 are their IPv6 sides (absent: none).
	Pool       netip.Prefix
	PoolV6     netip.Prefix
	Networks   map[string]netip.Prefix
	NetworksV6 map[string]netip.Prefix
}

// network is a network's subnets: its IPv4 one, and its IPv6 one if any.
func (dir Directory) network(name string) []netip.Prefix {
	out := []netip.Prefix{dir.Networks[name].Masked()}
	if p, ok := dir.NetworksV6[name]; ok && p.IsValid() {
		out = append(out, p.Masked())
	}
	return out
}

// Container is one container as policy sees it.
type Container struct {
	Name      string
	Address   netip.Addr
	AddressV6 netip.Addr // invalid: none
	Labels    map[string]string
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

// Compile resolves rules for the host whose container subnet is local, and
// localV6 its IPv6 one (invalid: none). defaultAction "" means allow.
func Compile(rules []Rule, defaultAction string, dir Directory, local, localV6 netip.Prefix) (Ruleset, error) {
	if defaultAction == "" {
		defaultAction = ActionAllow
	}
	if err := ValidateAction(defaultAction); err != nil {
		return Ruleset{}, fmt.Errorf("default %w", err)
	}
	if !local.IsValid() || !local.Addr().Is4() {
		return Ruleset{}, fmt.Errorf("local subnet %s: want an IPv4 prefix", local)
	}
	if localV6.IsValid() && (!localV6.Addr().Is6() || localV6.Addr().Is4In6()) {
		return Ruleset{}, fmt.Errorf("local IPv6 subnet %s: want an IPv6 prefix", localV6)
	}
	local = local.Masked()
	rs := Ruleset{Local: local, DefaultAction: defaultAction}
	for _, name := range slices.Sorted(maps.Keys(dir.Networks)) {
		rs.Networks = append(rs.Networks, dir.network(name)...)
	}
	spaces := append([]netip.Prefix{local}, rs.Networks...) // where this host's containers are
	if localV6.IsValid() {
		rs.LocalV6 = localV6.Masked()
		spaces = append(spaces, rs.LocalV6)
	}
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
		dests := slices.Clone(spaces)
		if len(r.To) > 0 {
			dests = nil
			for _, p := range rs.resolve(r.Name, "to", r.To, dir) {
				for _, space := range spaces {
					if p.Bits() <= space.Bits() && p.Contains(space.Addr()) {
						dests = append(dests, space)
					} else if space.Bits() <= p.Bits() && space.Contains(p.Addr()) {
						dests = append(dests, p)
					}
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
	rs.Rules = append(rs.Rules, isolation([]netip.Prefix{local, rs.LocalV6}, dir, defaultAction, spaces)...)
	return rs, nil
}

// isolation keeps the fabric's Docker networks apart, as Docker keeps its
// bridges apart: traffic into a network from another network or from the
// containers of the bridges is refused, after the rules (which may allow
// it) and before the default. Traffic from outside the fabric is the
// rules' and the default's to judge, and so is traffic from the hosts'
// gateway addresses: connections to a published port arrive SNATed to the
// gateway of the host that took them.
func isolation(local []netip.Prefix, dir Directory, defaultAction string, spaces []netip.Prefix) []CompiledRule {
	if len(dir.Networks) == 0 {
		return nil
	}
	local = slices.DeleteFunc(slices.Clone(local), func(p netip.Prefix) bool { return !p.IsValid() })
	var out []CompiledRule
	var gateways []netip.Prefix
	for _, s := range append(slices.Collect(maps.Values(dir.Nodes)), slices.Collect(maps.Values(dir.NodesV6))...) {
		if s.IsValid() {
			gw := s.Masked().Addr().Next()
			gateways = append(gateways, netip.PrefixFrom(gw, gw.BitLen()))
		}
	}
	if len(gateways) > 0 {
		out = append(out, CompiledRule{Name: "the hosts' gateways (published ports) as by default", Action: defaultAction,
			Sources: normalize(gateways), Dests: normalize(slices.Clone(spaces))})
	}
	names := slices.Sorted(maps.Keys(dir.Networks))
	var all []netip.Prefix
	for _, name := range names {
		all = append(all, dir.network(name)...)
	}
	out = append(out, CompiledRule{Name: "isolation of the bridge from the networks " + strings.Join(names, ", "),
		Action: ActionDeny, Sources: normalize(slices.Clone(all)), Dests: normalize(local)})
	for _, name := range names {
		own := dir.network(name)
		var others []netip.Prefix
		for _, p := range []netip.Prefix{dir.Pool, dir.PoolV6} {
			if p.IsValid() {
				others = append(others, p.Masked())
			}
		}
		for _, p := range all {
			if !slices.Contains(own, p) {
				others = append(others, p)
			}
		}
		out = append(out, CompiledRule{Name: "isolation of network " + name, Action: ActionDeny, Sources: normalize(others), Dests: normalize(own)})
	}
	return out
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
			a := netip.MustParseAddr(s.Address) // validated
			out = append(out, netip.PrefixFrom(a, a.BitLen()))
		case s.Container != "" || s.Label != "":
			// No container selected is normal (none started yet): the
			// selector matches nothing, without a warning.
			key, value, _ := strings.Cut(s.Label, "=")
			for _, c := range dir.Containers {
				v, ok := c.Labels[key]
				if (s.Container != "" && c.Name == s.Container) || (s.Label != "" && ok && v == value) {
					out = append(out, netip.PrefixFrom(c.Address, 32))
					if c.AddressV6.IsValid() {
						out = append(out, netip.PrefixFrom(c.AddressV6, 128))
					}
				}
			}
		case s.Node != "":
			p, ok := dir.Nodes[s.Node]
			if !ok || !p.IsValid() {
				rs.Warnings = append(rs.Warnings, fmt.Sprintf("rule %q: %s: node %q has no subnet; matches nothing", rule, side, s.Node))
				continue
			}
			out = append(out, p.Masked())
			if p6, ok := dir.NodesV6[s.Node]; ok && p6.IsValid() {
				out = append(out, p6.Masked())
			}
		case s.Network != "":
			if _, ok := dir.Networks[s.Network]; !ok {
				rs.Warnings = append(rs.Warnings, fmt.Sprintf("rule %q: %s: there is no fabric network %q; matches nothing", rule, side, s.Network))
				continue
			}
			out = append(out, dir.network(s.Network)...)
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
