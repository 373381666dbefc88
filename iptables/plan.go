package iptables

import (
	"bufio"
	"bytes"
	"cmp"
	"fmt"
	"maps"
	"slices"
	"strings"
)

// ChainPrefix starts the name of every chain fabric owns. Every chain with
// this prefix, in every table, belongs to this package: what no section
// wants is removed.
const ChainPrefix = "FABRIC-"

// Rank orders fabric's jumps inside one built-in chain, lowest first. The
// order is fixed here, in one place, so no section can put its jump ahead of
// another's by accident: policy always decides before anything of fabric
// accepts.
type Rank int

const (
	// RankEstablished: FABRIC-ESTABLISHED accepts the later packets of
	// connections between containers, whose first packet passed policy. It
	// is most of the traffic, and every rule such a packet passes costs
	// throughput (make bench, the breakdown).
	RankEstablished Rank = 1
	RankIngress     Rank = 5  // FABRIC-INPUT: tunnel packets only from fabric hosts
	RankPolicy      Rank = 10 // FABRIC-POLICY: rejects what policy denies
	RankAccept      Rank = 20 // FABRIC-FORWARD: accepts fabric traffic
	RankNAT         Rank = 30 // the nat table's chains
)

// Chain is the desired content of one fabric chain, each rule written
// exactly as iptables-save prints it after "-A NAME ", so comparing with the
// kernel is a string compare.
type Chain struct {
	Table string
	Name  string
	Rules []string
}

// Jump is the one rule in a built-in chain (From) that enters a fabric chain
// (To). Why becomes its comment. Match, when set, limits the jump to the
// packets it matches, written as iptables-save prints it.
type Jump struct {
	Table string
	From  string
	To    string
	Why   string
	Rank  Rank
	Match string
}

// Rule is the jump as iptables-save prints it.
func (j Jump) Rule() string {
	rule := Comment("fabric: "+j.Why) + " -j " + j.To
	if j.Match != "" {
		rule = j.Match + " " + rule
	}
	return rule
}

// Section is what one renderer (nat, policy) wants in the kernel.
type Section struct {
	Chains []Chain
	Jumps  []Jump
}

// Comment renders a comment match the way iptables-save prints it.
func Comment(text string) string {
	return "-m comment --comment " + saveQuote(text)
}

// saveQuote quotes s like iptables' xtables_save_string.
func saveQuote(s string) string {
	const plain = "_-0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
	if s != "" && strings.Trim(s, plain) == "" {
		return s
	}
	var b strings.Builder
	b.WriteByte('"')
	for _, r := range s {
		if r == '"' || r == '\\' || r == '\'' {
			b.WriteByte('\\')
		}
		b.WriteRune(r)
	}
	b.WriteByte('"')
	return b.String()
}

// savedTable is one table as iptables-save printed it.
type savedTable struct {
	order []string            // chains in the order printed
	rules map[string][]string // chain -> rule texts after "-A CHAIN "
}

func (t savedTable) has(chain string) bool { return slices.Contains(t.order, chain) }

// parseSave reads a whole iptables-save dump into its tables.
func parseSave(out []byte) (map[string]savedTable, error) {
	tables := map[string]savedTable{}
	var cur *savedTable
	flush := func(name string) {
		if cur != nil {
			tables[name] = *cur
		}
	}
	name := ""
	sc := bufio.NewScanner(bytes.NewReader(out))
	sc.Buffer(make([]byte, 64*1024), 16*1024*1024)
	for sc.Scan() {
		line := sc.Text()
		switch {
		case strings.HasPrefix(line, "*"):
			flush(name)
			name = line[1:]
			cur = &savedTable{rules: map[string][]string{}}
		case cur == nil:
		case strings.HasPrefix(line, ":"):
			chain, _, _ := strings.Cut(line[1:], " ")
			cur.order = append(cur.order, chain)
		case strings.HasPrefix(line, "-A "):
			chain, rule, ok := strings.Cut(line[3:], " ")
			if !ok {
				return nil, fmt.Errorf("unexpected iptables-save line %q", line)
			}
			cur.rules[chain] = append(cur.rules[chain], rule)
		}
	}
	flush(name)
	return tables, sc.Err()
}

// ruleTarget returns the chain or target a rule jumps (-j) or goes (-g) to.
func ruleTarget(rule string) string {
	args := splitArgs(rule)
	for i := 0; i+1 < len(args); i++ {
		if args[i] == "-j" || args[i] == "-g" {
			return args[i+1]
		}
	}
	return ""
}

func isFabric(chain string) bool { return strings.HasPrefix(chain, ChainPrefix) }

// splitArgs splits a saved rule into arguments, honouring double quotes and
// backslash escapes as iptables-restore does, so a comment holding " -j "
// is not taken for a target.
func splitArgs(rule string) []string {
	var args []string
	var cur strings.Builder
	inQuote, escaped, started := false, false, false
	for _, r := range rule {
		switch {
		case escaped:
			cur.WriteRune(r)
			escaped = false
		case r == '\\':
			escaped, started = true, true
		case r == '"':
			inQuote, started = !inQuote, true
		case r == ' ' && !inQuote:
			if started {
				args = append(args, cur.String())
				cur.Reset()
				started = false
			}
		default:
			cur.WriteRune(r)
			started = true
		}
	}
	if started {
		args = append(args, cur.String())
	}
	return args
}

// desiredTable is every section's wish for one table, merged.
type desiredTable struct {
	chains []Chain
	jumps  map[string][]Jump // built-in chain -> jumps in rank order
}

