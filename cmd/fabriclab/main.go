// fabriclab runs fabric on a lab of network namespaces on this machine.
// `fabriclab demo` is what `make demo` runs: a real etcd, fabricd on three
// hosts, containers talking across hosts, and the operator's view of it.
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"net/netip"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/fabricnet/fabric/lab"
	"github.com/fabricnet/fabric/localapi"
)

func main() {
	if len(os.Args) < 2 || os.Args[1] != "demo" {
		fmt.Fprintln(os.Stderr, "usage: fabriclab demo [--bin DIR] [--hosts N] [--keep]")
		os.Exit(2)
	}
	fs := flag.NewFlagSet("demo", flag.ExitOnError)
	bin := fs.String("bin", "bin", "directory holding fabricd and fabricctl")
	hosts := fs.Int("hosts", 3, "number of hosts")
	encap := fs.String("encapsulation", "auto", "fabricd --encapsulation")
	keep := fs.Bool("keep", false, "keep the lab running until Ctrl-C")
	fs.Parse(os.Args[2:])
	binDir, _ := filepath.Abs(*bin)
	if err := demo(binDir, *hosts, *encap, *keep); err != nil {
		fmt.Fprintln(os.Stderr, "demo failed:", err)
		os.Exit(1)
	}
}

type demoLab struct {
	lab    *lab.Lab
	binDir string
}

func step(format string, a ...any) { fmt.Printf("\n==> "+format+"\n", a...) }

