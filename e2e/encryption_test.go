package e2e

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/fabricnet/fabric/internal/testreq"
	"github.com/fabricnet/fabric/internal/testwait"
	"github.com/fabricnet/fabric/lab"
	"github.com/fabricnet/fabric/registry"
)

// TestEncryptionRollout turns encryption on across a running fabric the
// way docs/operations.md tells an operator to: every host restarted with
// encryption wireguard-optional, then every host with wireguard. Before,
// the underlay carries the containers' TCP payload in clear (the check can
// see plaintext); halfway, pairs whose hosts both offer WireGuard use it and
// the rest stay in clear; after, every pair goes through WireGuard and the
// underlay shows UDP to the WireGuard port and no payload. A forged record
// that claims a host's subnet with another key gets no traffic, and
// restarts keep a host's key. (TestEncryptedRestart is the lighter test the
// qemu lane runs with the kernel's WireGuard.)
func TestEncryptionRollout(t *testing.T) {
	t.Parallel()
	f := newFabric(t, lab.Spec{Hosts: 3, Subnets: 1})
	hosts := f.startMesh()
	h1, h2, h3 := hosts[0], hosts[1], hosts[2]
	ctrs := f.containersTalk(hosts)
	clear := f.autoEncap(h1)
	if plain, _ := f.captureExchange(h1, ctrs[h1.Name], ctrs[h2.Name]); !plain {
		t.Fatalf("the underlay capture did not show the TCP payload of a %s fabric in clear: the check cannot see plaintext", clear)
	}

	// Encryption required on one host while the others send in clear: it
	// sends nothing to them (unreachable, not in clear, not along the
	// default route), and says why.
	f.restartWith(h1, "--encryption", "wireguard")
	f.eventually(30*time.Second, "host1 refuses its peers that do not encrypt", func() error {
		ps, err := f.peers(h1)
		if err != nil {
			return err
		}
		for _, p := range ps {
			if p.Encap != "" || !strings.Contains(p.EncapReason, "the peer does not encrypt") {
				return fmt.Errorf("host1 -> %s: %q (%s)", p.Name, p.Encap, p.EncapReason)
			}
		}
		if r := f.ownedRoutes(h1)[f.subnet(h2).String()]; !strings.HasPrefix(r, "unreachable") {
			return fmt.Errorf("host1's route to host2's subnet: %q, want unreachable", r)
		}
		return nil
	})
	if err := ping(ctrs[h1.Name], ctrs[h2.Name].Addr); err == nil {
		t.Error("host1 (encryption required) reached host2 (in clear)")
	}

	// Step 1, one host at a time: WireGuard where both hosts offer it.
	optional := map[string]bool{}
	for _, h := range hosts {
		f.restartWith(h, "--encryption", "wireguard-optional")
		optional[h.Name] = true
		f.waitEncaps(hosts, func(a, b string) string {
			if optional[a] && optional[b] {
				return "wireguard"
			}
			return clear
		})
		f.pairsTalk(hosts, ctrs)
	}
	// Step 2: nothing in clear.
	for _, h := range hosts {
		f.restartWith(h, "--encryption", "wireguard")
		f.waitEncaps(hosts, func(string, string) string { return "wireguard" })
	}
	f.pairsTalk(hosts, ctrs)
	st, err := f.status(h1)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("host1: encryption %s, MTU %d", st.Encryption, st.MTU)
	if impl := f.wireGuardImplementation(h1); !strings.HasPrefix(st.Encryption, "wireguard ("+impl+" WireGuard") || st.WireGuardKey == "" {
		t.Errorf("status says encryption %q, key %q; want %s WireGuard and a key", st.Encryption, st.WireGuardKey, impl)
	}
	plain, wg := f.captureExchange(h1, ctrs[h1.Name], ctrs[h2.Name])
	if plain || wg == 0 {
		t.Errorf("underlay of host1 with encryption on: payload in clear %v, %d WireGuard packets; want none in clear and some WireGuard", plain, wg)
	}

	// A forged record: host2's subnet, an outside address, another key.
	cli, err := f.lab.EtcdClient()
	if err != nil {
		t.Fatal(err)
	}
	defer cli.Close()
	forged := registry.Node{Name: "forged", Address: h3.Addr.Next().Next().Next(), ASN: 64512, Subnet: f.subnet(h2),
		Encaps: []string{"wireguard"}, WireGuardKey: "u7tNTbxt7ZK0Qs3BJFIJ6hJbT/9d1V5mfZgoE1dn2UY=", Version: "forged", MachineID: "forged"}
	value, _ := json.Marshal(forged)
	ctx, cancel := context.WithTimeout(context.Background(), testwait.Scale(10*time.Second))
	defer cancel()
	if _, err := cli.Put(ctx, "/fabric/v1/nodes/forged", string(value)); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cli.Delete(context.Background(), "/fabric/v1/nodes/forged") })
	f.eventually(10*time.Second, "host1 logs the forged record refused", func() error {
		if log, _ := os.ReadFile(f.agents[h1.Name].proc.LogPath()); !bytes.Contains(log, []byte(`node=forged`)) ||
			!bytes.Contains(log, []byte("is not leased to it")) {
			return fmt.Errorf("no refusal of node forged in host1's log")
		}
		return nil
	})
	f.pairsTalk(hosts, ctrs)

	// Each restart kept host2's key: peers need not learn a new one.
	if keys := f.wireGuardKeys[h2.Name]; len(keys) < 2 || strings.Count(strings.Join(keys, " "), keys[0]) != len(keys) {
		t.Errorf("host2's public key across its restarts: %v, want one key", keys)
	}
}

