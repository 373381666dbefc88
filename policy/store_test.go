package policy

import (
	"context"
	"errors"
	"log/slog"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/fabricnet/fabric/internal/etcdtest"
	"github.com/fabricnet/fabric/internal/testlog"
)

func TestStoreRoundTrip(t *testing.T) {
	cli := etcdtest.Start(t).Client(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	const prefix = "/fabric"

	doc, err := ParseDocument("policy.yaml", []byte(goodYAML))
	if err != nil {
		t.Fatal(err)
	}
	if err := PutDocument(ctx, cli, prefix, doc); err != nil {
		t.Fatal(err)
	}
	got, err := Get(ctx, cli, prefix)
	if err != nil {
		t.Fatal(err)
	}
	want := Policy{DefaultAction: "deny", Rules: []Rule{doc.Rules[1], doc.Rules[0]}} // order 0 before 10
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("got %+v\nwant %+v", got, want)
	}

	// A batch with one invalid rule stores nothing.
	bad := []Rule{{Name: "fine", Action: "allow"}, {Name: "broken", Action: "block"}}
	if err := Put(ctx, cli, prefix, bad); err == nil || !strings.Contains(err.Error(), `rule "broken"`) {
		t.Fatalf("invalid batch: %v", err)
	}
	rules, err := List(ctx, cli, prefix)
	if err != nil {
		t.Fatal(err)
	}
	if len(rules) != 2 {
		t.Fatalf("refused batch left rules behind: %+v", rules)
	}

	if err := Delete(ctx, cli, prefix, "web"); err != nil {
		t.Fatal(err)
	}
	err = Delete(ctx, cli, prefix, "web")
	if !errors.Is(err, ErrNotFound) || !strings.Contains(err.Error(), `"web"`) {
		t.Fatalf("deleting an absent rule: %v", err)
	}
	if rules, _ := List(ctx, cli, prefix); len(rules) != 1 || rules[0].Name != "ping" {
		t.Fatalf("after delete: %+v", rules)
	}
}

// apply -f makes the stored policy the file's: a rule taken out of the file
// goes, the default action stays unless the file sets one, and a file that
// only renames a rule leaves no stale copy.
func TestReplaceDocument(t *testing.T) {
	cli := etcdtest.Start(t).Client(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	const prefix = "/fabric"
	doc, err := ParseDocument("policy.yaml", []byte(goodYAML))
	if err != nil {
		t.Fatal(err)
	}
	if err := PutDocument(ctx, cli, prefix, doc); err != nil {
		t.Fatal(err)
	}
	smaller := Document{Rules: []Rule{{Name: "web2", Action: "allow", Protocol: "tcp", Ports: doc.Rules[0].Ports}}}
	removed, err := ReplaceDocument(ctx, cli, prefix, smaller)
	if err != nil {
		t.Fatal(err)
	}
	got, err := Get(ctx, cli, prefix)
	if err != nil {
		t.Fatal(err)
	}
	if len(got.Rules) != 1 || got.Rules[0].Name != "web2" || got.DefaultAction != "deny" {
		t.Errorf("after replace: %+v, want web2 alone and default deny kept", got)
	}
	if strings.Join(removed, ",") != "ping,web" {
		t.Errorf("removed %v, want ping and web", removed)
	}
}

func TestWatchFollowsChangesAndHoldsOnMalformed(t *testing.T) {
	cli := etcdtest.Start(t).Client(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	const prefix = "/fabric"
	logs := &testlog.Buffer{}
	logger := slog.New(slog.NewTextHandler(logs, nil))

	deny80 := Rule{Name: "deny-80", Action: "deny", Protocol: "tcp", Ports: []PortRange{{80, 80}}}
	if err := Put(ctx, cli, prefix, []Rule{deny80}); err != nil {
		t.Fatal(err)
	}
	ch := WatchPolicy(ctx, cli, prefix, logger)
	next := func(what string) Policy {
		t.Helper()
		select {
		case p := <-ch:
			return p
		case <-time.After(15 * time.Second): // a loaded CI etcd, not the latency (logged below)
			t.Fatalf("no policy update within 15s: %s", what)
		}
		return Policy{}
	}
	if p := next("initial"); len(p.Rules) != 1 || p.DefaultAction != "allow" {
		t.Fatalf("initial: %+v", p)
	}

	start := time.Now()
	if err := SetDefaultAction(ctx, cli, prefix, "deny"); err != nil {
		t.Fatal(err)
	}
	if p := next("default deny"); p.DefaultAction != "deny" || len(p.Rules) != 1 {
		t.Fatalf("after default change: %+v", p)
	}
	t.Logf("watch latency: %s", time.Since(start))

	// A malformed rule must not drop deny-80: no update is sent and the
	// problem is logged with its key.
	if _, err := cli.Put(ctx, RuleKey(prefix, "evil"), `{"name":"evil","action":"allow","from":[{"cidr":"bogus"}]}`); err != nil {
		t.Fatal(err)
	}
	if err := Delete(ctx, cli, prefix, "deny-80"); err != nil {
		t.Fatal(err)
	}
	// The watch has seen both writes once it logged the malformed key.
	for deadline := time.Now().Add(15 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		if l := logs.String(); strings.Contains(l, "/fabric/policy/evil") && strings.Contains(l, "ERROR") {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("malformed key not logged loudly within 15s:\n%s", logs.String())
		}
	}
	select {
	case p := <-ch:
		t.Fatalf("update sent while a stored rule is malformed: %+v", p)
	case <-time.After(500 * time.Millisecond):
	}

	// Fixing the key releases the current state.
	if _, err := cli.Delete(ctx, RuleKey(prefix, "evil")); err != nil {
		t.Fatal(err)
	}
	if p := next("after fix"); len(p.Rules) != 0 || p.DefaultAction != "deny" {
		t.Fatalf("after fix: %+v", p)
	}
}

// A malformed stored value at start, when no policy is in force yet: the
// valid rules are enforced with default deny (fail closed), whatever default
// is stored. Once the value is fixed, the stored policy is sent.
func TestWatchFailsClosedAtStartWhileStoreIsMalformed(t *testing.T) {
	cli := etcdtest.Start(t).Client(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	const prefix = "/fabric"
	if err := PutDocument(ctx, cli, prefix, Document{DefaultAction: ActionAllow, Rules: []Rule{{Name: "allow-web", Action: "allow", Protocol: "tcp", Ports: []PortRange{{80, 80}}}}}); err != nil {
		t.Fatal(err)
	}
	if _, err := cli.Put(ctx, RuleKey(prefix, "junk"), "{not json"); err != nil {
		t.Fatal(err)
	}
	if _, err := Get(ctx, cli, prefix); err == nil || !strings.Contains(err.Error(), "/fabric/policy/junk") {
		t.Fatalf("Get with malformed value: %v", err)
	}
	ch := WatchPolicy(ctx, cli, prefix, slog.New(slog.DiscardHandler))
	select {
	case p := <-ch:
		if len(p.Rules) != 1 || p.Rules[0].Name != "allow-web" || p.DefaultAction != ActionDeny {
			t.Fatalf("at start with a malformed value: %+v, want allow-web with default deny", p)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("nothing sent at start: the host would have no policy at all")
	}
	if _, err := cli.Delete(ctx, RuleKey(prefix, "junk")); err != nil {
		t.Fatal(err)
	}
	select {
	case p := <-ch:
		if len(p.Rules) != 1 || p.DefaultAction != ActionAllow {
			t.Fatalf("after the fix: %+v, want the stored default allow", p)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("nothing sent after the malformed value was deleted")
	}
}
