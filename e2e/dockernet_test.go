package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/fabricnet/fabric/dockernet"
	"github.com/fabricnet/fabric/internal/testreq"
	"github.com/fabricnet/fabric/lab"
)

const dockernetLinkPrefix = dockernet.LinkPrefix

// networkSettle bounds waits for a network to appear or go on every host;
// the times measured are logged (make bench measures them).
const networkSettle = 20 * time.Second

// dockerNetLab is a 3-host fabric with a real dockerd on every host, each
// finding its own fabricd's network plugin.
func dockerNetLab(t *testing.T) (*fabric, []*dockerHost, string) {
	t.Helper()
	if reason := lab.DockerMissing(); reason != "" {
		testreq.Missing(t, "%s", reason)
	}
	f := newFabric(t, lab.Spec{Hosts: 3})
	hosts := f.startMesh()
	dhs, img := f.startDockerds(hosts)
	return f, dhs, img
}

// hasNetwork waits until dh's dockerd has (or, with want false, lacks) a
// network of that name with the fabric driver, and returns how long it took.
func (f *fabric) hasNetwork(dh *dockerHost, name string, want bool) time.Duration {
	f.t.Helper()
	return f.eventually(networkSettle, fmt.Sprintf("network %s on %s: %v", name, dh.host.Name, want), func() error {
		out, err := dh.docker("network", "ls", "--filter", "driver=fabric", "--format", "{{.Name}}")
		if err != nil {
			return err
		}
		has := false
		for _, n := range strings.Fields(out) {
			has = has || n == name
		}
		if has != want {
			return fmt.Errorf("fabric networks on %s: %q", dh.host.Name, out)
		}
		return nil
	})
}

// runOn starts a detached container on network with extra docker run flags
// and returns its address there.
func (dh *dockerHost) runOn(t *testing.T, network, name string, flags []string, img string, cmd ...string) netip.Addr {
	t.Helper()
	args := append(append(append([]string{"run", "-d", "--name", name, "--network", network}, flags...), img), cmd...)
	if out, err := dh.docker(args...); err != nil {
		t.Fatalf("docker run %s on %s: %v: %s", name, dh.host.Name, err, out)
	}
	ip, err := dh.docker("inspect", "-f", "{{(index .NetworkSettings.Networks \""+network+"\").IPAddress}}", name)
	if err != nil {
		t.Fatal(err)
	}
	return netip.MustParseAddr(ip)
}

