package ingress

import (
	"context"
	"net/netip"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/fabricnet/fabric/internal/ipsets"
	"github.com/fabricnet/fabric/iptables"
	"github.com/fabricnet/fabric/lab"
)

// limiterLab is a host namespace running a Limiter and a sender namespace
// with two underlay addresses, a fabric host's (A) and a stranger's (B).
// The "tunnel" is a TCP port here: the chain drops by source whatever the
// match selects, and a TCP server tells plainly whether a packet arrived.
type limiterLab struct {
	host, sender string
	lim          *Limiter
	tables       *iptables.Manager
}

const (
	tunnelMatch = "-p tcp -m tcp --dport 7000"
	hostAddr    = "10.77.0.1"
	tunnelAddr  = hostAddr + ":7000"
)

var (
	senderA = netip.MustParseAddr("10.77.0.2")
	senderB = netip.MustParseAddr("10.77.0.3")
)

func newLimiterLab(t *testing.T) *limiterLab {
	lab.RequireRoot(t, "iptables", "ipset")
	p := lab.Prefix("ing")
	l := &limiterLab{host: lab.AddNS(t, p+"h"), sender: lab.AddNS(t, p+"s")}
	lab.Veth(t, l.host, "eth0", l.sender, "eth0")
	lab.Addr(t, l.host, "eth0", hostAddr+"/24")
	lab.Addr(t, l.sender, "eth0", senderA.String()+"/24")
	lab.Addr(t, l.sender, "eth0", senderB.String()+"/24")
	run := func(ctx context.Context, name string, args ...string) *exec.Cmd {
		return lab.Command(ctx, l.host, name, args...)
	}
	tables, err := iptables.New(iptables.Config{Exec: run, NetnsPath: lab.Path(l.host),
		Sections: []string{Section}, Logger: lab.Logger(t)})
	if err != nil {
		t.Fatal(err)
	}
	l.tables = tables
	l.lim = New(Config{Tables: tables, Sets: ipsets.NewOwner(lab.Path(l.host)), Matches: []string{tunnelMatch}, Logger: lab.Logger(t)})
	ln, err := lab.ServeTCP(l.host, tunnelAddr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	return l
}

// arrives reports whether a connection from src reaches the host's port.
func (l *limiterLab) arrives(t *testing.T, src netip.Addr) bool {
	t.Helper()
	c, _, err := lab.DialTCP(l.sender, src.String(), tunnelAddr, 700*time.Millisecond)
	if err != nil {
		return false
	}
	c.Close()
	return true
}

func (l *limiterLab) apply(t *testing.T, nodes ...netip.Addr) {
	t.Helper()
	if err := l.lim.Apply(context.Background(), nodes); err != nil {
		t.Fatal(err)
	}
}

// TestOnlyFabricHostsReachTheTunnel follows the node set as hosts join and
// leave, rewrites only what changed, and repairs a set emptied by hand.
func TestOnlyFabricHostsReachTheTunnel(t *testing.T) {
	l := newLimiterLab(t)
	if !l.arrives(t, senderB) {
		t.Fatal("before any Apply the port is not reachable at all: the lab is broken")
	}

	l.apply(t, senderA)
	if !l.arrives(t, senderA) {
		t.Error("a fabric host's tunnel packets are dropped")
	}
	if l.arrives(t, senderB) {
		t.Error("a host outside the fabric reaches the tunnel")
	}

	l.apply(t, senderA, senderB)
	if !l.arrives(t, senderB) {
		t.Error("a joining host's tunnel packets are dropped")
	}
	writes := l.lim.Writes()
	l.apply(t, senderB, senderA) // the same set: a repair tick, or a change elsewhere
	if n := l.lim.Writes() - writes; n != 0 {
		t.Errorf("an unchanged node set wrote %d entries, want none", n)
	}

	l.apply(t, senderB)
	if l.arrives(t, senderA) {
		t.Error("a host that left the fabric still reaches the tunnel")
	}
	if !l.arrives(t, senderB) {
		t.Error("a remaining host's tunnel packets are dropped")
	}

	// Emptied by hand (or by another tool): the next tick puts it back.
	lab.Exec(t, l.host, "ipset", "flush", SetName)
	if l.arrives(t, senderB) {
		t.Fatal("an empty node set still lets a host through: the test proves nothing")
	}
	l.apply(t, senderB)
	if !l.arrives(t, senderB) {
		t.Error("the node set was not repaired")
	}

	if err := l.tables.Cleanup(context.Background()); err != nil {
		t.Fatal(err)
	}
	if err := ipsets.NewOwner(lab.Path(l.host)).Cleanup(); err != nil {
		t.Fatal(err)
	}
	if out := lab.Exec(t, l.host, "ipset", "list", "-n"); strings.TrimSpace(out) != "" {
		t.Errorf("after cleanup ipsets are left: %s", out)
	}
}

// TestForeignSetOfThatName refuses to use a set of the same name that
// fabric did not make, and says which.
func TestForeignSetOfThatName(t *testing.T) {
	l := newLimiterLab(t)
	lab.Exec(t, l.host, "ipset", "create", SetName, "hash:net")
	err := l.lim.Apply(context.Background(), []netip.Addr{senderA})
	if err == nil || !strings.Contains(err.Error(), SetName) || !strings.Contains(err.Error(), "hash:net") {
		t.Fatalf("Apply over a hash:net set named %s: got %v, want an error naming the set and its type", SetName, err)
	}
	if !l.arrives(t, senderB) {
		t.Error("a refused Apply changed the rules")
	}
}