// TestEncryptedRestart: two hosts with encryption on from the start (the
// kernel's WireGuard in the qemu lane, wireguard-go here); the underlay
// carries no payload in clear, and a restart of fabricd on one host keeps
// its key and, with the kernel's device (adopted as it is), loses no packet;
// with wireguard-go the loss is logged, what a restart costs there.
func TestEncryptedRestart(t *testing.T) {
	t.Parallel()
	f := newFabric(t, lab.Spec{Hosts: 2, Subnets: 1}, "--encryption", "wireguard")
	hosts := f.startMesh()
	h1, h2 := hosts[0], hosts[1]
	ctrs := f.containersTalk(hosts)
	f.waitEncaps(hosts, func(string, string) string { return "wireguard" })
	impl := f.wireGuardImplementation(h1)
	st, err := f.status(h2)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(st.Encryption, "wireguard ("+impl+" WireGuard") {
		t.Errorf("host2's status says encryption %q, want %s WireGuard", st.Encryption, impl)
	}
	if plain, wg := f.captureExchange(h1, ctrs[h1.Name], ctrs[h2.Name]); plain || wg == 0 {
		t.Errorf("underlay of host1: payload in clear %v, %d WireGuard packets", plain, wg)
	}
	// What an operator checks first: the peer's last handshake.
	if ps, err := f.peers(h1); err != nil || len(ps) != 1 || ps[0].WireGuardHandshake.IsZero() {
		t.Errorf("host1's peers status shows no WireGuard handshake with host2 after traffic: %+v %v", ps, err)
	}

	// A stream from before the stop until the restarted host is back in
	// every pair. Loss is counted from the sequence numbers answered: the
	// requests missing between the first and the last reply (what was in
	// flight when the stream ended is not lost; under TCG that is several).
	pinger, err := ctrs[h1.Name].Start("pingstream", "ping", "-D", "-i", "0.02", ctrs[h2.Name].Addr.String())
	if err != nil {
		t.Fatal(err)
	}
	f.eventually(10*time.Second, "the ping stream from host1 to host2 runs", func() error {
		if log, _ := os.ReadFile(pinger.LogPath()); !bytes.Contains(log, []byte("bytes from")) {
			return fmt.Errorf("no reply yet")
		}
		return nil
	})
	stopped := time.Now()
	f.restartWith(h2)
	back := time.Now()
	f.waitEncaps(hosts, func(string, string) string { return "wireguard" })
	f.pairsTalk(hosts, ctrs)
	if err := pinger.Signal(syscall.SIGINT); err != nil {
		t.Fatal(err)
	}
	waitCtx, waitCancel := context.WithTimeout(context.Background(), testwait.Scale(10*time.Second))
	defer waitCancel()
	pinger.Wait(waitCtx)
	log, _ := os.ReadFile(pinger.LogPath())
	sent, got := streamLoss(string(log), stopped)
	t.Logf("host2's fabricd restarted (%s WireGuard): %d of %d pings from host1 lost", impl, sent-got, sent)
	if all, answered := streamLoss(string(log), time.Time{}); all-answered > sent-got {
		t.Logf("before the restart, while the stream started, %d more were lost (not the restart's)", all-answered-(sent-got))
	}
	if sent < 100 || (impl == "kernel" && got != sent) {
		t.Errorf("%s WireGuard across a restart: %d of %d pings lost, want 0 of at least 100", impl, sent-got, sent)
		// Whether the loss falls in the restart: the replies around each
		// gap carry their time (ping -D).
		t.Logf("host2's fabricd stopped at %.3f, the new one answered at %.3f; replies around the missing ones:",
			float64(stopped.UnixMicro())/1e6, float64(back.UnixMicro())/1e6)
		for _, gap := range aroundGaps(string(log), stopped, back) {
			t.Logf("gap: %s", gap) // one line each, for the qemu lane's excerpt
		}
		// One line each, so that the qemu lane's excerpt carries them.
		for _, h := range hosts {
			b, _ := os.ReadFile(f.agents[h.Name].proc.LogPath())
			for _, line := range strings.Split(string(b), "\n") {
				if !strings.Contains(line, "level=DEBUG") && regexp.MustCompile(`wireguard|route|encapsulation|===|stopped|bfd|Peer`).MatchString(line) {
					t.Logf("%s: %.220s", h.Name, line)
				}
			}
		}
	}
	if st2, err := f.status(h2); err != nil || st2.WireGuardKey != st.WireGuardKey {
		t.Errorf("host2's public key after its restart: %q (%v), want %q", st2.WireGuardKey, err, st.WireGuardKey)
	}
	f.pairsTalk(hosts, ctrs)
}

