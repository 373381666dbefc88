package e2e

import (
	"context"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/fabricnet/fabric/internal/testreq"
	"github.com/fabricnet/fabric/lab"
)

// TestFRRTopOfRackBFD: FRR (bgpd with bfdd) as an eBGP top-of-rack router
// with `neighbor X bfd`, fabricd with bfd: true for it. BFD comes up on
// both sides; when the router's link goes down (no word from it) fabricd
// drops the router's route well before the BGP hold time could; with BFD
// off for the router, only the hold time does.
func TestFRRTopOfRackBFD(t *testing.T) {
	t.Parallel()
	const hold = 9 * time.Second
	for _, tc := range []struct {
		name   string
		bfd    bool
		within time.Duration
	}{
		{"bfd", true, hold / 2},
		{"no bfd", false, hold + 5*time.Second},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			f := newFabric(t, lab.Spec{Hosts: 1})
			h := f.lab.Hosts()[0]
			tor, vtysh := startFRR(t, f, func(tor *lab.Host) string { return torBFDConf(tor, h, tc.bfd) })
			conf := fmt.Sprintf("peers:\n- name: tor\n  address: %s\n  asn: 65001\n", tor.Addr)
			if tc.bfd {
				conf += "  bfd: true\n"
			}
			f.start(h, "--config", peersFile(t, f, conf))
			torRoute := "10.250.0.0/24"
			f.eventually(30*time.Second, h.Name+" installs FRR's "+torRoute, func() error {
				if _, ok := f.ownedRoutes(h)[torRoute]; !ok {
					return fmt.Errorf("owned routes %v", f.ownedRoutes(h))
				}
				return nil
			})
			if tc.bfd {
				f.eventually(15*time.Second, "BFD up on both sides", func() error {
					ps, err := f.peers(h)
					if err != nil {
						return err
					}
					// Up, and on the fast timers both sides asked for
					// (3 × 200 ms), not the start-up pace of one second.
					if len(ps) != 1 || ps[0].BFD != "up" || ps[0].BFDDetect != 600*time.Millisecond {
						return fmt.Errorf("fabricd's peers: %+v", ps)
					}

					out, err := vtysh("show bfd peers brief")
					if err != nil || !strings.Contains(out, h.Addr.String()) || !strings.Contains(out, "up") {
						return fmt.Errorf("FRR: %v: %s", err, out)
					}
					return nil
				})
				out, _ := f.fabricctl(h, "peers", "status")
				t.Logf("fabricctl peers status:\n%s", out)
				// FRR starts its session anew when BGP comes up (bgpd
				// registers it again): a Down without a diagnostic, which
				// must not drop the router's routes.
				if log, _ := os.ReadFile(f.agents[h.Name].proc.LogPath()); strings.Contains(string(log), "bfd session failed") {
					t.Fatalf("fabricd took FRR's session restart for a failure:\n%s", log)
				}
			}

			t.Cleanup(func() {
				if !t.Failed() {
					return
				}
				// What decided the route's fate: the lab keeps only each
				// log's tail, which a debug-level fabricd fills in seconds.
				log, _ := os.ReadFile(f.agents[h.Name].proc.LogPath())
				var lines []string
				for _, l := range strings.Split(string(log), "\n") {
					if strings.Contains(l, "bfd") || strings.Contains(l, "peer state") || strings.Contains(l, "route") && strings.Contains(l, torRoute) {
						lines = append(lines, l)
					}
				}
				t.Logf("fabricd's BFD, session and %s lines:\n%s", torRoute, strings.Join(lines, "\n"))
				out, _ := vtysh("show bfd peers")
				t.Logf("FRR: show bfd peers:\n%s", out)
			})
			if _, err := tor.Run(context.Background(), "ip", "link", "set", tor.Dev, "down"); err != nil {
				t.Fatal(err)
			}
			start := time.Now()
			f.eventually(tc.within, h.Name+" drops the silent router's route", func() error {
				if via, ok := f.ownedRoutes(h)[torRoute]; ok {
					return fmt.Errorf("still routes %s: %s", torRoute, via)
				}
				return nil
			})
			t.Logf("the router's route went %.2fs after its link went down", time.Since(start).Seconds())
		})
	}
}

// torBFDConf is frr.conf for an eBGP router (AS 65001) that announces
// 10.250.0.0/24 to host h, with BFD on the session when bfd is set.
func torBFDConf(tor, h *lab.Host, bfd bool) string {
	neighborBFD := ""
	if bfd {
		neighborBFD = fmt.Sprintf(" neighbor %s bfd\n neighbor %s bfd profile fast\n", h.Addr, h.Addr)
	}
	return fmt.Sprintf(`frr defaults traditional
hostname tor
!
bfd
 profile fast
  receive-interval 200
  transmit-interval 200
 !
!
router bgp 65001
 bgp router-id %[1]s
 no bgp ebgp-requires-policy
 no bgp network import-check
 timers bgp 3 9
 neighbor %[2]s remote-as 64512
%[3]s address-family ipv4 unicast
  network 10.250.0.0/24
 exit-address-family
!
`, tor.Addr, h.Addr, neighborBFD)
}

