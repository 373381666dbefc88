// Command bench measures fabric's data plane and its route programming on
// this machine, each against a baseline measured in the same run:
//
//   - throughput container to container across two hosts over fabricd's
//     VXLAN, against a hand-built kernel VXLAN (the same recipe, set up with
//     ip and bridge commands) running side by side on the same CPU, then
//     fabricd's pair taken apart piece by piece (-only throughput);
//   - programming 1000 peers (route + neighbour + FDB entry each) with the
//     dataplane package, against `ip -batch` and `bridge -batch` doing the
//     same, plus the cost of a no-change re-apply (drift repair);
//   - fabricd's memory (RSS) with a full mesh;
//   - a fabric of many hosts (50 as a full mesh and with two fabricd route
//     reflectors, 200 with two reflectors; -only hosts, -hosts 50x0,...):
//     sessions per host, time to converge, steady CPU and memory per host;
//   - routes from a BIRD peer (-only routes, -routes 10000,100000) against
//     `ip -batch` of the same routes: the kernel step alone, session up to
//     every route in the kernel, withdrawal, fabricd's RSS;
//   - container names (-only names): records to resolvable on four hosts,
//     DNS queries per second against dnsmasq;
//   - Docker networks (-only networks): `docker network create` to on every
//     host, `docker run` to reachable by name from another host, and
//     throughput on a fabric network against docker0 and Docker's swarm
//     overlay between the same hosts;
//   - failover (-only failover): a host whose link goes down silently,
//     until no host routes to it, with BFD against BFD off; an IPIP path
//     that stops passing protocol 4, until the probe says so, against the
//     previous probe settings; and the CPU of BFD on a host of a 50-host
//     fabric (49 sessions);
//   - encryption (-only encryption): fabricd with WireGuard against fabricd
//     in clear, side by side, and fabricd's CPU per Gbit/s encrypted;
//   - flow offload (-only offload): fabricd with its flowtable against
//     fabricd with --flow-offload=false, side by side (in the qemu guest
//     where this kernel has no flowtables).
//
// Figures are medians of several runs, with min and max: these machines are
// shared and noisy, one sample proves nothing. The hosts part is the
// exception, one run per setup (a lab of a hundred hosts takes minutes), and
// says so.
//
// Run it with `make bench` (root). Results are tables with ratios; nothing
// here asserts a timing.
package main

import (
	"context"
	"flag"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/fabricnet/fabric/backend"
	"github.com/fabricnet/fabric/dataplane"
	"github.com/fabricnet/fabric/lab"
	"github.com/fabricnet/fabric/vxlanfallback"
)

func main() {
	binDir := os.Getenv("FABRIC_BIN")
	if binDir == "" {
		binDir = "bin"
	}
	binDir, _ = filepath.Abs(binDir)
	lab.CloseOnInterrupt()
	only := flag.String("only", "", `run one part: "throughput" (container to container, with the breakdown), "encryption" (WireGuard against clear), "offload" (flow offload against the path through the rules, in the qemu guest where this kernel has no flowtables), "ipv6" (IPv6 against IPv4), "names" (container names and DNS), "networks" (Docker networks), "failover" (a silent host routed around, an IPIP path blocked, BFD's CPU), "probe" (an IPIP path blocked, here and in the qemu guest), "bfd" (BFD's CPU, alone), "routes" (routes from a BIRD peer) or "hosts" (many hosts: full mesh against reflectors); default every part`)
	routeCounts := flag.String("routes", "10000", "route counts of the BIRD part, comma-separated (e.g. 10000,100000)")
	scale := flag.String("hosts", "", "setups of the hosts part as HOSTSxREFLECTORS, comma-separated (default 50x0,50x2,200x2)")
	flag.Parse()
	if *bfdPeersFlag != "" { // the child of the failover part
		if err := runBFDPeers(); err != nil {
			fmt.Fprintln(os.Stderr, "bench:", err)
			os.Exit(1)
		}
		return
	}
	counts, err := parseCounts(*routeCounts)
	if err != nil {
		fmt.Fprintln(os.Stderr, "bench:", err)
		os.Exit(2)
	}
	setups := defaultScaleSetups
	if *scale != "" {
		if setups, err = parseSetups(*scale); err != nil {
			fmt.Fprintln(os.Stderr, "bench:", err)
			os.Exit(2)
		}
	}
	switch *only {
	case "":
		err = run(binDir, counts, setups)
	case "throughput":
		err = throughputOnly(context.Background(), binDir)
	case "names":
		err = namesBench(context.Background(), binDir)
	case "networks":
		err = networksBench(context.Background(), binDir)
	case "failover":
		err = failoverBench(context.Background(), binDir)
	case "probe":
		if err = probeBench(context.Background()); err == nil {
			err = guestBench(context.Background(), "probe")
		}
	case "bfd":
		err = bfdBench(context.Background())
	case "encryption":
		err = encryptionBench(context.Background(), binDir)
	case "ipv6":
		err = ipv6Bench(context.Background(), binDir)
	case "offload":
		err = offloadBench(context.Background(), binDir)
	case "routes":
		err = routesBench(context.Background(), binDir, counts)
	case "hosts":
		err = hostsBench(context.Background(), binDir, setups)
	default:
		err = fmt.Errorf("-only %q: want throughput, encryption, offload, ipv6, names, networks, failover, probe, bfd, routes or hosts", *only)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "bench:", err)
		os.Exit(1)
	}
}

