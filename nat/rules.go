package nat

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net/netip"
	"slices"
	"strconv"
	"strings"
)

// ownedChains are the chains this package writes, per table. Other FABRIC-
// chains (the policy package's) are left alone.
var ownedChains = map[string][]string{
	"nat":    {PreroutingChain, OutputChain, PostroutingChain},
	"filter": {ForwardChain},
}

func ownedChain(table, chain string) bool {
	return slices.Contains(ownedChains[table], chain)
}

// tableSpec is the desired content of fabric's chains in one table, every
// rule written exactly as iptables-save prints it, so comparing is a string
// compare.
type tableSpec struct {
	name   string
	chains []chainSpec
	jumps  []jumpSpec
}

type chainSpec struct {
	name  string
	rules []string
}

// jumpSpec is the one rule in a built-in chain that enters a fabric chain.
type jumpSpec struct {
	from  string // built-in chain
	chain string // fabric chain jumped to
	rule  string
}

// desiredTables computes every rule fabric wants on this host.
func desiredTables(st State, publishes []Publish) []tableSpec {
	pool := st.Pool.Masked()
	subnet := st.Subnet.Masked()
	gateway := subnet.Addr().Next() // the bridge's address, routed back to this host by the fabric

	var prerouting, output, postrouting, forward []string
	forward = append(forward,
		"-m conntrack --ctstate RELATED,ESTABLISHED "+comment("replies of accepted connections")+" -j ACCEPT")
	for _, p := range publishes {
		target := p.Target.Addr().Unmap()
		port := strconv.Itoa(int(p.Target.Port()))
		hostPort := strconv.Itoa(int(p.HostPort))
		name := fmt.Sprintf("%s/%d to %s", p.Proto, p.HostPort, netip.AddrPortFrom(target, p.Target.Port()))
		dnat := fmt.Sprintf("-p %s -m addrtype --dst-type LOCAL -m %s --dport %s %s -j DNAT --to-destination %s",
			p.Proto, p.Proto, hostPort, comment("publish "+name), netip.AddrPortFrom(target, p.Target.Port()))
		prerouting = append(prerouting, dnat)
		// Loopback destinations are excluded: DNAT of 127.0.0.1 to another
		// address needs route_localnet, which fabric does not turn on.
		output = append(output, "! -d 127.0.0.0/8 "+dnat)

		// Matches the connection after DNAT by its original port, so only
		// this publish's connections are touched, not dockerd's -p ones.
		published := fmt.Sprintf("-d %s/32 -p %s -m %s --dport %s -m conntrack --ctstate DNAT --ctorigdstport %s",
			target, p.Proto, p.Proto, port, hostPort)
		if subnet.Contains(target) {
			// A local target answers clients from elsewhere through this host
			// anyway; only a container of this bridge (hairpin) would be
			// answered directly, so only it is SNATed.
			postrouting = append(postrouting, fmt.Sprintf("-s %s %s %s -j SNAT --to-source %s",
				subnet, published, comment("hairpin of publish "+name), gateway))
		} else {
			// A remote target would answer the client directly; SNAT to our
			// gateway makes the reply come back through this host's conntrack.
			postrouting = append(postrouting, fmt.Sprintf("%s %s -j SNAT --to-source %s",
				published, comment("replies of publish "+name+" return through this host"), gateway))
		}
		forward = append(forward, fmt.Sprintf("%s %s -j ACCEPT", published, comment("forward publish "+name)))
	}
	postrouting = append(postrouting,
		// ACCEPT, not RETURN: it also ends the nat POSTROUTING walk, so a
		// MASQUERADE of dockerd (run without --ip-masq=false) cannot hide
		// container addresses from each other either.
		fmt.Sprintf("-s %s -d %s %s -j ACCEPT", pool, pool, comment("traffic between containers keeps its addresses")),
		fmt.Sprintf("-s %s ! -d %s %s -j MASQUERADE", subnet, pool, comment("containers leaving the fabric use the host address")),
	)
	forward = append(forward,
		fmt.Sprintf("-s %s %s -j ACCEPT", pool, comment("traffic from containers of the fabric")))

	return []tableSpec{
		{
			name: "nat",
			chains: []chainSpec{
				{PreroutingChain, prerouting},
				{OutputChain, output},
				{PostroutingChain, postrouting},
			},
			jumps: []jumpSpec{
				jump("PREROUTING", PreroutingChain, "published ports"),
				jump("OUTPUT", OutputChain, "published ports from this host"),
				jump("POSTROUTING", PostroutingChain, "masquerade and published replies"),
			},
		},
		{
			name:   "filter",
			chains: []chainSpec{{ForwardChain, forward}},
			jumps:  []jumpSpec{jump("FORWARD", ForwardChain, "accept fabric traffic")},
		},
	}
}

func jump(from, chain, why string) jumpSpec {
	return jumpSpec{from: from, chain: chain, rule: comment(why) + " -j " + chain}
}

