package probe

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"regexp"
	"runtime"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/fabricnet/fabric/internal/nsthread"
	"github.com/fabricnet/fabric/lab"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

const testInterval = 200 * time.Millisecond

func testLogger(t *testing.T, name string) *slog.Logger {
	level := slog.LevelInfo
	if testing.Verbose() {
		level = slog.LevelDebug
	}
	return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level})).With("host", name)
}

var (
	addrA = netip.MustParseAddr("10.99.1.10")
	addrB = netip.MustParseAddr("10.99.1.11")
	addrR = netip.MustParseAddr("10.99.1.1") // router, runs no prober
	addrC = netip.MustParseAddr("10.99.2.10")
)

// TestPathVerdicts builds
//
//	A 10.99.1.10 ─┐
//	B 10.99.1.11 ─┼─ bridge (namespace S) ─ R 10.99.1.1 | 10.99.2.1 ─ C 10.99.2.10
//
// runs a Prober in A, B and C, then drops IP protocol 4 in R's FORWARD chain
// and lifts the drop again.
func TestPathVerdicts(t *testing.T) {
	l := newLab(t)
	nsS, nsA, nsB, nsR, nsC := l.ns("S"), l.ns("A"), l.ns("B"), l.ns("R"), l.ns("C")
	lab.Bridge(t, nsS, "br0")
	for _, h := range []struct{ ns, port, addr string }{
		{nsA, "pa", addrA.String() + "/24"},
		{nsB, "pb", addrB.String() + "/24"},
		{nsR, "pr", addrR.String() + "/24"},
	} {
		lab.Veth(t, h.ns, "eth0", nsS, h.port)
		lab.AddToBridge(t, nsS, "br0", h.port)
		lab.Addr(t, h.ns, "eth0", h.addr)
	}
	lab.Veth(t, nsR, "eth1", nsC, "eth0")
	lab.Addr(t, nsR, "eth1", "10.99.2.1/24")
	lab.Addr(t, nsC, "eth0", addrC.String()+"/24")
	lab.Exec(t, nsR, "sysctl", "-qw", "net.ipv4.ip_forward=1")
	for _, ns := range []string{nsA, nsB} {
		lab.Run(t, "ip", "-n", ns, "route", "add", "default", "via", addrR.String())
	}
	lab.Run(t, "ip", "-n", nsC, "route", "add", "default", "via", "10.99.2.1")

	// The defaults, as fabricd runs them.
	cfg := func(local netip.Addr, name string) Config {
		return Config{Local: local, Logger: testLogger(t, name)}
	}
	pa := startIn(t, nsA, cfg(addrA, "A"))
	pb := startIn(t, nsB, cfg(addrB, "B"))
	pc := startIn(t, nsC, cfg(addrC, "C"))

	// A new peer is on VXLAN until it has answered.
	pa.SetPeers([]netip.Addr{addrB, addrC, addrR})
	if pa.IPIPWorks(addrB) || pa.IPIPWorks(addrC) {
		t.Fatalf("a peer counts as IPIP before any answer: B %s, C %s", describe(pa, addrB), describe(pa, addrC))
	}
	pb.SetPeers([]netip.Addr{addrA, addrC})
	pc.SetPeers([]netip.Addr{addrA}) // C does not know B, but must answer it

	type pair struct {
		name string
		p    *Prober
		peer netip.Addr
	}
	all := []pair{{"A→B", pa, addrB}, {"A→C", pa, addrC}, {"B→A", pb, addrA}, {"B→C", pb, addrC}, {"C→A", pc, addrA}}
	for _, pr := range all {
		took, ok := waitFor(2*DefaultInterval, func() bool { return pr.p.IPIPWorks(pr.peer) })
		if !ok {
			t.Fatalf("%s: IPIP not working %s after start: %s", pr.name, took, describe(pr.p, pr.peer))
		}
		if _, reason, _ := pr.p.State(pr.peer); !strings.Contains(reason, "IP protocol 4 answered in") {
			t.Errorf("%s: reason %q", pr.name, reason)
		}
	}
	if !fired(pa.Changes()) {
		t.Errorf("A: Changes() did not fire when its peers started to work")
	}

	// R runs no prober: blocked, never works.
	_, ok := waitFor(5*time.Second, func() bool {
		_, reason, _ := pa.State(addrR)
		return unansweredAtLeast(reason, DefaultFailAfter)
	})
	if !ok || pa.IPIPWorks(addrR) {
		t.Fatalf("A→R (no prober there): %s, want blocked after %d probes", describe(pa, addrR), DefaultFailAfter)
	}
	if _, reason, _ := pa.State(addrR); !strings.Contains(reason, "10.99.1.1 answered ICMP protocol unreachable") {
		t.Errorf("A→R reason %q does not name R's protocol unreachable", reason)
	}

	// Hosts that run a responder send no ICMP for probes; the ipip-less R
	// answers each probe with one protocol unreachable at most.
	for _, ns := range []string{nsA, nsB, nsC} {
		if n := l.icmpCounter(ns, "OutMsgs"); n != 0 {
			t.Errorf("%s sent %d ICMP messages, want none", ns, n)
		}
	}
	if n := l.icmpCounter(nsR, "OutDestUnreachs"); n > 20 {
		t.Errorf("R sent %d ICMP unreachables for about %d probes", n, DefaultFailAfter+2)
	}

	// Drop IP protocol 4 in the router: A↔C flips to blocked, A↔B stays.
	drain(pa.Changes())
	lab.Exec(t, nsR, "iptables", "-A", "FORWARD", "-p", "4", "-j", "DROP")
	bFlapped := false
	took, ok := waitFor(5*time.Second, func() bool {
		bFlapped = bFlapped || !pa.IPIPWorks(addrB)
		return !pa.IPIPWorks(addrC)
	})
	if !ok {
		t.Fatalf("A→C still IPIP %s after R dropped protocol 4: %s", took, describe(pa, addrC))
	}
	t.Logf("A→C blocked %s after the drop: %s", took.Round(time.Millisecond), describe(pa, addrC))
	if _, reason, since := pa.State(addrC); !unansweredAtLeast(reason, DefaultFailAfter) || time.Since(since) > time.Second {
		t.Errorf("A→C blocked with reason %q since %s", reason, since)
	}
	if !fired(pa.Changes()) {
		t.Errorf("A: Changes() did not fire when C got blocked")
	}
	for _, pr := range []pair{{"C→A", pc, addrA}, {"B→C", pb, addrC}} {
		if _, ok := waitFor(2*time.Second, func() bool { return !pr.p.IPIPWorks(pr.peer) }); !ok {
			t.Errorf("%s still IPIP after the drop: %s", pr.name, describe(pr.p, pr.peer))
		}
	}
	// A↔B must stay up while C is down: wait until B has answered A as
	// many more times in a row as misses would block it, watching A→B all
	// the while.
	base := pa.successes(addrB)
	prev := base
	if _, ok := waitFor(10*time.Second, func() bool {
		bFlapped = bFlapped || !pa.IPIPWorks(addrB)
		cur := pa.successes(addrB)
		if cur < prev { // a miss started the count again
			base = 0
		}
		prev = cur
		return cur-base >= DefaultFailAfter
	}); !ok {
		t.Errorf("A→B not answered %d times in a row while C was blocked: %s", DefaultFailAfter, describe(pa, addrB))
	}
	if bFlapped || !pa.IPIPWorks(addrB) || !pb.IPIPWorks(addrA) {
		t.Errorf("A↔B left IPIP although only the path to C drops protocol 4: A→B %s, B→A %s",
			describe(pa, addrB), describe(pb, addrA))
	}

	// Lift the drop: A↔C recovers after RecoverAfter answers.
	drain(pa.Changes())
	lab.Exec(t, nsR, "iptables", "-D", "FORWARD", "-p", "4", "-j", "DROP")
	took, ok = waitFor(5*time.Second, func() bool { return pa.IPIPWorks(addrC) })
	if !ok {
		t.Fatalf("A→C not back on IPIP %s after the drop was lifted: %s", took, describe(pa, addrC))
	}
	t.Logf("A→C back %s after the drop was lifted: %s", took.Round(time.Millisecond), describe(pa, addrC))
	if took < DefaultInterval/2 {
		t.Errorf("A→C recovered after %s, on one answer; want %d", took, 2)
	}
	if !fired(pa.Changes()) {
		t.Errorf("A: Changes() did not fire when C recovered")
	}

	// Forgotten peers report false.
	pa.SetPeers([]netip.Addr{addrB})
	if works, reason, _ := pa.State(addrC); works || !strings.HasPrefix(reason, "not probed") {
		t.Errorf("A→C after SetPeers without C: works=%v reason %q", works, reason)
	}
	if !pa.IPIPWorks(addrB) {
		t.Errorf("A→B lost its verdict on SetPeers: %s", describe(pa, addrB))
	}
}

