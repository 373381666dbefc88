package iptables

import (
	"slices"
	"strings"
	"testing"
)

// These tests need no root and no kernel: plan is a pure function, and
// restoreSim below applies its output the way iptables-restore --noflush
// does, so each test checks what the kernel would hold afterwards.

func TestSaveFormatHelpers(t *testing.T) {
	if got := saveQuote("fabric: a b"); got != `"fabric: a b"` {
		t.Errorf("saveQuote = %s", got)
	}
	if got := saveQuote("plain-word_1"); got != "plain-word_1" {
		t.Errorf("saveQuote = %s", got)
	}
	rule := `-m comment --comment "trick -j FABRIC-X \" quoted" -j MASQUERADE`
	if got := ruleTarget(rule); got != "MASQUERADE" {
		t.Errorf("ruleTarget(%s) = %q", rule, got)
	}
	if got := ruleTarget("-s 10.0.0.0/8 -g FABRIC-FORWARD"); got != "FABRIC-FORWARD" {
		t.Errorf("ruleTarget with -g = %q", got)
	}
}

var (
	policyJump = Jump{Table: "filter", From: "FORWARD", To: "FABRIC-POLICY", Why: "policy", Rank: RankPolicy}
	acceptJump = Jump{Table: "filter", From: "FORWARD", To: "FABRIC-FORWARD", Why: "accept fabric traffic", Rank: RankAccept}
	masqJump   = Jump{Table: "nat", From: "POSTROUTING", To: "FABRIC-POSTROUTING", Why: "masquerade", Rank: RankNAT}

	acceptSection = Section{
		Chains: []Chain{
			{Table: "filter", Name: "FABRIC-FORWARD", Rules: []string{"-s 10.244.0.0/16 -j ACCEPT"}},
			{Table: "nat", Name: "FABRIC-POSTROUTING", Rules: []string{"-s 10.244.1.0/24 ! -d 10.244.0.0/16 -j MASQUERADE"}},
		},
		Jumps: []Jump{acceptJump, masqJump},
	}
	policySection = Section{
		Chains: []Chain{{Table: "filter", Name: "FABRIC-POLICY", Rules: []string{
			"-m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
			"-p tcp -m tcp --dport 80 -j REJECT --reject-with tcp-reset",
		}}},
		Jumps: []Jump{policyJump},
	}
)

const dockerSave = `*filter
:INPUT ACCEPT [0:0]
:FORWARD DROP [0:0]
:OUTPUT ACCEPT [0:0]
:DOCKER - [0:0]
:DOCKER-USER - [0:0]
-A FORWARD -j DOCKER-USER
-A FORWARD -o docker0 -j DOCKER
-A DOCKER-USER -j RETURN
COMMIT
*nat
:PREROUTING ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
-A POSTROUTING -s 10.244.1.0/24 ! -o docker0 -j MASQUERADE
COMMIT
`

func mustParse(t *testing.T, save string) map[string]savedTable {
	t.Helper()
	tables, err := parseSave([]byte(save))
	if err != nil {
		t.Fatal(err)
	}
	return tables
}

func mustMerge(t *testing.T, sections map[string]Section) map[string]*desiredTable {
	t.Helper()
	want, err := merge(sections)
	if err != nil {
		t.Fatal(err)
	}
	return want
}

// converge applies plan's output to have until nothing is left to do, and
// fails if that takes more than one round: one write must be enough.
func converge(t *testing.T, want map[string]*desiredTable, have map[string]savedTable) map[string]savedTable {
	t.Helper()
	for table, payload := range plan(want, have) {
		have[table] = restoreSim(t, have[table], payload)
	}
	if again := plan(want, have); len(again) != 0 {
		t.Fatalf("a second plan still writes: %v", again)
	}
	return have
}