// TestKeyRotation: `fabricctl rotate-key` on host1 under ping streams
// 10 ms apart (scaled in the qemu guest) into and out of host1. Every peer handshakes with the new key
// (fabricctl waits for it and says so), host1's status and node record
// carry it, and neither stream loses a packet: the device keeps decrypting
// the peers' sessions and holds what it sends until they have the new key.
func TestKeyRotation(t *testing.T) {
	t.Parallel()
	f := newFabric(t, lab.Spec{Hosts: 3, Subnets: 1}, "--encryption", "wireguard")
	hosts := f.startMesh()
	h1, h2, h3 := hosts[0], hosts[1], hosts[2]
	ctrs := f.containersTalk(hosts)
	f.waitEncaps(hosts, func(string, string) string { return "wireguard" })
	impl := f.wireGuardImplementation(h1)
	before, err := f.status(h1)
	if err != nil {
		t.Fatal(err)
	}
	streams := map[string]*lab.Process{}
	for name, pair := range map[string][2]*lab.Container{
		"host2->host1": {ctrs[h2.Name], ctrs[h1.Name]},
		"host1->host3": {ctrs[h1.Name], ctrs[h3.Name]},
	} {
		// 10 ms apart (at the time scale: WireGuard holds 128 packets per
		// peer while a peer follows, and a loaded qemu guest took over 1.3 s
		// to, which at 10 ms is more than the 128 hold).
		interval := fmt.Sprintf("%.3f", testwait.Scale(10*time.Millisecond).Seconds())
		p, err := pair[0].Start("pingstream-"+strings.ReplaceAll(name, ">", ""), "ping", "-D", "-i", interval, pair[1].Addr.String())
		if err != nil {
			t.Fatal(err)
		}
		streams[name] = p
		f.eventually(10*time.Second, "the ping stream "+name+" runs", func() error {
			if log, _ := os.ReadFile(p.LogPath()); !bytes.Contains(log, []byte("bytes from")) {
				return fmt.Errorf("no reply yet")
			}
			return nil
		})
	}

	rotated := time.Now()
	out, err := f.fabricctl(h1, "rotate-key")
	if err != nil {
		t.Fatalf("fabricctl rotate-key: %v\n%s", err, out)
	}
	t.Logf("fabricctl rotate-key (%s WireGuard):\n%s", impl, out)
	for _, want := range []string{"was " + before.WireGuardKey, "host2 handshook with the new key after", "host3 handshook with the new key after"} {
		if !strings.Contains(out, want) {
			t.Errorf("fabricctl rotate-key does not say %q", want)
		}
	}
	after, err := f.status(h1)
	if err != nil || after.WireGuardKey == before.WireGuardKey || !strings.Contains(out, after.WireGuardKey) {
		t.Fatalf("host1's key after the rotation: %q (%v), was %q; fabricctl said:\n%s", after.WireGuardKey, err, before.WireGuardKey, out)
	}
	f.eventually(10*time.Second, "host1's node record carries the new key", func() error {
		nodes, err := f.fabricctl(h2, "nodes", "-o", "json")
		if err != nil || !strings.Contains(nodes, after.WireGuardKey) {
			return fmt.Errorf("fabricctl nodes: %v %.300s", err, nodes)
		}
		return nil
	})
	// Both streams go on a while with the new key.
	for name, p := range streams {
		logged, _ := os.ReadFile(p.LogPath())
		f.eventually(20*time.Second, "100 more replies on "+name, func() error {
			if log, _ := os.ReadFile(p.LogPath()); bytes.Count(log[len(logged):], []byte("bytes from")) < 100 {
				return fmt.Errorf("not yet")
			}
			return nil
		})
	}
	for name, p := range streams {
		if err := p.Signal(syscall.SIGINT); err != nil {
			t.Fatal(err)
		}
		waitCtx, waitCancel := context.WithTimeout(context.Background(), testwait.Scale(10*time.Second))
		p.Wait(waitCtx)
		waitCancel()
		log, _ := os.ReadFile(p.LogPath())
		sent, got := streamLoss(string(log), rotated)
		t.Logf("%s across the rotation: %d of %d pings lost", name, sent-got, sent)
		if all, answered := streamLoss(string(log), time.Time{}); all-answered > sent-got {
			t.Logf("%s: before the rotation, while the stream started, %d more were lost (not the rotation's)", name, all-answered-(sent-got))
		}
		if sent < 100 || got != sent {
			t.Errorf("%s across host1's key rotation: %d of %d pings lost, want 0 of at least 100", name, sent-got, sent)
		}
	}
	f.pairsTalk(hosts, ctrs)
}