// TestDockerNetworks is the multi-host workflow of every Docker guide, on
// the fabric: a network created on one host exists on every host; containers
// on it reach each other by name across hosts with their own addresses;
// another network and the bridge cannot reach them (refused, not timed out)
// and do not resolve their names; --ip is honoured once fabric-wide;
// -p publishes a port; leaving the fabric they are masqueraded; a network
// with containers is not removed, an empty one goes everywhere; bad input
// gets a clear error.
func TestDockerNetworks(t *testing.T) {
	t.Parallel()
	f, dhs, img := dockerNetLab(t)
	h1, h2, h3 := dhs[0], dhs[1], dhs[2]

	start := time.Now()
	if out, err := h1.docker("network", "create", "-d", "fabric", "--ipam-driver", "fabric",
		"--subnet", "172.16.1.0/24", "--gateway", "172.16.1.254", "net1"); err != nil {
		t.Fatalf("docker network create on host1: %v: %s", err, out)
	}
	for _, dh := range dhs[1:] {
		f.hasNetwork(dh, "net1", true)
	}
	t.Logf("net1 created on host1: on every host %.2fs later", time.Since(start).Seconds())

	c1 := h1.runOn(t, "net1", "c1", nil, img, "sleep", "3600")
	c2 := h2.runOn(t, "net1", "c2", nil, img, "tcpprobe", "serve", "0.0.0.0:8000", "1000")
	h3.runOn(t, "net1", "c3", nil, img, "sleep", "3600")
	for _, a := range []netip.Addr{c1, c2} {
		if !netip.MustParsePrefix("172.16.1.0/24").Contains(a) || a == netip.MustParseAddr("172.16.1.254") {
			t.Fatalf("container address %s: want one of net1's, not its gateway", a)
		}
	}
	h1.ctr, h2.ctr = "c1", "c2"

	t.Run("containers reach each other by name across hosts", func(t *testing.T) {
		f := f.sub(t)
		f.eventually(networkSettle, "c1 on host1 pings c2 on host2 by name", func() error {
			out, err := h1.docker("exec", "c1", "ping", "-c", "1", "-W", "2", "c2")
			if err != nil {
				return fmt.Errorf("%v: %s", err, out)
			}
			return nil
		})
		seen, err := h1.dial("c2:8000")
		if err != nil {
			t.Fatal(err)
		}
		if seen != c1.String() {
			t.Errorf("c2 saw c1 as %s, want its own address %s", seen, c1)
		}
		if out, err := h3.docker("exec", "c3", "ping", "-c", "1", "-W", "2", "c1"); err != nil {
			t.Errorf("c3 on host3 pings c1 by name: %v: %s", err, out)
		}
	})

	t.Run("another network and the bridge are refused and do not resolve its names", func(t *testing.T) {
		f := f.sub(t)
		if out, err := h2.docker("network", "create", "-d", "fabric", "--ipam-driver", "fabric", "--subnet", "172.16.2.0/24", "net2"); err != nil {
			t.Fatalf("create net2: %v: %s", err, out)
		}
		f.hasNetwork(h1, "net2", true)
		h1.runOn(t, "net2", "d1", nil, img, "sleep", "3600")
		h1.run(t, "b1", nil, img, "sleep", "3600") // docker0
		for _, from := range []string{"d1", "b1"} {
			start := time.Now()
			out, err := h1.docker("exec", from, "tcpprobe", "dial", netip.AddrPortFrom(c2, 8000).String())
			if err == nil {
				t.Errorf("%s reached c2 on net1: %s", from, out)
			} else if !strings.Contains(out, "refused") || time.Since(start) > 5*time.Second {
				t.Errorf("%s -> c2: want the connection refused at once, got after %s: %s", from, time.Since(start).Round(time.Millisecond), out)
			}
		}
		if out, err := h1.docker("exec", "d1", "nslookup", "c2"); err == nil && strings.Contains(out, c2.String()) {
			t.Errorf("c2 (net1) resolves from d1 on net2: %s", out)
		}
	})

	t.Run("--ip is given once fabric-wide", func(t *testing.T) {
		if got := h3.runOn(t, "net1", "fixed", []string{"--ip", "172.16.1.50"}, img, "sleep", "3600"); got != netip.MustParseAddr("172.16.1.50") {
			t.Fatalf("--ip 172.16.1.50 gave %s", got)
		}
		out, err := h1.docker("run", "-d", "--name", "twin", "--network", "net1", "--ip", "172.16.1.50", img, "sleep", "3600")
		if err == nil || !strings.Contains(out, "in use") || !strings.Contains(out, "host3") {
			t.Errorf("a second --ip 172.16.1.50 on host1: want it refused as in use on host3, got %v: %s", err, out)
		}
		if out, err := h1.docker("exec", "c1", "ping", "-c", "1", "-W", "2", "172.16.1.50"); err != nil {
			t.Errorf("c1 pings the --ip container on host3: %v: %s", err, out)
		}
	})

	t.Run("a published port answers on its host", func(t *testing.T) {
		f := f.sub(t)
		h2.runOn(t, "net1", "web", []string{"-p", "8080:80"}, img, "tcpprobe", "serve", "0.0.0.0:80", "1000")
		outside, err := f.lab.AddOutside(t.Context())
		if err != nil {
			t.Fatal(err)
		}
		f.eventually(networkSettle, "the outside reaches web through host2:8080", func() error {
			_, err := outsideDial(outside, netip.AddrPortFrom(h2.host.Addr, 8080).String())
			return err
		})
	})

	t.Run("leaving the fabric, a container is masqueraded", func(t *testing.T) {
		outside, err := f.lab.AddOutside(t.Context())
		if err != nil {
			t.Fatal(err)
		}
		srv, err := outside.Start("tcpprobe-masquerade", filepath.Join(binDir, "tcpprobe"), "serve", outside.Addr.String()+":9000", "100")
		if err != nil {
			t.Fatal(err)
		}
		defer srv.Stop()
		var seen string
		f.sub(t).eventually(networkSettle, "c1 reaches the outside server", func() error {
			var err error
			seen, err = h1.dial(netip.AddrPortFrom(outside.Addr, 9000).String())
			return err
		})
		if seen != h1.host.Addr.String() {
			t.Errorf("the outside saw c1 as %s, want host1's address %s", seen, h1.host.Addr)
		}
	})

	t.Run("fabricctl publish reaches a container on a fabric network from every host", func(t *testing.T) {
		f := f.sub(t)
		if out, err := f.fabricctl(h1.host, "publish", "add", "9100/tcp", netip.AddrPortFrom(c2, 8000).String()); err != nil {
			t.Fatalf("fabricctl publish add: %v: %s", err, out)
		}
		outside, _ := f.lab.AddOutside(t.Context())
		for _, dh := range dhs {
			f.eventually(networkSettle, "the outside reaches c2 through "+dh.host.Name+":9100", func() error {
				_, err := outsideDial(outside, netip.AddrPortFrom(dh.host.Addr, 9100).String())
				return err
			})
		}
		if out, err := f.fabricctl(h1.host, "publish", "delete", "9100/tcp"); err != nil {
			t.Errorf("fabricctl publish delete: %v: %s", err, out)
		}
	})

	t.Run("a container cannot send from an address that is not its own", func(t *testing.T) {
		h1.runOn(t, "net1", "spoofer", []string{"--cap-add", "NET_ADMIN"}, img, "sleep", "3600")
		if out, err := h1.docker("exec", "spoofer", "ip", "addr", "add", "172.16.1.99/24", "dev", "eth0"); err != nil {
			t.Fatalf("add a second address in the container: %v: %s", err, out)
		}
		// c2's count of echo requests received says whether a ping
		// arrived: a reply to 172.16.1.99 would be lost anyway.
		before := h2.echoesReceived(t, "c2", false)
		h1.docker("exec", "spoofer", "ping", "-c", "2", "-W", "2", "-I", "172.16.1.99", c2.String())
		spoofed := h2.echoesReceived(t, "c2", false) - before
		if out, err := h1.docker("exec", "spoofer", "ping", "-c", "1", "-W", "2", c2.String()); err != nil {
			t.Fatalf("spoofer pings c2 from its own address: %v: %s", err, out)
		}
		if own := h2.echoesReceived(t, "c2", false) - before - spoofed; own < 1 {
			t.Fatalf("c2 counted %d echo requests from the spoofer's own address: the counter does not show arrivals", own)
		}
		if spoofed != 0 {
			t.Errorf("%d pings from an address that is not the container's reached c2", spoofed)
		}
		h1.docker("rm", "-f", "spoofer")
	})

	t.Run("fabricctl networks shows each host's blocks and containers", func(t *testing.T) {
		out, err := f.fabricctl(h3.host, "networks", "-o", "json")
		if err != nil {
			t.Fatalf("fabricctl networks: %v: %s", err, out)
		}
		var rows []struct {
			Name       string
			Subnet     string
			Gateway    string
			Blocks     map[string][]string
			Containers map[string]int
		}
		if err := json.Unmarshal([]byte(out), &rows); err != nil {
			t.Fatalf("%v: %s", err, out)
		}
		byName := map[string]int{}
		for i, r := range rows {
			byName[r.Name] = i
		}
		r := rows[byName["net1"]]
		if r.Subnet != "172.16.1.0/24" || r.Gateway != "172.16.1.254" || r.Containers["host1"] != 1 || r.Containers["host2"] != 2 || r.Containers["host3"] != 2 || len(r.Blocks["host1"]) == 0 {
			t.Errorf("fabricctl networks: net1 is %+v; want its subnet, gateway, a block of host1's and 1, 2, 2 containers", r)
		}
		table, _ := f.fabricctl(h3.host, "networks")
		t.Logf("fabricctl networks:\n%s", table)
	})

	t.Run("a network with containers on other hosts stays in the fabric", func(t *testing.T) {
		f := f.sub(t)
		// host3's own containers go first: dockerd itself refuses to remove
		// a network its own containers use.
		if out, err := h3.docker("rm", "-f", "c3", "fixed"); err != nil {
			t.Fatalf("docker rm on host3: %v: %s", err, out)
		}
		// fabricd refuses, naming the hosts; dockerd 20.10 logs the
		// refusal and removes its own copy anyway, which fabricd makes
		// again: the network stays fabric-wide.
		h3.docker("network", "rm", "net1")
		f.hasNetwork(h3, "net1", true)
		if log, _ := os.ReadFile(h3.d.LogPath()); !strings.Contains(string(log), "has containers attached: 1 on host1, 2 on host2") {
			t.Errorf("host3's dockerd log lacks fabricd's refusal naming host1 and host2")
		}
		if out, err := h1.docker("exec", "c1", "ping", "-c", "1", "-W", "2", "c2"); err != nil {
			t.Errorf("c1 pings c2 after the refused removal: %v: %s", err, out)
		}
		f.hasNetwork(h1, "net1", true)
	})

	t.Run("bad input gets a clear error and changes nothing", func(t *testing.T) {
		for _, c := range []struct {
			args []string
			want string
		}{
			{[]string{"-d", "fabric", "--subnet", "172.16.9.0/24", "noipam"}, "--ipam-driver fabric"},
			{[]string{"-d", "fabric", "--ipam-driver", "fabric", "--subnet", "10.244.200.0/24", "inpool"}, "overlaps the fabric's container pool"},
			{[]string{"-d", "fabric", "--ipam-driver", "fabric", "--subnet", "172.16.1.128/25", "overlapping"}, "overlaps"},
			{[]string{"-d", "fabric", "--ipam-driver", "fabric", "--subnet", "192.168.100.0/24", "underlay"}, "underlay"},
			{[]string{"-d", "fabric", "--ipam-driver", "fabric", "--ipv6", "--subnet", "172.16.9.0/24", "--subnet", "fd00:9::/64", "six"}, "needs the fabric's IPv6 pool"},
			{[]string{"-d", "fabric", "--ipam-driver", "fabric", "nosubnet"}, "needs its subnet"},
		} {
			args := append([]string{"network", "create"}, c.args...)
			out, err := h1.docker(args...)
			if err == nil || !strings.Contains(out, c.want) {
				t.Errorf("docker %s: want an error saying %q, got %v: %s", strings.Join(args, " "), c.want, err, out)
			}
			name := c.args[len(c.args)-1]
			if ls, _ := h1.docker("network", "ls", "--format", "{{.Name}}"); strings.Contains(ls, name) {
				t.Errorf("refused network %s exists anyway: %s", name, ls)
			}
		}
	})

	t.Run("an empty network is removed from every host", func(t *testing.T) {
		f := f.sub(t)
		for dh, names := range map[*dockerHost][]string{h1: {"c1"}, h2: {"c2", "web"}} {
			if out, err := dh.docker(append([]string{"rm", "-f"}, names...)...); err != nil {
				t.Fatalf("docker rm on %s: %v: %s", dh.host.Name, err, out)
			}
		}
		if out, err := h3.docker("network", "rm", "net1"); err != nil {
			t.Fatalf("docker network rm net1 on host3: %v: %s", err, out)
		}
		for _, dh := range dhs {
			f.hasNetwork(dh, "net1", false)
		}
	})
}