// restoreSim applies an iptables-restore --noflush payload to one table.
func restoreSim(t *testing.T, tbl savedTable, payload string) savedTable {
	t.Helper()
	if tbl.rules == nil {
		tbl.rules = map[string][]string{}
	}
	lines := strings.Split(strings.TrimSpace(payload), "\n")
	if !strings.HasPrefix(lines[0], "*") || lines[len(lines)-1] != "COMMIT" {
		t.Fatalf("payload is not one table transaction:\n%s", payload)
	}
	for _, l := range lines[1 : len(lines)-1] {
		switch {
		case strings.HasPrefix(l, ":"):
			name, _, _ := strings.Cut(l[1:], " ")
			if !tbl.has(name) {
				tbl.order = append(tbl.order, name)
			}
			tbl.rules[name] = nil
		case strings.HasPrefix(l, "-A "):
			chain, rule, _ := strings.Cut(l[3:], " ")
			if !tbl.has(chain) {
				t.Fatalf("-A to missing chain %s", chain)
			}
			tbl.rules[chain] = append(tbl.rules[chain], rule)
		case strings.HasPrefix(l, "-D "):
			chain, rule, _ := strings.Cut(l[3:], " ")
			i := slices.Index(tbl.rules[chain], rule)
			if i < 0 {
				t.Fatalf("-D of a rule that is not there: %s", l)
			}
			tbl.rules[chain] = slices.Delete(tbl.rules[chain], i, i+1)
		case strings.HasPrefix(l, "-I "):
			f := strings.SplitN(l[3:], " ", 3)
			if f[1] != "1" {
				t.Fatalf("insert at %s, want 1: %s", f[1], l)
			}
			if !tbl.has(ruleTarget(f[2])) {
				t.Fatalf("jump to a chain not declared yet: %s", l)
			}
			tbl.rules[f[0]] = slices.Insert(tbl.rules[f[0]], 0, f[2])
		case strings.HasPrefix(l, "-X "):
			name := l[3:]
			if len(tbl.rules[name]) > 0 {
				t.Fatalf("-X of non-empty chain %s", name)
			}
			for c, rs := range tbl.rules {
				for _, r := range rs {
					if ruleTarget(r) == name {
						t.Fatalf("-X of %s still referenced from %s", name, c)
					}
				}
			}
			tbl.order = slices.DeleteFunc(tbl.order, func(c string) bool { return c == name })
			delete(tbl.rules, name)
		default:
			t.Fatalf("unexpected payload line %q", l)
		}
	}
	return tbl
}

func targets(rules []string) []string {
	var out []string
	for _, r := range rules {
		out = append(out, ruleTarget(r))
	}
	return out
}

func TestPolicyJumpAlwaysPrecedesAccept(t *testing.T) {
	for _, c := range []struct {
		name    string
		forward []string // FORWARD before the plan
	}{
		{"empty", nil},
		{"dockerd put DOCKER-USER on top", []string{"-j DOCKER-USER", policyJump.Rule(), acceptJump.Rule(), "-o docker0 -j DOCKER"}},
		{"accept jump above policy", []string{acceptJump.Rule(), policyJump.Rule(), "-j DOCKER-USER"}},
		{"policy jump missing", []string{acceptJump.Rule(), "-j DOCKER-USER"}},
		{"duplicate accept jump", []string{policyJump.Rule(), acceptJump.Rule(), acceptJump.Rule()}},
		{"old jump text", []string{"-j FABRIC-POLICY", acceptJump.Rule()}},
	} {
		t.Run(c.name, func(t *testing.T) {
			have := mustParse(t, dockerSave)
			f := have["filter"]
			f.order = append(f.order, "FABRIC-POLICY", "FABRIC-FORWARD")
			f.rules["FORWARD"] = slices.Clone(c.forward)
			have["filter"] = f
			// Section names sort the other way round than the ranks, so
			// the order comes from the rank and nothing else.
			want := mustMerge(t, map[string]Section{"a-accept": acceptSection, "z-policy": policySection})
			got := converge(t, want, have)["filter"].rules["FORWARD"]
			if len(got) < 2 || got[0] != policyJump.Rule() || got[1] != acceptJump.Rule() {
				t.Fatalf("FORWARD = %q, want the policy jump, then the accept jump, first", got)
			}
			if n := slices.Index(targets(got)[2:], "FABRIC-FORWARD"); n >= 0 {
				t.Errorf("a second accept jump is left: %q", got)
			}
			for _, r := range c.forward {
				if !isFabric(ruleTarget(r)) && !slices.Contains(got, r) {
					t.Errorf("rule %q of another owner is gone: %q", r, got)
				}
			}
		})
	}
}

