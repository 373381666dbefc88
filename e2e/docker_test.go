package e2e

import (
	"context"
	"fmt"
	"net/netip"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/fabricnet/fabric/lab"

	"github.com/fabricnet/fabric/internal/testreq"
)

// dockerHost is one lab host running fabricd and a real dockerd started with
// the options fabricd wrote, with one busybox container.
type dockerHost struct {
	host *lab.Host
	d    *lab.Dockerd
	opts []string // DOCKER_OPTS as fabricd wrote them
	ctr  string   // container name
	ip   netip.Addr
	gw   netip.Addr
}

// dockerOpts reads DOCKER_OPTS from the options file fabricd wrote, through
// fabricctl docker-opts (as an operator's systemd unit would).
func (f *fabric) dockerOpts(h *lab.Host) ([]string, error) {
	a := f.agents[h.Name]
	out, err := f.fabricctl(h, "docker-opts", "--format", "env", "--file", filepath.Join(a.runDir, "docker.env"))
	if err != nil {
		return nil, err
	}
	for _, line := range strings.Split(out, "\n") {
		if v, ok := strings.CutPrefix(line, "DOCKER_OPTS="); ok {
			return strings.Fields(strings.Trim(v, `"`)), nil
		}
	}
	return nil, fmt.Errorf("no DOCKER_OPTS in:\n%s", out)
}

func dockerCtx() (context.Context, context.CancelFunc) {
	return context.WithTimeout(context.Background(), 20*time.Second)
}

func (dh *dockerHost) docker(args ...string) (string, error) {
	ctx, cancel := dockerCtx()
	defer cancel()
	return dh.d.Docker(ctx, args...)
}

// dial connects from dh's container to addr with tcpprobe and returns the
// source address the server saw.
func (dh *dockerHost) dial(addr string) (string, error) {
	out, err := dh.docker("exec", dh.ctr, "tcpprobe", "dial", addr)
	if err != nil {
		return "", err
	}
	seen, ok := strings.CutPrefix(strings.TrimSpace(out), "seen-from ")
	if !ok {
		return "", fmt.Errorf("tcpprobe dial %s from %s: %q", addr, dh.host.Name, out)
	}
	return seen, nil
}

// outsideDial connects from the outside namespace.
func outsideDial(o *lab.Host, addr string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	out, err := o.Run(ctx, filepath.Join(binDir, "tcpprobe"), "dial", addr)
	if err != nil {
		return "", err
	}
	seen, ok := strings.CutPrefix(strings.TrimSpace(out), "seen-from ")
	if !ok {
		return "", fmt.Errorf("tcpprobe dial %s: %q", addr, out)
	}
	return seen, nil
}

