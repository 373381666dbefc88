package main

import (
	"context"
	"encoding/json"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/fabricnet/fabric/internal/etcdtest"
	"github.com/fabricnet/fabric/ipam"
	"github.com/fabricnet/fabric/names"
)

// fabricctl containers shows which record DNS answers for each name, and
// why it refuses the others, against a real etcd.
func TestContainersShowsAnswersAndRefusals(t *testing.T) {
	bin := fabricctlPath
	c := etcdtest.Start(t)
	cli := c.Client(t)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	const prefix = "/fabric/v1"
	pool := &ipam.Pool{Network: netip.MustParsePrefix("10.244.0.0/16"), SubnetLen: 24}
	subnets := map[string]netip.Prefix{}
	for i, node := range []string{"host1", "host2"} {
		m, err := ipam.New(ipam.Options{Client: cli, Prefix: prefix, Node: node, MachineID: "m-" + node,
			HostAddr: netip.AddrFrom4([4]byte{192, 0, 2, byte(i + 1)}), Pool: pool})
		if err != nil {
			t.Fatal(err)
		}
		l, err := m.Acquire(ctx)
		if err != nil {
			t.Fatal(err)
		}
		subnets[node] = l.Subnet
	}
	in := func(node string, n int) netip.Addr {
		a := subnets[node].Addr()
		for range n {
			a = a.Next()
		}
		return a
	}
	put := func(r names.Record) {
		b, _ := json.Marshal(r)
		if _, err := cli.Put(ctx, names.Key(prefix, r), string(b)); err != nil {
			t.Fatal(err)
		}
	}
	put(names.Record{Name: "web", Node: "host1", Address: in("host1", 2), ID: "a", Created: time.Unix(200, 0)})
	put(names.Record{Name: "web", Node: "host2", Address: in("host2", 2), ID: "b", Created: time.Unix(100, 0)})
	put(names.Record{Name: "bank", Node: "host2", Address: in("host1", 3), ID: "c", Created: time.Unix(100, 0)})

	out, err := exec.Command(bin, "--etcd-endpoints", c.Endpoint(0), "containers").CombinedOutput()
	if err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	lines := strings.Split(strings.TrimSpace(string(out)), "\n")
	find := func(name, node string) string {
		for _, l := range lines {
			f := strings.Fields(l)
			if len(f) >= 4 && f[0] == name && f[3] == node {
				return l
			}
		}
		t.Fatalf("no row for %s on %s in:\n%s", name, node, out)
		return ""
	}
	if row := find("web", "host2"); !strings.Contains(row, "yes") {
		t.Errorf("host2's web (older) should answer: %q", row)
	}
	if row := find("web", "host1"); !strings.Contains(row, "no: host2's is older") {
		t.Errorf("host1's web should be shadowed: %q", row)
	}
	if row := find("bank", "host2"); !strings.Contains(row, "no: address "+in("host1", 3).String()+" is not in a subnet leased to host2") {
		t.Errorf("bank should be refused with the reason: %q", row)
	}

	out, err = exec.Command(bin, "--etcd-endpoints", c.Endpoint(0), "--json", "containers").Output()
	var entries []names.Entry
	if err != nil || json.Unmarshal(out, &entries) != nil || len(entries) != 3 {
		t.Fatalf("--json containers: %v\n%s", err, out)
	}
}