// throughputOnly is the throughput part on a lab of its own.
func throughputOnly(ctx context.Context, binDir string) error {
	l, err := lab.New(ctx, lab.Spec{Hosts: 4, Logger: warnLog})
	if err != nil {
		return err
	}
	defer l.Close()
	h := l.Hosts()
	_, err = throughputBench(ctx, l, binDir, h[0], h[1], h[2], h[3])
	return err
}

func run(binDir string, routeCounts []int, setups []scaleSetup) error {
	ctx := context.Background()
	l, err := lab.New(ctx, lab.Spec{Hosts: 5, Logger: warnLog})
	if err != nil {
		return err
	}
	defer l.Close()
	hosts := l.Hosts()

	fabricdRSS, err := throughputBench(ctx, l, binDir, hosts[0], hosts[1], hosts[2], hosts[3])
	if err != nil {
		return fmt.Errorf("throughput: %w", err)
	}

	fmt.Println("\n## Programming 1000 peers (route + neighbour + FDB each) in a host namespace")
	rows, err := programPeers(ctx, hosts[4], 1000)
	if err != nil {
		return err
	}
	fmt.Printf("| method | time | vs ip/bridge -batch |\n|---|---|---|\n")
	base := rows[0].d
	for _, r := range rows {
		fmt.Printf("| %s | %s | %.2f |\n", r.name, r.d.Round(100*time.Microsecond), float64(r.d)/float64(base))
	}

	fmt.Println("\n## Memory")
	fmt.Printf("| process | RSS |\n|---|---|\n| fabricd with one mesh peer, after the throughput run | %.1f MiB |\n", float64(fabricdRSS)/(1<<20))
	l.Close()

	if err := hostsBench(ctx, binDir, setups); err != nil {
		return err
	}
	if err := routesBench(ctx, binDir, routeCounts); err != nil {
		return err
	}
	if err := namesBench(ctx, binDir); err != nil {
		return err
	}
	if err := failoverBench(ctx, binDir); err != nil {
		return err
	}
	if err := encryptionBench(ctx, binDir); err != nil {
		return err
	}
	if err := offloadBench(ctx, binDir); err != nil {
		return err
	}
	if err := ipv6Bench(ctx, binDir); err != nil {
		return err
	}
	return networksBench(ctx, binDir)
}

// warnLog is the log of the labs and helpers a benchmark builds: warnings
// only, so that the tables stay readable.
var warnLog = slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))

// runs is how many samples a figure of the names and routes parts is the
// median of.
const runs = 3

type stats struct{ median, min, max float64 }

// samples runs measure runs times and summarises.
func samples(measure func() (float64, error)) (stats, error) {
	var vs []float64
	for range runs {
		v, err := measure()
		if err != nil {
			return stats{}, err
		}
		vs = append(vs, v)
	}
	return summarize(vs), nil
}

// summarize gives the median, min and max of measured values.
func summarize(vs []float64) stats {
	vs = slices.Clone(vs)
	slices.Sort(vs)
	return stats{median: vs[len(vs)/2], min: vs[0], max: vs[len(vs)-1]}
}

func fabricdArgs(l *lab.Lab, binDir string, h *lab.Host) []string {
	return l.FabricdArgs(binDir, h, "--log-level", "warn")
}

// rss is p's resident memory; a process that has exited is an error, not 0.
func rss(p *lab.Process) (int64, error) {
	if p.Exited() {
		return 0, fmt.Errorf("%s exited; see %s", p.Label, p.LogPath())
	}
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", p.Pid()))
	if err != nil {
		return 0, err
	}
	for _, line := range strings.Split(string(data), "\n") {
		if f := strings.Fields(line); len(f) >= 2 && f[0] == "VmRSS:" {
			kb, _ := strconv.ParseInt(f[1], 10, 64)
			return kb << 10, nil
		}
	}
	return 0, fmt.Errorf("no VmRSS for %s", p.Label)
}