// merge combines sections into per-table desired state. Two sections
// claiming one chain is a programming error, reported rather than guessed.
func merge(sections map[string]Section) (map[string]*desiredTable, error) {
	out := map[string]*desiredTable{}
	get := func(table string) *desiredTable {
		if out[table] == nil {
			out[table] = &desiredTable{jumps: map[string][]Jump{}}
		}
		return out[table]
	}
	owner := map[string]string{}
	for _, name := range slices.Sorted(maps.Keys(sections)) {
		s := sections[name]
		for _, c := range s.Chains {
			if !isFabric(c.Name) {
				return nil, fmt.Errorf("section %s: chain %s does not start with %s", name, c.Name, ChainPrefix)
			}
			key := c.Table + "/" + c.Name
			if o, ok := owner[key]; ok {
				return nil, fmt.Errorf("chain %s is claimed by sections %s and %s", key, o, name)
			}
			owner[key] = name
			d := get(c.Table)
			d.chains = append(d.chains, c)
		}
		for _, j := range s.Jumps {
			d := get(j.Table)
			d.jumps[j.From] = append(d.jumps[j.From], j)
		}
	}
	for _, d := range out {
		for from, js := range d.jumps {
			slices.SortStableFunc(js, func(a, b Jump) int { return cmp.Compare(a.Rank, b.Rank) })
			d.jumps[from] = js
		}
	}
	return out, nil
}

// plan returns, per table, the `iptables-restore --noflush` input that turns
// have into want; tables that already match are absent. Every fabric chain
// want does not hold is removed, and every jump to a fabric chain that want
// does not list is deleted. A built-in chain whose fabric jumps are not
// exactly want's, in rank order, at its top gets all of them deleted and
// inserted again in the same transaction, so there is no moment when one
// fabric jump runs before another that must precede it.
func plan(want map[string]*desiredTable, have map[string]savedTable) map[string]string {
	tables := map[string]bool{}
	for t := range want {
		tables[t] = true
	}
	for t, h := range have {
		for _, c := range h.order {
			if isFabric(c) {
				tables[t] = true
			}
		}
	}
	out := map[string]string{}
	for table := range tables {
		w := want[table]
		if w == nil {
			w = &desiredTable{jumps: map[string][]Jump{}}
		}
		h, ok := have[table]
		if !ok {
			h = savedTable{rules: map[string][]string{}}
		}
		if p := planTable(table, w, h); p != "" {
			out[table] = p
		}
	}
	return out
}

func planTable(table string, want *desiredTable, have savedTable) string {
	var decls, deletes, inserts, appends, removes []string
	wanted := map[string]bool{}
	for _, c := range want.chains {
		wanted[c.Name] = true
		if have.has(c.Name) && slices.Equal(have.rules[c.Name], c.Rules) {
			continue
		}
		decls = append(decls, ":"+c.Name+" - [0:0]")
		for _, r := range c.Rules {
			appends = append(appends, "-A "+c.Name+" "+r)
		}
	}
	// Every non-fabric chain that has, or should have, fabric jumps.
	froms := map[string]bool{}
	for from := range want.jumps {
		froms[from] = true
	}
	for _, chain := range have.order {
		if isFabric(chain) {
			continue
		}
		for _, r := range have.rules[chain] {
			if isFabric(ruleTarget(r)) {
				froms[chain] = true
			}
		}
	}
	for _, from := range slices.Sorted(maps.Keys(froms)) {
		js := want.jumps[from]
		rules := make([]string, len(js))
		for i, j := range js {
			rules[i] = j.Rule()
		}
		existing := have.rules[from]
		if jumpsInPlace(existing, rules) {
			continue
		}
		for _, r := range existing {
			if isFabric(ruleTarget(r)) {
				deletes = append(deletes, "-D "+from+" "+r)
			}
		}
		// Inserted at 1 from the last, so they end up in rank order.
		for i := len(rules) - 1; i >= 0; i-- {
			inserts = append(inserts, "-I "+from+" 1 "+rules[i])
		}
	}
	for _, chain := range have.order {
		if isFabric(chain) && !wanted[chain] {
			decls = append(decls, ":"+chain+" - [0:0]") // flushes it
			removes = append(removes, "-X "+chain)
		}
	}
	if len(decls)+len(deletes)+len(inserts) == 0 {
		return ""
	}
	var b strings.Builder
	b.WriteString("*" + table + "\n")
	for _, part := range [][]string{decls, deletes, inserts, appends, removes} {
		for _, l := range part {
			b.WriteString(l + "\n")
		}
	}
	b.WriteString("COMMIT\n")
	return b.String()
}

// jumpsInPlace reports whether the jumps to fabric chains in a built-in
// chain's rules are exactly want, in order, as its first rules.
func jumpsInPlace(rules, want []string) bool {
	n := 0
	for i, r := range rules {
		if !isFabric(ruleTarget(r)) {
			continue
		}
		if i != n || n >= len(want) || r != want[n] {
			return false
		}
		n++
	}
	return n == len(want)
}

// fabricRules lists fabric's rules in have as "-t TABLE -A CHAIN ..." lines:
// the jumps into fabric chains and the chains' contents.
func fabricRules(have map[string]savedTable) []string {
	var lines []string
	for _, table := range slices.Sorted(maps.Keys(have)) {
		t := have[table]
		for _, chain := range t.order {
			for _, rule := range t.rules[chain] {
				if isFabric(chain) || isFabric(ruleTarget(rule)) {
					lines = append(lines, fmt.Sprintf("-t %s -A %s %s", table, chain, rule))
				}
			}
		}
	}
	return lines
}
