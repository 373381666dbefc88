package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/fabricnet/fabric/internal/testreq"
	"github.com/fabricnet/fabric/internal/testwait"
	"github.com/fabricnet/fabric/lab"
)

// TestIPv6AcrossHosts: with an IPv6 pool, each host's dockerd gets the /64
// paired with its IPv4 subnet, the /64s travel over BGP, and containers on
// three hosts reach each other over IPv6 (ping and TCP, the receiver
// seeing the sender's own address), by name, under policy, through
// published ports, beside IPv4 as before; over VXLAN and WireGuard, on an
// IPv4 underlay (the /64s on the IPv4 sessions) and on an IPv6-only one,
// with no IPv4 on it at all (etcd, BGP and the tunnels over IPv6; the /24s
// travel on the IPv6 sessions).
func TestIPv6AcrossHosts(t *testing.T) {
	t.Parallel()
	if reason := lab.DockerMissing(); reason != "" {
		testreq.Missing(t, "%s", reason)
	}
	for _, v6Underlay := range []bool{false, true} {
		for _, encap := range []string{"vxlan", "wireguard"} {
			name := encap
			if v6Underlay {
				name += "-ipv6-only-underlay"
			}
			t.Run(name, func(t *testing.T) {
				t.Parallel()
				args := []string{"--pool-v6", "fd00:10:244::/48"}
				if encap == "wireguard" {
					args = append(args, "--encryption", "wireguard")
				}
				f := newFabric(t, lab.Spec{Hosts: 3, IPv6Underlay: v6Underlay}, args...)
				dhs := ipv6AcrossHosts(t, encap, f)
				if v6Underlay {
					ipv4OverIPv6Underlay(t, f, encap, dhs)
				}
			})
		}
	}
}

// ipv4OverIPv6Underlay: the containers' IPv4 crosses the IPv6-only
// underlay too, and the tunnels' outer packets are IPv6.
func ipv4OverIPv6Underlay(t *testing.T, f *fabric, encap string, dhs []*dockerHost) {
	hosts := f.lab.Hosts()
	ctx, cancel := dockerCtx()
	defer cancel()
	for _, h := range hosts {
		if out, err := h.Run(ctx, "ip", "-4", "addr", "show", "dev", h.Dev); err != nil || strings.Contains(out, "inet ") {
			t.Fatalf("%s's underlay %s has IPv4: %q (%v); the lab must give it none", h.Name, h.Dev, out, err)
		}
	}
	// The containers' MTU leaves room for an IPv6 outer header: 20 bytes
	// more than over IPv4.
	st, err := f.status(hosts[0])
	if err != nil {
		t.Fatal(err)
	}
	mtu := map[string]int{"vxlan": 1500 - 70, "wireguard": 1500 - 80}[encap]
	if out, err := hosts[0].Run(ctx, "ip", "link", "show", st.Bridge); err != nil || !strings.Contains(out, fmt.Sprintf(" mtu %d ", mtu)) {
		t.Errorf("%s's bridge %s: %q (%v), want mtu %d", hosts[0].Name, st.Bridge, out, err, mtu)
	}
	if encap == "vxlan" {
		out, err := hosts[0].Run(ctx, "ip", "-d", "link", "show", "fabric.vxlan")
		if err != nil || !strings.Contains(out, "local "+hosts[0].Addr.String()) {
			t.Errorf("%s's fabric.vxlan: %q (%v), want local %s", hosts[0].Name, out, err, hosts[0].Addr)
		}
	}
	// IPv4 between containers, across hosts.
	for i, a := range dhs {
		b := dhs[(i+1)%len(dhs)]
		target := b.ipv4(t)
		f.eventually(10*time.Second, fmt.Sprintf("%s's container reaches %s's over IPv4 (%s) across the IPv6 underlay", a.host.Name, b.host.Name, target), func() error {
			_, err := a.docker("exec", a.ctr, "ping", "-c", "1", "-W", "2", target.String())
			return err
		})
	}
}