// streamLoss reads ping's replies (ping -D: "[unix time] ... icmp_seq=N")
// and returns how many requests lie between the last reply before from
// (the event under test; the first reply if none came before it) and the
// last reply, and how many of them were answered. What the stream lost
// while it started (a loaded guest's first packets) is not the event's.
func streamLoss(log string, from time.Time) (sent, got int) {
	seen := map[int]bool{}
	start, last := -1, -1
	first := -1
	re := regexp.MustCompile(`(?m)^\[(\d+\.\d+)\].*icmp_seq=(\d+) `)
	for _, m := range re.FindAllStringSubmatch(log, -1) {
		sec, _ := strconv.ParseFloat(m[1], 64)
		n, _ := strconv.Atoi(m[2])
		seen[n] = true
		if first < 0 || n < first {
			first = n
		}
		if time.UnixMicro(int64(sec * 1e6)).Before(from) {
			start = max(start, n)
		}
		last = max(last, n)
	}
	if first < 0 {
		return 0, 0
	}
	if start < 0 {
		start = first
	}
	for n := start; n <= last; n++ {
		if seen[n] {
			got++
		}
	}
	return last - start + 1, got
}

// aroundGaps lists, for each icmp_seq missing from a ping stream's log,
// the reply lines just before and after it.
func aroundGaps(log string, stopped, back time.Time) []string {
	bySeq := map[int]string{}
	seqRe := regexp.MustCompile(`icmp_seq=(\d+) `)
	timeRe := regexp.MustCompile(`^\[(\d+\.\d+)\]`)
	for _, line := range strings.Split(log, "\n") {
		if m := seqRe.FindStringSubmatch(line); m != nil {
			n, _ := strconv.Atoi(m[1])
			bySeq[n] = line
		}
	}
	// when says whether a reply (ping -D) came inside host2's restart.
	when := func(line string) string {
		m := timeRe.FindStringSubmatch(line)
		if m == nil {
			return "?"
		}
		sec, _ := strconv.ParseFloat(m[1], 64)
		at := time.UnixMicro(int64(sec * 1e6))
		switch {
		case at.Before(stopped):
			return "before the restart"
		case at.After(back):
			return "after the restart"
		}
		return "during the restart"
	}
	var out []string
	for n := range bySeq {
		if _, ok := bySeq[n+1]; ok {
			continue
		}
		next := n + 1
		for ; next < n+10000; next++ {
			if _, ok := bySeq[next]; ok {
				break
			}
		}
		if next < n+10000 {
			out = append(out, fmt.Sprintf("missing %d-%d, between a reply %s and one %s: %s / %s", n+1, next-1, when(bySeq[n]), when(bySeq[next]), bySeq[n], bySeq[next]))
		}
	}
	slices.Sort(out)
	return out
}

