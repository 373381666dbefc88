package e2e

import (
	"context"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/fabricnet/fabric/lab"
)

// TestThreeMemberEtcdOneDown: with one of three etcd members stopped, agents
// still start, lease distinct subnets and route to each other.
func TestThreeMemberEtcdOneDown(t *testing.T) {
	t.Parallel()
	f := newFabric(t, lab.Spec{Hosts: 2, EtcdMembers: 3})
	if err := f.lab.StopEtcdMember(0); err != nil {
		t.Fatal(err)
	}
	hosts := f.lab.Hosts()
	for _, h := range hosts {
		f.start(h)
	}
	if a, b := f.subnet(hosts[0]), f.subnet(hosts[1]); a == b {
		t.Fatalf("both hosts got %s", a)
	}
	for _, h := range hosts {
		f.eventually(20*time.Second, h.Name+" routes", func() error { return f.routesTo(h, f.otherSubnets(h, hosts)) })
	}
	out, err := f.fabricctl(hosts[0], "ipam", "show")
	if err != nil {
		t.Fatalf("ipam show with a member down: %v\n%s", err, out)
	}
	t.Logf("ipam show with etcd member 0 stopped:\n%s", out)
}

// TestEtcdAwayKeepsDataPlane: when etcd goes away entirely, agents keep their
// routes and containers keep talking; when it returns, a new host is seen.
func TestEtcdAwayKeepsDataPlane(t *testing.T) {
	t.Parallel()
	f := newFabric(t, lab.Spec{Hosts: 2}, "--resync", "1s")
	hosts := f.lab.Hosts()
	for _, h := range hosts {
		f.start(h)
	}
	for _, h := range hosts {
		f.eventually(20*time.Second, h.Name+" routes", func() error { return f.routesTo(h, f.otherSubnets(h, hosts)) })
	}
	c1, c2 := f.container(hosts[0], "c1", 2), f.container(hosts[1], "c1", 2)
	if err := f.lab.StopEtcdMember(0); err != nil {
		t.Fatal(err)
	}
	// Longer than the node TTL (10 s): the records would have expired if
	// etcd were judging liveness, but etcd is gone and the agents keep going.
	deadline := time.Now().Add(12 * time.Second)
	for time.Now().Before(deadline) {
		if err := ping(c1, c2.Addr); err != nil {
			t.Fatalf("container traffic broke while etcd was away: %v", err)
		}
		time.Sleep(time.Second)
	}
	st, err := f.status(hosts[0])
	if err != nil {
		t.Fatal(err)
	}
	if st.EtcdHealthy {
		t.Errorf("status says etcd is reachable while it is stopped")
	}
	if err := f.lab.StartEtcdMember(0); err != nil {
		t.Fatal(err)
	}
	h3, err := f.lab.AddHost(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	f.start(h3)
	s3 := f.subnet(h3)
	// The etcd client reconnects with a backoff, so allow for it.
	d := f.eventually(45*time.Second, "host1 learns the host that joined after etcd came back", func() error {
		if _, ok := f.ownedRoutes(hosts[0])[s3.String()]; !ok {
			return fmt.Errorf("no route to %s", s3)
		}
		return nil
	})
	t.Logf("host1 routed to the host that joined after etcd returned %.1fs after that host's agent answered", d.Seconds())
	out, _ := f.fabricctl(hosts[0], "status")
	if !strings.Contains(out, "reachable") {
		t.Errorf("status after etcd returned:\n%s", out)
	}
}

// TestNodeRecordGoneSessionUp: a host's node record vanishes from etcd (its
// liveness lease expired while it was cut off from etcd, say) while its BGP
// session and data plane work: the other hosts keep routing to it.
func TestNodeRecordGoneSessionUp(t *testing.T) {
	t.Parallel()
	f := newFabric(t, lab.Spec{Hosts: 2})
	hosts := f.lab.Hosts()
	for _, h := range hosts {
		f.start(h)
	}
	h1, h2 := hosts[0], hosts[1]
	s2 := f.subnet(h2)
	f.eventually(20*time.Second, "host1 routes to host2", func() error { return f.routesTo(h1, []netip.Prefix{s2}) })
	cli, err := f.lab.EtcdClient()
	if err != nil {
		t.Fatal(err)
	}
	defer cli.Close()
	// host2's agent puts its record back soon; until then the record is
	// gone while the session is up, which is the window under test.
	if _, err := cli.Delete(t.Context(), "/fabric/v1/nodes/"+h2.Name); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(4 * time.Second)
	for time.Now().Before(deadline) {
		if _, ok := f.ownedRoutes(h1)[s2.String()]; !ok {
			t.Fatalf("host1 dropped its route to host2 when host2's node record vanished, though their session is up")
		}
		time.Sleep(100 * time.Millisecond)
	}
	ps, err := f.peers(h1)
	if err != nil || len(ps) != 1 || ps[0].State != "established" {
		t.Fatalf("host1's peers after host2's record vanished: %+v %v", ps, err)
	}
}

// TestNodeRecordWithoutLeaseIgnored: a node record whose subnet is not leased
// to that node (here 0.0.0.0/0, which would turn a "from node" rule into
// "from anywhere") is refused by every host: no peer, no tunnel entry, and a
// policy rule naming that node matches nothing.
func TestNodeRecordWithoutLeaseIgnored(t *testing.T) {
	t.Parallel()
	f := newFabric(t, lab.Spec{Hosts: 2})
	hosts := f.startMesh()
	h1 := hosts[0]
	cli, err := f.lab.EtcdClient()
	if err != nil {
		t.Fatal(err)
	}
	defer cli.Close()
	evil := `{"name":"evil","address":"192.168.100.99","asn":64512,"subnet":"0.0.0.0/0","vtepMAC":"0e:fa:c0:a8:64:63","encaps":["vxlan"],"version":"x","machineID":"m"}`
	if _, err := cli.Put(t.Context(), "/fabric/v1/nodes/evil", evil); err != nil {
		t.Fatal(err)
	}
	policyFile := filepath.Join(f.lab.LogDir(), "deny-evil.yaml")
	os.WriteFile(policyFile, []byte("rules:\n  - name: deny-evil\n    action: deny\n    from: [{node: evil}]\n"), 0o644)
	if out, err := f.fabricctl(h1, "policy", "apply", "-f", policyFile); err != nil {
		t.Fatalf("policy apply: %v %s", err, out)
	}
	f.eventually(10*time.Second, "host1 refuses the record", func() error {
		log, _ := os.ReadFile(f.agents[h1.Name].proc.LogPath())
		if !strings.Contains(string(log), "its subnet 0.0.0.0/0 is not leased to it") {
			return fmt.Errorf("no refusal logged")
		}
		return nil
	})
	if ps, _ := f.peers(h1); len(ps) != 1 {
		t.Errorf("host1 peers with %v, want only host2", ps)
	}
	ctx := context.Background()
	if neigh, _ := h1.Run(ctx, "ip", "neigh", "show", "dev", "fabric.vxlan"); strings.Contains(neigh, "0.0.0.0") {
		t.Errorf("a VXLAN neighbour entry keyed by the /0 record:\n%s", neigh)
	}
	// The rule naming the refused node must not become "from anywhere":
	// containers still reach each other, and no line of it lacks a source.
	f.containersTalk(hosts)
	rules, _ := h1.Run(ctx, "iptables", "-S", "FABRIC-POLICY")
	for _, line := range strings.Split(rules, "\n") {
		if strings.Contains(line, "deny-evil") && !strings.Contains(line, "-s ") {
			t.Errorf("a rule for the refused node matches every source: %s", line)
		}
	}
}

// TestMalformedPolicyAtBootFailsClosed: a host that boots while a stored
// policy value is malformed enforces the valid rules with default deny
// (nothing a malformed deny rule might have closed is open), and the stored
// policy once the value is fixed.
func TestMalformedPolicyAtBootFailsClosed(t *testing.T) {
	t.Parallel()
	f := newFabric(t, lab.Spec{Hosts: 2})
	cli, err := f.lab.EtcdClient()
	if err != nil {
		t.Fatal(err)
	}
	defer cli.Close()
	if _, err := cli.Put(t.Context(), "/fabric/v1/policy/junk", "{not json"); err != nil {
		t.Fatal(err)
	}
	hosts := f.startMesh()
	h1, h2 := hosts[0], hosts[1]
	target := f.container(h1, "target", 2)
	client := f.container(h2, "client", 2)
	if _, err := target.Start("serve", filepath.Join(binDir, "tcpprobe"), "serve", target.Addr.String()+":80", "1000"); err != nil {
		t.Fatal(err)
	}
	// The server answers (asked from its own namespace, which policy does
	// not filter), so a refusal below is policy, not a server not yet up.
	f.eventually(10*time.Second, "the server listens", func() error {
		ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
		defer cancel()
		_, err := target.Run(ctx, filepath.Join(binDir, "tcpprobe"), "dial", target.Addr.String()+":80")
		return err
	})
	f.eventually(10*time.Second, "default deny in force at boot", func() error { return tcpBlockedFrom(client, target.Addr, 80) })
	log, _ := os.ReadFile(f.agents[h1.Name].proc.LogPath())
	if !strings.Contains(string(log), "enforcing the valid rules with default deny") {
		t.Errorf("fabricd does not say why it denies")
	}
	if _, err := cli.Delete(t.Context(), "/fabric/v1/policy/junk"); err != nil {
		t.Fatal(err)
	}
	f.eventually(10*time.Second, "the stored policy (allow) once the value is fixed", func() error { return tcpOKFrom(client, target.Addr, 80) })
}
