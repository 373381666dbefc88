package e2e

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/fabricnet/fabric/lab"

	"github.com/fabricnet/fabric/internal/testreq"
)

// TestDenyHoldsWhileForwardIsRewritten is the attack of the architecture
// issue: with a deny policy in force, other programs keep putting their own
// jumps at the top of FORWARD (as dockerd does with DOCKER-USER on every
// restart) and a real dockerd restarts, while a client keeps connecting to
// the denied port. Not one connection may get through. Before the iptables
// owner, nat and policy each moved their own jump to the top on their own
// timers, and for a moment FABRIC-FORWARD's accept ran before FABRIC-POLICY.
func TestDenyHoldsWhileForwardIsRewritten(t *testing.T) {
	t.Parallel()
	if reason := lab.DockerMissing(); reason != "" {
		testreq.Missing(t, "%s", reason)
	}
	f := newFabric(t, lab.Spec{Hosts: 2})
	hosts := f.startMesh()
	client, server := hosts[0], hosts[1]

	// A real dockerd on the server host, adopting fabricd's docker0.
	startDockerd := func() *lab.Dockerd { return f.startDockerd(server).d }
	dockerd := startDockerd()

	srv := f.container(server, "srv", 2)
	cli := f.container(client, "cli", 2)
	for _, port := range []int{8000, 8001} {
		if _, err := srv.Start(fmt.Sprintf("serve%d", port), filepath.Join(binDir, "tcpprobe"), "serve", fmt.Sprintf("%s:%d", srv.Addr, port), "1000000"); err != nil {
			t.Fatal(err)
		}
		f.eventually(10*time.Second, fmt.Sprintf("tcp to %d before any policy", port), func() error { return tcpOKFrom(cli, srv.Addr, port) })
	}

	policyFile := filepath.Join(f.lab.LogDir(), "deny-8000.yaml")
	if err := os.WriteFile(policyFile, []byte(`rules:
  - name: deny-8000-from-client
    action: deny
    from: [{node: `+client.Name+`}]
    protocol: tcp
    ports: [8000]
`), 0o644); err != nil {
		t.Fatal(err)
	}
	if out, err := f.fabricctl(client, "policy", "apply", "-f", policyFile); err != nil {
		t.Fatalf("policy apply: %v: %s", err, out)
	}
	f.eventually(10*time.Second, "deny in force", func() error { return tcpBlockedFrom(cli, srv.Addr, 8000) })

	// Another owner of FORWARD: its own chain, which returns, jumped to from
	// the top of FORWARD every 200 ms.
	inServer := func(args ...string) (string, error) {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		return server.Run(ctx, args[0], args[1:]...)
	}
	if out, err := inServer("iptables", "-N", "OTHER-TOOL"); err != nil {
		t.Fatalf("iptables -N OTHER-TOOL: %v: %s", err, out)
	}
	const window = 30 * time.Second
	stop := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(2)
	insertions := 0
	go func() {
		defer wg.Done()
		for {
			select {
			case <-stop:
				return
			case <-time.After(200 * time.Millisecond):
			}
			if _, err := inServer("iptables", "-I", "FORWARD", "1", "-j", "OTHER-TOOL"); err == nil {
				insertions++
			}
		}
	}()
	restarts := 0
	go func() {
		defer wg.Done()
		select {
		case <-stop:
			return
		case <-time.After(window / 3):
		}
		// dockerd restarts: on start it re-inserts its jumps (DOCKER-USER
		// first) at the top of FORWARD.
		if err := dockerd.Stop(); err != nil {
			t.Errorf("stop dockerd: %v", err)
		}
		dockerd = startDockerd()
		restarts++
	}()

	outcomes := map[string]int{}
	deadline := time.Now().Add(window)
	for time.Now().Before(deadline) {
		_, err := dial(cli, srv.Addr, 8000, 1500*time.Millisecond)
		switch {
		case err == nil:
			outcomes["connected"]++
		case strings.Contains(err.Error(), "refused"):
			outcomes["refused"]++
		default:
			outcomes["other: "+err.Error()]++
		}
		time.Sleep(50 * time.Millisecond)
	}
	close(stop)
	wg.Wait()
	forward, _ := inServer("iptables", "-S", "FORWARD")
	t.Logf("%s of connection attempts to the denied port; %d foreign jumps inserted, %d dockerd restart(s); FORWARD now:\n%s",
		window, insertions, restarts, forward)
	for what, n := range outcomes {
		t.Logf("  %-40s %d", what, n)
	}
	if outcomes["connected"] > 0 {
		t.Errorf("%d denied connections got through", outcomes["connected"])
	}
	if outcomes["refused"] < 20 || insertions < 20 || restarts != 1 {
		t.Errorf("the window did not test enough: %d refused, %d insertions, %d restarts", outcomes["refused"], insertions, restarts)
	}
	// The allowed port still works: the denials were policy, not broken routing.
	if err := tcpOKFrom(cli, srv.Addr, 8001); err != nil {
		t.Errorf("allowed port after the window: %v", err)
	}
}
