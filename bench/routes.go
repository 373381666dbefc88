package main

import (
	"context"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/fabricnet/fabric/dataplane"
	"github.com/fabricnet/fabric/lab"
	"github.com/fabricnet/fabric/localapi"
)

// routesBench measures routes from a BIRD top-of-rack router: n /32 routes
// announced to one host, from the session coming up to every route in the
// kernel, and from BIRD withdrawing them to none left; against `ip -batch`
// adding the same routes in another host of the same lab (the kernel's own
// cost) in the same run; the kernel step alone: fabricd's data plane
// (dataplane.Apply) adding the same routes there. fabricd's RSS with the
// routes installed.
func routesBench(ctx context.Context, binDir string, counts []int) error {
	fmt.Printf("\n## Routes from a BIRD peer to the kernel (median of %d runs, min-max)\n", runs)
	fmt.Printf("| routes | `ip -batch` (baseline) | kernel step (dataplane.Apply) | vs ip -batch | session up → all in kernel | vs ip -batch | BIRD withdraws → none left | fabricd RSS |\n|---|---|---|---|---|---|---|---|\n")
	for _, n := range counts {
		var batch, apply, up, down []float64
		var rssMiB float64
		for range runs {
			r, err := routesRun(ctx, binDir, n)
			if err != nil {
				return fmt.Errorf("%d routes: %w", n, err)
			}
			batch = append(batch, r.batch.Seconds())
			apply = append(apply, r.apply.Seconds())
			up = append(up, r.up.Seconds())
			down = append(down, r.down.Seconds())
			rssMiB = max(rssMiB, r.rssMiB)
		}
		b, a, u, d := summarize(batch), summarize(apply), summarize(up), summarize(down)
		fmt.Printf("| %d | %.3f s (%.3f-%.3f) | %.3f s (%.3f-%.3f) | %.2f | %.2f s (%.2f-%.2f) | %.1f | %.2f s (%.2f-%.2f) | %.1f MiB (most) |\n",
			n, b.median, b.min, b.max, a.median, a.min, a.max, a.median/b.median, u.median, u.min, u.max, u.median/b.median, d.median, d.min, d.max, rssMiB)
	}
	return nil
}

type routesResult struct {
	batch, apply, up, down time.Duration
	rssMiB                 float64
}

// benchRoute is the i-th /32 BIRD announces: 10.60.0.0/14 holds 262144.
func benchRoute(i int) netip.Prefix {
	return netip.PrefixFrom(netip.AddrFrom4([4]byte{10, 60 + byte(i>>16), byte(i >> 8), byte(i)}), 32)
}