// wireGuardImplementation is what fabricd runs on this kernel: the
// kernel's WireGuard where it has one (the qemu guest), else wireguard-go.
func (f *fabric) wireGuardImplementation(h *lab.Host) string {
	f.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), testwait.Scale(5*time.Second))
	defer cancel()
	if _, err := h.Run(ctx, "ip", "link", "add", "fbwgprobe", "type", "wireguard"); err != nil {
		if os.Getenv("FABRIC_KERNEL_WIREGUARD") == "1" { // the qemu lane
			f.t.Fatalf("this kernel should have WireGuard (FABRIC_KERNEL_WIREGUARD=1), but: %v", err)
		}
		return "userspace"
	}
	h.Run(ctx, "ip", "link", "del", "fbwgprobe")
	return "kernel"
}

// restartWith stops fabricd on h and starts it with the same flags plus
// more (later flags win), then waits for its API.
func (f *fabric) restartWith(h *lab.Host, more ...string) {
	f.t.Helper()
	a := f.agents[h.Name]
	if err := a.proc.Stop(); err != nil {
		f.t.Fatalf("stop fabricd on %s: %v", h.Name, err)
	}
	f.start(h, more...)
	if st, err := f.status(h); err == nil && st.WireGuardKey != "" {
		if f.wireGuardKeys == nil {
			f.wireGuardKeys = map[string][]string{}
		}
		f.wireGuardKeys[h.Name] = append(f.wireGuardKeys[h.Name], st.WireGuardKey)
	}
}

