package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/fabricnet/fabric/internal/testwait"
	"github.com/fabricnet/fabric/lab"
	"github.com/fabricnet/fabric/localapi"
)

// throughputRounds is how many rounds each throughput figure is the median
// of.
const throughputRounds = 9

// throughputRuns is how many runs of throughputRounds the comparison with
// flannel's recipe makes: one run's median still moves by a point or two
// from run to run.
const throughputRuns = 3

// throughputStreams are the iperf3 stream counts of the headline table.
var throughputStreams = []int{1, 4}

// throughputCPU is the one CPU every iperf3 of a round runs on. Measured one
// after the other, the same path varies by +-15% from sample to sample on
// these shared machines, far more than the difference sought; side by side
// on one CPU both paths see the same machine at the same moment, and the
// ratio of what they move is the ratio of what a byte costs on each (the
// last row of the breakdown, nothing different left, shows ~1.0).
const throughputCPU = "0"

// throughputBench measures container to container throughput over fabricd's
// VXLAN (hosts a, b) against a hand-built kernel VXLAN (c, d), then takes
// fabricd's pair apart one piece at a time (the breakdown). It returns
// fabricd's RSS, read before the breakdown stops it.
func throughputBench(ctx context.Context, l *lab.Lab, binDir string, a, b, c, d *lab.Host) (int64, error) {
	fab, err := startFabricPair(ctx, l, binDir, a, b)
	if err != nil {
		return 0, fmt.Errorf("fabric pair: %w", err)
	}
	hand, err := handBuiltPair(ctx, l, c, d)
	if err != nil {
		return 0, fmt.Errorf("hand-built vxlan: %w", err)
	}
	fmt.Printf("## Throughput, container to container across two hosts: fabricd (auto mode: %s) against a hand-built kernel VXLAN\n\n", fab.encap)
	fmt.Printf("Both pairs run iperf3 at the same time, every process on CPU %s, for 3 s after 1 s of warm-up: %d rounds, median (min-max). Gbit/s is what each moved while sharing the CPU; the ratio is taken per round.\n\n", throughputCPU, throughputRounds)
	fmt.Printf("| streams | fabricd Gbit/s | hand-built Gbit/s | fabricd / hand-built |\n|---|---|---|---|\n")
	for _, n := range throughputStreams {
		f, h, err := sideBySideRounds(ctx, &fab.containerPair, hand, n)
		if err != nil {
			return 0, err
		}
		fmt.Printf("| %d | %s | %s | %s |\n", n, gbits(summarize(f)), gbits(summarize(h)), ratioStats(f, h))
	}
	if err := againstFlannelRecipe(ctx, fab, hand); err != nil {
		return 0, err
	}
	mem, err := rss(fab.procs[0])
	if err != nil {
		return 0, err
	}
	return mem, throughputBreakdown(ctx, fab, hand)
}

// flannelMasquerade is the nat table flannel writes on every node (pool
// 10.250.0.0/16, this node's subnet %s, as handBuiltPair gives them): traffic inside the pool untouched,
// traffic leaving it masqueraded. With it the kernel tracks connections, as
// on any host whose containers reach the outside (dockerd's own MASQUERADE
// does the same).
const flannelMasquerade = `*nat
-A POSTROUTING -s 10.250.0.0/16 -d 10.250.0.0/16 -j RETURN
-A POSTROUTING -s 10.250.0.0/16 ! -d 224.0.0.0/4 -j MASQUERADE --random-fully
-A POSTROUTING ! -s 10.250.0.0/16 -d %s -j RETURN
-A POSTROUTING ! -s 10.250.0.0/16 -d 10.250.0.0/16 -j MASQUERADE --random-fully
COMMIT
*filter
-A FORWARD -s 10.250.0.0/16 -j ACCEPT
-A FORWARD -d 10.250.0.0/16 -j ACCEPT
COMMIT
`

