package echo

import (
	"context"
	"net/netip"
	"testing"
	"time"

	"github.com/fabricnet/fabric/internal/nsthread"
	"github.com/fabricnet/fabric/lab"
)

// TestAnswers: a live peer's kernel answers; with its link down, nothing
// does, and the answer is no within the wait.
func TestAnswers(t *testing.T) {
	lab.RequireRoot(t)
	prefix := lab.Prefix("ec")
	nsA, nsB := lab.AddNS(t, prefix+"a"), lab.AddNS(t, prefix+"b")
	lab.Veth(t, nsA, "eth0", nsB, "eth0")
	lab.Addr(t, nsA, "eth0", "10.98.0.1/24")
	lab.Addr(t, nsB, "eth0", "10.98.0.2/24")
	local, peer := netip.MustParseAddr("10.98.0.1"), netip.MustParseAddr("10.98.0.2")
	ask := func() (bool, time.Duration) {
		t.Helper()
		var ok bool
		start := time.Now()
		err := nsthread.Do(nsA, func() (err error) {
			ok, err = Answers(context.Background(), local, peer, 50*time.Millisecond, 300*time.Millisecond)
			return err
		})
		if err != nil {
			t.Fatal(err)
		}
		return ok, time.Since(start)
	}
	if ok, took := ask(); !ok {
		t.Fatalf("a live peer did not answer (asked for %s)", took)
	}
	lab.Exec(t, nsB, "ip", "link", "set", "eth0", "down")
	ok, took := ask()
	if ok {
		t.Fatal("a peer with its link down answered")
	}
	if took > time.Second {
		t.Fatalf("the answer no took %s, want about the 300ms wait", took)
	}
}
