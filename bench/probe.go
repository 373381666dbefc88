package main

import (
	"context"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"net/netip"
	"os"
	"time"

	"github.com/fabricnet/fabric/internal/nsthread"
	"github.com/fabricnet/fabric/lab"
	"github.com/fabricnet/fabric/probe"
)

var errorLog = slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelError}))

// probeRounds is how many blocks and lifts each probe setting is timed for.
const probeRounds = 7

// probeBench times the encapsulation probe on a routed lab (two hosts on
// two subnets): the router starts dropping IP protocol 4, until host1's
// prober calls host2's path blocked; the drop is lifted, until it works
// again. The previous settings (a probe every 2 s, 3 misses, the interval
// as timeout) run in the same lab first, as the baseline. Each block comes
// at a random moment of the probe cycle.
func probeBench(ctx context.Context) error {
	fmt.Printf("\n## An IPIP path that stops passing IP protocol 4: until the prober says blocked, and back (median of %d blocks, min-max)\n\n", probeRounds)
	l, err := lab.New(ctx, lab.Spec{Hosts: 2, Subnets: 2, Logger: warnLog})
	if err != nil {
		return err
	}
	defer l.Close()
	h1, h2 := l.Hosts()[0], l.Hosts()[1]
	fmt.Println("| probe settings | blocked after (s) | vs before | working again after (s) |")
	fmt.Println("|---|---|---|---|")
	var baseline float64
	for _, setting := range []struct {
		name string
		cfg  probe.Config
	}{
		{"before: every 2 s, blocked after 3 misses", probe.Config{Interval: 2 * time.Second, FastInterval: 2 * time.Second, MinTimeout: 2 * time.Second, FailAfter: 3}},
		{fmt.Sprintf("now: every %s, %s apart after a miss, blocked after %d misses", probe.DefaultInterval, probe.DefaultFastInterval, probe.DefaultFailAfter), probe.Config{}},
	} {
		blocked, back, err := probeRuns(ctx, l, h1, h2, setting.cfg)
		if err != nil {
			return fmt.Errorf("%s: %w", setting.name, err)
		}
		if baseline == 0 {
			baseline = blocked.median
		}
		fmt.Printf("| %s | %.2f (%.2f-%.2f) | %.3f | %.2f (%.2f-%.2f) |\n", setting.name, blocked.median, blocked.min, blocked.max, blocked.median/baseline, back.median, back.min, back.max)
	}
	return nil
}

func probeRuns(ctx context.Context, l *lab.Lab, h1, h2 *lab.Host, cfg probe.Config) (blocked, back stats, err error) {
	ctx, stop := context.WithCancel(ctx)
	defer stop()
	var probers []*probe.Prober
	for _, h := range []*lab.Host{h1, h2} {
		c := cfg
		c.Local, c.Logger = h.Addr, errorLog // its blocked warnings are what is being timed
		var p *probe.Prober
		if err := nsthread.Do(h.Netns, func() (err error) { p, err = probe.Start(ctx, c); return err }); err != nil {
			return stats{}, stats{}, err
		}
		probers = append(probers, p)
		defer func() { stop(); <-p.Done() }()
	}
	p1 := probers[0]
	p1.SetPeers([]netip.Addr{h2.Addr})
	probers[1].SetPeers([]netip.Addr{h1.Addr})
	// waitVerdict waits for p1's verdict on host2 and returns how long it took.
	waitVerdict := func(works bool) (float64, error) {
		start := time.Now()
		for p1.IPIPWorks(h2.Addr) != works {
			if time.Since(start) > 30*time.Second {
				w, reason, _ := p1.State(h2.Addr)
				return 0, fmt.Errorf("host1's verdict on host2 still works=%v after 30 s (want %v): %s", w, works, reason)
			}
			time.Sleep(5 * time.Millisecond)
		}
		return time.Since(start).Seconds(), nil
	}
	if _, err := waitVerdict(true); err != nil {
		return stats{}, stats{}, err
	}
	var blocks, backs []float64
	for range probeRounds {
		time.Sleep(time.Duration(rand.Int64N(int64(2 * time.Second)))) // a random moment of the cycle
		undo, err := l.DropIPProto(ctx, 4, h1.SubnetIndex, h2.SubnetIndex)
		if err != nil {
			return stats{}, stats{}, err
		}
		b, err := waitVerdict(false)
		if uerr := undo(); err == nil {
			err = uerr
		}
		if err != nil {
			return stats{}, stats{}, err
		}
		w, err := waitVerdict(true)
		if err != nil {
			return stats{}, stats{}, err
		}
		blocks, backs = append(blocks, b), append(backs, w)
	}
	return summarize(blocks), summarize(backs), nil
}
