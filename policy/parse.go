package policy

import (
	"bytes"
	"errors"
	"fmt"
	"regexp"
	"strconv"
	"strings"

	"gopkg.in/yaml.v3"
)

// Document is the content of one policy file.
type Document struct {
	Rules         []Rule
	DefaultAction string // "" when the file does not set it
}

// ParseFile parses a policy file (YAML or JSON) and returns its rules. See
// ParseDocument for the accepted forms.
func ParseFile(name string, data []byte) ([]Rule, error) {
	doc, err := ParseDocument(name, data)
	if err != nil {
		return nil, err
	}
	return doc.Rules, nil
}

// ParseDocument parses a policy file: either a list of rules or a mapping
// {rules: [...], defaultAction: allow|deny}. Parsing is strict: unknown
// fields, wrong types, invalid values and duplicate rule names refuse the
// whole file, with an error "<name>:<line>: <problem>".
//
// yaml.v3 is used instead of sigs.k8s.io/yaml because its nodes keep line
// numbers; JSON is parsed by the same code (JSON is YAML flow syntax).
func ParseDocument(name string, data []byte) (Document, error) {
	trimmed := bytes.TrimSpace(data)
	if len(trimmed) > 0 && (trimmed[0] == '{' || trimmed[0] == '[') {
		// JSON may be indented with tabs, which YAML refuses; a raw tab is
		// not valid inside a JSON string, so replacing tabs changes nothing
		// else and keeps line numbers.
		data = bytes.ReplaceAll(data, []byte("\t"), []byte(" "))
	}
	var root yaml.Node
	if err := yaml.Unmarshal(data, &root); err != nil {
		return Document{}, yamlError(name, err)
	}
	p := parser{file: name}
	if root.Kind == 0 || len(root.Content) == 0 {
		return Document{}, fmt.Errorf("%s: empty policy file", name)
	}
	top := root.Content[0]
	var doc Document
	var rulesNode *yaml.Node
	switch top.Kind {
	case yaml.SequenceNode:
		rulesNode = top
	case yaml.MappingNode:
		if err := p.noDuplicateKeys(top, "file"); err != nil {
			return Document{}, err
		}
		for i := 0; i+1 < len(top.Content); i += 2 {
			key, val := top.Content[i], top.Content[i+1]
			switch key.Value {
			case "rules":
				rulesNode = val
			case "defaultAction":
				s, err := p.str(val, "defaultAction")
				if err != nil {
					return Document{}, err
				}
				if err := ValidateAction(s); err != nil {
					return Document{}, p.errAt(val, "defaultAction: %v", err)
				}
				doc.DefaultAction = s
			default:
				return Document{}, p.errAt(key, "unknown field %q (want rules, defaultAction)", key.Value)
			}
		}
		if rulesNode == nil && doc.DefaultAction == "" {
			return Document{}, p.errAt(top, "no rules and no defaultAction")
		}
	default:
		return Document{}, p.errAt(top, "want a list of rules or a mapping with rules and defaultAction")
	}
	if rulesNode != nil {
		if rulesNode.Kind != yaml.SequenceNode {
			return Document{}, p.errAt(rulesNode, "rules: want a list of rules")
		}
		// Every bad rule is reported, not only the first: a file with
		// three mistakes is fixed in one round.
		var errs []error
		firstLine := map[string]int{}
		for i, n := range rulesNode.Content {
			r, err := p.rule(n, i)
			if err != nil {
				errs = append(errs, err)
				continue
			}
			if line, dup := firstLine[r.Name]; dup {
				errs = append(errs, p.errAt(p.field(n, "name"), "rule %q: duplicate name (first at line %d)", r.Name, line))
				continue
			}
			firstLine[r.Name] = p.field(n, "name").Line
			doc.Rules = append(doc.Rules, r)
		}
		if len(errs) > 0 {
			return Document{}, errors.Join(errs...)
		}
	}
	return doc, nil
}

type parser struct{ file string }

func (p parser) errAt(n *yaml.Node, format string, args ...any) error {
	return fmt.Errorf("%s:%d: %s", p.file, n.Line, fmt.Sprintf(format, args...))
}

var yamlLine = regexp.MustCompile(`^(?:yaml: )?line (\d+): (.*)$`)

// yamlError turns "yaml: line 3: problem" into "file:3: problem".
func yamlError(file string, err error) error {
	var te *yaml.TypeError
	msgs := []string{err.Error()}
	if errors.As(err, &te) {
		msgs = te.Errors
	}
	if m := yamlLine.FindStringSubmatch(msgs[0]); m != nil {
		return fmt.Errorf("%s:%s: %s", file, m[1], m[2])
	}
	return fmt.Errorf("%s: %s", file, strings.TrimPrefix(msgs[0], "yaml: "))
}

// noDuplicateKeys refuses a mapping that sets a key twice (yaml.v3 only
// checks that when decoding into Go maps or structs).
func (p parser) noDuplicateKeys(n *yaml.Node, label string) error {
	first := map[string]int{}
	for i := 0; i+1 < len(n.Content); i += 2 {
		key := n.Content[i]
		if line, dup := first[key.Value]; dup {
			return p.errAt(key, "%s: field %q set twice (first at line %d)", label, key.Value, line)
		}
		first[key.Value] = key.Line
	}
	return nil
}

