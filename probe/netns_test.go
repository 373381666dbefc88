package probe

import (
	"context"
	"fmt"
	"net/netip"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/fabricnet/fabric/internal/nsthread"
	"github.com/fabricnet/fabric/lab"
)

// Helpers for tests on real network namespaces (see internal/nstest). Every
// namespace is named with a per-test prefix and deleted in t.Cleanup; links
// live inside namespaces and go with them.

// nsLab names namespaces "<prefix><role>", e.g. "pb1a2fA".
type nsLab struct {
	t      *testing.T
	prefix string
}

func newLab(t *testing.T) *nsLab {
	lab.RequireRoot(t)
	return &nsLab{t: t, prefix: lab.Prefix("pb")}
}

// ns creates namespace role with loopback up and returns its name.
func (l *nsLab) ns(role string) string {
	return lab.AddNS(l.t, l.prefix+role)
}

// startIn starts a Prober inside namespace name; it stops in t.Cleanup.
func startIn(t *testing.T, name string, cfg Config) *Prober {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	var p *Prober
	err := nsthread.Do(name, func() (err error) {
		p, err = Start(ctx, cfg)
		return err
	})
	if err != nil {
		cancel()
		t.Fatalf("starting prober in %s: %v", name, err)
	}
	t.Cleanup(func() {
		cancel()
		select {
		case <-p.Done():
		case <-time.After(5 * time.Second):
			t.Errorf("prober in %s did not stop", name)
		}
	})
	return p
}

// waitFor polls cond until it holds or timeout passes; it returns how long
// that took and whether cond held.
func waitFor(timeout time.Duration, cond func() bool) (time.Duration, bool) {
	start := time.Now()
	for {
		if cond() {
			return time.Since(start), true
		}
		if time.Since(start) > timeout {
			return time.Since(start), false
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// icmpCounter reads one Icmp counter (e.g. "OutDestUnreachs") of namespace ns.
func (l *nsLab) icmpCounter(ns, name string) int {
	lines := strings.Split(lab.Exec(l.t, ns, "cat", "/proc/net/snmp"), "\n")
	for i := 0; i+1 < len(lines); i++ {
		if !strings.HasPrefix(lines[i], "Icmp: ") || !strings.HasPrefix(lines[i+1], "Icmp: ") {
			continue
		}
		keys, values := strings.Fields(lines[i]), strings.Fields(lines[i+1])
		for j := range keys {
			if keys[j] == name && j < len(values) {
				n, err := strconv.Atoi(values[j])
				if err != nil {
					l.t.Fatalf("Icmp %s in %s: %v", name, ns, err)
				}
				return n
			}
		}
	}
	l.t.Fatalf("no Icmp counter %s in %s", name, ns)
	return 0
}

func drain(c <-chan struct{}) {
	select {
	case <-c:
	default:
	}
}

func fired(c <-chan struct{}) bool {
	select {
	case <-c:
		return true
	default:
		return false
	}
}

// successes is how many probes in a row peer has answered.
func (p *Prober) successes(peer netip.Addr) int {
	p.mu.Lock()
	defer p.mu.Unlock()
	if st := p.peers[peer]; st != nil {
		return st.successes
	}
	return 0
}

func describe(p *Prober, peer netip.Addr) string {
	works, reason, since := p.State(peer)
	return fmt.Sprintf("works=%v reason=%q since=%s", works, reason, since.Format("15:04:05.000"))
}