// TestDockerFabric is the "Host integration" story with a real dockerd on
// every host: dockerd started with fabricd's options adopts fabricd's bridge;
// docker containers on different hosts reach each other with their own
// addresses; traffic leaving the pool is masqueraded to the host address; a
// published port answers on every host and goes away everywhere; a flushed
// NAT chain is repaired; --cleanup leaves nothing of fabric behind.
func TestDockerFabric(t *testing.T) {
	t.Parallel()
	if reason := lab.DockerMissing(); reason != "" {
		testreq.Missing(t, "%s", reason)
	}
	f := newFabric(t, lab.Spec{Hosts: 3})
	hosts := f.lab.Hosts()
	for _, h := range hosts {
		f.start(h)
	}
	for _, h := range hosts {
		f.eventually(20*time.Second, h.Name+" sessions established", func() error { return f.allEstablished(h, 2) })
		f.eventually(10*time.Second, h.Name+" routes", func() error { return f.routesTo(h, f.otherSubnets(h, hosts)) })
	}

	// dockerd on every host with exactly the options fabricd wrote.
	dhs := make([]*dockerHost, len(hosts))
	started := time.Now()
	for i, h := range hosts {
		dh := f.startDockerd(h)
		dh.ctr = "web"
		st, err := f.status(h)
		if err != nil {
			t.Fatal(err)
		}
		opts := strings.Join(dh.opts, " ")
		wantBip := fmt.Sprintf("--bip=%s/%d", st.Gateway, netip.MustParsePrefix(st.Subnet).Bits())
		if !strings.Contains(opts, wantBip) || !strings.Contains(opts, fmt.Sprintf("--mtu=%d", st.MTU)) || !strings.Contains(opts, "--ip-masq=false") {
			t.Fatalf("%s: DOCKER_OPTS %q do not match the status (%s, mtu %d)", h.Name, opts, wantBip, st.MTU)
		}
		if st.Bridge != "docker0" {
			t.Fatalf("%s: fabric bridge is %q, want docker0 (dockerd's default bridge)", h.Name, st.Bridge)
		}
		dhs[i] = dh
		t.Logf("%s: dockerd %s", h.Name, opts)
	}
	t.Logf("3 dockerds answering %.1fs after the first start", time.Since(started).Seconds())

	// dockerd adopted fabricd's bridge: same address, MTU, and its bridge
	// network is the lease.
	for _, dh := range dhs {
		st, _ := f.status(dh.host)
		ctx, cancel := dockerCtx()
		addrs, err := dh.host.Run(ctx, "ip", "-4", "-o", "addr", "show", "dev", "docker0")
		cancel()
		if err != nil {
			t.Fatal(err)
		}
		wantAddr := fmt.Sprintf("%s/%d", st.Gateway, netip.MustParsePrefix(st.Subnet).Bits())
		if strings.Count(addrs, "inet ") != 1 || !strings.Contains(addrs, "inet "+wantAddr) {
			t.Errorf("%s: docker0 addresses after dockerd started: %q, want only %s", dh.host.Name, addrs, wantAddr)
		}
		sub, err := dh.docker("network", "inspect", "bridge", "--format", "{{range .IPAM.Config}}{{.Subnet}} {{.Gateway}}{{end}} {{index .Options \"com.docker.network.driver.mtu\"}} {{index .Options \"com.docker.network.bridge.name\"}}")
		if err != nil {
			t.Fatal(err)
		}
		if want := fmt.Sprintf("%s %s %d docker0", st.Subnet, st.Gateway, st.MTU); sub != want {
			t.Errorf("%s: docker's bridge network is %q, want %q", dh.host.Name, sub, want)
		}
	}

	// A busybox image (with the static tcpprobe) in every daemon, and one
	// container per host serving tcpprobe on :8000.
	for _, dh := range dhs {
		ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
		img, err := f.lab.BusyboxImage(ctx, dh.d, map[string]string{"/bin/tcpprobe": filepath.Join(binDir, "tcpprobe")})
		cancel()
		if err != nil {
			t.Fatal(err)
		}
		if _, err := dh.docker("run", "-d", "--name", dh.ctr, img, "tcpprobe", "serve", "0.0.0.0:8000", "100000"); err != nil {
			t.Fatalf("docker run on %s: %v", dh.host.Name, err)
		}
		ip, err := dh.docker("inspect", "-f", "{{.NetworkSettings.IPAddress}}", dh.ctr)
		if err != nil {
			t.Fatal(err)
		}
		dh.ip = netip.MustParseAddr(ip)
		st, _ := f.status(dh.host)
		if !netip.MustParsePrefix(st.Subnet).Contains(dh.ip) {
			t.Errorf("%s: container got %s outside the lease %s", dh.host.Name, dh.ip, st.Subnet)
		}
		mtu, _ := dh.docker("exec", dh.ctr, "cat", "/sys/class/net/eth0/mtu")
		route, _ := dh.docker("exec", dh.ctr, "ip", "route", "show", "default")
		if mtu != strconv.Itoa(st.MTU) || !strings.Contains(route, "via "+st.Gateway) {
			t.Errorf("%s: container MTU %q (want %d), default route %q (want via %s)", dh.host.Name, mtu, st.MTU, route, st.Gateway)
		}
		t.Logf("%s: docker container %s, MTU %s, %s", dh.host.Name, dh.ip, mtu, route)
	}

	// The stories below share this setup and run in order.
	ctx := context.Background()
	o, err := f.lab.AddOutside(ctx)
	if err != nil {
		t.Fatal(err)
	}
	srv, err := o.Start("tcpprobe", filepath.Join(binDir, "tcpprobe"), "serve", o.Addr.String()+":9000", "100000")
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Stop()
	outsideAddr := netip.AddrPortFrom(o.Addr, 9000).String()
	t.Run("containers talk across hosts", func(t *testing.T) {
		f := f.sub(t)
		// Every pair: ping, and TCP where the receiver sees the sender's
		// container address.
		for _, a := range dhs {
			for _, b := range dhs {
				if a == b {
					continue
				}
				d := f.eventually(10*time.Second, fmt.Sprintf("docker exec ping %s -> %s", a.host.Name, b.host.Name), func() error {
					_, err := a.docker("exec", a.ctr, "ping", "-c", "1", "-W", "2", b.ip.String())
					return err
				})
				seen, err := a.dial(netip.AddrPortFrom(b.ip, 8000).String())
				if err != nil {
					t.Fatalf("tcp %s -> %s: %v", a.host.Name, b.host.Name, err)
				}
				if seen != a.ip.String() {
					t.Errorf("tcp %s -> %s: receiver saw %s, want the sender's container address %s", a.host.Name, b.host.Name, seen, a.ip)
				}
				t.Logf("container %s@%s -> %s@%s: ping ok (%.1fs), tcp receiver saw %s", a.ip, a.host.Name, b.ip, b.host.Name, d.Seconds(), seen)
			}
		}
		// Big packets at the container MTU cross without fragmentation trouble.
		st0, _ := f.status(hosts[0])
		size := st0.MTU - 28
		if _, err := dhs[0].docker("exec", dhs[0].ctr, "ping", "-c", "1", "-W", "2", "-s", strconv.Itoa(size), dhs[1].ip.String()); err != nil {
			t.Errorf("ping with %d-byte payload (container MTU %d) host1 -> host2: %v", size, st0.MTU, err)
		}
	})
	t.Run("the outside sees the host address", func(t *testing.T) {
		f := f.sub(t)
		// The outside world (not a fabric host) sees the host's underlay address.
		for _, dh := range dhs {
			var seen string
			f.eventually(10*time.Second, dh.host.Name+" container reaches the outside", func() error {
				var err error
				seen, err = dh.dial(outsideAddr)
				return err
			})
			if seen != dh.host.Addr.String() {
				t.Errorf("outside saw %s from %s's container, want the host address %s (MASQUERADE)", seen, dh.host.Name, dh.host.Addr)
			}
			t.Logf("container %s@%s -> outside %s: server saw %s", dh.ip, dh.host.Name, o.Addr, seen)
		}
	})
	t.Run("a published port reaches its container from every host", func(t *testing.T) {
		f := f.sub(t)
		// A fabric-wide published port: 8080/tcp on every host to the container
		// on host2.
		target := dhs[1]
		pubTarget := netip.AddrPortFrom(target.ip, 8000).String()
		if out, err := f.fabricctl(hosts[0], "publish", "add", "8080/tcp", pubTarget); err != nil {
			t.Fatalf("publish add: %v\n%s", err, out)
		}
		published := time.Now()
		out, _ := f.fabricctl(hosts[2], "publish", "list")
		t.Logf("fabricctl publish list (host3):\n%s", out)
		var slowest time.Duration
		for _, dh := range dhs {
			addr := netip.AddrPortFrom(dh.host.Addr, 8080).String()
			var seen string
			f.eventually(15*time.Second, "published port via "+dh.host.Name, func() error {
				var err error
				seen, err = outsideDial(o, addr)
				return err
			})
			if d := time.Since(published); d > slowest {
				slowest = d
			}
			// Via the target's own host the container sees the client; via any
			// other host it sees that host's gateway, so replies return through
			// the host that did the DNAT.
			want := o.Addr.String()
			if dh != target {
				want = dh.gw.String()
			}
			if seen != want {
				t.Errorf("published port via %s: container saw %s, want %s", dh.host.Name, seen, want)
			}
			t.Logf("outside -> %s (%s) -> %s: container saw %s", addr, dh.host.Name, pubTarget, seen)
		}
		t.Logf("published port answered on all 3 hosts within %.2fs of `publish add`", slowest.Seconds())
		// The target's own container reaches it through another host too (hairpin
		// across hosts: DNAT on host1, back to host2).
		// host1 SNATs it to its gateway so the reply comes back through it.
		st1, _ := f.status(hosts[0])
		if seen, err := target.dial(netip.AddrPortFrom(hosts[0].Addr, 8080).String()); err != nil {
			t.Errorf("container on host2 -> host1:8080: %v", err)
		} else if seen != st1.Gateway {
			t.Errorf("container on host2 -> host1:8080 -> itself: it saw %s, want host1's gateway %s", seen, st1.Gateway)
		} else {
			t.Logf("container %s@host2 -> host1:8080 -> itself: saw host1's gateway %s", target.ip, seen)
		}

		if out, err := f.fabricctl(hosts[2], "publish", "delete", "8080/tcp"); err != nil {
			t.Fatalf("publish delete: %v\n%s", err, out)
		}
		deleted := time.Now()
		closed := map[string]bool{}
		f.eventually(15*time.Second, "published port closed everywhere", func() error {
			var open []string
			for _, dh := range dhs {
				if closed[dh.host.Name] {
					continue
				}
				if _, err := outsideDial(o, netip.AddrPortFrom(dh.host.Addr, 8080).String()); err == nil {
					open = append(open, dh.host.Name)
				} else {
					closed[dh.host.Name] = true
				}
			}
			if len(open) > 0 {
				return fmt.Errorf("still open via %v", open)
			}
			return nil
		})
		t.Logf("published port closed on all 3 hosts within %.2fs of `publish delete`", time.Since(deleted).Seconds())
		for _, dh := range dhs {
			if _, err := outsideDial(o, netip.AddrPortFrom(dh.host.Addr, 8080).String()); err == nil {
				t.Errorf("port 8080 via %s answers again after delete", dh.host.Name)
			}
		}
	})
	t.Run("a published UDP port reaches its container from every host", func(t *testing.T) {
		f := f.sub(t)
		target := dhs[1]
		if _, err := target.docker("exec", "-d", target.ctr, "tcpprobe", "serve-udp", "0.0.0.0:5353"); err != nil {
			t.Fatal(err)
		}
		pubTarget := netip.AddrPortFrom(target.ip, 5353).String()
		if out, err := f.fabricctl(hosts[0], "publish", "add", "5353/udp", pubTarget); err != nil {
			t.Fatalf("publish add 5353/udp: %v\n%s", err, out)
		}
		for _, dh := range dhs {
			addr := netip.AddrPortFrom(dh.host.Addr, 5353).String()
			var seen string
			f.eventually(15*time.Second, "published UDP port via "+dh.host.Name, func() error {
				ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
				defer cancel()
				out, err := o.Run(ctx, filepath.Join(binDir, "tcpprobe"), "dial-udp", addr)
				if err != nil {
					return fmt.Errorf("%v %s", err, out)
				}
				var ok bool
				if seen, ok = strings.CutPrefix(strings.TrimSpace(out), "seen-from "); !ok {
					return fmt.Errorf("answer %q", out)
				}
				return nil
			})
			want := o.Addr.String()
			if dh != target {
				want = dh.gw.String()
			}
			if seen != want {
				t.Errorf("published UDP port via %s: container saw %s, want %s", dh.host.Name, seen, want)
			}
		}
		if out, err := f.fabricctl(hosts[2], "publish", "delete", "5353/udp"); err != nil {
			t.Fatalf("publish delete: %v\n%s", err, out)
		}
		f.eventually(15*time.Second, "published UDP port closed", func() error {
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			if out, err := o.Run(ctx, filepath.Join(binDir, "tcpprobe"), "dial-udp", netip.AddrPortFrom(hosts[0].Addr, 5353).String()); err == nil {
				return fmt.Errorf("still answered: %s", out)
			}
			return nil
		})
	})
	t.Run("deleted rules come back", func(t *testing.T) {
		f := f.sub(t)
		// Deleted rules come back: flush fabric's POSTROUTING chain on host1.
		h1 := dhs[0]
		{
			ctx, cancel := dockerCtx()
			out, err := h1.host.Run(ctx, "iptables", "-w", "-t", "nat", "-F", "FABRIC-POSTROUTING")
			cancel()
			if err != nil {
				t.Fatalf("flush: %v %s", err, out)
			}
		}
		flushed := time.Now()
		// A connection started right after the flush, in the background: the
		// rule is polled meanwhile, so the repair time is not the dial timeout.
		type dialResult struct {
			seen string
			err  error
		}
		during := make(chan dialResult, 1)
		go func() {
			seen, err := h1.dial(outsideAddr)
			during <- dialResult{seen, err}
		}()
		// The rule itself, polled.
		f.eventually(15*time.Second, "MASQUERADE back in FABRIC-POSTROUTING on host1", func() error {
			ctx, cancel := dockerCtx()
			defer cancel()
			out, err := h1.host.Run(ctx, "iptables", "-w", "-t", "nat", "-S", "FABRIC-POSTROUTING")
			if err != nil {
				return err
			}
			if !strings.Contains(out, "-j MASQUERADE") {
				return fmt.Errorf("no MASQUERADE rule:\n%s", out)
			}
			return nil
		})
		repaired := time.Since(flushed)
		r := <-during
		broken := r.err != nil || r.seen != h1.host.Addr.String()
		if broken {
			t.Logf("right after the flush: host1's container -> outside fails (seen %q, err %v): masquerade gone", r.seen, r.err)
		}
		f.eventually(15*time.Second, "masquerade works again on host1", func() error {
			seen, err := h1.dial(outsideAddr)
			if err != nil {
				return err
			}
			if seen != h1.host.Addr.String() {
				return fmt.Errorf("outside saw %s", seen)
			}
			return nil
		})
		if !broken {
			// Only if fabricd's 2 s repair ran between the flush and the dial.
			t.Logf("note: the masquerade was repaired before the first dial after the flush")
		}
		t.Logf("flushed FABRIC-POSTROUTING on host1: rules back after %.2fs (fabricd repairs every 2 s), outside sees %s again",
			repaired.Seconds(), h1.host.Addr)
	})
	t.Run("cleanup leaves nothing of fabric", func(t *testing.T) {
		f := f.sub(t)
		// Cleanup: dockerd first (it keeps docker0 busy), then fabricd, then
		// fabricd --cleanup. Nothing of fabric may remain.
		for _, dh := range dhs {
			stopStart := time.Now()
			if err := dh.d.Stop(); err != nil {
				t.Errorf("stop dockerd on %s: %v", dh.host.Name, err)
			}
			t.Logf("%s: dockerd, its container and its directories removed in %.1fs", dh.host.Name, time.Since(stopStart).Seconds())
		}
		for _, h := range hosts {
			a := f.agents[h.Name]
			if err := a.proc.Stop(); err != nil {
				t.Errorf("stop fabricd on %s: %v", h.Name, err)
			}
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			out, err := h.Run(ctx, a.args[0], append(a.args[1:], "--cleanup")...)
			cancel()
			if err != nil {
				t.Fatalf("fabricd --cleanup on %s: %v\n%s", h.Name, err, out)
			}
		}
		for _, h := range hosts {
			ctx, cancel := dockerCtx()
			save, err := h.Run(ctx, "iptables-save")
			if err != nil {
				t.Fatal(err)
			}
			if n := strings.Count(save, "FABRIC"); n != 0 {
				t.Errorf("%s: %d iptables lines mention FABRIC after --cleanup:\n%s", h.Name, n, grepLines(save, "FABRIC"))
			}
			if r := f.ownedRoutes(h); len(r) != 0 {
				t.Errorf("%s: proto 93 routes after --cleanup: %v", h.Name, r)
			}
			links, _ := h.Run(ctx, "ip", "-o", "link")
			for _, line := range strings.Split(links, "\n") {
				if strings.Contains(line, ": fabric.") || strings.Contains(line, ": docker0:") || strings.Contains(line, ": docker0@") {
					t.Errorf("%s: link left after --cleanup: %s", h.Name, line)
				}
			}
			cancel()
		}
	})
}

func grepLines(s, sub string) string {
	var out []string
	for _, line := range strings.Split(s, "\n") {
		if strings.Contains(line, sub) {
			out = append(out, line)
		}
	}
	return strings.Join(out, "\n")
}