// benchDataplane is fabricd's data plane (VXLAN, quiet) in h's namespace,
// and a func that removes what it installed.
func benchDataplane(h *lab.Host) (*dataplane.Manager, func(), error) {
	ns, err := netns.GetFromName(h.Netns)
	if err != nil {
		return nil, nil, err
	}
	defer ns.Close()
	nh, err := netlink.NewHandleAt(ns, unix.NETLINK_ROUTE)
	if err != nil {
		return nil, nil, err
	}
	quiet := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelError}))
	vx, err := vxlanfallback.New(vxlanfallback.Config{Handle: nh, UnderlayAddr: h.Addr, UnderlayDev: h.Dev, Subnet: netip.MustParsePrefix("10.99.0.0/24"), Logger: quiet})
	if err != nil {
		nh.Close()
		return nil, nil, err
	}
	dp, err := dataplane.New(dataplane.Config{Handle: nh, Backends: []backend.Backend{vx}, UnderlayDev: h.Dev, UnderlayAddr: h.Addr, Logger: quiet})
	if err != nil {
		nh.Close()
		return nil, nil, err
	}
	return dp, func() {
		dataplane.Cleanup(nh, dataplane.DefaultProtocol)
		backend.DeleteLink(nh, vx.Device())
		nh.Close()
	}, nil
}

type timing struct {
	name string
	d    time.Duration
}

// programPeers times installing n peers' routes, neighbours and FDB entries.
func programPeers(ctx context.Context, h *lab.Host, n int) ([]timing, error) {
	peers := make([]dataplane.RemoteRoute, n)
	var ipBatch, fdbBatch strings.Builder
	for i := range n {
		sub := netip.PrefixFrom(netip.AddrFrom4([4]byte{10, 100 + byte(i/256), byte(i % 256), 0}), 24)
		addr := netip.AddrFrom4([4]byte{172, 31, byte(i / 256), byte(i%256) + 1})
		mac := net.HardwareAddr{0x0e, 0xfa, 172, 31, byte(i / 256), byte(i%256) + 1}
		peers[i] = dataplane.RemoteRoute{Prefix: sub, NextHop: addr, PeerName: fmt.Sprintf("peer%d", i),
			Peer: &dataplane.PeerInfo{Name: fmt.Sprintf("peer%d", i), Address: addr, VTEPMAC: mac, Encaps: []string{"vxlan"}, Subnet: sub}}
		fmt.Fprintf(&ipBatch, "neigh replace %s lladdr %s dev bvx nud permanent\nroute replace %s via %s dev bvx onlink proto 94\n", sub.Addr(), mac, sub, sub.Addr())
		fmt.Fprintf(&fdbBatch, "fdb append %s dev bvx dst %s\n", mac, addr)
	}
	dir, err := os.MkdirTemp("", "fabric-bench-")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(dir)
	os.WriteFile(filepath.Join(dir, "ip.batch"), []byte(ipBatch.String()), 0o644)
	os.WriteFile(filepath.Join(dir, "fdb.batch"), []byte(fdbBatch.String()), 0o644)

	// Baseline: iproute2's batch mode on its own VXLAN device.
	if out, err := h.Run(ctx, "ip", "link", "add", "bvx", "type", "vxlan", "id", "7", "local", h.Addr.String(), "dev", h.Dev, "dstport", "4790", "nolearning"); err != nil {
		return nil, fmt.Errorf("%w: %s", err, out)
	}
	h.Run(ctx, "ip", "link", "set", "bvx", "up")
	start := time.Now()
	if out, err := h.Run(ctx, "ip", "-batch", filepath.Join(dir, "ip.batch")); err != nil {
		return nil, fmt.Errorf("ip -batch: %w: %s", err, out)
	}
	if out, err := h.Run(ctx, "bridge", "-batch", filepath.Join(dir, "fdb.batch")); err != nil {
		return nil, fmt.Errorf("bridge -batch: %w: %s", err, out)
	}
	batch := time.Since(start)
	h.Run(ctx, "ip", "link", "del", "bvx")

	dp, closeDP, err := benchDataplane(h)
	if err != nil {
		return nil, err
	}
	defer closeDP()
	start = time.Now()
	if err := dp.Apply(ctx, peers); err != nil {
		return nil, err
	}
	first := time.Since(start)
	start = time.Now()
	if err := dp.Apply(ctx, peers); err != nil {
		return nil, err
	}
	again := time.Since(start)
	owned, _ := dp.Owned()
	if len(owned) != n {
		return nil, fmt.Errorf("dataplane installed %d routes, want %d", len(owned), n)
	}
	return []timing{
		{"ip -batch + bridge -batch (baseline)", batch},
		{"dataplane.Apply, empty kernel", first},
		{"dataplane.Apply, nothing changed (drift check)", again},
	}, nil
}
