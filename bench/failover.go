package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/fabricnet/fabric/bfd"
	"github.com/fabricnet/fabric/internal/nsthread"
	"github.com/fabricnet/fabric/lab"
	"github.com/fabricnet/fabric/localapi"
)

// failoverBench measures how long the other hosts keep routing to a host
// whose underlay link goes down silently, with BFD (the default) against
// BFD off (the BGP hold time and the node record) in the same run; how
// long the encapsulation probe takes to call a blocked IPIP path blocked
// (probeBench); and
// the CPU BFD costs a host of a 50-host fabric (49 sessions, 5 packets a
// second each way).
func failoverBench(ctx context.Context, binDir string) error {
	fmt.Printf("\n## A silent host routed around: 3 hosts, its underlay link set down (median of %d runs, min-max)\n\n", runs)
	fmt.Println("| detection | seconds until no host routes to it | vs BFD off |")
	fmt.Println("|---|---|---|")
	var results []stats
	for _, mode := range []struct {
		name string
		args []string
	}{
		{"BFD off (BGP hold time 9 s, node record 10 s)", []string{"--bfd-interval", "0"}},
		{"BFD 200 ms × 3, then ICMP echo", nil},
	} {
		st, err := deadHostRuns(ctx, binDir, mode.args, mode.args == nil)
		if err != nil {
			return fmt.Errorf("%s: %w", mode.name, err)
		}
		results = append(results, st)
		fmt.Printf("| %s | %.2f (%.2f-%.2f) | %.3f |\n", mode.name, st.median, st.min, st.max, st.median/results[0].median)
	}

	if err := probeBench(ctx); err != nil {
		return fmt.Errorf("probe: %w", err)
	}
	// Where IPIP itself runs: the probe at its own pace under TCG.
	if err := guestBench(ctx, "probe"); err != nil {
		return err
	}

	return bfdBench(ctx)
}

// bfdBench is the CPU of one host's BFD with 49 sessions against the idle
// server (-only bfd alone).
func bfdBench(ctx context.Context) error {
	const peers = 49
	fmt.Printf("\n## BFD's CPU on a host of a 50-host fabric: %d sessions at 200 ms each way (median of %d runs of 10 s, min-max)\n\n", peers, runs)
	cpu, err := bfdCPU(ctx, peers)
	if err != nil {
		return fmt.Errorf("bfd cpu: %w", err)
	}
	fmt.Println("| what | % of one core |")
	fmt.Println("|---|---|")
	fmt.Printf("| the BFD server alone, no session (baseline) | %.3f (%.3f-%.3f) |\n", cpu[0].median, cpu[0].min, cpu[0].max)
	fmt.Printf("| the BFD server with %d sessions up | %.3f (%.3f-%.3f) |\n", peers, cpu[1].median, cpu[1].min, cpu[1].max)
	return nil
}

// deadHostRuns times, runs times on one lab, host3's link going down until
// host1 and host2 have no route to its subnet, bringing it back between
// runs.
func deadHostRuns(ctx context.Context, binDir string, args []string, waitBFD bool) (stats, error) {
	l, err := lab.New(ctx, lab.Spec{Hosts: 3, Logger: warnLog})
	if err != nil {
		return stats{}, err
	}
	defer l.Close()
	hosts := l.Hosts()
	for _, h := range hosts {
		if _, err := h.Start("fabricd", append(fabricdArgs(l, binDir, h), args...)...); err != nil {
			return stats{}, err
		}
	}
	dead, others := hosts[2], hosts[:2]
	st, err := waitStatus(ctx, l, dead)
	if err != nil {
		return stats{}, err
	}
	subnet := st.Subnet
	routed := func(h *lab.Host) bool {
		out, _ := h.Run(ctx, "ip", "route", "show", "proto", "93", subnet)
		return strings.TrimSpace(out) != ""
	}
	until := func(what string, limit time.Duration, cond func() bool) error {
		deadline := time.Now().Add(limit)
		for !cond() {
			if time.Now().After(deadline) {
				return fmt.Errorf("%s: not within %s", what, limit)
			}
			time.Sleep(10 * time.Millisecond)
		}
		return nil
	}
	ready := func() bool {
		for _, h := range others {
			if !routed(h) {
				return false
			}
			if !waitBFD {
				continue
			}
			ps, err := localapi.NewClient(h.FabricdRunDir() + "/fabricd.sock").Peers(ctx)
			if err != nil {
				return false
			}
			up := false
			for _, p := range ps {
				up = up || (p.Name == dead.Name && p.BFD == "up" && p.BFDDetect == 600*time.Millisecond)
			}
			if !up {
				return false
			}
		}
		return true
	}
	return samples(func() (float64, error) {
		if err := until("routes to "+dead.Name+" (and BFD up)", 90*time.Second, ready); err != nil {
			return 0, err
		}
		if _, err := dead.Run(ctx, "ip", "link", "set", dead.Dev, "down"); err != nil {
			return 0, err
		}
		start := time.Now()
		err := until("no route to the dead host", time.Minute, func() bool { return !routed(others[0]) && !routed(others[1]) })
		took := time.Since(start).Seconds()
		if _, uerr := dead.Run(ctx, "ip", "link", "set", dead.Dev, "up"); uerr != nil {
			return 0, errors.Join(err, uerr)
		}
		return took, err
	})
}

