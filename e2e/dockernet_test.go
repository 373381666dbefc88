package e2e

import (
	"fmt"
	"net/netip"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/fabricnet/fabric/internal/testreq"
	"github.com/fabricnet/fabric/lab"
)

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
			{[]string{"-d", "fabric", "--ipam-driver", "fabric", "--ipv6", "--subnet", "172.16.9.0/24", "--subnet", "fd00:9::/64", "six"}, "IPv4 only"},
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