func demo(binDir string, nHosts int, encap string, keep bool) error {
	for _, b := range []string{"fabricd", "fabricctl"} {
		if _, err := os.Stat(filepath.Join(binDir, b)); err != nil {
			return fmt.Errorf("%s not found in %s: run `make build` first", b, binDir)
		}
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	lab.SweepStale()

	step("building a lab: %d hosts on one underlay segment, a real etcd, in network namespaces", nHosts)
	buildCtx, cancel := context.WithTimeout(ctx, 60*time.Second)
	l, err := lab.New(buildCtx, lab.Spec{Hosts: nHosts})
	cancel()
	if err != nil {
		return err
	}
	defer func() {
		step("tearing down lab %s (namespaces, links, processes)", l.Prefix())
		if err := l.Close(); err != nil {
			fmt.Fprintln(os.Stderr, "teardown:", err)
		}
	}()
	d := &demoLab{lab: l, binDir: binDir}
	fmt.Printf("lab prefix %s, etcd at %s, logs in %s\n", l.Prefix(), strings.Join(l.EtcdEndpoints(), ","), l.LogDir())
	for _, h := range l.Hosts() {
		fmt.Printf("  %-6s namespace %-14s underlay %s on %s\n", h.Name, h.Netns, h.Addr, h.Dev)
	}

	step("starting fabricd on every host (pool 10.244.0.0/16, encapsulation %s)", encap)
	for _, h := range l.Hosts() {
		args := []string{filepath.Join(binDir, "fabricd"),
			"--node-name", h.Name, "--machine-id", l.Prefix() + "-" + h.Name,
			"--etcd-endpoints", strings.Join(l.EtcdEndpoints(), ","),
			"--pool", "10.244.0.0/16", "--encapsulation", encap,
			"--run-dir", d.runDir(h), "--docker-opts-file", d.runDir(h) + "/docker.env",
			"--underlay-interface", h.Dev}
		if _, err := h.Start("fabricd", args...); err != nil {
			return err
		}
	}
	statuses := map[string]localapi.Status{}
	for _, h := range l.Hosts() {
		s, err := d.waitStatus(ctx, h)
		if err != nil {
			return err
		}
		statuses[h.Name] = s
	}

	step("fabricctl ipam show")
	out, err := d.ctl(ctx, l.Hosts()[0], "ipam", "show")
	fmt.Print(out)
	if err != nil {
		return err
	}

	step("waiting for the BGP mesh")
	if err := d.waitMesh(ctx); err != nil {
		return err
	}
	h1 := l.Hosts()[0]
	step("fabricctl peers status (on %s)", h1.Name)
	out, _ = d.ctl(ctx, h1, "peers", "status")
	fmt.Print(out)
	step("fabricctl routes (on %s)", h1.Name)
	out, _ = d.ctl(ctx, h1, "routes")
	fmt.Print(out)
	step("fabricctl docker-opts (on %s)", h1.Name)
	out, _ = d.ctl(ctx, h1, "docker-opts", "--file", d.runDir(h1)+"/docker.env")
	fmt.Print(out)

	step("one container per host, on the bridge fabricd created")
	var ctrs []*lab.Container
	for _, h := range l.Hosts() {
		s := statuses[h.Name]
		sub := netip.MustParsePrefix(s.Subnet)
		addr := sub.Addr().Next().Next()
		c, err := l.AddContainer(ctx, h, "c1", netip.PrefixFrom(addr, sub.Bits()), netip.MustParseAddr(s.Gateway), s.Bridge, s.MTU)
		if err != nil {
			return err
		}
		fmt.Printf("  %s: container %s on %s (MTU %d)\n", h.Name, addr, s.Bridge, s.MTU)
		ctrs = append(ctrs, c)
	}

	step("containers on different hosts reach each other")
	peers, _ := localapi.NewClient(d.runDir(h1) + "/fabricd.sock").Peers(ctx)
	encapOf := map[string]string{}
	for _, p := range peers {
		encapOf[p.Name] = p.Encap
	}
	failed := 0
	for _, a := range ctrs {
		for _, b := range ctrs {
			if a == b {
				continue
			}
			// In-process ICMP: these machines have no ping binary.
			err := a.Ping(ctx, b.Addr, 5*time.Second)
			verdict := "ok"
			if err != nil {
				verdict = "FAILED"
				failed++
			}
			via := ""
			if a.Host == h1 {
				via = " (" + encapOf[b.Host.Name] + ")"
			}
			fmt.Printf("  ping %s@%s -> %s@%s%s: %s\n", a.Addr, a.Host.Name, b.Addr, b.Host.Name, via, verdict)
		}
	}
	if failed > 0 {
		return fmt.Errorf("%d container pairs could not reach each other; fabricd logs are in %s", failed, l.LogDir())
	}
	if keep {
		step("lab is running; Ctrl-C to tear it down. Try: nsenter --net=/var/run/netns/%s %s/fabricctl --run-dir %s peers status", h1.Netns, binDir, d.runDir(h1))
		<-ctx.Done()
	}
	step("demo passed")
	return nil
}

func (d *demoLab) runDir(h *lab.Host) string { return filepath.Join(d.lab.LogDir(), h.Name+"-run") }

func (d *demoLab) ctl(ctx context.Context, h *lab.Host, args ...string) (string, error) {
	c, cancel := context.WithTimeout(ctx, 15*time.Second)
	defer cancel()
	full := append([]string{"--run-dir", d.runDir(h), "--etcd-endpoints", strings.Join(d.lab.EtcdEndpoints(), ",")}, args...)
	return h.Run(c, filepath.Join(d.binDir, "fabricctl"), full...)
}

func (d *demoLab) waitStatus(ctx context.Context, h *lab.Host) (localapi.Status, error) {
	deadline := time.Now().Add(30 * time.Second)
	for {
		out, err := d.ctl(ctx, h, "status", "--json")
		if err == nil {
			var s localapi.Status
			return s, json.Unmarshal([]byte(out), &s)
		}
		if time.Now().After(deadline) || ctx.Err() != nil {
			return localapi.Status{}, fmt.Errorf("fabricd on %s did not come up: %v (log: %s/%s-fabricd.log)", h.Name, err, d.lab.LogDir(), h.Name)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

func (d *demoLab) waitMesh(ctx context.Context) error {
	deadline := time.Now().Add(30 * time.Second)
	want := len(d.lab.Hosts()) - 1
	for {
		ok := true
		for _, h := range d.lab.Hosts() {
			out, err := d.ctl(ctx, h, "peers", "status", "--json")
			var ps []localapi.Peer
			if err != nil || json.Unmarshal([]byte(out), &ps) != nil {
				ok = false
				break
			}
			est := 0
			for _, p := range ps {
				if p.State == "established" {
					est++
				}
			}
			if est < want {
				ok = false
			}
		}
		if ok {
			return nil
		}
		if time.Now().After(deadline) || ctx.Err() != nil {
			return fmt.Errorf("BGP mesh not established within 30s; logs in %s", d.lab.LogDir())
		}
		time.Sleep(300 * time.Millisecond)
	}
}
