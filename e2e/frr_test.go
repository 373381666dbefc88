package e2e

import (
	"context"
	"fmt"
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
			tor, vtysh := startFRR(t, f, h, tc.bfd)
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

// startFRR runs zebra, bfdd and bgpd in an outside namespace as an eBGP
// router (AS 65001) that announces 10.250.0.0/24 to host h, with BFD on
// the session when bfd is set. It returns the router and a vtysh runner.
func startFRR(t *testing.T, f *fabric, h *lab.Host, bfd bool) (*lab.Host, func(cmd string) (string, error)) {
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
	neighborBFD := ""
	if bfd {
		neighborBFD = fmt.Sprintf(" neighbor %s bfd\n neighbor %s bfd profile fast\n", h.Addr, h.Addr)
	}
	conf := fmt.Sprintf(`frr defaults traditional
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
	if err := os.WriteFile(filepath.Join(dir, "frr.conf"), []byte(conf), 0o644); err != nil {
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
	vtysh := func(cmd string) (string, error) {
		out, err := exec.Command("ip", "netns", "exec", tor.Netns, "vtysh", "--vty_socket", dir, "-c", cmd).CombinedOutput()
		return string(out), err
	}
	return tor, vtysh
}
