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
	"strconv"
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

	step("starting fabricd on every host (pool 10.244.0.0/16, IPv6 pool %s, encapsulation %s)", demoPoolV6, encap)
	for _, h := range l.Hosts() {
		args := l.FabricdArgs(binDir, h, "--encapsulation", encap, "--pool-v6", demoPoolV6)
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
	withDocker := lab.DockerMissing() == ""
	var ctrs []*lab.Container
	for _, h := range l.Hosts() {
		s := statuses[h.Name]
		sub := netip.MustParsePrefix(s.Subnet)
		addr := sub.Addr().Next().Next()
		if withDocker {
			// dockerd joins this bridge later and hands out .2 upward.
			addr = netip.AddrFrom4([4]byte{sub.Addr().As4()[0], sub.Addr().As4()[1], sub.Addr().As4()[2], 254})
		}
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
	if reason := lab.DockerMissing(); !withDocker {
		step("skipping the dockerd part: %s", reason)
	} else if err := d.dockerDemo(ctx, statuses); err != nil {
		return err
	}
	if keep {
		step("lab is running; Ctrl-C to tear it down. Try: nsenter --net=/var/run/netns/%s %s/fabricctl --run-dir %s peers status", h1.Netns, binDir, d.runDir(h1))
		<-ctx.Done()
	}
	step("demo passed")
	return nil
}

func (d *demoLab) runDir(h *lab.Host) string { return h.FabricdRunDir() }

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

// dockerCtr is a demo container and the dockerd it runs in.
// demoPoolV6 gives the demo's containers IPv6 beside IPv4: each host's /64
// pairs with its /24.
const demoPoolV6 = "fd00:10:244::/48"

type dockerCtr struct {
	host *lab.Host
	d    *lab.Dockerd
	name string // "app" + the host's number: names are fabric-wide
	ip   string
	ipv6 string
}

// pingPairs pings from each container every container on another host,
// over IPv6 or IPv4, and returns how many pairs failed.
func pingPairs(ctx context.Context, ctrs []dockerCtr, ipv6 bool) (failed int) {
	for _, a := range ctrs {
		for _, b := range ctrs {
			if a.host == b.host {
				continue
			}
			args, dst := []string{"exec", a.name, "ping", "-c", "1", "-W", "2"}, b.ip
			if ipv6 {
				args, dst = append(args, "-6"), b.ipv6
			}
			var err error
			for try := 0; try < 3; try++ {
				pctx, cancel := context.WithTimeout(ctx, 10*time.Second)
				_, err = a.d.Docker(pctx, append(args, dst)...)
				cancel()
				if err == nil {
					break
				}
			}
			verdict := "ok"
			if err != nil {
				verdict = "FAILED"
				failed++
			}
			fmt.Printf("  docker exec %s ping %s   (%s@%s -> %s@%s): %s\n", a.name, dst, a.name, a.host.Name, b.name, b.host.Name, verdict)
		}
	}
	return failed
}

// dockerDemo starts a real dockerd on every host with the options fabricd
// wrote, runs a busybox container on each with `docker run`, and pings
// across hosts with `docker exec`. Lab.Close stops the daemons and removes
// their containers, directories and cgroups.
func (d *demoLab) dockerDemo(ctx context.Context, statuses map[string]localapi.Status) error {
	hosts := d.lab.Hosts()
	step("a real dockerd on every host, started with the options fabricd wrote (docker.io %s)", lab.DockerdPath)
	var ctrs []dockerCtr
	for _, h := range hosts {
		out, err := d.ctl(ctx, h, "docker-opts", "--file", d.runDir(h)+"/docker.env")
		if err != nil {
			return err
		}
		var opts []string
		for _, line := range strings.Split(out, "\n") {
			if v, ok := strings.CutPrefix(line, "DOCKER_OPTS="); ok {
				opts = strings.Fields(strings.Trim(v, `"`))
			}
		}
		if len(opts) == 0 {
			return fmt.Errorf("no DOCKER_OPTS in fabricctl docker-opts on %s:\n%s", h.Name, out)
		}
		sctx, cancel := context.WithTimeout(ctx, 40*time.Second)
		dd, err := h.StartDockerd(sctx, lab.DockerdOptions{ExtraArgs: opts, PluginDir: h.DockerPluginDir()})
		cancel()
		if err != nil {
			return err
		}
		fmt.Printf("  %s: dockerd %s (socket %s)\n", h.Name, strings.Join(opts, " "), dd.Socket)
		ctrs = append(ctrs, dockerCtr{host: h, d: dd, name: "app" + strings.TrimPrefix(h.Name, "host")})
	}

	step("docker import of a busybox image, then `docker run -d --name appN` one container per host")
	for i := range ctrs {
		c := &ctrs[i]
		rctx, cancel := context.WithTimeout(ctx, 60*time.Second)
		img, err := d.lab.BusyboxImage(rctx, c.d, nil)
		if err == nil {
			_, err = c.d.Docker(rctx, "run", "-d", "--name", c.name, img, "sleep", "3600")
		}
		if err == nil {
			c.ip, err = c.d.Docker(rctx, "inspect", "-f", "{{.NetworkSettings.IPAddress}}", c.name)
		}
		if err == nil {
			c.ipv6, err = c.d.Docker(rctx, "inspect", "-f", "{{.NetworkSettings.GlobalIPv6Address}}", c.name)
		}
		mtu, _ := c.d.Docker(rctx, "exec", c.name, "cat", "/sys/class/net/eth0/mtu")
		cancel()
		if err != nil {
			return fmt.Errorf("docker on %s: %w", c.host.Name, err)
		}
		s := statuses[c.host.Name]
		fmt.Printf("  %s: docker container %s, %s in %s and %s in %s (MTU %s, gateway %s on %s)\n", c.host.Name, c.name, c.ip, s.Subnet, c.ipv6, s.SubnetV6, mtu, s.Gateway, s.Bridge)
	}

	step("docker containers on different hosts reach each other (docker exec ping)")
	failed := pingPairs(ctx, ctrs, false)
	step("and over IPv6 (docker exec ping -6)")
	failed += pingPairs(ctx, ctrs, true)

	// By name, as on Docker's overlay: fabricd answers <name>.fabric on every
	// gateway, and dockerd's --dns-search makes the short name work.
	step("containers find each other by name across hosts (fabricd's DNS on the bridge gateway)")
	for i, a := range ctrs {
		b := ctrs[(i+1)%len(ctrs)]
		if a.host == b.host {
			continue
		}
		var out string
		var err error
		for try := 0; try < 10; try++ {
			pctx, cancel := context.WithTimeout(ctx, 10*time.Second)
			out, err = a.d.Docker(pctx, "exec", a.name, "ping", "-c", "1", "-W", "2", b.name)
			cancel()
			if err == nil {
				break
			}
			time.Sleep(500 * time.Millisecond)
		}
		// The name has an A and an AAAA record; ping takes the one its
		// resolver prefers.
		verdict, addr := "ok", b.ip
		if strings.Contains(out, "("+b.ipv6+")") {
			addr = b.ipv6
		}
		if err != nil || !strings.Contains(out, "("+addr+")") {
			verdict = fmt.Sprintf("FAILED: %v %s", err, out)
			failed++
		}
		fmt.Printf("  docker exec %s ping %s   (%s@%s -> %s.fabric = %s@%s): %s\n", a.name, b.name, a.name, a.host.Name, b.name, addr, b.host.Name, verdict)
	}
	if out, err := d.ctl(ctx, hosts[0], "containers"); err == nil {
		fmt.Printf("  fabricctl containers (on %s):\n", hosts[0].Name)
		for _, line := range strings.Split(strings.TrimSpace(out), "\n") {
			fmt.Printf("    %s\n", line)
		}
	}
	// One full-size packet: the container MTU fits the VXLAN overhead.
	if len(ctrs) > 1 {
		mtu := statuses[ctrs[0].host.Name].MTU
		pctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		_, err := ctrs[0].d.Docker(pctx, "exec", ctrs[0].name, "ping", "-c", "1", "-W", "2", "-s", strconv.Itoa(mtu-28), ctrs[1].ip)
		cancel()
		verdict := "ok"
		if err != nil {
			verdict = "FAILED"
			failed++
		}
		fmt.Printf("  full-size ping (%d-byte IP packets, the container MTU) %s -> %s: %s\n", mtu, ctrs[0].host.Name, ctrs[1].host.Name, verdict)
	}
	failed += d.networkDemo(ctx, ctrs[0].d, ctrs)
	if failed > 0 {
		return fmt.Errorf("%d docker container pings failed; logs in %s", failed, d.lab.LogDir())
	}
	return nil
}

// networkDemo is the multi-host workflow of every Docker guide: a network
// made on the first host with `docker network create -d fabric` appears on
// every host, and containers on it ping each other by name across hosts.
// It returns how many checks failed.
func (d *demoLab) networkDemo(ctx context.Context, first *lab.Dockerd, ctrs []dockerCtr) int {
	failed := 0
	step("docker network create -d fabric --ipam-driver fabric --subnet 172.16.1.0/24 net1 on %s: the network appears on every host", ctrs[0].host.Name)
	cctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	_, err := first.Docker(cctx, "network", "create", "-d", "fabric", "--ipam-driver", "fabric", "--subnet", "172.16.1.0/24", "net1")
	cancel()
	if err != nil {
		fmt.Printf("  FAILED: %v\n", err)
		return 1
	}
	for _, c := range ctrs {
		var out string
		for try := 0; try < 50; try++ {
			lctx, cancel := context.WithTimeout(ctx, 5*time.Second)
			out, _ = c.d.Docker(lctx, "network", "ls", "--filter", "driver=fabric", "--format", "{{.Name}} {{.Driver}}")
			cancel()
			if strings.Contains(out, "net1") {
				break
			}
			time.Sleep(100 * time.Millisecond)
		}
		verdict := "ok"
		if !strings.Contains(out, "net1") {
			verdict = "FAILED"
			failed++
		}
		fmt.Printf("  %s: docker network ls: %s: %s\n", c.host.Name, strings.ReplaceAll(strings.TrimSpace(out), "\n", ", "), verdict)
	}
	step("docker run --network net1 --name webN on every host; each pings the next one by name")
	img := ""
	for _, c := range ctrs {
		rctx, cancel := context.WithTimeout(ctx, 60*time.Second)
		img, err = d.lab.BusyboxImage(rctx, c.d, nil)
		if err == nil {
			_, err = c.d.Docker(rctx, "run", "-d", "--network", "net1", "--name", "web"+strings.TrimPrefix(c.host.Name, "host"), img, "sleep", "3600")
		}
		cancel()
		if err != nil {
			fmt.Printf("  %s: FAILED: %v\n", c.host.Name, err)
			failed++
		}
	}
	for i, a := range ctrs {
		b := ctrs[(i+1)%len(ctrs)]
		from, to := "web"+strings.TrimPrefix(a.host.Name, "host"), "web"+strings.TrimPrefix(b.host.Name, "host")
		var out string
		for try := 0; try < 10; try++ {
			pctx, cancel := context.WithTimeout(ctx, 10*time.Second)
			out, err = a.d.Docker(pctx, "exec", from, "ping", "-c", "1", "-W", "2", to)
			cancel()
			if err == nil {
				break
			}
			time.Sleep(500 * time.Millisecond)
		}
		verdict := "ok"
		if err != nil {
			verdict = fmt.Sprintf("FAILED: %v %s", err, out)
			failed++
		}
		first := strings.SplitN(out, "\n", 2)[0]
		fmt.Printf("  docker exec %s ping %s (%s -> %s): %s  %s\n", from, to, a.host.Name, b.host.Name, verdict, first)
	}
	if out, err := d.ctl(ctx, ctrs[0].host, "networks"); err == nil {
		fmt.Printf("  fabricctl networks (on %s):\n", ctrs[0].host.Name)
		for _, line := range strings.Split(strings.TrimSpace(out), "\n") {
			fmt.Printf("    %s\n", line)
		}
	}
	return failed
}
