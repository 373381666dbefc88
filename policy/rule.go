// Package policy is fabric-wide network policy: rules stored in etcd, parsed
// from YAML or JSON files, compiled per host and enforced for traffic TO that
// host's own containers, whether it arrives over a tunnel from another host or
// from a container on the same bridge.
//
// Rules are evaluated in ascending Order (ties broken by Name); the first rule
// that matches decides. Packets no rule matches get the default action
// ("allow" unless set to "deny"). Replies of allowed connections always pass.
//
// A policy file (YAML or JSON; ParseDocument) is a list of rules or:
//
//	defaultAction: deny          # optional; allow when never set
//	rules:
//	  - name: web                # letters, digits, . _ -
//	    order: 10                # lower first; ties by name
//	    action: allow            # allow | deny
//	    from: [{node: host-b}, {cidr: 10.244.1.0/24}]   # empty = anywhere
//	                             # cidr and address are one family (IPv4 or
//	                             # IPv6); node, container and label select both
//	    to: [{address: 10.244.2.2}]                      # empty = anywhere
//	    protocol: tcp            # tcp | udp | icmp | omitted = any
//	    ports: [80, "8000-8100"] # tcp/udp only
//
// Default deny applies to every packet to the host's containers, including
// traffic between containers on the same bridge.
//
// etcd layout (see store.go):
//
//	<prefix>/policy/<rule name>   JSON of one Rule
//	<prefix>/policy/_default      "allow" or "deny" (absent = allow)
//
// Enforcement sits behind the Enforcer interface; IptablesEnforcer is the
// iptables + ipset implementation.
package policy

import (
	"encoding/json"
	"fmt"
	"net/netip"
	"regexp"
	"strconv"
	"strings"
)

// Actions a rule or the default can take.
const (
	ActionAllow = "allow"
	ActionDeny  = "deny"
)

// Protocols a rule can match; ProtocolAny ("") matches every protocol.
const (
	ProtocolAny  = ""
	ProtocolTCP  = "tcp"
	ProtocolUDP  = "udp"
	ProtocolICMP = "icmp"
)

// Rule is one fabric-wide policy rule. Empty From or To means "anywhere";
// empty Ports means every port.
type Rule struct {
	Name     string      `json:"name"`
	Order    int         `json:"order,omitempty"`
	Action   string      `json:"action"`
	From     []Selector  `json:"from,omitempty"`
	To       []Selector  `json:"to,omitempty"`
	Protocol string      `json:"protocol,omitempty"`
	Ports    []PortRange `json:"ports,omitempty"`
}

// Selector names a set of addresses; exactly one field is set.
type Selector struct {
	// CIDR and Address are literal: one family each. The others select
	// both families of what they name (a node's /24 and its /64, a
	// container's IPv4 and IPv6 address).
	CIDR    string `json:"cidr,omitempty"`
	Node    string `json:"node,omitempty"`    // whole node: that node's current subnets
	Address string `json:"address,omitempty"` // one container address
	// Container selects the containers of that name on any host (names are
	// not unique across hosts: each one matches), following them as they
	// start and stop.
	Container string `json:"container,omitempty"`
	// Label selects the containers with that Docker label, "key=value".
	Label string `json:"label,omitempty"`
	// Network selects the containers of a fabric Docker network: its subnet.
	Network string `json:"network,omitempty"`
}

// selectsContainers reports whether the selector follows containers.
func (s Selector) selectsContainers() bool { return s.Container != "" || s.Label != "" }

// PortRange is an inclusive range of destination ports. In files and in etcd
// it is written as a number (80) or a string range ("8000-8100").
type PortRange struct {
	From, To uint16
}

func (p PortRange) String() string {
	if p.From == p.To {
		return strconv.Itoa(int(p.From))
	}
	return fmt.Sprintf("%d-%d", p.From, p.To)
}

// MarshalJSON writes a single port as a number and a range as "a-b".
func (p PortRange) MarshalJSON() ([]byte, error) {
	if p.From == p.To {
		return []byte(strconv.Itoa(int(p.From))), nil
	}
	return json.Marshal(p.String())
}

// UnmarshalJSON accepts 80 or "80" or "8000-8100".
func (p *PortRange) UnmarshalJSON(b []byte) error {
	var s string
	if len(b) > 0 && b[0] == '"' {
		if err := json.Unmarshal(b, &s); err != nil {
			return err
		}
	} else {
		s = string(b)
	}
	r, err := ParsePortRange(s)
	if err != nil {
		return err
	}
	*p = r
	return nil
}

// ParsePortRange parses "80" or "8000-8100".
func ParsePortRange(s string) (PortRange, error) {
	lo, hi, isRange := strings.Cut(strings.TrimSpace(s), "-")
	from, err := parsePort(lo)
	if err != nil {
		return PortRange{}, fmt.Errorf("port %q: %w", s, err)
	}
	to := from
	if isRange {
		if to, err = parsePort(hi); err != nil {
			return PortRange{}, fmt.Errorf("port %q: %w", s, err)
		}
	}
	if to < from {
		return PortRange{}, fmt.Errorf("port range %q: end below start", s)
	}
	return PortRange{From: from, To: to}, nil
}