// echoesReceived is how many ICMP (or ICMPv6) echo requests container ctr
// on dh has received: whether a ping arrived, whatever became of its reply.
func (dh *dockerHost) echoesReceived(t *testing.T, ctr string, v6 bool) int {
	t.Helper()
	file := "/proc/net/snmp"
	if v6 {
		file = "/proc/net/snmp6"
	}
	out, err := dh.docker("exec", ctr, "cat", file)
	if err != nil {
		t.Fatalf("read %s's %s: %v: %s", ctr, file, err, out)
	}
	lines := strings.Split(out, "\n")
	for i, line := range lines {
		f := strings.Fields(line)
		switch {
		case v6 && len(f) == 2 && f[0] == "Icmp6InEchos":
			n, _ := strconv.Atoi(f[1])
			return n
		case !v6 && len(f) > 0 && f[0] == "Icmp:" && i+1 < len(lines):
			// "Icmp: InMsgs ... InEchos ..." then the values, in order.
			values := strings.Fields(lines[i+1])
			if k := slices.Index(f, "InEchos"); k > 0 && k < len(values) {
				n, _ := strconv.Atoi(values[k])
				return n
			}
		}
	}
	t.Fatalf("%s's %s has no count of echo requests: %s", ctr, file, out)
	return 0
}