// ipv6AcrossHosts runs the checks on f's three hosts and returns their
// dockerds, each with its container.
func ipv6AcrossHosts(t *testing.T, encap string, f *fabric) (dhs []*dockerHost) {
	hosts, subnetV6 := f.startIPv6Mesh()

	dhs, img := f.startDockerds(hosts)
	addrs := make([]netip.Addr, len(dhs))
	for i, dh := range dhs {
		if opts := strings.Join(dh.opts, " "); !strings.Contains(opts, "--ipv6 --fixed-cidr-v6="+subnetV6[dh.host.Name].String()) {
			t.Fatalf("%s: DOCKER_OPTS %q lack the host's IPv6 subnet %s", dh.host.Name, opts, subnetV6[dh.host.Name])
		}
		dh.ctr = "v6-" + dh.host.Name
		dh.run(t, dh.ctr, nil, img, "tcpprobe", "serve", "[::]:8000", "100")
		out, err := dh.docker("inspect", "-f", "{{.NetworkSettings.GlobalIPv6Address}}", dh.ctr)
		if err != nil {
			t.Fatal(err)
		}
		a, err := netip.ParseAddr(out)
		if err != nil || !subnetV6[dh.host.Name].Contains(a) {
			t.Fatalf("%s: container IPv6 address %q (%v), want one in %s", dh.host.Name, out, err, subnetV6[dh.host.Name])
		}
		addrs[i] = a
	}
	for i, a := range dhs {
		for j, b := range dhs {
			if i == j {
				continue
			}
			what := fmt.Sprintf("%s's container reaches %s's over IPv6 (%s)", a.host.Name, b.host.Name, addrs[j])
			f.eventually(10*time.Second, what, func() error {
				_, err := a.docker("exec", a.ctr, "ping", "-6", "-c", "1", "-W", "2", addrs[j].String())
				return err
			})
			seen, err := a.dial(netip.AddrPortFrom(addrs[j], 8000).String())
			if err != nil {
				t.Fatalf("TCP over IPv6 %s -> %s: %v", a.host.Name, b.host.Name, err)
			}
			if seen != addrs[i].String() {
				t.Errorf("TCP over IPv6 %s -> %s: the server saw %s, want the client's own %s", a.host.Name, b.host.Name, seen, addrs[i])
			}
		}
	}
	// Names answer AAAA with the container's IPv6 address, on every host.
	for i, dh := range dhs {
		for j, b := range dhs {
			if i == j {
				continue
			}
			f.eventually(15*time.Second, fmt.Sprintf("%s's container resolves %s's name to its IPv6 address %s", dh.host.Name, b.ctr, addrs[j]), func() error {
				out, err := dh.docker("exec", dh.ctr, "nslookup", "-type=AAAA", b.ctr+".fabric")
				if err != nil || !strings.Contains(out, addrs[j].String()) {
					return fmt.Errorf("nslookup -type=AAAA %s.fabric: %v: %s", b.ctr, err, out)
				}
				return nil
			})
		}
	}

	// Policy holds for IPv6 as for IPv4: a rule naming host3's container
	// (and so both its addresses) refuses its TCP to host2's container
	// over IPv6, at once, while host1's IPv6 passes.
	path := filepath.Join(f.lab.LogDir(), "policy-ipv6.yaml")
	rule := fmt.Sprintf("rules:\n  - name: deny-h3-h2\n    action: deny\n    from: [{container: %s}]\n    to: [{node: %s}]\n    protocol: tcp\n    ports: [8000]\n", dhs[2].ctr, hosts[1].Name)
	if err := os.WriteFile(path, []byte(rule), 0o644); err != nil {
		t.Fatal(err)
	}
	if out, err := f.fabricctl(hosts[0], "policy", "apply", "-f", path); err != nil {
		t.Fatalf("fabricctl policy apply: %v: %s", err, out)
	}
	target := netip.AddrPortFrom(addrs[1], 8000).String()
	f.eventually(15*time.Second, "host3's TCP to host2's container over IPv6 refused by the rule", func() error {
		_, err := dhs[2].dial(target)
		if err == nil || !strings.Contains(err.Error(), "refused") {
			return fmt.Errorf("dial %s: %v, want connection refused", target, err)
		}
		return nil
	})
	if _, err := dhs[2].dial(netip.AddrPortFrom(dhs[1].ipv4(t), 8000).String()); err == nil || !strings.Contains(err.Error(), "refused") {
		t.Errorf("IPv4 from host3's container to host2's: %v, want refused as over IPv6", err)
	}
	if seen, err := dhs[0].dial(target); err != nil || seen != addrs[0].String() {
		t.Errorf("IPv6 from host1 (not named by the rule) to host2: %q %v, want it to pass", seen, err)
	}
	if out, err := f.fabricctl(hosts[0], "policy", "delete", "deny-h3-h2"); err != nil {
		t.Fatalf("fabricctl policy delete: %v: %s", err, out)
	}
	f.eventually(15*time.Second, "host3's IPv6 open again once the rule is gone", func() error {
		_, err := dhs[2].dial(target)
		return err
	})

	publishOverIPv6(t, f, hosts, dhs, subnetV6)

	// The route to a peer's /64 goes over the tunnel via the peer's IPv6
	// gateway address (the kernel takes no IPv4 gateway for an IPv6
	// route), which a permanent neighbour entry maps to its VTEP MAC.
	ctx, cancel := dockerCtx()
	defer cancel()
	peer := subnetV6[hosts[1].Name]
	out, err := hosts[0].Run(ctx, "ip", "-6", "route", "show", peer.String())
	if encap == "wireguard" {
		// WireGuard picks the peer by its allowed IPs: a device route.
		if err != nil || !strings.Contains(out, "dev fabric.wg proto 93") {
			t.Errorf("%s's route to %s's IPv6 subnet: %q (%v), want dev fabric.wg proto 93", hosts[0].Name, hosts[1].Name, out, err)
		}
		return
	}
	if err != nil || !strings.Contains(out, "via "+peer.Addr().String()+" dev fabric.vxlan proto 93") {
		t.Errorf("%s's route to %s's IPv6 subnet: %q (%v), want via %s dev fabric.vxlan proto 93", hosts[0].Name, hosts[1].Name, out, err, peer.Addr())
	}
	out, err = hosts[0].Run(ctx, "ip", "-6", "neigh", "show", "dev", "fabric.vxlan", peer.Addr().String())
	if err != nil || !strings.Contains(out, "PERMANENT") {
		t.Errorf("%s's neighbour entry for %s: %q (%v), want a permanent one", hosts[0].Name, peer.Addr(), out, err)
	}
	return dhs
}

