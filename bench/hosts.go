package main

import (
	"context"
	"flag"
	"fmt"
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

// hostsArgs go to every fabricd of the hosts part: "--bfd-interval 0"
// shows what BFD costs an idle host.
var hostsArgs = flag.String("hosts-args", "", `more fabricd flags for the hosts part, space-separated (e.g. "--bfd-interval 0")`)

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

// hostsBench builds a fabric of many hosts and reports, per setup: BGP
// sessions per host; the time from the first start to every host holding a
// route to every other host's subnet, with fabricd started in waves of
// startWave hosts, each wave routed everywhere before the next starts (all at
// once, a few hundred agents and etcd starve on this machine's two cores,
// which real hosts do not share); then, converged, one
// more host joining until every host routes to it, and leaving
// (`fabricctl leave`) until no host does; the steady state: CPU per host
// with the commands it runs (mean over 10 s, % of one core) and RSS per
// host.
func hostsBench(ctx context.Context, binDir string, setups []scaleSetup) error {
	fmt.Printf("\n## Many hosts: full mesh against fabricd route reflectors (one run each)\n")
	fmt.Printf("| hosts | reflectors | BGP sessions per host (fewest-most) | start (waves of %d, each routed everywhere before the next) to every route everywhere | a host joins → routed everywhere | it leaves → gone everywhere | steady CPU per host | CPU per reflector during the start | fabricd RSS per host, mean |\n|---|---|---|---|---|---|---|---|---|\n", startWave)
	for _, s := range setups {
		r, err := converge(ctx, binDir, s.hosts, s.reflectors)
		if err != nil {
			// A row this machine cannot hold (too many hosts for its
			// cores) says why and the other rows still run.
			fmt.Printf("| %d | %d | not measured: %s | | | | | | |\n", s.hosts, s.reflectors, strings.ReplaceAll(err.Error(), "|", "/"))
			continue
		}
		reflectorCPU := "-"
		if s.reflectors > 0 {
			reflectorCPU = fmt.Sprintf("%.1f %%", r.reflectorPct)
		}
		fmt.Printf("| %d | %d | %d-%d | %s | %s | %s | %.1f %% | %s | %.1f MiB |\n", s.hosts, s.reflectors, r.fewest, r.sessions,
			r.took.Round(100*time.Millisecond), r.join.Round(10*time.Millisecond), r.leave.Round(10*time.Millisecond), r.cpuPct, reflectorCPU, r.rss/(1<<20))
	}
	return nil
}

// startWave is how many fabricd the hosts part starts before waiting for
// them to answer on their local API.
const startWave = 10

type convergence struct {
	fewest      int // sessions of the host with the fewest
	sessions    int // and of the one with the most
	took        time.Duration
	join, leave time.Duration
	cpuPct      float64 // steady CPU per host, % of one core
	// reflectorPct is the CPU of each reflector from its start until every
	// host has every route, % of one core (mean of the reflectors).
	reflectorPct float64
	rss          float64
}

// converge builds n+1 hosts of a new lab, starts fabricd on n of them (the
// first reflectors with --route-reflector), measures until every host has a
// route to every other host's subnet and the steady state, then starts the
// last host and times its route reaching every other host, and its leaving.
func converge(ctx context.Context, binDir string, n, reflectors int) (convergence, error) {
	// An underlay subnet holds up to 189 hosts; more go on routed subnets,
	// as racks would. etcd runs at nice -10, standing in for its own
	// machines: at an equal share it would get one agent's slice of the two
	// cores, its leases would expire, and every host would react to every
	// record that went.
	l, err := lab.New(ctx, lab.Spec{Hosts: n + 1, Subnets: (n + 180) / 180, Logger: warnLog, EtcdNice: -10})
	if err != nil {
		return convergence{}, err
	}
	defer l.Close()
	hosts := l.Hosts()
	clients := map[string]*localapi.Client{}
	for _, h := range hosts {
		clients[h.Name] = localapi.NewClient(filepath.Join(l.LogDir(), h.Name+"-run", "fabricd.sock"))
	}
	started := map[string]*lab.Process{}
	startOne := func(i int) (*lab.Process, error) {
		// etcd shares this machine's two cores with every agent: its
		// answers take longer than fabricd's default 5 s wait while a wave
		// of a few hundred hosts starts, which real etcd servers do not.
		args := append(fabricdArgs(l, binDir, hosts[i]), "--etcd-timeout", "30s")
		args = append(args, strings.Fields(*hostsArgs)...)
		if i < reflectors {
			// Every client's sessions live on the reflectors' keepalives
			// (9 s hold time). A reflector needs little CPU (the table's
			// column) but, at a load of 200 runnable agents, waits its turn
			// for seconds, which a real host with its own CPUs does not:
			// nice -5 stands in for that (two of three 200-host runs passed
			// without it, the third lost sessions to hold-timer expiry).
			args = append([]string{"nice", "-n", "-5"}, append(args, "--route-reflector")...)
		}
		p, err := hosts[i].Start("fabricd", args...)
		if err == nil {
			started[hosts[i].Name] = p
		}
		return p, err
	}
	// every waits until cond holds for every host of hs; when it does not,
	// the error ends with that host's last fabricd log lines.
	every := func(hs []*lab.Host, limit time.Duration, what string, cond func(*lab.Host) bool) error {
		deadline := time.Now().Add(limit)
		for _, h := range hs {
			for !cond(h) {
				if time.Now().After(deadline) {
					err := fmt.Errorf("%s: not on %s after %s", what, h.Name, limit)
					if p := started[h.Name]; p != nil {
						if b, rerr := os.ReadFile(p.LogPath()); rerr == nil {
							lines := strings.Split(strings.TrimSpace(string(b)), "\n")
							err = fmt.Errorf("%w; its fabricd's last log lines:\n%s", err, strings.Join(lines[max(0, len(lines)-8):], "\n"))
						}
					}
					return err
				}
				time.Sleep(50 * time.Millisecond)
			}
		}
		return nil
	}
	answers := func(h *lab.Host) bool { _, err := clients[h.Name].Status(ctx); return err == nil }
	routesTo := func(want int) func(*lab.Host) bool {
		return func(h *lab.Host) bool {
			routes, err := clients[h.Name].Routes(ctx)
			return err == nil && len(routes) >= want
		}
	}

	start := time.Now()
	fabric, joiner := hosts[:n], hosts[n]
	var procs []*lab.Process
	for wave := 0; wave < len(fabric); wave += startWave {
		end := min(wave+startWave, len(fabric))
		for i := wave; i < end; i++ {
			p, err := startOne(i)
			if err != nil {
				return convergence{}, err
			}
			procs = append(procs, p)
		}
		if err := every(fabric[wave:end], time.Minute, "fabricd answers", answers); err != nil {
			return convergence{}, err
		}
		// The next wave starts once this one is routed everywhere: every
		// host reacts to each new host, and a machine simulating hundreds
		// of hosts on two cores falls behind (etcd then answers too late for
		// the newest fabricd to start) unless each wave's work is done.
		if err := every(fabric[:end], 3*time.Minute, "a route to every started host", routesTo(end-1)); err != nil {
			return convergence{}, err
		}
	}
	// The last wave's check was every host routed to every other.
	r := convergence{took: time.Since(start), fewest: n}
	if reflectors > 0 {
		ticks, err := cpuTicks(procs[:reflectors])
		if err != nil {
			return r, err
		}
		r.reflectorPct = float64(ticks) / clockTicks / r.took.Seconds() / float64(reflectors) * 100
	}
	for _, h := range fabric {
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

	// One more host joins, then leaves.
	start = time.Now()
	if _, err := startOne(n); err != nil {
		return r, err
	}
	if err := every(fabric, 2*time.Minute, "a route to the joining host", routesTo(n)); err != nil {
		return r, err
	}
	r.join = time.Since(start)
	start = time.Now()
	if _, err := clients[joiner.Name].Leave(ctx); err != nil {
		return r, fmt.Errorf("leave %s: %w", joiner.Name, err)
	}
	if err := every(fabric, 2*time.Minute, "the left host's route gone", func(h *lab.Host) bool {
		routes, err := clients[h.Name].Routes(ctx)
		return err == nil && len(routes) == n-1
	}); err != nil {
		return r, err
	}
	r.leave = time.Since(start)
	return r, nil
}

// clockTicks is the kernel's USER_HZ, the unit of /proc/PID/stat's times.
const clockTicks = 100

// cpuTicks sums user and system time of the processes and of their
// children that have ended (iptables-save, iptables-restore, ipset).
func cpuTicks(procs []*lab.Process) (int64, error) {
	var total int64
	for _, p := range procs {
		data, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", p.Pid()))
		if err != nil {
			return 0, fmt.Errorf("%s: %w", p.Label, err)
		}
		// The command may hold spaces: fields count from after its ')'.
		f := strings.Fields(string(data[strings.LastIndexByte(string(data), ')')+2:]))
		for _, field := range f[11:15] { // utime, stime, cutime, cstime
			v, _ := strconv.ParseInt(field, 10, 64)
			total += v
		}
	}
	return total, nil
}