// pingStream pings dst every 10 ms for d from the network namespace of
// container ctr on dh (the host's iputils ping, which busybox's is not),
// and returns packets sent and received.
func (dh *dockerHost) pingStream(t *testing.T, ctr string, dst netip.Addr, d time.Duration) (sent, received int) {
	t.Helper()
	pid, err := dh.docker("inspect", "-f", "{{.State.Pid}}", ctr)
	if err != nil {
		t.Errorf("pid of %s on %s: %v", ctr, dh.host.Name, err)
		return 0, 0
	}
	ctx, cancel := context.WithTimeout(context.Background(), d+20*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, "nsenter", "-t", pid, "-n", "ping", "-q", "-i", "0.01", "-w", strconv.Itoa(int(d/time.Second)), dst.String()).CombinedOutput()
	t.Logf("ping %s from %s on %s: %v: %s", dst, ctr, dh.host.Name, err, out)
	m := regexp.MustCompile(`(\d+) packets transmitted, (\d+) received`).FindStringSubmatch(string(out))
	if m == nil {
		t.Errorf("ping %s from %s on %s: %v: %s", dst, ctr, dh.host.Name, err, out)
		return 0, 0
	}
	sent, _ = strconv.Atoi(m[1])
	received, _ = strconv.Atoi(m[2])
	return sent, received
}