// publishOverIPv6: a port published to host2's container (by its IPv4
// address, as always) answers on every host's IPv6 address too: the
// hosts' underlay gets IPv6 addresses here, as on a dual-stack LAN, and a
// client outside the fabric reaches the container through each of them.
// Through the container's own host it sees the client; through another
// host, that host's IPv6 gateway (so the reply returns through it).
func publishOverIPv6(t *testing.T, f *fabric, hosts []*lab.Host, dhs []*dockerHost, subnetV6 map[string]netip.Prefix) {
	o := dualStackOutside(t, f, hosts)
	target := netip.AddrPortFrom(dhs[1].ipv4(t), 8000).String()
	if out, err := f.fabricctl(hosts[0], "publish", "add", "8090/tcp", target); err != nil {
		t.Fatalf("publish add: %v\n%s", err, out)
	}
	for i, h := range hosts {
		want := underlayV6(1).String() // the client's own address
		if i != 1 {
			want = subnetV6[h.Name].Addr().Next().String()
		}
		addr := netip.AddrPortFrom(underlayV6(i+2), 8090).String()
		f.eventually(15*time.Second, "the outside reaches host2's container through "+h.Name+"'s IPv6 address "+addr, func() error {
			seen, err := outsideDial(o, addr)
			if err == nil && seen != want {
				err = fmt.Errorf("the container saw %s, want %s", seen, want)
			}
			return err
		})
	}
	if out, err := f.fabricctl(hosts[0], "publish", "delete", "8090/tcp"); err != nil {
		t.Fatalf("publish delete: %v\n%s", err, out)
	}
}