func parsePort(s string) (uint16, error) {
	n, err := strconv.Atoi(strings.TrimSpace(s))
	if err != nil || n < 1 || n > 65535 {
		return 0, fmt.Errorf("want a port number 1-65535")
	}
	return uint16(n), nil
}

// ruleNamePattern keeps names usable as etcd key segments and in iptables
// comments. A leading "_" is reserved for keys like _default.
var ruleNamePattern = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$`)

// fieldError is a validation problem tied to one field, so the file parser
// can point at the line of exactly that field.
type fieldError struct {
	path []any // field names (string) and list indexes (int) below the rule
	msg  string
}

func (e *fieldError) Error() string { return e.msg }

func fieldErr(msg string, path ...any) *fieldError { return &fieldError{path: path, msg: msg} }

// Validate reports the first problem with the rule, prefixed with its name.
func (r Rule) Validate() error {
	if fe := r.validate(); fe != nil {
		return fmt.Errorf("rule %q: %s", r.Name, fe.msg)
	}
	return nil
}

func (r Rule) validate() *fieldError {
	if r.Name == "" {
		return fieldErr("name missing", "name")
	}
	if !ruleNamePattern.MatchString(r.Name) {
		return fieldErr(fmt.Sprintf("name %q: want letters, digits, '.', '_' or '-' (at most 63, not starting with '.', '_' or '-')", r.Name), "name")
	}
	if err := ValidateAction(r.Action); err != nil {
		return fieldErr(err.Error(), "action")
	}
	for _, side := range []struct {
		name string
		sels []Selector
	}{{"from", r.From}, {"to", r.To}} {
		for i, s := range side.sels {
			if err := s.Validate(); err != nil {
				return fieldErr(fmt.Sprintf("%s[%d]: %v", side.name, i, err), side.name, i)
			}
		}
	}
	switch r.Protocol {
	case ProtocolAny, ProtocolTCP, ProtocolUDP, ProtocolICMP:
	default:
		return fieldErr(fmt.Sprintf("protocol %q: want tcp, udp, icmp or none (any)", r.Protocol), "protocol")
	}
	if len(r.Ports) > 0 && r.Protocol != ProtocolTCP && r.Protocol != ProtocolUDP {
		proto := r.Protocol
		if proto == "" {
			proto = "any"
		}
		return fieldErr(fmt.Sprintf("ports need protocol tcp or udp, not %s", proto), "ports")
	}
	for i, p := range r.Ports {
		if p.From == 0 || p.To < p.From {
			return fieldErr(fmt.Sprintf("ports[%d]: bad range %d-%d", i, p.From, p.To), "ports", i)
		}
	}
	return nil
}

// ValidateAction accepts "allow" and "deny".
func ValidateAction(a string) error {
	if a != ActionAllow && a != ActionDeny {
		return fmt.Errorf("action %q: want allow or deny", a)
	}
	return nil
}

// Validate checks that exactly one field is set and that it parses.
func (s Selector) Validate() error {
	set := 0
	for _, v := range []string{s.CIDR, s.Node, s.Address, s.Container, s.Label, s.Network} {
		if v != "" {
			set++
		}
	}
	if set != 1 {
		return fmt.Errorf("selector needs exactly one of cidr, node, address, container, label, network (has %d)", set)
	}
	switch {
	case s.CIDR != "":
		p, err := netip.ParsePrefix(s.CIDR)
		if err != nil || p.Addr().Is4In6() || p.Addr().Zone() != "" {
			return fmt.Errorf("cidr %q: want an IPv4 or IPv6 prefix like 10.244.1.0/24 or fd00:10:244:1::/64", s.CIDR)
		}
		if p.Masked() != p {
			return fmt.Errorf("cidr %q has host bits set: did you mean %s?", s.CIDR, p.Masked())
		}
	case s.Address != "":
		a, err := netip.ParseAddr(s.Address)
		if err != nil || a.Is4In6() || a.Zone() != "" {
			return fmt.Errorf("address %q: want an IPv4 or IPv6 address like 10.244.1.2 or fd00:10:244:1::2", s.Address)
		}
	case s.Container != "":
		if strings.ContainsAny(s.Container, "/ \t\n") {
			return fmt.Errorf("container %q: not a container name", s.Container)
		}
	case s.Label != "":
		if k, _, ok := strings.Cut(s.Label, "="); !ok || k == "" || strings.ContainsAny(s.Label, "\n") {
			return fmt.Errorf("label %q: want key=value, like role=frontend", s.Label)
		}
	case s.Node != "":
		if strings.ContainsAny(s.Node, "/ \t\n") {
			return fmt.Errorf("node %q: not a node name", s.Node)
		}
	case s.Network != "":
		if strings.ContainsAny(s.Network, "/ \t\n") {
			return fmt.Errorf("network %q: not a network name", s.Network)
		}
	}
	return nil
}

func (s Selector) String() string {
	switch {
	case s.CIDR != "":
		return "cidr " + s.CIDR
	case s.Node != "":
		return "node " + s.Node
	case s.Network != "":
		return "network " + s.Network
	default:
		return "address " + s.Address
	}
}