// captureExchange captures h's underlay while src's container opens a TCP
// connection to dst's and the two exchange a line ("seen-from <src>"). It
// reports whether that line crossed the underlay in clear, and how many
// UDP packets to or from the WireGuard port the capture holds.
func (f *fabric) captureExchange(h *lab.Host, src, dst *lab.Container) (plain bool, wireguard int) {
	f.t.Helper()
	c, err := lab.StartCapture(h.Netns, h.Dev)
	if err != nil {
		f.t.Fatal(err)
	}
	from, err := tcpExchange(dst, src, 8001)
	frames := c.Frames()
	if err != nil || from != src.Addr.String() {
		f.t.Fatalf("tcp %s -> %s: receiver saw %q, want %s: %v", src.Name, dst.Name, from, src.Addr, err)
	}
	line := []byte("seen-from " + src.Addr.String())
	for _, fr := range frames {
		plain = plain || bytes.Contains(fr, line)
		if lab.UDPPort(fr, 51820) {
			wireguard++
		}
	}
	f.t.Logf("%s's underlay during the exchange: %d frames, %d WireGuard, payload in clear: %v", h.Name, len(frames), wireguard, plain)
	return plain, wireguard
}

// TestDockerNetworkEncrypted: containers of a Docker network on two hosts
// with encryption on reach each other both ways, so WireGuard lets through
// what is routed to a host besides its subnet (its network blocks).
func TestDockerNetworkEncrypted(t *testing.T) {
	t.Parallel()
	if reason := lab.DockerMissing(); reason != "" {
		testreq.Missing(t, "%s", reason)
	}
	f := newFabric(t, lab.Spec{Hosts: 2}, "--encryption", "wireguard")
	hosts := f.startMesh()
	dhs, img := f.startDockerds(hosts)
	h1, h2 := dhs[0], dhs[1]
	if out, err := h1.docker("network", "create", "-d", "fabric", "--ipam-driver", "fabric", "--subnet", "172.16.7.0/24", "net7"); err != nil {
		t.Fatalf("create net7: %v: %s", err, out)
	}
	f.hasNetwork(h2, "net7", true)
	c1 := h1.runOn(t, "net7", "c1", nil, img, "sleep", "3600")
	c2 := h2.runOn(t, "net7", "c2", nil, img, "sleep", "3600")
	f.waitEncaps(hosts, func(string, string) string { return "wireguard" })
	for _, p := range []struct {
		dh       *dockerHost
		ctr      string
		dst      netip.Addr
		pairName string
	}{{h1, "c1", c2, "c1 -> c2"}, {h2, "c2", c1, "c2 -> c1"}} {
		f.eventually(networkSettle, p.pairName+" over WireGuard", func() error {
			out, err := p.dh.docker("exec", p.ctr, "ping", "-c", "1", "-W", "1", p.dst.String())
			if err != nil {
				return fmt.Errorf("%v: %s", err, out)
			}
			return nil
		})
	}
}

// TestKernelWireGuardRequired: `wireguardImplementation: kernel` on a kernel
// without WireGuard refuses to start, saying what to do, instead of running
// with no way to reach its peers.
func TestKernelWireGuardRequired(t *testing.T) {
	t.Parallel()
	f := newFabric(t, lab.Spec{Hosts: 1})
	h := f.lab.Hosts()[0]
	if f.wireGuardImplementation(h) == "kernel" {
		t.Log("this kernel has WireGuard: nothing to refuse here")
		return
	}
	args := f.fabricdArgs(h, filepath.Join(f.lab.LogDir(), h.Name+"-run"), "--encryption", "wireguard", "--wireguard-implementation", "kernel")
	ctx, cancel := context.WithTimeout(context.Background(), testwait.Scale(30*time.Second))
	defer cancel()
	out, err := h.Run(ctx, args[0], args[1:]...)
	if err == nil || !strings.Contains(out, "wireguardImplementation kernel: this kernel has no WireGuard") {
		t.Errorf("fabricd with wireguardImplementation kernel on a kernel without it: %v\n%s", err, out)
	}
}