// dualStackOutside adds a client outside the fabric and gives it and the
// hosts IPv6 addresses on the underlay, as on a dual-stack LAN: the
// outside is underlayV6(1), hosts[i] underlayV6(i+2).
func dualStackOutside(t *testing.T, f *fabric, hosts []*lab.Host) *lab.Host {
	t.Helper()
	ctx, cancel := dockerCtx()
	defer cancel()
	o, err := f.lab.AddOutside(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for i, h := range append([]*lab.Host{o}, hosts...) {
		if _, err := h.Run(ctx, "ip", "-6", "addr", "replace", underlayV6(i+1).String()+"/64", "dev", h.Dev, "nodad"); err != nil {
			t.Fatal(err)
		}
	}
	return o
}

// underlayV6 is the i-th IPv6 address the tests give the lab's underlay
// segment, fd99::i (a dual-stack network beside the lab's IPv4 one).
func underlayV6(i int) netip.Addr { return netip.AddrFrom16([16]byte{0xfd, 0x99, 15: byte(i)}) }

// ipv4 is the IPv4 address of dh's container.
func (dh *dockerHost) ipv4(t *testing.T) netip.Addr {
	t.Helper()
	out, err := dh.docker("inspect", "-f", "{{.NetworkSettings.IPAddress}}", dh.ctr)
	if err != nil {
		t.Fatal(err)
	}
	return netip.MustParseAddr(out)
}

// TestIPv6OverTheTunnels: IPv6 between containers on three hosts (set up as
// dockerd would, without dockerd, so the test runs in the qemu guest too).
// There auto mode carries IPv4 over ipip, which cannot carry IPv6: the /64s
// must go over vxlan while the /24s stay on ipip.
func TestIPv6OverTheTunnels(t *testing.T) {
	t.Parallel()
	f := newFabric(t, lab.Spec{Hosts: 3}, "--pool-v6", "fd00:10:244::/48")
	hosts, subnets := f.startIPv6Mesh()
	ctrs := make([]*lab.Container, len(hosts))
	addrs := make([]netip.Addr, len(hosts))
	for i, h := range hosts {
		ctrs[i], addrs[i] = f.containerV6(h, subnets[h.Name])
	}
	for i, a := range ctrs {
		for j := range ctrs {
			if i == j {
				continue
			}
			f.eventually(15*time.Second, fmt.Sprintf("%s's container reaches %s's over IPv6 (%s)", hosts[i].Name, hosts[j].Name, addrs[j]), func() error {
				ctx, cancel := dockerCtx()
				defer cancel()
				_, err := a.Run(ctx, "ping", "-6", "-c", "1", "-W", "2", addrs[j].String())
				return err
			})
		}
	}
	v4encap := f.autoEncap(hosts[0])
	routes := f.ownedRoutes(hosts[0])
	for _, h := range hosts[1:] {
		r6, r4 := routes[subnets[h.Name].String()], routes[f.subnet(h).String()]
		if !strings.Contains(r6, "dev fabric.vxlan") || !strings.Contains(r4, "dev fabric."+v4encap) {
			t.Errorf("%s's routes to %s: IPv6 %q, IPv4 %q; want IPv6 on fabric.vxlan and IPv4 on fabric.%s (auto mode's choice)", hosts[0].Name, h.Name, r6, r4, v4encap)
		}
	}
	// fabricctl peers status says so.
	want := v4encap
	if v4encap == "ipip" {
		want = "ipip (IPv6: vxlan)"
	}
	ps, err := f.peers(hosts[0])
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range ps {
		if p.Encap != want {
			t.Errorf("%s's peer %s: encapsulation %q, want %q", hosts[0].Name, p.Name, p.Encap, want)
		}
	}
	t.Logf("IPv4 over %s, IPv6 over vxlan; peers status: %q", v4encap, want)

	// --cleanup removes the IPv6 side too: routes, and the IPv6 tables'
	// chains (policy and NAT66).
	// No deadline of its own, as in TestCleanupLeavesNothing: under TCG
	// beside a busy machine the cleanup took over 20 s.
	h, a, ctx := hosts[0], f.agents[hosts[0].Name], context.Background()
	if rules, _ := h.Run(ctx, "ip6tables-save"); !strings.Contains(rules, "FABRIC-POSTROUTING") || !strings.Contains(rules, "FABRIC-POLICY") {
		t.Errorf("%s's IPv6 tables lack fabric's NAT66 or policy chain:\n%s", h.Name, rules)
	}
	if err := a.proc.Stop(); err != nil {
		t.Fatal(err)
	}
	if out, err := h.Run(ctx, a.args[0], append(a.args[1:], "--cleanup")...); err != nil {
		t.Fatalf("fabricd --cleanup: %v\n%s", err, out)
	}
	if routes, _ := h.Run(ctx, "ip", "-6", "route", "show", "proto", "93"); strings.TrimSpace(routes) != "" {
		t.Errorf("IPv6 routes left after --cleanup:\n%s", routes)
	}
	if rules, _ := h.Run(ctx, "ip6tables-save"); strings.Contains(rules, "FABRIC") {
		t.Errorf("ip6tables chains left after --cleanup:\n%s", rules)
	}
}

// startIPv6Mesh starts the mesh (startMesh waits for routes to every other
// host's IPv4 and IPv6 subnets) and returns the hosts and their IPv6
// subnets, each a /64 of the pool.
func (f *fabric) startIPv6Mesh(more ...string) ([]*lab.Host, map[string]netip.Prefix) {
	f.t.Helper()
	hosts := f.startMesh(more...)
	subnetV6 := map[string]netip.Prefix{}
	for _, h := range hosts {
		st, err := f.status(h)
		if err != nil {
			f.t.Fatal(err)
		}
		p, err := netip.ParsePrefix(st.SubnetV6)
		if err != nil || p.Bits() != 64 {
			f.t.Fatalf("%s: IPv6 subnet %q (%v), want a /64 of the pool", h.Name, st.SubnetV6, err)
		}
		subnetV6[h.Name] = p
	}
	return hosts, subnetV6
}

// containerV6 adds a container on h's bridge, as dockerd would with an IPv6
// pool: its second IPv4 address of h's subnet, and the second address of
// h's /64 with the first (the bridge's) as its IPv6 gateway.
func (f *fabric) containerV6(h *lab.Host, subnetV6 netip.Prefix) (*lab.Container, netip.Addr) {
	f.t.Helper()
	st, err := f.status(h)
	if err != nil {
		f.t.Fatal(err)
	}
	c := f.container(h, "c6", 2)
	addr := subnetV6.Addr().Next().Next()
	ctx, cancel := dockerCtx()
	defer cancel()
	if err := c.AddIPv6(ctx, st.Bridge, netip.PrefixFrom(subnetV6.Addr().Next(), 64), netip.PrefixFrom(addr, 64)); err != nil {
		f.t.Fatal(err)
	}
	return c, addr
}

// TestPoolOverlappingTheUnderlay: fabricd refuses to start, naming both,
// when the pool overlaps the network its underlay is on, for either
// family: a subnet leased there would shadow the hosts' own network. The
// pool in etcd is the fabric's, so the host with the clash is the one
// that stops.
func TestPoolOverlappingTheUnderlay(t *testing.T) {
	t.Parallel()
	f := newFabric(t, lab.Spec{Hosts: 1})
	h := f.lab.Hosts()[0]
	ctx, cancel := context.WithTimeout(context.Background(), testwait.Scale(30*time.Second))
	defer cancel()
	for _, c := range []struct {
		flags []string
		want  string
	}{
		{[]string{"--pool", "192.168.0.0/16"}, "the pool 192.168.0.0/16 overlaps this host's underlay network " + h.Subnet.String()},
		{[]string{"--pool-v6", "fd99::/48"}, "the pool fd99::/48 overlaps this host's underlay network fd99::/64"},
	} {
		if c.flags[0] == "--pool-v6" {
			if _, err := h.Run(ctx, "ip", "-6", "addr", "add", "fd99::2/64", "dev", h.Dev, "nodad"); err != nil {
				t.Fatal(err)
			}
		}
		args := f.fabricdArgs(h, filepath.Join(f.lab.LogDir(), h.Name+"-run"), c.flags...)
		out, err := h.Run(ctx, args[0], args[1:]...)
		if err == nil || !strings.Contains(out, c.want) {
			t.Errorf("fabricd %v on %s: %v, want it to stop with %q:\n%s", c.flags, h.Name, err, c.want, out)
		}
	}
}

// TestDockerNetworkIPv6: `docker network create -d fabric --ipv6` with an
// IPv6 subnet beside the IPv4 one exists on every host with both;
// containers on three hosts get an IPv6 address of it from their host's
// block and reach each other over IPv6 (ping, TCP seeing the sender's own
// address) and by name (AAAA); the bridge's containers are refused over
// IPv6 as over IPv4, and a container cannot send from an IPv6 address that
// is not its own.
func TestDockerNetworkIPv6(t *testing.T) {
	t.Parallel()
	if reason := lab.DockerMissing(); reason != "" {
		testreq.Missing(t, "%s", reason)
	}
	f := newFabric(t, lab.Spec{Hosts: 3}, "--pool-v6", "fd00:10:244::/48")
	hosts, hostSubnetV6 := f.startIPv6Mesh()
	dhs, img := f.startDockerds(hosts)
	subnet, subnetV6 := netip.MustParsePrefix("172.30.0.0/24"), netip.MustParsePrefix("fd00:30::/64")

	if out, err := dhs[0].docker("network", "create", "-d", "fabric", "--ipam-driver", "fabric", "--ipv6",
		"--subnet", subnet.String(), "--subnet", subnetV6.String(), "net6"); err != nil {
		t.Fatalf("docker network create --ipv6 on host1: %v: %s", err, out)
	}
	for _, dh := range dhs[1:] {
		f.hasNetwork(dh, "net6", true)
		out, err := dh.docker("network", "inspect", "-f", "{{.EnableIPv6}} {{range .IPAM.Config}}{{.Subnet}} {{end}}", "net6")
		if err != nil || strings.TrimSpace(out) != "true "+subnet.String()+" "+subnetV6.String() {
			t.Fatalf("net6 on %s: %q (%v), want IPv6 on with both subnets", dh.host.Name, out, err)
		}
	}

	names := []string{"n1", "n2", "n3"}
	v4, v6 := make([]netip.Addr, len(dhs)), make([]netip.Addr, len(dhs))
	for i, dh := range dhs {
		flags := []string{"--cap-add", "NET_ADMIN"}
		if i == 1 {
			flags = append(flags, "-p", "8081:8000")
		}
		v4[i] = dh.runOn(t, "net6", names[i], flags, img, "tcpprobe", "serve", "[::]:8000", "1000")
		out, err := dh.docker("inspect", "-f", `{{(index .NetworkSettings.Networks "net6").GlobalIPv6Address}}`, names[i])
		if v6[i], err = netip.ParseAddr(strings.TrimSpace(out)); err != nil || !subnetV6.Contains(v6[i]) {
			t.Fatalf("%s on %s: IPv6 address %q (%v), want one of %s", names[i], dh.host.Name, out, err, subnetV6)
		}
	}
	if v6[0] == v6[1] || v6[1] == v6[2] || v6[0] == v6[2] {
		t.Fatalf("IPv6 addresses given twice: %v", v6)
	}

	for i, a := range dhs {
		for j := range dhs {
			if i == j {
				continue
			}
			f.eventually(networkSettle, fmt.Sprintf("%s on %s pings %s over IPv6 (%s)", names[i], a.host.Name, names[j], v6[j]), func() error {
				out, err := a.docker("exec", names[i], "ping", "-6", "-c", "1", "-W", "2", v6[j].String())
				if err != nil {
					return fmt.Errorf("%v: %s", err, out)
				}
				return nil
			})
			out, err := a.docker("exec", names[i], "tcpprobe", "dial", netip.AddrPortFrom(v6[j], 8000).String())
			if seen, _ := strings.CutPrefix(strings.TrimSpace(out), "seen-from "); err != nil || seen != v6[i].String() {
				t.Errorf("TCP over IPv6 %s -> %s: %q (%v), want the server to see %s", names[i], names[j], out, err, v6[i])
			}
		}
	}

	t.Run("--ip6 is given once fabric-wide", func(t *testing.T) {
		dhs[2].runOn(t, "net6", "fixed6", []string{"--ip6", "fd00:30::99"}, img, "sleep", "3600")
		out, err := dhs[2].docker("inspect", "-f", `{{(index .NetworkSettings.Networks "net6").GlobalIPv6Address}}`, "fixed6")
		if err != nil || strings.TrimSpace(out) != "fd00:30::99" {
			t.Fatalf("--ip6 fd00:30::99 gave %q (%v)", out, err)
		}
		out, err = dhs[0].docker("run", "-d", "--name", "twin6", "--network", "net6", "--ip6", "fd00:30::99", img, "sleep", "3600")
		if err == nil || !strings.Contains(out, "in use") || !strings.Contains(out, hosts[2].Name) {
			t.Errorf("a second --ip6 fd00:30::99 on host1: want it refused as in use on host3, got %v: %s", err, out)
		}
		f.sub(t).eventually(networkSettle, "n1 pings the --ip6 container on host3", func() error {
			out, err := dhs[0].docker("exec", "n1", "ping", "-6", "-c", "1", "-W", "2", "fd00:30::99")
			if err != nil {
				return fmt.Errorf("%v: %s", err, out)
			}
			return nil
		})
	})

	t.Run("names answer AAAA on the network", func(t *testing.T) {
		f.sub(t).eventually(networkSettle, "n1 resolves n2's IPv6 address", func() error {
			out, err := dhs[0].docker("exec", "n1", "nslookup", "-type=AAAA", "n2")
			if err != nil || !strings.Contains(out, v6[1].String()) {
				return fmt.Errorf("nslookup -type=AAAA n2: %v: %s", err, out)
			}
			return nil
		})
	})

	t.Run("the bridge's containers are refused over IPv6", func(t *testing.T) {
		// A container on host3's docker0 (its IPv6 from the fabric's pool).
		dhs[2].ctr = "bridged"
		dhs[2].run(t, dhs[2].ctr, nil, img, "sleep", "3600")
		target := netip.AddrPortFrom(v6[1], 8000).String()
		f.sub(t).eventually(networkSettle, "host3's bridge container refused by n2 over IPv6", func() error {
			_, err := dhs[2].dial(target)
			if err == nil || !strings.Contains(err.Error(), "refused") {
				return fmt.Errorf("dial %s from the bridge: %v, want connection refused", target, err)
			}
			return nil
		})
	})

	t.Run("a container cannot send from an IPv6 address that is not its own", func(t *testing.T) {
		echoes := func() int { return dhs[1].echoesReceived(t, "n2", true) }
		fake := v6[2] // n3's address, on host3
		if out, err := dhs[0].docker("exec", "n1", "ip", "-6", "addr", "add", netip.PrefixFrom(fake, 128).String(), "dev", "eth0"); err != nil {
			t.Fatalf("add n3's address in n1: %v: %s", err, out)
		}
		f.sub(t).eventually(networkSettle, "n3's address in n1 past duplicate detection", func() error {
			out, err := dhs[0].docker("exec", "n1", "ip", "-6", "addr", "show", "dev", "eth0")
			if err != nil || !strings.Contains(out, fake.String()) || strings.Contains(out, "tentative") {
				return fmt.Errorf("n1's addresses: %v: %s", err, out)
			}
			return nil
		})
		before := echoes()
		dhs[0].docker("exec", "n1", "ping", "-6", "-c", "3", "-W", "1", "-I", fake.String(), v6[1].String())
		spoofed := echoes() - before
		if out, err := dhs[0].docker("exec", "n1", "ping", "-6", "-c", "1", "-W", "2", v6[1].String()); err != nil {
			t.Fatalf("n1 pings n2 from its own address: %v: %s", err, out)
		}
		if own := echoes() - before - spoofed; own < 1 {
			t.Fatalf("n2 counted %d echo requests from n1's own address: the counter does not show arrivals", own)
		}
		if spoofed != 0 {
			t.Errorf("%d echo requests from n3's address, sent by n1 on host1, reached n2", spoofed)
		}
	})

	t.Run("published ports answer on IPv6", func(t *testing.T) {
		// The hosts' underlay gets IPv6 addresses, as on a dual-stack LAN;
		// a client outside the fabric reaches n2 (on host2) through
		// host2's -p 8081 and through host1's fabric-wide publish 9101 (to
		// n2's IPv4 address, as a publish names its target).
		f := f.sub(t)
		o := dualStackOutside(t, f, hosts)
		if out, err := f.fabricctl(hosts[0], "publish", "add", "9101/tcp", netip.AddrPortFrom(v4[1], 8000).String()); err != nil {
			t.Fatalf("fabricctl publish add: %v: %s", err, out)
		}
		for _, c := range []struct {
			via  netip.AddrPort
			sees string
		}{
			{netip.AddrPortFrom(underlayV6(3), 8081), underlayV6(1).String()},                             // host2, docker run -p: the client itself
			{netip.AddrPortFrom(underlayV6(2), 9101), hostSubnetV6[hosts[0].Name].Addr().Next().String()}, // host1: its IPv6 gateway
		} {
			f.eventually(networkSettle, "the outside reaches n2 over IPv6 through "+c.via.String(), func() error {
				seen, err := outsideDial(o, c.via.String())
				if err == nil && seen != c.sees {
					err = fmt.Errorf("n2 saw %s, want %s", seen, c.sees)
				}
				return err
			})
		}
		if out, err := f.fabricctl(hosts[0], "publish", "delete", "9101/tcp"); err != nil {
			t.Errorf("fabricctl publish delete: %v: %s", err, out)
		}
	})

	t.Run("fabricd restarted: no IPv6 packet lost", func(t *testing.T) {
		// host2's fabricd restarts while n1 pings n2 over IPv6: the
		// endpoint's link and /128 route stay, and are kept after it.
		done := make(chan [2]int, 1)
		go func() {
			sent, received := dhs[0].pingStream(t, "n1", v6[1], 8*time.Second)
			done <- [2]int{sent, received}
		}()
		f.sub(t).eventually(10*time.Second, "the ping stream runs", func() error {
			_, err := dhs[0].docker("exec", "n1", "ping", "-6", "-c", "1", "-W", "1", v6[1].String())
			return err
		})
		f.restart(hosts[1])
		sr := <-done
		f.sub(t).eventually(30*time.Second, "host2's fabricd answers again", func() error { _, err := f.status(hosts[1]); return err })
		t.Logf("fabricd on host2 restarted: n1 -> n2 over IPv6 %d sent, %d received", sr[0], sr[1])
		if sr[0] < 300 || sr[1] != sr[0] {
			t.Errorf("%d of %d IPv6 packets lost across host2's fabricd restart (want 0 of at least 300)", sr[0]-sr[1], sr[0])
		}
	})

	t.Run("fabricctl networks shows both subnets and each host's blocks", func(t *testing.T) {
		out, err := f.fabricctl(hosts[2], "networks", "-o", "json")
		if err != nil {
			t.Fatalf("fabricctl networks: %v: %s", err, out)
		}
		var rows []struct {
			Name, SubnetV6, GatewayV6 string
			Blocks                    map[string][]string
			Containers                map[string]int
		}
		if err := json.Unmarshal([]byte(out), &rows); err != nil || len(rows) != 1 {
			t.Fatalf("%v: %s", err, out)
		}
		r := rows[0]
		if r.SubnetV6 != subnetV6.String() || r.GatewayV6 != "fd00:30::1" || r.Containers[hosts[1].Name] != 1 ||
			!slices.ContainsFunc(r.Blocks[hosts[1].Name], func(b string) bool { return strings.HasSuffix(b, "::/68") }) {
			t.Errorf("fabricctl networks: %+v; want the IPv6 subnet and gateway, one container on host2 and its IPv6 block", r)
		}
	})

	t.Run("the network's IPv6 blocks are routed to their hosts", func(t *testing.T) {
		ctx, cancel := dockerCtx()
		defer cancel()
		out, err := hosts[0].Run(ctx, "ip", "-6", "route", "show", "proto", "93")
		if err != nil {
			t.Fatal(err)
		}
		// host2's block of fd00:30::/64 (a /68, as its IPv4 block is a /28)
		// goes over the tunnel; the subnet itself is unreachable here.
		if !strings.Contains(out, "unreachable "+subnetV6.String()) || !regexp.MustCompile(`fd00:30:0:0:[0-9a-f]+::/68 via \S+ dev fabric\.vxlan`).MatchString(out) {
			t.Errorf("host1's IPv6 routes of proto 93:\n%s\nwant the subnet unreachable and host2's /68 block via the tunnel", out)
		}
	})
}