// field returns the value node of key in mapping n, or n itself when absent
// (so errors point at the rule).
func (p parser) field(n *yaml.Node, key string) *yaml.Node {
	for i := 0; i+1 < len(n.Content); i += 2 {
		if n.Content[i].Value == key {
			return n.Content[i+1]
		}
	}
	return n
}

func (p parser) str(n *yaml.Node, what string) (string, error) {
	if n.Kind != yaml.ScalarNode || n.Tag == "!!null" {
		return "", p.errAt(n, "%s: want a string", what)
	}
	return n.Value, nil
}

func (p parser) rule(n *yaml.Node, index int) (Rule, error) {
	label := fmt.Sprintf("rule #%d", index+1)
	if n.Kind != yaml.MappingNode {
		return Rule{}, p.errAt(n, "%s: want a mapping with name, action, ...", label)
	}
	if nameNode := p.field(n, "name"); nameNode != n && nameNode.Kind == yaml.ScalarNode {
		label = fmt.Sprintf("rule %q", nameNode.Value)
	}
	if err := p.noDuplicateKeys(n, label); err != nil {
		return Rule{}, err
	}
	var r Rule
	// where remembers the node of each field and list element so a
	// validation error can name the exact line.
	where := map[string]*yaml.Node{}
	for i := 0; i+1 < len(n.Content); i += 2 {
		key, val := n.Content[i], n.Content[i+1]
		where[key.Value] = val
		var err error
		switch key.Value {
		case "name":
			r.Name, err = p.str(val, label+": name")
		case "action":
			r.Action, err = p.str(val, label+": action")
		case "protocol":
			r.Protocol, err = p.str(val, label+": protocol")
		case "order":
			if val.Kind != yaml.ScalarNode || val.Tag != "!!int" {
				return Rule{}, p.errAt(val, "%s: order %q: want a whole number", label, val.Value)
			}
			r.Order, err = strconv.Atoi(val.Value)
			if err != nil {
				return Rule{}, p.errAt(val, "%s: order %q: want a whole number", label, val.Value)
			}
		case "from", "to":
			var sels []Selector
			sels, err = p.selectors(val, label+": "+key.Value, key.Value, where)
			if key.Value == "from" {
				r.From = sels
			} else {
				r.To = sels
			}
		case "ports":
			if val.Kind != yaml.SequenceNode {
				return Rule{}, p.errAt(val, "%s: ports: want a list like [80, 443, \"8000-8100\"]", label)
			}
			for j, pn := range val.Content {
				where[fmt.Sprintf("ports.%d", j)] = pn
				if pn.Kind != yaml.ScalarNode {
					return Rule{}, p.errAt(pn, "%s: ports[%d]: want a port or a range \"a-b\"", label, j)
				}
				pr, perr := ParsePortRange(pn.Value)
				if perr != nil {
					return Rule{}, p.errAt(pn, "%s: %v", label, perr)
				}
				r.Ports = append(r.Ports, pr)
			}
		default:
			return Rule{}, p.errAt(key, "%s: unknown field %q (want name, order, action, from, to, protocol, ports)", label, key.Value)
		}
		if err != nil {
			return Rule{}, err
		}
	}
	if fe := r.validate(); fe != nil {
		at := n
		for k := len(fe.path); k > 0; k-- {
			if node, ok := where[pathKey(fe.path[:k])]; ok {
				at = node
				break
			}
		}
		return Rule{}, p.errAt(at, "%s: %s", label, fe.msg)
	}
	return r, nil
}

func pathKey(path []any) string {
	parts := make([]string, len(path))
	for i, v := range path {
		parts[i] = fmt.Sprint(v)
	}
	return strings.Join(parts, ".")
}

func (p parser) selectors(n *yaml.Node, label, side string, where map[string]*yaml.Node) ([]Selector, error) {
	if n.Kind != yaml.SequenceNode {
		return nil, p.errAt(n, "%s: want a list of selectors like [{cidr: 10.244.1.0/24}, {node: host-b}]", label)
	}
	var sels []Selector
	for i, sn := range n.Content {
		where[fmt.Sprintf("%s.%d", side, i)] = sn
		if sn.Kind != yaml.MappingNode {
			return nil, p.errAt(sn, "%s[%d]: want a mapping with one of cidr, node, address, container, label, network", label, i)
		}
		if err := p.noDuplicateKeys(sn, fmt.Sprintf("%s[%d]", label, i)); err != nil {
			return nil, err
		}
		var s Selector
		for j := 0; j+1 < len(sn.Content); j += 2 {
			key, val := sn.Content[j], sn.Content[j+1]
			v, err := p.str(val, fmt.Sprintf("%s[%d]: %s", label, i, key.Value))
			if err != nil {
				return nil, err
			}
			switch key.Value {
			case "cidr":
				s.CIDR = v
			case "node":
				s.Node = v
			case "address":
				s.Address = v
			case "container":
				s.Container = v
			case "label":
				s.Label = v
			case "network":
				s.Network = v
			default:
				return nil, p.errAt(key, "%s[%d]: unknown field %q (want cidr, node, address, container, label or network)", label, i, key.Value)
			}
		}
		sels = append(sels, s)
	}
	return sels, nil
}
