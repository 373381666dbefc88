package main

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/fabricnet/fabric/lab"
	"github.com/fabricnet/fabric/localapi"
)

// scaleSetup is one row of the hosts part: n hosts, the first reflectors of
// them started with --route-reflector (0: the full mesh).
type scaleSetup struct{ hosts, reflectors int }

// defaultScaleSetups are the issue's: 50 hosts as a full mesh and with two
// reflectors, and 200 hosts with two reflectors.
var defaultScaleSetups = []scaleSetup{{50, 0}, {50, 2}, {200, 2}}

// parseSetups reads "50x0,50x2,200x2".
func parseSetups(s string) ([]scaleSetup, error) {
	var out []scaleSetup
	for _, f := range strings.Split(s, ",") {
		h, r, ok := strings.Cut(strings.TrimSpace(f), "x")
		hosts, err1 := strconv.Atoi(h)
		reflectors, err2 := strconv.Atoi(r)
		if !ok || err1 != nil || err2 != nil || hosts < 2 || hosts > 250 || reflectors < 0 || reflectors >= hosts {
			return nil, fmt.Errorf("hosts setup %q: want HOSTSxREFLECTORS, 2-250 hosts, fewer reflectors than hosts", f)
		}
		out = append(out, scaleSetup{hosts, reflectors})
	}
	return out, nil
}

// hostsBench starts fabricd on many hosts at once and reports, per setup:
// BGP sessions per host, the time from the first start to every host
// holding a route to every other host's subnet, then the steady state: CPU
// per host (mean over 10 s, in % of one core) and RSS per host.
func hostsBench(ctx context.Context, binDir string, setups []scaleSetup) error {
	fmt.Printf("\n## Many hosts: full mesh against fabricd route reflectors (one run each)\n")
	fmt.Printf("| hosts | reflectors | BGP sessions per host (fewest-most) | start to every route everywhere | steady CPU per host | fabricd RSS per host, mean |\n|---|---|---|---|---|---|\n")
	for _, s := range setups {
		r, err := converge(ctx, binDir, s.hosts, s.reflectors)
		if err != nil {
			return fmt.Errorf("%d hosts, %d reflectors: %w", s.hosts, s.reflectors, err)
		}
		fmt.Printf("| %d | %d | %d-%d | %s | %.1f %% | %.1f MiB |\n", s.hosts, s.reflectors, r.fewest, r.sessions,
			r.took.Round(100*time.Millisecond), r.cpuPct, r.rss/(1<<20))
	}
	return nil
}

type convergence struct {
	fewest   int // sessions of the host with the fewest
	sessions int // and of the one with the most
	took     time.Duration
	cpuPct   float64 // steady CPU per host, % of one core
	rss      float64
}

// converge starts fabricd on n hosts of a new lab (the first reflectors of
// them with --route-reflector) and measures until every host has a route to
// every other host's subnet, then the steady state.
func converge(ctx context.Context, binDir string, n, reflectors int) (convergence, error) {
	l, err := lab.New(ctx, lab.Spec{Hosts: n, Logger: slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))})
	if err != nil {
		return convergence{}, err
	}
	defer l.Close()
	hosts := l.Hosts()
	start := time.Now()
	var procs []*lab.Process
	for i, h := range hosts {
		args := fabricdArgs(l, binDir, h)
		if i < reflectors {
			args = append(args, "--route-reflector")
		}
		p, err := h.Start("fabricd", args...)
		if err != nil {
			return convergence{}, err
		}
		procs = append(procs, p)
	}
	clients := map[string]*localapi.Client{}
	for _, h := range hosts {
		clients[h.Name] = localapi.NewClient(filepath.Join(l.LogDir(), h.Name+"-run", "fabricd.sock"))
	}
	deadline := time.Now().Add(5 * time.Minute)
	for {
		done := true
		for _, h := range hosts {
			routes, err := clients[h.Name].Routes(ctx)
			if err != nil || len(routes) < n-1 {
				done = false
				break
			}
		}
		if done {
			break
		}
		if time.Now().After(deadline) {
			return convergence{}, fmt.Errorf("not every host has every route after 5 minutes")
		}
		time.Sleep(200 * time.Millisecond)
	}
	r := convergence{took: time.Since(start), fewest: n}
	for _, h := range hosts {
		peers, err := clients[h.Name].Peers(ctx)
		if err != nil {
			return r, err
		}
		r.sessions = max(r.sessions, len(peers))
		r.fewest = min(r.fewest, len(peers))
	}
	// Steady state: CPU over 10 s once converged.
	const window = 10 * time.Second
	before, err := cpuTicks(procs)
	if err != nil {
		return r, err
	}
	time.Sleep(window)
	after, err := cpuTicks(procs)
	if err != nil {
		return r, err
	}
	r.cpuPct = float64(after-before) / clockTicks / window.Seconds() / float64(len(procs)) * 100
	var total float64
	for _, p := range procs {
		v, err := rss(p)
		if err != nil {
			return r, err
		}
		total += float64(v)
	}
	r.rss = total / float64(len(procs))
	return r, nil
}

// clockTicks is the kernel's USER_HZ, the unit of /proc/PID/stat's times.
const clockTicks = 100

// cpuTicks sums user and system time of the processes.
func cpuTicks(procs []*lab.Process) (int64, error) {
	var total int64
	for _, p := range procs {
		data, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", p.Pid()))
		if err != nil {
			return 0, fmt.Errorf("%s: %w", p.Label, err)
		}
		// The command may hold spaces: fields count from after its ')'.
		f := strings.Fields(string(data[strings.LastIndexByte(string(data), ')')+2:]))
		utime, _ := strconv.ParseInt(f[11], 10, 64)
		stime, _ := strconv.ParseInt(f[12], 10, 64)
		total += utime + stime
	}
	return total, nil
}