// comment renders the comment match the way iptables-save prints it.
func comment(why string) string {
	return "-m comment --comment " + saveQuote("fabric: "+why)
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

func parseSave(out []byte) (savedTable, error) {
	t := savedTable{rules: map[string][]string{}}
	sc := bufio.NewScanner(bytes.NewReader(out))
	sc.Buffer(make([]byte, 64*1024), 16*1024*1024)
	for sc.Scan() {
		line := sc.Text()
		switch {
		case strings.HasPrefix(line, ":"):
			name, _, _ := strings.Cut(line[1:], " ")
			t.order = append(t.order, name)
		case strings.HasPrefix(line, "-A "):
			chain, rule, ok := strings.Cut(line[3:], " ")
			if !ok {
				return t, fmt.Errorf("unexpected iptables-save line %q", line)
			}
			t.rules[chain] = append(t.rules[chain], rule)
		}
	}
	return t, sc.Err()
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

// diffTable returns the iptables-restore --noflush input that turns have
// into want, or "" when nothing differs. A chain that differs is declared
// (which flushes it) and rewritten whole; a missing, duplicated or displaced
// jump is deleted and inserted again at position 1.
func diffTable(want tableSpec, have savedTable) string {
	var decls, lines []string
	for _, c := range want.chains {
		if have.has(c.name) && slices.Equal(have.rules[c.name], c.rules) {
			continue
		}
		decls = append(decls, ":"+c.name+" - [0:0]")
		for _, r := range c.rules {
			lines = append(lines, "-A "+c.name+" "+r)
		}
	}
	for _, j := range want.jumps {
		existing := have.rules[j.from]
		if jumpInPlace(existing, j) {
			continue
		}
		for _, r := range existing {
			if ruleTarget(r) == j.chain {
				lines = append(lines, "-D "+j.from+" "+r)
			}
		}
		lines = append(lines, "-I "+j.from+" 1 "+j.rule)
	}
	if len(decls) == 0 && len(lines) == 0 {
		return ""
	}
	return restorePayload(want.name, decls, lines)
}

// jumpInPlace reports whether builtin holds exactly one jump to j.chain, in
// its current form, with only jumps to fabric chains before it.
func jumpInPlace(builtin []string, j jumpSpec) bool {
	found := -1
	for i, r := range builtin {
		if ruleTarget(r) != j.chain {
			continue
		}
		if found >= 0 || r != j.rule {
			return false
		}
		found = i
	}
	if found < 0 {
		return false
	}
	for _, r := range builtin[:found] {
		if !strings.HasPrefix(ruleTarget(r), ChainPrefix) {
			return false
		}
	}
	return true
}

// cleanupPayload deletes every rule that jumps to one of our chains, then the
// chains themselves.
func cleanupPayload(table string, have savedTable) string {
	var decls, deletes, removes []string
	for _, chain := range have.order {
		if ownedChain(table, chain) {
			decls = append(decls, ":"+chain+" - [0:0]")
			removes = append(removes, "-X "+chain)
			continue
		}
		for _, r := range have.rules[chain] {
			if ownedChain(table, ruleTarget(r)) {
				deletes = append(deletes, "-D "+chain+" "+r)
			}
		}
	}
	if len(decls) == 0 && len(deletes) == 0 {
		return ""
	}
	return restorePayload(table, decls, append(deletes, removes...))
}

func restorePayload(table string, decls, lines []string) string {
	var b strings.Builder
	b.WriteString("*" + table + "\n")
	for _, l := range decls {
		b.WriteString(l + "\n")
	}
	for _, l := range lines {
		b.WriteString(l + "\n")
	}
	b.WriteString("COMMIT\n")
	return b.String()
}

func (m *Manager) readTable(ctx context.Context, table string) (savedTable, error) {
	cmd := m.exec(ctx, m.save, "-t", table)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return savedTable{}, fmt.Errorf("nat: reading table %s with %s: %v: %s", table, m.save, err, strings.TrimSpace(stderr.String()))
	}
	t, err := parseSave(out)
	if err != nil {
		return t, fmt.Errorf("nat: reading table %s: %w", table, err)
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
		return fmt.Errorf("nat: writing table %s with %s: %v: %s\ninput was:\n%s", table, m.restore, err, strings.TrimSpace(string(out)), payload)
	}
	return nil
}

// ensureHairpin turns on hairpin mode on every port of bridge, so a container
// connecting to its own published port gets the packet back out of the port
// it came in by. New ports get it on the next Apply or Maintain tick.
func (m *Manager) ensureHairpin(ctx context.Context, bridge string) error {
	out, err := m.exec(ctx, "ip", "-d", "-j", "link", "show", "master", bridge).Output()
	if err != nil {
		return fmt.Errorf("listing ports of bridge %s: %v", bridge, err)
	}
	var ports []struct {
		Name     string `json:"ifname"`
		LinkInfo struct {
			SlaveKind string `json:"info_slave_kind"`
			SlaveData struct {
				Hairpin bool `json:"hairpin"`
			} `json:"info_slave_data"`
		} `json:"linkinfo"`
	}
	if err := json.Unmarshal(out, &ports); err != nil {
		return fmt.Errorf("parsing ports of bridge %s: %v", bridge, err)
	}
	for _, p := range ports {
		if p.LinkInfo.SlaveKind != "bridge" || p.LinkInfo.SlaveData.Hairpin {
			continue
		}
		if out, err := m.exec(ctx, "ip", "link", "set", "dev", p.Name, "type", "bridge_slave", "hairpin", "on").CombinedOutput(); err != nil {
			return fmt.Errorf("hairpin on port %s of bridge %s: %v: %s", p.Name, bridge, err, strings.TrimSpace(string(out)))
		}
		m.log.Debug("hairpin enabled", "bridge", bridge, "port", p.Name)
	}
	return nil
}