func routesRun(ctx context.Context, binDir string, n int) (routesResult, error) {
	var res routesResult
	l, err := lab.New(ctx, lab.Spec{Hosts: 2, Logger: warnLog})
	if err != nil {
		return res, err
	}
	defer l.Close()
	h1, h2 := l.Hosts()[0], l.Hosts()[1]
	bird, err := l.AddOutside(ctx)
	if err != nil {
		return res, err
	}

	// The baseline: the same routes through ip -batch on host2.
	var b strings.Builder
	for i := range n {
		fmt.Fprintf(&b, "route add %s via %s dev %s proto 94\n", benchRoute(i), bird.Addr, h2.Dev)
	}
	batchFile := filepath.Join(l.LogDir(), "routes.batch")
	if err := os.WriteFile(batchFile, []byte(b.String()), 0o644); err != nil {
		return res, err
	}
	start := time.Now()
	if out, err := h2.Run(ctx, "ip", "-batch", batchFile); err != nil {
		return res, fmt.Errorf("ip -batch: %v %s", err, out)
	}
	res.batch = time.Since(start)
	if out, err := h2.Run(ctx, "ip", "route", "flush", "proto", "94"); err != nil {
		return res, fmt.Errorf("ip route flush: %v %s", err, out)
	}

	// The kernel step alone: fabricd's data plane adding the same routes
	// (via the router, as it would from BIRD) on host2.
	dp, closeDP, err := benchDataplane(h2)
	if err != nil {
		return res, err
	}
	routes := make([]dataplane.RemoteRoute, n)
	for i := range n {
		routes[i] = dataplane.RemoteRoute{Prefix: benchRoute(i), NextHop: bird.Addr, PeerName: "tor"}
	}
	start = time.Now()
	err = dp.Apply(ctx, routes)
	res.apply = time.Since(start)
	closeDP()
	if err != nil {
		return res, fmt.Errorf("dataplane.Apply of %d routes: %w", n, err)
	}

	// BIRD with n static routes, exported to host1 with itself as next hop.
	dir := filepath.Join(l.LogDir(), "bird")
	os.MkdirAll(dir, 0o755)
	var conf strings.Builder
	fmt.Fprintf(&conf, "router id %s;\nprotocol device {}\nprotocol static bench { ipv4;\n", bird.Addr)
	for i := range n {
		fmt.Fprintf(&conf, "route %s blackhole;\n", benchRoute(i))
	}
	fmt.Fprintf(&conf, "}\nprotocol bgp host1 { local %s as 65000; neighbor %s as 64512; hold time 9; keepalive time 3; connect retry time 1;\n"+
		"  ipv4 { import none; export all; next hop self; }; }\n", bird.Addr, h1.Addr)
	confPath, sock := filepath.Join(dir, "bird.conf"), filepath.Join(dir, "bird.ctl")
	if err := os.WriteFile(confPath, []byte(conf.String()), 0o644); err != nil {
		return res, err
	}
	if _, err := bird.Start("bird", "bird", "-f", "-c", confPath, "-s", sock, "-P", filepath.Join(dir, "bird.pid")); err != nil {
		return res, fmt.Errorf("bird (apt-get install bird2): %w", err)
	}

	peers := filepath.Join(l.LogDir(), "peers.yaml")
	os.WriteFile(peers, []byte(fmt.Sprintf("peers:\n- name: tor\n  address: %s\n  asn: 65000\n  maxPrefixes: %d\n", bird.Addr, 2*n)), 0o644)
	p, err := h1.Start("fabricd", append(fabricdArgs(l, binDir, h1), "--config", peers)...)
	if err != nil {
		return res, err
	}
	api := localapi.NewClient(filepath.Join(l.LogDir(), h1.Name+"-run", "fabricd.sock"))
	deadline := time.Now().Add(3 * time.Minute)
	var established time.Time
	for established.IsZero() {
		if ps, err := api.Peers(ctx); err == nil {
			for _, peer := range ps {
				if peer.Name == "tor" && peer.State == "established" {
					established = time.Now()
				}
			}
		}
		if time.Now().After(deadline) || p.Exited() {
			return res, fmt.Errorf("no session with BIRD; fabricd log %s", p.LogPath())
		}
		time.Sleep(20 * time.Millisecond)
	}
	count := func() (int, error) {
		out, err := h1.Run(ctx, "ip", "-4", "route", "show", "proto", "93")
		if err != nil {
			return 0, err
		}
		return strings.Count(out, "10.6"), nil
	}
	for {
		c, err := count()
		if err == nil && c >= n {
			break
		}
		if time.Now().After(deadline) || p.Exited() {
			return res, fmt.Errorf("%d of %d routes in the kernel after 3 minutes (%v); fabricd log %s", c, n, err, p.LogPath())
		}
		time.Sleep(50 * time.Millisecond)
	}
	res.up = time.Since(established)
	if v, err := rss(p); err == nil {
		res.rssMiB = float64(v) / (1 << 20)
	}

	withdrawn := time.Now()
	if out, err := bird.Run(ctx, "birdc", "-s", sock, "disable", "bench"); err != nil {
		return res, fmt.Errorf("birdc disable: %v %s", err, out)
	}
	for {
		c, err := count()
		if err == nil && c == 0 {
			break
		}
		if time.Now().After(deadline) || p.Exited() {
			return res, fmt.Errorf("%d routes still in the kernel after BIRD withdrew them (%v)", c, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
	res.down = time.Since(withdrawn)
	return res, nil
}

// parseCounts reads "10000,100000".
func parseCounts(s string) ([]int, error) {
	var out []int
	for _, f := range strings.Split(s, ",") {
		n, err := strconv.Atoi(strings.TrimSpace(f))
		if err != nil || n < 1 || n > 262144 {
			return nil, fmt.Errorf("route count %q: want 1-262144", f)
		}
		out = append(out, n)
	}
	return out, nil
}