// againstFlannelRecipe measures fabricd's pair against the hand-built pair
// with flannel's masquerade rules, one stream, then removes them again (the
// breakdown compares with the bare pair). The bare pair is what the kernel
// can do; this one is what a VXLAN fabric whose containers reach the
// outside costs, which is the part of the gap that is fabric's own.
func againstFlannelRecipe(ctx context.Context, fab *fabricPair, hand *containerPair) error {
	for i, h := range hand.hosts {
		if out, err := h.Run(ctx, "nft", "list", "ruleset"); err != nil || strings.TrimSpace(out) != "" {
			return fmt.Errorf("hand-built host %s: want no rules before adding flannel's: %v %s", h.Name, err, out)
		}
		rules := fmt.Sprintf(flannelMasquerade, netip.PrefixFrom(hand.ctrs[i].Addr, 24).Masked())
		cmd := h.Command(ctx, "iptables-restore", "--noflush")
		cmd.Stdin = strings.NewReader(rules)
		if out, err := cmd.CombinedOutput(); err != nil {
			return fmt.Errorf("flannel's rules on %s: %w: %s", h.Name, err, out)
		}
	}
	fmt.Printf("\n## Throughput against the hand-built pair with flannel's masquerade rules (conntrack and NAT on both sides), one stream\n\n")
	fmt.Printf("%d runs of %d rounds each; the last row is the median of the runs' medians, with their min and max.\n\n", throughputRuns, throughputRounds)
	fmt.Printf("| run | fabricd Gbit/s | hand-built + flannel's NAT Gbit/s | fabricd / hand-built + flannel's NAT |\n|---|---|---|---|\n")
	var medians []float64
	for run := range throughputRuns {
		f, h, err := sideBySideRounds(ctx, &fab.containerPair, hand, 1)
		if err != nil {
			return err
		}
		medians = append(medians, summarize(ratios(f, h)).median)
		fmt.Printf("| %d | %s | %s | %s |\n", run+1, gbits(summarize(f)), gbits(summarize(h)), ratioStats(f, h))
	}
	m := summarize(medians)
	fmt.Printf("| median of %d | | | %.3f (%.3f-%.3f) |\n", throughputRuns, m.median, m.min, m.max)
	return runOnHosts(ctx, hand.hosts, "nft", "flush", "ruleset")
}

// runOnHosts runs one command on each of hosts, stopping at the first that
// fails.
func runOnHosts(ctx context.Context, hosts []*lab.Host, args ...string) error {
	for _, h := range hosts {
		if out, err := h.Run(ctx, args[0], args[1:]...); err != nil {
			return fmt.Errorf("%s on %s: %w: %s", strings.Join(args, " "), h.Name, err, out)
		}
	}
	return nil
}

// sideBySideRounds measures both pairs side by side, throughputRounds times.
func sideBySideRounds(ctx context.Context, x, y *containerPair, streams int) (xs, ys []float64, err error) {
	for range throughputRounds {
		got, err := sideBySide(ctx, []*containerPair{x, y}, streams)
		if err != nil {
			return nil, nil, err
		}
		xs, ys = append(xs, got[0]), append(ys, got[1])
	}
	return xs, ys, nil
}

// sideBySide runs one iperf3 sample on every pair at once: the servers first,
// then, once all listen, the clients together.
func sideBySide(ctx context.Context, pairs []*containerPair, streams int) ([]float64, error) {
	for _, p := range pairs {
		srv, err := p.ctrs[1].Start("iperf3", "iperf3", "-s", "-1", "-A", throughputCPU, "-B", p.ctrs[1].Addr.String())
		if err != nil {
			return nil, err
		}
		defer srv.Stop()
		if err := waitListening(ctx, p.ctrs[1], 5201); err != nil {
			return nil, err
		}
	}
	clients := make([]iperfClient, len(pairs))
	for i, p := range pairs {
		clients[i] = iperfClient{from: p.ctrs[0], to: p.ctrs[1].Addr}
	}
	return runClients(ctx, clients, streams)
}

// iperfClient is one iperf3 client: where it runs and the server it sends to.
type iperfClient struct {
	from endpoint
	to   netip.Addr
}

// runClients runs every client at once (their servers listen already) and
// returns each one's bits per second.
func runClients(ctx context.Context, clients []iperfClient, streams int) ([]float64, error) {
	got := make([]float64, len(clients))
	errs := make([]error, len(clients))
	var wg sync.WaitGroup
	for i, cl := range clients {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c, cancel := context.WithTimeout(ctx, testwait.Scale(20*time.Second))
			defer cancel()
			out, err := cl.from.Run(c, "iperf3", "-c", cl.to.String(), "-A", throughputCPU, "-t", "3", "-O", "1", "-P", strconv.Itoa(streams), "-J")
			if err != nil {
				errs[i] = fmt.Errorf("iperf3 -c %s: %w", cl.to, err)
				return
			}
			got[i], errs[i] = iperfResult(out)
		}()
	}
	wg.Wait()
	return got, errors.Join(errs...)
}

// waitListening waits until a TCP socket listens on port in e's namespace.
func waitListening(ctx context.Context, e endpoint, port int) error {
	filter := fmt.Sprintf("sport = :%d", port)
	limit := testwait.Scale(5 * time.Second) // longer in the qemu guest
	var err error
	for start := time.Now(); time.Since(start) < limit; time.Sleep(50 * time.Millisecond) {
		var out string
		if out, err = e.Run(ctx, "ss", "-Hltn", filter); err == nil && strings.TrimSpace(out) != "" {
			return nil
		}
	}
	return fmt.Errorf("nothing listens on port %d after %s (ss: %v)", port, limit, err)
}

