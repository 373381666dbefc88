package e2e

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/fabricnet/fabric/lab"
)

// TestHitlessRestart: fabricd restarting, crashing or being upgraded on one
// host is not an event for the data plane. 10 ms ping streams run in both
// directions between a container on the restarting host and containers on
// two others; not one packet may be lost, and `ip monitor route` on every
// host shows no route of the fabric deleted.
func TestHitlessRestart(t *testing.T) {
	t.Parallel()
	f := newFabric(t, lab.Spec{Hosts: 3}, "--bgp-hold-time", "3s", "--bgp-keepalive", "1s", "--graceful-restart-time", "30s")
	hosts := f.startMesh()
	ctrs := f.containersTalk(hosts)
	// host2 restarts: host1 dials it (lower address), it dials host3.
	target := hosts[1]
	others := []*lab.Host{hosts[0], hosts[2]}

	// "Another build of fabricd": the same source with another version
	// stamped in, as a package upgrade would bring.
	upgraded := filepath.Join(t.TempDir(), "fabricd")
	build := exec.Command("go", "build", "-o", upgraded, "-ldflags", "-X github.com/fabricnet/fabric/version.Version=upgrade-test", "./cmd/fabricd")
	build.Dir = ".."
	build.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("build the upgrade: %v\n%s", err, out)
	}

	for _, sc := range []struct {
		name string
		stop func(a *agentProc) error
		bin  string
	}{
		{"SIGTERM then start", func(a *agentProc) error { return a.proc.Stop() }, ""},
		{"SIGKILL then start", func(a *agentProc) error { return a.proc.Kill() }, ""},
		{"upgrade to another build", func(a *agentProc) error { return a.proc.Stop() }, upgraded},
	} {
		t.Run(sc.name, func(t *testing.T) {
			g := *f
			g.t = t
			monitors := map[string]*lab.Process{}
			for _, h := range hosts {
				m, err := h.Start("route-monitor-"+strings.ReplaceAll(sc.name, " ", "-"), "ip", "monitor", "route")
				if err != nil {
					t.Fatal(err)
				}
				monitors[h.Name] = m
			}
			const stream = 14 * time.Second
			var wg sync.WaitGroup
			results := map[string]string{}
			var mu sync.Mutex
			pingStream := func(from, to *lab.Host) {
				defer wg.Done()
				ctx, cancel := context.WithTimeout(context.Background(), stream+10*time.Second)
				defer cancel()
				out, err := ctrs[from.Name].Run(ctx, "ping", "-q", "-i", "0.01", "-w", strconv.Itoa(int(stream/time.Second)), ctrs[to.Name].Addr.String())
				mu.Lock()
				defer mu.Unlock()
				if err != nil && !strings.Contains(out, "packets transmitted") {
					results[from.Name+"->"+to.Name] = "error: " + err.Error() + ": " + out
					return
				}
				results[from.Name+"->"+to.Name] = out
			}
			for _, o := range others {
				wg.Add(2)
				go pingStream(target, o)
				go pingStream(o, target)
			}

			time.Sleep(3 * time.Second)
			// BFD runs with the target: a restart must not undo graceful
			// restart through it (AdminDown on a stop; on a SIGKILL the
			// target's kernel still answers).
			for _, o := range others {
				g.eventually(10*time.Second, o.Name+"'s BFD session with "+target.Name+" up", func() error {
					ps, err := g.peers(o)
					if err != nil {
						return err
					}
					for _, p := range ps {
						if p.Name == target.Name && p.BFD == "up" {
							return nil
						}
					}
					return fmt.Errorf("peers %+v", ps)
				})
			}
			logFrom := map[string]int64{}
			for _, o := range others {
				if fi, err := os.Stat(f.agents[o.Name].proc.LogPath()); err == nil {
					logFrom[o.Name] = fi.Size()
				}
			}
			a := f.agents[target.Name]
			if err := sc.stop(a); err != nil {
				t.Fatalf("stop fabricd on %s: %v", target.Name, err)
			}
			args := a.args
			if sc.bin != "" {
				args = append([]string{sc.bin}, args[1:]...)
			}
			p, err := target.Start("fabricd", args...)
			if err != nil {
				t.Fatal(err)
			}
			a.proc = p
			restarted := time.Now()
			wg.Wait()
			for _, m := range monitors {
				m.Stop()
			}

			// The restarted agent is back in the fabric.
			g.eventually(30*time.Second, target.Name+" answers after the restart", func() error { _, err := g.status(target); return err })
			g.eventually(40*time.Second, target.Name+" sessions re-established", func() error { return g.allEstablished(target, 2) })
			st, _ := g.status(target)
			t.Logf("%s: fabricd %s back; sessions up %.1fs after the start", sc.name, st.Version, time.Since(restarted).Seconds())
			if sc.bin != "" && st.Version != "upgrade-test" {
				t.Errorf("upgraded fabricd reports version %q, want upgrade-test", st.Version)
			}

			lossRE := regexp.MustCompile(`(\d+) packets transmitted, (\d+) received`)
			for pair, out := range results {
				m := lossRE.FindStringSubmatch(out)
				if m == nil {
					t.Errorf("%s: no ping summary: %s", pair, out)
					continue
				}
				sent, _ := strconv.Atoi(m[1])
				got, _ := strconv.Atoi(m[2])
				t.Logf("%s: %s ping %s: %d sent, %d received, %d lost", sc.name, "10ms", pair, sent, got, sent-got)
				if sent < 500 || got != sent {
					t.Errorf("%s: %d of %d packets lost (want 0 of at least 500)", pair, sent-got, sent)
				}
			}
			// What the others' BFD made of it. A stop says AdminDown: no
			// failure. A SIGKILL goes down one of two ways, neither of which
			// may drop routes: silence that the target's live kernel
			// explains, or, when fabricd is back before the detection time,
			// its new session saying Down without a reason.
			for _, o := range others {
				log, _ := os.ReadFile(f.agents[o.Name].proc.LogPath())
				said := string(log[min(logFrom[o.Name], int64(len(log))):])
				sawDown := strings.Contains(said, `msg="bfd session down" component=bfd peer=`+target.Addr.String())
				switch {
				case strings.Contains(said, "dropped its routes"):
					t.Errorf("%s: %s dropped %s's routes on a BFD failure", sc.name, o.Name, target.Name)
				case sc.name == "SIGKILL then start" && !sawDown:
					t.Errorf("%s: %s's BFD never saw %s go down", sc.name, o.Name, target.Name)
				case sc.name != "SIGKILL then start" && strings.Contains(said, "bfd session failed"):
					t.Errorf("%s: %s took a stop for a BFD failure (no AdminDown?)", sc.name, o.Name)
				}
			}
			subnets := []string{}
			for _, h := range hosts {
				subnets = append(subnets, f.subnet(h).String())
			}
			for name, m := range monitors {
				log, _ := os.ReadFile(m.LogPath())
				for _, line := range strings.Split(string(log), "\n") {
					if !strings.HasPrefix(line, "Deleted") {
						continue
					}
					for _, s := range subnets {
						if strings.HasPrefix(strings.TrimPrefix(line, "Deleted "), s) {
							t.Errorf("%s: ip monitor route on %s: %s", sc.name, name, line)
						}
					}
				}
			}
		})
	}
}