// What `policy list -o yaml` prints, `policy apply -f -` takes back: the
// same rules and default action, through a real etcd.
func TestPolicyListYAMLRoundTrips(t *testing.T) {
	bin := fabricctlPath
	ep := etcdtest.Start(t).Endpoint(0)
	run := func(stdin string, args ...string) string {
		t.Helper()
		cmd := exec.Command(bin, append([]string{"--etcd-endpoints", ep}, args...)...)
		cmd.Stdin = strings.NewReader(stdin)
		out, err := cmd.CombinedOutput()
		if err != nil {
			t.Fatalf("fabricctl %v: %v\n%s", args, err, out)
		}
		return string(out)
	}
	run(`defaultAction: deny
rules:
  - name: frontends-to-backends
    order: 10
    action: allow
    from: [{label: role=frontend}, {node: host1}]
    to: [{label: role=backend}]
    protocol: tcp
    ports: [80, "8000-8100"]
  - name: ping
    order: 20
    action: allow
    from: [{cidr: 10.244.0.0/16}]
    protocol: icmp
`, "policy", "apply", "-f", "-")
	before := run("", "policy", "list", "-o", "json")
	listed := run("", "policy", "list", "-o", "yaml")
	if !strings.Contains(listed, "defaultAction: deny") || !strings.Contains(listed, "label: role=frontend") {
		t.Fatalf("policy list -o yaml:\n%s", listed)
	}
	// Wipe (apply makes the stored policy the file's: rules not in it go)
	// and apply the listing back.
	wiped := run("defaultAction: allow\nrules: []\n", "policy", "apply", "-f", "-")
	if !strings.Contains(wiped, "removed 2 rule(s) not in the file: frontends-to-backends, ping") {
		t.Errorf("apply of a file without the rules said %q", wiped)
	}
	if got := run("", "policy", "list", "-o", "json"); got == before || strings.Contains(got, "frontends-to-backends") {
		t.Fatalf("the wipe left %s: the round trip would prove nothing", got)
	}
	run(listed, "policy", "apply", "-f", "-")
	if after := run("", "policy", "list", "-o", "json"); after != before {
		t.Errorf("after list -o yaml | apply -f -:\n%s\nwant\n%s", after, before)
	}
	// A bad -o is a usage error (exit 2).
	cmd := exec.Command(bin, "--etcd-endpoints", ep, "policy", "list", "-o", "xml")
	out, err := cmd.CombinedOutput()
	if ee, ok := err.(*exec.ExitError); !ok || ee.ExitCode() != 2 || !strings.Contains(string(out), "want table, wide, json or yaml") {
		t.Errorf("-o xml: %v %s", err, out)
	}
}

// On a fabric host fabricctl finds etcd in fabricd's settings file; the
// environment and flags still win.
func TestEtcdFromFabricdSettingsFile(t *testing.T) {
	bin := fabricctlPath
	ep := etcdtest.Start(t).Endpoint(0)
	dir := t.TempDir()
	settings := filepath.Join(dir, "fabricd.yaml")
	os.WriteFile(settings, []byte("etcdEndpoints: ["+ep+"]\netcdPrefix: /site-a\nencapsulation: auto\n"), 0o644)
	run := func(env []string, args ...string) (string, error) {
		cmd := exec.Command(bin, args...)
		cmd.Env = append(os.Environ(), env...)
		out, err := cmd.CombinedOutput()
		return string(out), err
	}
	out, err := run([]string{"FABRIC_CONFIG=" + settings}, "ipam", "init", "--pool", "10.244.0.0/16")
	if err != nil || !strings.Contains(out, "pool 10.244.0.0/16") {
		t.Fatalf("ipam init with etcd from the settings file: %v\n%s", err, out)
	}
	// IPv6 added to the stored pool; a pool too small for the hosts is refused, naming the size.
	if out, err := run([]string{"FABRIC_CONFIG=" + settings}, "ipam", "init", "--pool", "10.244.0.0/16", "--pool-v6", "fd00:10:244::/48"); err != nil || !strings.Contains(out, "IPv6 pool fd00:10:244::/48, /64 per host") {
		t.Errorf("ipam init --pool-v6: %v\n%s", err, out)
	}
	if out, err := run([]string{"FABRIC_CONFIG=" + settings}, "ipam", "init", "--pool", "10.244.0.0/16", "--pool-v6", "fd00:10:244::/60"); err == nil || !strings.Contains(out, "must be /56 or larger") {
		t.Errorf("ipam init with too small an IPv6 pool: %v\n%s", err, out)
	}
	// The prefix came from the file too: the pool is under /site-a.
	if out, err := run(nil, "--etcd-endpoints", ep, "--etcd-prefix", "/site-a", "ipam", "show"); err != nil || !strings.Contains(out, "pool 10.244.0.0/16") {
		t.Errorf("pool not under the file's prefix: %v\n%s", err, out)
	}
	// A flag wins over the file.
	if out, err := run([]string{"FABRIC_CONFIG=" + settings}, "--etcd-endpoints", "http://127.0.0.1:1", "ipam", "show"); err == nil {
		t.Errorf("--etcd-endpoints did not win over the file:\n%s", out)
	}
	// A settings file that does not parse is a usage error naming it.
	bad := filepath.Join(dir, "bad.yaml")
	os.WriteFile(bad, []byte("etcdEndpoints: [\n"), 0o644)
	out, err = run([]string{"FABRIC_CONFIG=" + bad}, "ipam", "show")
	if ee, ok := err.(*exec.ExitError); !ok || ee.ExitCode() != 2 || !strings.Contains(out, bad) {
		t.Errorf("bad settings file: %v %s", err, out)
	}
}