func gbits(s stats) string {
	return fmt.Sprintf("%.2f (%.2f-%.2f)", s.median/1e9, s.min/1e9, s.max/1e9)
}

// ratios is vs[i]/base[i] for every round.
func ratios(vs, base []float64) []float64 {
	r := make([]float64, len(vs))
	for i := range vs {
		r[i] = vs[i] / base[i]
	}
	return r
}

// ratioStats summarises the per-round ratios of vs to base.
func ratioStats(vs, base []float64) string {
	s := summarize(ratios(vs, base))
	return fmt.Sprintf("%.3f (%.3f-%.3f)", s.median, s.min, s.max)
}

// breakdownStage is one piece of fabricd's pair taken away, on both hosts,
// on top of the stages before it.
type breakdownStage struct {
	name   string
	remove func(ctx context.Context, fab *fabricPair) error
}

// throughputBreakdown measures fabricd's pair as it is, then after each stage
// (cumulative), every time side by side with the hand-built pair. What a
// stage changes in the ratio is what that piece costs; the last row, with
// nothing of fabric's left but its devices and routes, is the check on the
// method.
func throughputBreakdown(ctx context.Context, fab *fabricPair, hand *containerPair) error {
	onHosts := func(args ...string) func(context.Context, *fabricPair) error {
		return func(ctx context.Context, fab *fabricPair) error { return runOnHosts(ctx, fab.hosts, args...) }
	}
	stages := []breakdownStage{
		{"fabricd running", nil},
		{"fabricd stopped (SIGTERM: its data plane stays)", func(ctx context.Context, fab *fabricPair) error {
			for _, p := range fab.procs {
				if err := p.Stop(); err != nil {
					return err
				}
			}
			return nil
		}},
		{"tunnel source check removed (FABRIC-INPUT's ipset match)", onHosts("iptables", "-t", "filter", "-F", "FABRIC-INPUT")},
		{"filter rules removed (policy, FABRIC-FORWARD; conntrack and NAT stay)", onHosts("sh", "-c", "iptables -t filter -F && iptables -t filter -X")},
		{"every rule removed (no conntrack, no NAT): the method's check, ~1.0", onHosts("nft", "flush", "ruleset")},
	}
	fmt.Printf("\n## Throughput breakdown: fabricd's pair taken apart, one stream\n\n")
	fmt.Printf("Each row takes one more piece away from both of fabricd's hosts and measures side by side with the hand-built pair as above (%d rounds). A row's change is what its piece cost.\n\n", throughputRounds)
	fmt.Printf("| fabricd's pair | fabricd Gbit/s | hand-built Gbit/s | ratio | change |\n|---|---|---|---|---|\n")
	prev := 0.0
	for _, st := range stages {
		if st.remove != nil {
			if err := st.remove(ctx, fab); err != nil {
				return fmt.Errorf("%s: %w", st.name, err)
			}
		}
		if err := fab.ctrs[0].Ping(ctx, fab.ctrs[1].Addr, 5*time.Second); err != nil {
			return fmt.Errorf("%s: containers no longer reach each other: %w", st.name, err)
		}
		f, h, err := sideBySideRounds(ctx, &fab.containerPair, hand, 1)
		if err != nil {
			return fmt.Errorf("%s: %w", st.name, err)
		}
		r := summarize(ratios(f, h)).median
		change := ""
		if prev > 0 {
			change = fmt.Sprintf("%+.3f", r-prev)
		}
		prev = r
		fmt.Printf("| %s | %s | %s | %s | %s |\n", st.name, gbits(summarize(f)), gbits(summarize(h)), ratioStats(f, h), change)
	}
	return nil
}

// endpoint is a host or a container namespace.
type endpoint interface {
	Run(ctx context.Context, name string, args ...string) (string, error)
}

// iperfResult is the bits per second an iperf3 -J report says were received.
func iperfResult(out string) (float64, error) {
	var res struct {
		End struct {
			SumReceived struct {
				BitsPerSecond float64 `json:"bits_per_second"`
			} `json:"sum_received"`
		} `json:"end"`
	}
	if err := json.Unmarshal([]byte(out), &res); err != nil {
		return 0, fmt.Errorf("iperf3 output: %w", err)
	}
	if res.End.SumReceived.BitsPerSecond == 0 {
		return 0, fmt.Errorf("iperf3 measured nothing: %s", out)
	}
	return res.End.SumReceived.BitsPerSecond, nil
}

// containerPair is a container on each of two hosts; iperf3 runs from the
// first to the second.
type containerPair struct {
	hosts []*lab.Host
	ctrs  []*lab.Container
}