// TestDockerNetworkLifecycle: what happens to containers on a fabric
// network when the daemons around them come and go. fabricd restarted:
// not one packet lost. dockerd restarted: its containers come back on the
// network, reachable by name. fabricd down while dockerd starts a
// container: a clear error and nothing half-made. A host that dies: its
// names go with its node record. fabricd --cleanup after a crash: no link
// or route of the networks is left.
func TestDockerNetworkLifecycle(t *testing.T) {
	t.Parallel()
	f, dhs, img := dockerNetLab(t)
	h1, h2, h3 := dhs[0], dhs[1], dhs[2]
	if out, err := h1.docker("network", "create", "-d", "fabric", "--ipam-driver", "fabric", "--subnet", "172.16.5.0/24", "net5"); err != nil {
		t.Fatalf("create net5: %v: %s", err, out)
	}
	for _, dh := range dhs {
		f.hasNetwork(dh, "net5", true)
	}
	c1 := h1.runOn(t, "net5", "c1", []string{"--restart", "always"}, img, "sleep", "3600")
	c2 := h2.runOn(t, "net5", "c2", []string{"--restart", "always"}, img, "sleep", "3600")
	f.eventually(networkSettle, "c1 reaches c2", func() error {
		_, err := h1.docker("exec", "c1", "ping", "-c", "1", "-W", "1", c2.String())
		return err
	})

	t.Run("fabricd restarted: no packet lost", func(t *testing.T) {
		const stream = 8 * time.Second
		var wg sync.WaitGroup
		results := map[string][2]int{}
		var mu sync.Mutex
		for _, p := range []struct {
			dh       *dockerHost
			ctr      string
			dst      netip.Addr
			pairName string
		}{{h1, "c1", c2, "c1->c2"}, {h2, "c2", c1, "c2->c1"}} {
			wg.Add(1)
			go func() {
				defer wg.Done()
				s, r := p.dh.pingStream(t, p.ctr, p.dst, stream)
				mu.Lock()
				results[p.pairName] = [2]int{s, r}
				mu.Unlock()
			}()
		}
		// Restart host2's fabricd while the streams run: the first
		// replies show they have started.
		f.eventually(10*time.Second, "the ping streams run", func() error {
			_, err := h1.docker("exec", "c1", "ping", "-c", "1", "-W", "1", c2.String())
			return err
		})
		f.restart(h2.host)
		wg.Wait()
		f.eventually(30*time.Second, "host2's fabricd answers again", func() error { _, err := f.status(h2.host); return err })
		for pair, sr := range results {
			t.Logf("fabricd on host2 restarted: %s %d sent, %d received", pair, sr[0], sr[1])
			if sr[0] < 300 || sr[1] != sr[0] {
				t.Errorf("%s: %d of %d packets lost across the restart (want 0 of at least 300)", pair, sr[0]-sr[1], sr[0])
			}
		}
		if t.Failed() {
			for _, h := range []*lab.Host{h1.host, h2.host} {
				for _, cmd := range [][]string{{"ip", "-o", "link"}, {"ip", "route"}, {"iptables-save", "-t", "filter"}} {
					out, err := h.Run(context.Background(), cmd[0], cmd[1:]...)
					t.Logf("%s: %s: %v\n%s", h.Name, strings.Join(cmd, " "), err, out)
				}
			}
			b, _ := os.ReadFile(f.agents[h2.host.Name].proc.LogPath())
			for _, l := range strings.Split(string(b), "\n") {
				if !strings.Contains(l, "DEBUG") {
					t.Log(l)
				}
			}
		}
	})

	t.Run("dockerd restarted: its containers come back on the network", func(t *testing.T) {
		f := f.sub(t)
		ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
		defer cancel()
		if err := h2.d.Restart(ctx); err != nil {
			t.Fatal(err)
		}
		d := f.eventually(60*time.Second, "c1 pings c2 by name after host2's dockerd restarted", func() error {
			out, err := h1.docker("exec", "c1", "ping", "-c", "1", "-W", "1", "c2")
			if err != nil {
				return fmt.Errorf("%v: %s", err, out)
			}
			return nil
		})
		t.Logf("c2 reachable by name %.1fs after host2's dockerd answered again", d.Seconds())
	})

	t.Run("fabricd down while dockerd starts a container: a clear error, nothing half-made", func(t *testing.T) {
		f := f.sub(t)
		a := f.agents[h3.host.Name]
		if err := a.proc.Stop(); err != nil {
			t.Fatal(err)
		}
		linksBefore, _ := h3.host.Run(context.Background(), "ip", "-o", "link")
		ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
		out, err := h3.d.Docker(ctx, "run", "-d", "--name", "orphan", "--network", "net5", img, "sleep", "3600")
		cancel()
		if err == nil {
			t.Errorf("docker run on net5 with fabricd down succeeded: %s", out)
		} else if !strings.Contains(out, "fabric") {
			t.Errorf("docker run with fabricd down: the error does not name the fabric plugin: %s", out)
		}
		t.Logf("docker run with fabricd down: %s", out)
		if st, _ := h3.docker("inspect", "-f", "{{.State.Running}}", "orphan"); st == "true" {
			t.Error("the container runs though its network could not be set up")
		}
		if linksAfter, _ := h3.host.Run(context.Background(), "ip", "-o", "link"); strings.Count(linksAfter, "fnep") != strings.Count(linksBefore, "fnep") {
			t.Errorf("endpoint links changed while fabricd was down:\nbefore %s\nafter %s", linksBefore, linksAfter)
		}
		h3.docker("rm", "-f", "orphan")
		p, err := h3.host.Start("fabricd", a.args...)
		if err != nil {
			t.Fatal(err)
		}
		a.proc = p
		f.eventually(30*time.Second, "host3's fabricd answers again", func() error { _, err := f.status(h3.host); return err })
		h3.runOn(t, "net5", "late", nil, img, "sleep", "3600")
	})

	t.Run("a host that dies takes its names with it", func(t *testing.T) {
		f := f.sub(t)
		if _, err := h1.docker("exec", "c1", "nslookup", "late"); err != nil {
			t.Fatalf("late (host3) does not resolve from c1 before host3 dies: %v", err)
		}
		f.agents[h3.host.Name].proc.Kill()
		killed := time.Now()
		f.eventually(nameSettle+10*time.Second, "late stops resolving on host1", func() error {
			if out, err := h1.docker("exec", "c1", "nslookup", "late"); err == nil && strings.Contains(out, "172.16.5.") {
				return fmt.Errorf("still resolves: %s", out)
			}
			return nil
		})
		t.Logf("host3's container names gone %.1fs after its fabricd was killed (node TTL 10s)", time.Since(killed).Seconds())
	})

	t.Run("fabricd --cleanup after a crash leaves no link or route of the networks", func(t *testing.T) {
		a := f.agents[h2.host.Name]
		a.proc.Kill()
		// Its containers go, and their Leave finds no fabricd: dockerd
		// waits for the plugin and is killed (the lab says so).
		if err := h2.d.Stop(); err != nil {
			t.Logf("stop dockerd with fabricd dead: %v", err)
		}
		links, _ := h2.host.Run(context.Background(), "ip", "-o", "link")
		if !strings.Contains(links, dockernetLinkPrefix) {
			t.Logf("no endpoint link was left by the crash (dockerd removed them): %s", links)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
		defer cancel()
		if out, err := h2.host.Run(ctx, a.args[0], append(a.args[1:], "--cleanup")...); err != nil {
			t.Fatalf("fabricd --cleanup: %v: %s", err, out)
		}
		links, _ = h2.host.Run(context.Background(), "ip", "-o", "link")
		if strings.Contains(links, dockernetLinkPrefix) {
			t.Errorf("endpoint links left after --cleanup:\n%s", links)
		}
		if routes := f.ownedRoutes(h2.host); len(routes) != 0 {
			t.Errorf("fabric routes left after --cleanup: %v", routes)
		}
	})
}

// composeFile is one project whose default network is a fabric network.
const composeFile = `version: "2.4"
services:
  web:
    image: %[1]s
    command: tcpprobe serve 0.0.0.0:80 1000
  client:
    image: %[1]s
    command: sleep 3600
networks:
  default:
    driver: fabric
    ipam:
      driver: fabric
      config:
        - subnet: 172.16.7.0/24
`

// compose runs Debian's docker-compose (1.29) against dh's dockerd.
func (dh *dockerHost) compose(t *testing.T, file string, args ...string) (string, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, "docker-compose", append([]string{"-f", file, "-p", "proj", "--no-ansi"}, args...)...)
	cmd.Env = append(os.Environ(), "DOCKER_HOST=unix://"+dh.d.Socket)
	out, err := cmd.CombinedOutput()
	return strings.TrimSpace(string(out)), err
}