// TestHostileInput sends a prober garbage and a flood of requests over IP
// protocol 4, from a raw socket in a second namespace.
func TestHostileInput(t *testing.T) {
	l := newLab(t)
	nsX, nsY := l.ns("X"), l.ns("Y")
	addrX, addrY := netip.MustParseAddr("10.99.3.1"), netip.MustParseAddr("10.99.3.2")
	lab.Veth(t, nsX, "eth0", nsY, "eth0")
	lab.Addr(t, nsX, "eth0", addrX.String()+"/24")
	lab.Addr(t, nsY, "eth0", addrY.String()+"/24")

	const limit = 50
	px := startIn(t, nsX, Config{Local: addrX, Interval: testInterval, MaxRepliesPerSecond: limit, Logger: testLogger(t, "X")})

	var conn *net.IPConn
	err := nsthread.Do(nsY, func() (err error) {
		conn, err = net.ListenIP("ip4:4", &net.IPAddr{IP: addrY.AsSlice()})
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	to := &net.IPAddr{IP: addrX.AsSlice()}
	send := func(b []byte) {
		t.Helper()
		if _, err := conn.WriteToIP(b, to); err != nil {
			t.Fatal(err)
		}
	}
	// replies counts replies to Y with the given nonce (0: any) until quiet.
	replies := func(nonce uint64, quiet time.Duration) int {
		n := 0
		buf := make([]byte, 2048)
		for {
			conn.SetReadDeadline(time.Now().Add(quiet))
			k, src, err := conn.ReadFromIP(buf)
			if err != nil {
				return n
			}
			m, err := parseMessage(buf[:k])
			if err == nil && m.typ == msgReply && src.IP.Equal(addrX.AsSlice()) && (nonce == 0 || m.nonce == nonce) {
				n++
			}
		}
	}
	request := func(nonce uint64) []byte { return message{typ: msgRequest, sender: addrY, nonce: nonce}.marshal() }

	// Garbage without our magic is dropped by the socket filter in the kernel.
	garbage := make([]byte, 1400)
	for i := range garbage {
		garbage[i] = byte(i*7 + 3)
	}
	for _, n := range []int{0, 1, 19, 20, 23, 24, 39, 40, 41, 100, 1400} {
		send(garbage[:n])
	}
	// Packets that carry the magic but are no valid probe reach the parser.
	valid := request(1)
	var broken [][]byte
	for n := innerHeaderLen + 4; n < packetLen; n++ {
		broken = append(broken, valid[:n]) // truncated
	}
	mutate := func(f func(b []byte)) {
		b := bytes.Clone(valid)
		f(b)
		broken = append(broken, b)
	}
	mutate(func(b []byte) { b[0] = 0x46 })                                            // inner header with options
	mutate(func(b []byte) { b[9] = 17 })                                              // inner UDP
	mutate(func(b []byte) { binary.BigEndian.PutUint16(b[2:4], 1000) })               // wrong inner length
	mutate(func(b []byte) { b[innerHeaderLen+4] = 9 })                                // unknown version
	mutate(func(b []byte) { b[innerHeaderLen+5] = 0 })                                // unknown type
	mutate(func(b []byte) { copy(b[innerHeaderLen+8:], []byte{10, 99, 3, 77}) })      // sender is not the source
	mutate(func(b []byte) { copy(b[innerHeaderLen+8:], []byte{255, 255, 255, 255}) }) // broadcast sender
	for _, b := range broken {
		send(b)
	}
	if n := replies(0, 3*testInterval); n != 0 {
		t.Errorf("X answered %d malformed probes", n)
	}
	if got := px.malformed.Load(); got != uint64(len(broken)) {
		t.Errorf("X parsed %d malformed packets, want %d: the kernel filter should drop the %s", got, len(broken), "ones without magic")
	}

	// X still answers a valid request.
	send(request(42))
	if n := replies(42, 3*testInterval); n != 1 {
		t.Fatalf("X answered a valid request %d times after the garbage, want 1", n)
	}

	// A flood gets at most the rate limit (plus what refills meanwhile).
	start := time.Now()
	for i := range 1000 {
		send(request(uint64(1000 + i)))
	}
	n := replies(0, 3*testInterval)
	allowed := limit + int(time.Since(start).Seconds()*limit) + 1
	t.Logf("1000 requests got %d replies, limit allows %d", n, allowed)
	if n > allowed || n < limit/2 {
		t.Errorf("1000 requests got %d replies, want between %d and %d", n, limit/2, allowed)
	}
	if px.rateLimited.Load() == 0 {
		t.Errorf("no request was rate limited")
	}

	// Y has a raw socket but no responder: X must not count it as working.
	px.SetPeers([]netip.Addr{addrY})
	_, ok := waitFor(5*time.Second, func() bool {
		_, reason, _ := px.State(addrY)
		return unansweredAtLeast(reason, DefaultFailAfter)
	})
	if !ok || px.IPIPWorks(addrY) {
		t.Errorf("X→Y (no responder): %s, want blocked", describe(px, addrY))
	}
}

// unansweredAtLeast: reason says that n or more probes in a row went
// unanswered.
func unansweredAtLeast(reason string, n int) bool {
	m := regexp.MustCompile(`^(\d+) probes over IP protocol 4 unanswered`).FindStringSubmatch(reason)
	if m == nil {
		return false
	}
	got, _ := strconv.Atoi(m[1])
	return got >= n
}

func TestStartErrors(t *testing.T) {
	if _, err := Start(context.Background(), Config{Local: netip.MustParseAddr("2001:db8::1")}); err == nil || !strings.Contains(err.Error(), "IPv4") {
		t.Errorf("IPv6 Local: err = %v", err)
	}
	if _, err := Start(context.Background(), Config{}); err == nil {
		t.Errorf("no Local: no error")
	}

	l := newLab(t)
	ns := l.ns("E")
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	err := nsthread.Do(ns, func() error {
		_, err := Start(ctx, Config{Local: netip.MustParseAddr("10.99.4.1")})
		return err
	})
	if err == nil || !strings.Contains(err.Error(), "not an address of this host") {
		t.Errorf("address not on the host: err = %v", err)
	}

	// Without CAP_NET_RAW. The thread that drops it stays locked, so it
	// dies with its goroutine instead of serving others without the capability.
	lab.Addr(t, ns, "lo", "10.99.4.1/32")
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		target, err := netns.GetFromName(ns)
		if err != nil {
			errc <- err
			return
		}
		defer target.Close()
		if err := netns.Set(target); err != nil {
			errc <- err
			return
		}
		hdr := unix.CapUserHeader{Version: unix.LINUX_CAPABILITY_VERSION_3}
		var data [2]unix.CapUserData
		if err := unix.Capget(&hdr, &data[0]); err != nil {
			errc <- err
			return
		}
		data[unix.CAP_NET_RAW/32].Effective &^= 1 << (unix.CAP_NET_RAW % 32)
		if err := unix.Capset(&hdr, &data[0]); err != nil {
			errc <- err
			return
		}
		_, err = Start(ctx, Config{Local: netip.MustParseAddr("10.99.4.1")})
		errc <- err
	}()
	err = <-errc
	if err == nil || !strings.Contains(err.Error(), "needs CAP_NET_RAW") {
		t.Errorf("without CAP_NET_RAW: err = %v", err)
	}
	t.Logf("without CAP_NET_RAW: %v", err)
}

// TestRestartKeepsVerdicts: a peer whose fabricd is away (its probe
// responder stops) keeps its verdict while it is held, and a prober started
// again from its state file begins with the verdicts it had.
func TestRestartKeepsVerdicts(t *testing.T) {
	l := newLab(t)
	nsS, nsA, nsB := l.ns("S"), l.ns("A"), l.ns("B")
	lab.Bridge(t, nsS, "br0")
	for _, h := range []struct{ ns, port, addr string }{{nsA, "pa", addrA.String() + "/24"}, {nsB, "pb", addrB.String() + "/24"}} {
		lab.Veth(t, h.ns, "eth0", nsS, h.port)
		lab.AddToBridge(t, nsS, "br0", h.port)
		lab.Addr(t, h.ns, "eth0", h.addr)
	}
	state := filepath.Join(t.TempDir(), "verdicts.json")
	cfgA := Config{Local: addrA, Interval: testInterval, FailAfter: 3, RecoverAfter: 2, StateFile: state, Logger: testLogger(t, "A")}
	pa := startIn(t, nsA, cfgA)
	ctxB, stopB := context.WithCancel(context.Background())
	var pb *Prober
	if err := nsthread.Do(nsB, func() (err error) {
		pb, err = Start(ctxB, Config{Local: addrB, Interval: testInterval, Logger: testLogger(t, "B")})
		return err
	}); err != nil {
		t.Fatal(err)
	}
	pa.SetPeers([]netip.Addr{addrB})
	if _, ok := waitFor(5*testInterval, func() bool { return pa.IPIPWorks(addrB) }); !ok {
		t.Fatalf("A→B: %s", describe(pa, addrB))
	}

	// B's fabricd goes away (restart): held, A's verdict stands.
	pa.Hold([]netip.Addr{addrB})
	stopB()
	<-pb.Done()
	time.Sleep(6 * testInterval)
	if !pa.IPIPWorks(addrB) {
		t.Fatalf("held peer flipped while its responder was away: %s", describe(pa, addrB))
	}
	// Not held, the same silence is a blocked path.
	pa.Hold(nil)
	if _, ok := waitFor(6*testInterval, func() bool { return !pa.IPIPWorks(addrB) }); !ok {
		t.Fatalf("released peer without answers still works: %s", describe(pa, addrB))
	}

	// A restarted prober starts from the saved verdicts: B blocked now. The
	// verdict is saved right after it flips: wait for the file to say so.
	if _, ok := waitFor(6*testInterval, func() bool {
		var saved map[netip.Addr]bool
		data, err := os.ReadFile(state)
		if err != nil || json.Unmarshal(data, &saved) != nil {
			return false
		}
		works, known := saved[addrB]
		return known && !works
	}); !ok {
		t.Fatalf("the blocked verdict never reached %s", state)
	}
	pa2 := startIn(t, nsA+"", Config{Local: addrA, Interval: time.Hour, StateFile: state, Logger: testLogger(t, "A2")})
	pa2.SetPeers([]netip.Addr{addrB})
	if works, reason, _ := pa2.State(addrB); works || reason != "verdict kept from before the restart" {
		t.Errorf("restarted prober: works=%v reason=%q, want the saved blocked verdict", works, reason)
	}
}

// TestRandomLossDoesNotFlap: 5 % of protocol 4 packets dropped at random
// on each host (about 10 % of round trips lose a probe or its answer) for
// 20 s. Probes go missing, yet no verdict changes: a path is blocked only
// after DefaultFailAfter misses in a row.
func TestRandomLossDoesNotFlap(t *testing.T) {
	l := newLab(t)
	nsA, nsB := l.ns("A"), l.ns("B")
	lab.Veth(t, nsA, "eth0", nsB, "eth0")
	lab.Addr(t, nsA, "eth0", addrA.String()+"/24")
	lab.Addr(t, nsB, "eth0", addrB.String()+"/24")
	pa := startIn(t, nsA, Config{Local: addrA, Logger: testLogger(t, "A")})
	pb := startIn(t, nsB, Config{Local: addrB, Logger: testLogger(t, "B")})
	pa.SetPeers([]netip.Addr{addrB})
	pb.SetPeers([]netip.Addr{addrA})
	for _, pr := range []struct {
		p    *Prober
		peer netip.Addr
	}{{pa, addrB}, {pb, addrA}} {
		if _, ok := waitFor(5*time.Second, func() bool { return pr.p.IPIPWorks(pr.peer) }); !ok {
			t.Fatalf("no IPIP verdict before the loss: %s", describe(pr.p, pr.peer))
		}
	}
	drain(pa.Changes())
	drain(pb.Changes())
	for _, ns := range []string{nsA, nsB} {
		lab.Exec(t, ns, "iptables", "-A", "INPUT", "-p", "4", "-m", "statistic", "--mode", "random", "--probability", "0.05", "-j", "DROP")
	}
	missedBefore := pa.missedProbes.Load() + pb.missedProbes.Load()
	const lossFor = 20 * time.Second
	flapped := ""
	waitFor(lossFor, func() bool {
		if !pa.IPIPWorks(addrB) {
			flapped = "A→B: " + describe(pa, addrB)
		}
		if !pb.IPIPWorks(addrA) {
			flapped = "B→A: " + describe(pb, addrA)
		}
		return flapped != ""
	})
	missed := pa.missedProbes.Load() + pb.missedProbes.Load() - missedBefore
	t.Logf("%s of 5 %% loss on each host: %d probes missed, verdicts %s", lossFor, missed, map[bool]string{true: "stayed", false: "flapped"}[flapped == ""])
	if missed == 0 {
		t.Fatalf("no probe went missing in %s: the loss rule dropped nothing, so the test proves nothing", lossFor)
	}
	if flapped != "" || fired(pa.Changes()) || fired(pb.Changes()) {
		t.Errorf("a verdict changed under random loss (%d probes missed, never %d in a row on a working path): %s", missed, DefaultFailAfter, flapped)
	}
}