func TestJumpsInPlaceWriteNothing(t *testing.T) {
	have := mustParse(t, dockerSave)
	want := mustMerge(t, map[string]Section{"nat": acceptSection, "policy": policySection})
	have = converge(t, want, have)
	if p := plan(want, have); len(p) != 0 {
		t.Errorf("unchanged state planned a write: %v", p)
	}
	// A rule appended below ours by another owner changes nothing.
	f := have["filter"]
	f.rules["FORWARD"] = append(f.rules["FORWARD"], "-i eth9 -j ACCEPT")
	if p := plan(want, have); len(p) != 0 {
		t.Errorf("another owner's rule below ours planned a write: %v", p)
	}
	// A chain edited by hand is rewritten whole.
	f.rules["FABRIC-POLICY"] = f.rules["FABRIC-POLICY"][:1]
	p := plan(want, have)
	if !strings.Contains(p["filter"], ":FABRIC-POLICY - [0:0]") || strings.Contains(p["filter"], "-I FORWARD") {
		t.Errorf("a shortened chain should be redeclared, jumps left alone:\n%s", p["filter"])
	}
}

func TestLeftoversAndCleanup(t *testing.T) {
	have := mustParse(t, dockerSave+`*mangle
:PREROUTING ACCEPT [0:0]
:FABRIC-OLD - [0:0]
-A PREROUTING -j FABRIC-OLD
-A PREROUTING -j MARK --set-mark 1
-A FABRIC-OLD -j RETURN
COMMIT
`)
	want := mustMerge(t, map[string]Section{"nat": acceptSection})
	have = converge(t, want, have)
	if have["mangle"].has("FABRIC-OLD") || slices.Contains(targets(have["mangle"].rules["PREROUTING"]), "FABRIC-OLD") {
		t.Errorf("leftover chain FABRIC-OLD or its jump survived: %v", have["mangle"])
	}
	if !slices.Contains(have["mangle"].rules["PREROUTING"], "-j MARK --set-mark 1") {
		t.Errorf("another owner's mangle rule is gone")
	}

	// Withdrawing a section removes its chain and jump, nothing else.
	have = converge(t, mustMerge(t, map[string]Section{"nat": acceptSection, "policy": policySection}), have)
	have = converge(t, want, have)
	if have["filter"].has("FABRIC-POLICY") {
		t.Errorf("withdrawn policy chain is still there")
	}

	// Cleanup: nothing wanted.
	have = converge(t, nil, have)
	if lines := fabricRules(have); len(lines) != 0 {
		t.Errorf("fabric rules left after cleanup: %q", lines)
	}
	for _, tbl := range have {
		for _, c := range tbl.order {
			if isFabric(c) {
				t.Errorf("chain %s left after cleanup", c)
			}
		}
	}
	if got := have["filter"].rules["FORWARD"]; !slices.Equal(got, []string{"-j DOCKER-USER", "-o docker0 -j DOCKER"}) {
		t.Errorf("dockerd's FORWARD rules changed by cleanup: %q", got)
	}
}

func TestMergeRefusesConflicts(t *testing.T) {
	if _, err := merge(map[string]Section{"a": policySection, "b": policySection}); err == nil ||
		!strings.Contains(err.Error(), "claimed by sections a and b") {
		t.Errorf("two sections owning one chain: err = %v", err)
	}
	bad := Section{Chains: []Chain{{Table: "filter", Name: "DOCKER-USER"}}}
	if _, err := merge(map[string]Section{"a": bad}); err == nil || !strings.Contains(err.Error(), "does not start with FABRIC-") {
		t.Errorf("a section writing another owner's chain: err = %v", err)
	}
}