// startFRR runs zebra, bfdd and bgpd in an outside namespace (the router
// tor) with the frr.conf that conf gives for it. It returns the router and
// a vtysh runner (each argument one command, in order).
func startFRR(t *testing.T, f *fabric, conf func(tor *lab.Host) string) (*lab.Host, func(cmds ...string) (string, error)) {
	t.Helper()
	if _, err := os.Stat("/usr/lib/frr/bgpd"); err != nil {
		testreq.Missing(t, "FRR not installed (apt-get install frr; make test installs it)")
	}
	frrUser, err := user.Lookup("frr")
	if err != nil {
		testreq.Missing(t, "no frr user: %v", err)
	}
	uid, _ := strconv.Atoi(frrUser.Uid)
	gid, _ := strconv.Atoi(frrUser.Gid)
	tor, err := f.lab.AddOutside(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	// The daemons drop to the frr user: their directory must be theirs and
	// reachable, which the lab's log dir is not.
	dir, err := os.MkdirTemp("", "fabric-frr-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	if err := os.WriteFile(filepath.Join(dir, "frr.conf"), []byte(conf(tor)), 0o644); err != nil {
		t.Fatal(err)
	}
	for _, p := range []string{dir, filepath.Join(dir, "frr.conf")} {
		if err := os.Chown(p, uid, gid); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	for _, daemon := range []string{"zebra", "bfdd", "bgpd"} {
		args := []string{"/usr/lib/frr/" + daemon, "-N", tor.Name, "-z", filepath.Join(dir, "zserv.api"), "-i", filepath.Join(dir, daemon+".pid"),
			"--vty_socket", dir, "-f", filepath.Join(dir, "frr.conf")}
		if daemon == "bfdd" {
			args = append(args, "--bfdctl", filepath.Join(dir, "bfdd.sock"))
		}
		if _, err := tor.Start("frr-"+daemon, args...); err != nil {
			t.Fatal(err)
		}
		// Each daemon connects to zebra's socket: zebra first.
		sock := filepath.Join(dir, "zserv.api")
		f.eventually(10*time.Second, "FRR's zebra socket", func() error { _, err := os.Stat(sock); return err })
	}
	vtysh := func(cmds ...string) (string, error) {
		args := []string{"netns", "exec", tor.Netns, "vtysh", "--vty_socket", dir}
		for _, c := range cmds {
			args = append(args, "-c", c)
		}
		out, err := exec.Command("ip", args...).CombinedOutput()
		return string(out), err
	}
	return tor, vtysh
}

// TestFRRLearnsIPv6Subnets: FRR as the top-of-rack router learns every
// host's IPv6 /64 with that host's IPv6 address as next hop, installs it in
// its kernel and reaches a container's IPv6 address natively (no tunnel, no
// NAT); the hosts route the router's own IPv6 network through it. A /80
// that FRR announces inside host2's /64 is refused by host1, which keeps
// reaching host2's container through its tunnel. On a dual-stack underlay
// (the sessions over IPv4) and on an IPv6-only one (the sessions over
// IPv6).
func TestFRRLearnsIPv6Subnets(t *testing.T) {
	t.Parallel()
	for _, v6Only := range []bool{false, true} {
		t.Run(map[bool]string{false: "dual-stack-underlay", true: "ipv6-only-underlay"}[v6Only], func(t *testing.T) {
			t.Parallel()
			frrLearnsIPv6Subnets(t, v6Only)
		})
	}
}

func frrLearnsIPv6Subnets(t *testing.T, v6Only bool) {
	f := newFabric(t, lab.Spec{Hosts: 2, IPv6Underlay: v6Only}, "--pool-v6", "fd00:10:244::/48")
	hosts := f.lab.Hosts()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	// hostV6 is each host's IPv6 address on the underlay: its underlay
	// address on an IPv6-only one; on a dual-stack one an address the test
	// gives it before fabricd starts, which takes the underlay's global
	// IPv6 address as its /64's next hop.
	hostV6 := func(i int) netip.Addr {
		if v6Only {
			return hosts[i].Addr
		}
		return underlayV6(i + 1)
	}
	if !v6Only {
		for i, h := range hosts {
			if _, err := h.Run(ctx, "ip", "-6", "addr", "add", hostV6(i).String()+"/64", "dev", h.Dev, "nodad"); err != nil {
				t.Fatal(err)
			}
		}
	}
	var torV6 netip.Addr
	tor, vtysh := startFRR(t, f, func(tor *lab.Host) string {
		torV6 = tor.Addr
		if !v6Only {
			torV6 = netip.MustParseAddr("fd99::250")
			if _, err := tor.Run(ctx, "ip", "-6", "addr", "add", torV6.String()+"/64", "dev", tor.Dev, "nodad"); err != nil {
				t.Fatal(err)
			}
		}
		// A router ID is 32 bits, also on an IPv6-only network.
		conf := "frr defaults traditional\nhostname tor\n!\nrouter bgp 65001\n bgp router-id 10.255.0.250\n no bgp ebgp-requires-policy\n no bgp network import-check\n timers bgp 3 9\n"
		for _, h := range hosts {
			conf += fmt.Sprintf(" neighbor %s remote-as 64512\n", h.Addr)
		}
		// A network of the router's own, behind it.
		if _, err := tor.Run(ctx, "ip", "-6", "addr", "add", "2001:db8:250::1/128", "dev", "lo"); err != nil {
			t.Fatal(err)
		}
		conf += " address-family ipv6 unicast\n"
		for _, h := range hosts {
			conf += fmt.Sprintf("  neighbor %s activate\n", h.Addr)
		}
		return conf + " exit-address-family\n!\n"
	})
	peers := peersFile(t, f, fmt.Sprintf("peers:\n- name: tor\n  address: %s\n  asn: 65001\n", tor.Addr))
	_, subnets := f.startIPv6Mesh("--config", peers)
	for i, h := range hosts {
		sub := subnets[h.Name]
		want := fmt.Sprintf("via %s dev %s proto bgp", hostV6(i), tor.Dev)
		f.eventually(30*time.Second, "FRR installs "+h.Name+"'s /64 via its IPv6 address", func() error {
			out, err := tor.Run(ctx, "ip", "-6", "route", "show", sub.String())
			if err != nil || !strings.Contains(out, want) {
				return fmt.Errorf("the router's kernel: %q (%v), want %q", out, err, want)
			}
			return nil
		})
	}
	out, _ := vtysh("show bgp ipv6 unicast")
	t.Logf("FRR: show bgp ipv6 unicast:\n%s", out)
	// What the operator checks on the host: the next hop routers get.
	if out, err := f.fabricctl(hosts[0], "status"); err != nil || !strings.Contains(out, fmt.Sprintf("%s (next hop %s)", subnets[hosts[0].Name], hostV6(0))) {
		t.Errorf("fabricctl status on host1: %v\n%s\nwant its IPv6 subnet with next hop %s", err, out, hostV6(0))
	}

	// A container on host1 answers the router over IPv6, natively.
	c1, c1v6 := f.containerV6(hosts[0], subnets[hosts[0].Name])
	f.eventually(10*time.Second, "the router pings host1's container over IPv6", func() error {
		_, err := tor.Run(ctx, "ping", "-6", "-c", "1", "-W", "1", c1v6.String())
		return err
	})

	// The router's own IPv6 network (announced once the mesh is up, whose
	// check counts every route) is routed through it, and host1's
	// container reaches it (leaving the pool: NAT66 to host1's address).
	if out, err := vtysh("configure terminal", "router bgp 65001", "address-family ipv6 unicast", "network 2001:db8:250::/48"); err != nil {
		t.Fatalf("vtysh: %v: %s", err, out)
	}
	f.eventually(15*time.Second, "host1 installs the router's 2001:db8:250::/48 via its IPv6 address", func() error {
		if via := f.ownedRoutes(hosts[0])["2001:db8:250::/48"]; !strings.Contains(via, "via "+torV6.String()+" ") {
			return fmt.Errorf("host1's route: %q, want via %s", via, torV6)
		}
		return nil
	})
	f.eventually(10*time.Second, "host1's container reaches the router's network over IPv6", func() error {
		_, err := c1.Run(ctx, "ping", "-6", "-c", "1", "-W", "1", "2001:db8:250::1")
		return err
	})

	// The router announces a /80 inside host2's /64: refused by host1,
	// whose container still reaches host2's over the tunnel.
	_, c2v6 := f.containerV6(hosts[1], subnets[hosts[1].Name])
	rogue := netip.PrefixFrom(subnets[hosts[1].Name].Addr(), 80)
	if out, err := vtysh("configure terminal", "router bgp 65001", "address-family ipv6 unicast", "network "+rogue.String()); err != nil {
		t.Fatalf("vtysh: %v: %s", err, out)
	}
	f.eventually(30*time.Second, "host1 refuses the router's "+rogue.String(), func() error {
		log, _ := os.ReadFile(f.agents[hosts[0].Name].proc.LogPath())
		if !strings.Contains(string(log), rogue.String()+" is not the subnet "+subnets[hosts[1].Name].String()) {
			return fmt.Errorf("no refusal of %s in host1's log", rogue)
		}
		return nil
	})
	if via, ok := f.ownedRoutes(hosts[0])[rogue.String()]; ok {
		t.Errorf("host1 installed the router's %s: %s", rogue, via)
	}
	if out, err := hosts[0].Run(ctx, "ip", "-6", "route", "get", c2v6.String()); err != nil || !strings.Contains(out, " dev fabric.") {
		t.Errorf("host1's route to host2's container: %q (%v), want it through a fabric tunnel", out, err)
	}
	f.eventually(10*time.Second, "host1's container reaches host2's over IPv6", func() error {
		_, err := c1.Run(ctx, "ping", "-6", "-c", "1", "-W", "1", c2v6.String())
		return err
	})
}