// TestDockerCompose: one compose file whose default network is a fabric
// network; `web` is started on host2 and `client` on host1, and the client
// reaches web by its service name; `docker-compose down` on both hosts
// leaves nothing.
func TestDockerCompose(t *testing.T) {
	t.Parallel()
	if _, err := exec.LookPath("docker-compose"); err != nil {
		testreq.Missing(t, "docker-compose not installed (apt-get install docker-compose; make test installs it)")
	}
	f, dhs, img := dockerNetLab(t)
	h1, h2 := dhs[0], dhs[1]
	file := filepath.Join(t.TempDir(), "docker-compose.yml")
	if err := os.WriteFile(file, []byte(fmt.Sprintf(composeFile, img)), 0o644); err != nil {
		t.Fatal(err)
	}
	if out, err := h2.compose(t, file, "up", "-d", "web"); err != nil {
		t.Fatalf("docker-compose up web on host2: %v\n%s", err, out)
	}
	f.hasNetwork(h1, "proj_default", true)
	if out, err := h1.compose(t, file, "up", "-d", "--no-deps", "client"); err != nil {
		t.Fatalf("docker-compose up client on host1: %v\n%s", err, out)
	}
	h1.ctr = "proj_client_1"
	defer func() {
		if t.Failed() {
			for _, q := range []string{"web", "web.fabric", "proj_web_1"} {
				out, err := h1.docker("exec", "proj_client_1", "nslookup", q)
				t.Logf("nslookup %s in the client: %v: %s", q, err, out)
			}
			out, _ := h1.docker("exec", "proj_client_1", "cat", "/etc/resolv.conf")
			t.Logf("client's resolv.conf: %s", out)
			recs, _ := f.fabricctl(h1.host, "containers")
			t.Logf("fabricctl containers:\n%s", recs)
		}
	}()
	var seen string
	d := f.eventually(networkSettle, "client on host1 reaches web on host2 by service name", func() error {
		var err error
		seen, err = h1.dial("web:80")
		return err
	})
	client, _ := h1.docker("inspect", "-f", "{{(index .NetworkSettings.Networks \"proj_default\").IPAddress}}", "proj_client_1")
	if seen != client {
		t.Errorf("web saw the client as %s, want its own address %s", seen, client)
	}
	t.Logf("client reached web by its service name %.1fs after it started", d.Seconds())

	for _, dh := range []*dockerHost{h2, h1} {
		if out, err := dh.compose(t, file, "down"); err != nil {
			t.Errorf("docker-compose down on %s: %v\n%s", dh.host.Name, err, out)
		}
	}
	for _, dh := range dhs {
		f.hasNetwork(dh, "proj_default", false)
		if ps, _ := dh.docker("ps", "-aq"); ps != "" {
			t.Errorf("containers left on %s: %s", dh.host.Name, ps)
		}
	}
	if out, _ := f.fabricctl(h1.host, "networks", "-o", "json"); strings.Contains(out, "proj_default") {
		t.Errorf("the fabric still has the network: %s", out)
	}
}