// bfdCPU runs one BFD server in a host namespace against peers servers in
// a child process in another, and measures this process's CPU over 10 s:
// first with no session, then with every session up.
func bfdCPU(ctx context.Context, peers int) ([2]stats, error) {
	l, err := lab.New(ctx, lab.Spec{Hosts: 2, Logger: warnLog})
	if err != nil {
		return [2]stats{}, err
	}
	defer l.Close()
	a, b := l.Hosts()[0], l.Hosts()[1]
	var peerAddrs []string
	base := b.Addr.As4()
	for i := range peers {
		addr := netip.AddrFrom4([4]byte{base[0], base[1], base[2], byte(100 + i)})
		if _, err := b.Run(ctx, "ip", "addr", "add", addr.String()+"/32", "dev", b.Dev); err != nil {
			return [2]stats{}, err
		}
		peerAddrs = append(peerAddrs, addr.String())
	}
	self, err := os.Executable()
	if err != nil {
		return [2]stats{}, err
	}
	if _, err := b.Start("bfd-peers", self, "-bfd-peers", strings.Join(peerAddrs, ","), "-bfd-peer-of", a.Addr.String()); err != nil {
		return [2]stats{}, err
	}
	var server *bfd.Server
	if err := nsthread.Do(a.Netns, func() (err error) {
		server, err = bfd.Listen(a.Addr, bfd.Port, slog.New(slog.DiscardHandler))
		return err
	}); err != nil {
		return [2]stats{}, err
	}
	runCtx, cancel := context.WithCancel(ctx)
	defer cancel()
	go server.Run(runCtx)
	cfg := bfd.Config{Interval: 200 * time.Millisecond, Multiplier: 3}
	measure := func() (float64, error) {
		before, t0 := cpuTime(), time.Now()
		time.Sleep(10 * time.Second)
		return 100 * float64(cpuTime()-before) / float64(time.Since(t0)), nil
	}
	idle, err := samples(measure)
	if err != nil {
		return [2]stats{}, err
	}
	var sessions []bfd.Peer
	for _, p := range peerAddrs {
		sessions = append(sessions, bfd.Peer{Addr: netip.MustParseAddr(p), Config: cfg})
	}
	server.SetPeers(sessions)
	deadline := time.Now().Add(30 * time.Second)
	for {
		up := 0
		for _, st := range server.Status() {
			if st.State == bfd.Up && st.DetectionTime == 600*time.Millisecond {
				up++
			}
		}
		if up == peers {
			break
		}
		if time.Now().After(deadline) {
			return [2]stats{}, fmt.Errorf("%d of %d sessions up after 30 s", up, peers)
		}
		time.Sleep(100 * time.Millisecond)
	}
	busy, err := samples(measure)
	return [2]stats{idle, busy}, err
}

// cpuTime is this process's user and system CPU so far.
func cpuTime() time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// bfdPeersFlag runs, in the child bfdCPU starts, a BFD server for each of
// its addresses with the one peer, until it is stopped.
var (
	bfdPeersFlag  = flag.String("bfd-peers", "", "internal: run BFD servers on these addresses (comma-separated)")
	bfdPeerOfFlag = flag.String("bfd-peer-of", "", "internal: the address their one peer has")
)

func runBFDPeers() error {
	peer, err := netip.ParseAddr(*bfdPeerOfFlag)
	if err != nil {
		return err
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, os.Interrupt)
	defer stop()
	cfg := bfd.Config{Interval: 200 * time.Millisecond, Multiplier: 3}
	for _, a := range strings.Split(*bfdPeersFlag, ",") {
		s, err := bfd.Listen(netip.MustParseAddr(a), bfd.Port, slog.New(slog.DiscardHandler))
		if err != nil {
			return err
		}
		go s.Run(ctx)
		s.SetPeers([]bfd.Peer{{Addr: peer, Config: cfg}})
	}
	<-ctx.Done()
	return nil
}