// fabricPair is two hosts running fabricd with a container each.
type fabricPair struct {
	containerPair
	procs []*lab.Process
	encap string // what auto mode chose
}

func startFabricPair(ctx context.Context, l *lab.Lab, binDir string, a, b *lab.Host) (*fabricPair, error) {
	return startFabricPairWith(ctx, l, binDir, a, b, nil)
}

// startFabricPairWith starts fabricd on a and b behind prefix (e.g. taskset)
// with more flags, and a container on each that reaches the other.
func startFabricPairWith(ctx context.Context, l *lab.Lab, binDir string, a, b *lab.Host, prefix []string, more ...string) (*fabricPair, error) {
	fab := &fabricPair{containerPair: containerPair{hosts: []*lab.Host{a, b}}, encap: "?"}
	for _, h := range fab.hosts {
		p, err := h.Start("fabricd", append(slices.Clone(prefix), append(fabricdArgs(l, binDir, h), more...)...)...)
		if err != nil {
			return nil, err
		}
		fab.procs = append(fab.procs, p)
	}
	for _, h := range fab.hosts {
		cli := localapi.NewClient(filepath.Join(l.LogDir(), h.Name+"-run", "fabricd.sock"))
		var st localapi.Status
		var err error
		for i := 0; i < 100; i++ {
			if st, err = cli.Status(ctx); err == nil {
				break
			}
			time.Sleep(200 * time.Millisecond)
		}
		if err != nil {
			return nil, err
		}
		sub := netip.MustParsePrefix(st.Subnet)
		c, err := l.AddContainer(ctx, h, "ip", netip.PrefixFrom(sub.Addr().Next().Next(), sub.Bits()), netip.MustParseAddr(st.Gateway), st.Bridge, st.MTU)
		if err != nil {
			return nil, err
		}
		fab.ctrs = append(fab.ctrs, c)
	}
	var err error
	for i := 0; i < 100; i++ {
		if err = fab.ctrs[0].Ping(ctx, fab.ctrs[1].Addr, time.Second); err == nil {
			break
		}
		time.Sleep(200 * time.Millisecond)
	}
	if err != nil {
		return nil, fmt.Errorf("containers on fabricd's hosts never reached each other: %w", err)
	}
	if peers, err := localapi.NewClient(filepath.Join(l.LogDir(), a.Name+"-run", "fabricd.sock")).Peers(ctx); err == nil && len(peers) > 0 {
		fab.encap = peers[0].Encap
	}
	return fab, nil
}

// handBuiltPair sets up flannel's and Calico's VXLAN recipe by hand between a
// and b: the reference for what the kernel can do.
func handBuiltPair(ctx context.Context, l *lab.Lab, a, b *lab.Host) (*containerPair, error) {
	type side struct {
		h      *lab.Host
		subnet netip.Prefix
		mac    string
	}
	sides := []side{{a, netip.MustParsePrefix("10.250.1.0/24"), "0e:00:00:00:01:01"}, {b, netip.MustParsePrefix("10.250.2.0/24"), "0e:00:00:00:02:02"}}
	pair := &containerPair{hosts: []*lab.Host{a, b}}
	for i, s := range sides {
		o := sides[1-i]
		gw := s.subnet.Addr().Next()
		if err := s.h.EnsureBridge(ctx, "br0", netip.PrefixFrom(gw, 24), 1450); err != nil {
			return nil, err
		}
		for _, args := range [][]string{
			{"ip", "link", "add", "vx0", "type", "vxlan", "id", "42", "local", s.h.Addr.String(), "dev", s.h.Dev, "dstport", "4789", "nolearning"},
			{"ip", "link", "set", "vx0", "mtu", "1450", "address", s.mac, "up"},
			{"ip", "addr", "add", s.subnet.Addr().String() + "/32", "dev", "vx0"},
			{"ip", "neigh", "add", o.subnet.Addr().String(), "lladdr", o.mac, "dev", "vx0", "nud", "permanent"},
			{"bridge", "fdb", "add", o.mac, "dev", "vx0", "dst", o.h.Addr.String()},
			{"ip", "route", "add", o.subnet.String(), "via", o.subnet.Addr().String(), "dev", "vx0", "onlink"},
		} {
			if out, err := s.h.Run(ctx, args[0], args[1:]...); err != nil {
				return nil, fmt.Errorf("%v: %w %s", args, err, out)
			}
		}
		c, err := l.AddContainer(ctx, s.h, "hb", netip.PrefixFrom(gw.Next(), 24), gw, "br0", 1450)
		if err != nil {
			return nil, err
		}
		pair.ctrs = append(pair.ctrs, c)
	}
	return pair, nil
}
