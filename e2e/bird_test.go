package e2e

import (
	"context"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/fabricnet/fabric/lab"

	"github.com/fabricnet/fabric/internal/testreq"
)

// TestBIRDTopOfRack peers every host with BIRD 2 acting as a top-of-rack
// router (eBGP, AS 65000, TCP MD5 password): BIRD learns every host's subnet with the host as
// next hop, and the aggregate and default route BIRD originates are installed
// on the hosts.
func TestBIRDTopOfRack(t *testing.T) {
	t.Parallel()
	f := newFabric(t, lab.Spec{Hosts: 3})
	ctx := context.Background()
	tor, sock := startBIRD(t, f, func(addr string) string {
		return "protocol static { ipv4; route 10.250.0.0/16 blackhole; route 0.0.0.0/0 blackhole; }\n" +
			torTemplate(addr, `password "fabric-md5";`)
	}, torNeighbor)
	// The session is protected with a TCP MD5 password on both sides.
	peerFile := peersFile(t, f, fmt.Sprintf("peers:\n- name: tor\n  address: %s\n  asn: 65000\n  password: fabric-md5\n", tor.Addr))
	for _, h := range f.lab.Hosts() {
		f.start(h, "--config", peerFile)
	}

	// BIRD learns every host's subnet, next hop = the host.
	for _, h := range f.lab.Hosts() {
		sub := f.subnet(h)
		f.eventually(30*time.Second, "BIRD learns "+sub.String(), func() error {
			out, err := tor.Run(ctx, "birdc", "-s", sock, "show", "route", "for", sub.Addr().Next().String(), "all")
			if err != nil {
				return err
			}
			// The BGP next hop attribute, not the neighbour BIRD prints
			// for every route it learned from the host.
			if !strings.Contains(out, sub.String()) || !strings.Contains(out, "BGP.next_hop: "+h.Addr.String()) {
				return fmt.Errorf("birdc: want %s with BGP.next_hop %s: %s", sub, h.Addr, out)
			}
			return nil
		})
	}
	out, _ := tor.Run(ctx, "birdc", "-s", sock, "show", "route")
	t.Logf("birdc show route:\n%s", out)

	// Every host installs BIRD's aggregate and default route via BIRD, and
	// its peers status shows the external peer.
	for _, h := range f.lab.Hosts() {
		f.eventually(15*time.Second, h.Name+" installs 10.250.0.0/16 and the default route", func() error {
			owned := f.ownedRoutes(h)
			for _, p := range []string{"10.250.0.0/16", "default"} {
				if r, ok := owned[p]; !ok || !strings.Contains(r, "via "+tor.Addr.String()) {
					return fmt.Errorf("no %s via %s; owned routes: %v", p, tor.Addr, owned)
				}
			}
			return nil
		})
	}
	// And the mesh's routes: BIRD having every subnet says nothing about
	// host1's own sessions (seen: host1-host2 still connecting).
	h1 := f.lab.Hosts()[0]
	f.eventually(30*time.Second, "host1 routes to the other hosts", func() error {
		owned := f.ownedRoutes(h1)
		for _, p := range f.otherSubnets(h1, f.lab.Hosts()) {
			if _, ok := owned[p.String()]; !ok {
				return fmt.Errorf("no route to %s; owned routes: %v", p, owned)
			}
		}
		return nil
	})
	st, _ := f.fabricctl(h1, "peers", "status")
	t.Logf("peers status:\n%s", st)
	if !strings.Contains(st, "tor") || !strings.Contains(st, "external") {
		t.Errorf("peers status lacks the external peer tor:\n%s", st)
	}
	rs, _ := f.fabricctl(f.lab.Hosts()[0], "routes")
	t.Logf("routes:\n%s", rs)
	// Every route fabricd owns, with where it came from.
	rows := map[string]string{}
	for _, line := range strings.Split(rs, "\n") {
		if fields := strings.Fields(line); len(fields) > 0 {
			rows[fields[0]] = line
		}
	}
	for _, want := range []struct{ prefix, from string }{{"0.0.0.0/0", "tor"}, {"10.250.0.0/16", "tor"}} {
		if r, ok := rows[want.prefix]; !ok || !strings.Contains(r, want.from) || !strings.Contains(r, "external") {
			t.Errorf("fabricctl routes: %s row %q, want it learned from %s (external)", want.prefix, r, want.from)
		}
	}
	for _, h := range f.lab.Hosts()[1:] {
		if r := rows[f.subnet(h).String()]; !strings.Contains(r, h.Name) || !strings.Contains(r, "mesh") {
			t.Errorf("fabricctl routes: %s row %q, want it learned from %s (mesh)", f.subnet(h), r, h.Name)
		}
	}
}

// TestBIRDRouteReflector turns the mesh off: every host peers only with BIRD
// acting as an iBGP route reflector, and still learns every other host's
// subnet with the originating host as next hop.
func TestBIRDRouteReflector(t *testing.T) {
	t.Parallel()
	f := newFabric(t, lab.Spec{Hosts: 3})
	rr, _ := startBIRD(t, f, func(addr string) string {
		return "template bgp rrc { local " + addr + " as 64512; rr client; rr cluster id 1.1.1.1; hold time 9; keepalive time 3; connect retry time 2; ipv4 { import all; export all; }; }\n"
	}, func(h *lab.Host) string {
		return fmt.Sprintf("protocol bgp %s from rrc { neighbor %s as 64512; }", h.Name, h.Addr)
	})
	peerFile := peersFile(t, f, fmt.Sprintf("mesh: false\npeers:\n- name: rr\n  address: %s\n  asn: 64512\n  type: route-reflector\n", rr.Addr))
	hosts := f.lab.Hosts()
	for _, h := range hosts {
		f.start(h, "--config", peerFile)
	}
	for _, h := range hosts {
		f.eventually(30*time.Second, h.Name+" learns every subnet through the reflector", func() error {
			if err := f.routesTo(h, f.otherSubnets(h, hosts)); err != nil {
				return err
			}
			for _, o := range hosts {
				if o == h {
					continue
				}
				// The reflector keeps the originator's next hop: the route
				// leads to the host, not to the reflector.
				sub := f.subnet(o)
				r := f.ownedRoutes(h)[sub.String()]
				if strings.Contains(r, rr.Addr.String()) {
					return fmt.Errorf("route to %s points at the reflector: %s", sub, r)
				}
			}
			return nil
		})
	}
	st, _ := f.fabricctl(hosts[0], "peers", "status")
	t.Logf("peers status with the mesh off:\n%s", st)
	if strings.Contains(st, "mesh ") || !strings.Contains(st, "route-reflector") {
		t.Errorf("want only the route-reflector peer:\n%s", st)
	}
	ctrs := map[string]*lab.Container{}
	for _, h := range hosts {
		ctrs[h.Name] = f.container(h, "c1", 2)
	}
	f.eventually(15*time.Second, "host1 container reaches host3 container via reflected route", func() error {
		return ping(ctrs["host1"], ctrs["host3"].Addr)
	})
}

// startBIRD runs BIRD 2 with conf (a protocol per host is appended by
// perHost) in its own namespace on the underlay and returns that namespace
// and the birdc socket.
func startBIRD(t *testing.T, f *fabric, conf func(addr string) string, perHost func(h *lab.Host) string) (*lab.Host, string) {
	t.Helper()
	if _, err := exec.LookPath("bird"); err != nil {
		testreq.Missing(t, "bird not installed (apt-get install bird2; make test installs it)")
	}
	bird, err := f.lab.AddOutside(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	dir := filepath.Join(f.lab.LogDir(), "bird")
	os.MkdirAll(dir, 0o755)
	text := fmt.Sprintf("router id %s;\nlog stderr all;\nprotocol device {}\n", bird.Addr) + conf(bird.Addr.String())
	for _, h := range f.lab.Hosts() {
		text += perHost(h) + "\n"
	}
	confPath := filepath.Join(dir, "bird.conf")
	sock := filepath.Join(dir, "bird.ctl")
	if err := os.WriteFile(confPath, []byte(text), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := bird.Start("bird", "bird", "-f", "-c", confPath, "-s", sock, "-P", filepath.Join(dir, "bird.pid")); err != nil {
		t.Fatal(err)
	}
	return bird, sock
}

// peersFile writes a fabricd config file and returns its path.
func peersFile(t *testing.T, f *fabric, content string) string {
	path := filepath.Join(f.lab.LogDir(), "fabricd-peers.yaml")
	if err := os.WriteFile(path, []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
	return path
}

// TestBIRDGracefulRestartHelper: BIRD as an eBGP top-of-rack router with
// graceful restart on. While fabricd on host1 restarts (SIGTERM, then start),
// BIRD keeps host1's subnet and host1 keeps BIRD's default route and
// aggregate: polled every 100 ms on BIRD, `ip monitor route` on host1.
func TestBIRDGracefulRestartHelper(t *testing.T) {
	t.Parallel()
	f := newFabric(t, lab.Spec{Hosts: 2}, "--graceful-restart-time", "30s")
	ctx := context.Background()
	tor, sock := startBIRD(t, f, func(addr string) string {
		return "protocol static { ipv4; route 10.250.0.0/16 blackhole; route 0.0.0.0/0 blackhole; }\n" +
			torTemplate(addr, "graceful restart on; graceful restart time 30;")
	}, torNeighbor)
	peerFile := peersFile(t, f, fmt.Sprintf("peers:\n- name: tor\n  address: %s\n  asn: 65000\n", tor.Addr))
	hosts := f.lab.Hosts()
	for _, h := range hosts {
		f.start(h, "--config", peerFile)
	}
	h1 := hosts[0]
	sub := f.subnet(h1)
	torHas := func() error {
		c, cancel := context.WithTimeout(ctx, 3*time.Second)
		defer cancel()
		out, err := tor.Run(c, "birdc", "-s", sock, "show", "route", "for", sub.Addr().Next().String())
		if err != nil {
			return err
		}
		if !strings.Contains(out, sub.String()) {
			return fmt.Errorf("BIRD has no route to %s: %s", sub, out)
		}
		return nil
	}
	f.eventually(30*time.Second, "BIRD learns "+sub.String(), torHas)
	f.eventually(15*time.Second, "host1 installs BIRD's default route", func() error {
		if _, ok := f.ownedRoutes(h1)["default"]; !ok {
			return fmt.Errorf("no default route")
		}
		return nil
	})
	f.eventually(15*time.Second, "graceful restart negotiated with BIRD", func() error {
		out, _ := tor.Run(ctx, "birdc", "-s", sock, "show", "protocols", "all", h1.Name)
		if !strings.Contains(out, "Graceful restart") || !strings.Contains(out, "Established") {
			return fmt.Errorf("birdc show protocols all %s:\n%s", h1.Name, out)
		}
		return nil
	})

	monitor, err := h1.Start("route-monitor", "ip", "monitor", "route")
	if err != nil {
		t.Fatal(err)
	}
	a := f.agents[h1.Name]
	if err := a.proc.Stop(); err != nil {
		t.Fatal(err)
	}
	p, err := h1.Start("fabricd", a.args...)
	if err != nil {
		t.Fatal(err)
	}
	a.proc = p
	restarted := time.Now()
	missing, polls := 0, 0
	for time.Since(restarted) < 15*time.Second {
		polls++
		if err := torHas(); err != nil {
			missing++
			t.Logf("%.1fs after the restart: %v", time.Since(restarted).Seconds(), err)
		}
		time.Sleep(100 * time.Millisecond)
	}
	f.eventually(30*time.Second, "host1 back in session with BIRD", func() error { return f.allEstablished(h1, 2) })
	monitor.Stop()
	if missing > 0 {
		t.Errorf("BIRD lacked host1's subnet in %d of %d polls during host1's restart", missing, polls)
	}
	log, _ := os.ReadFile(monitor.LogPath())
	for _, line := range strings.Split(string(log), "\n") {
		if strings.HasPrefix(line, "Deleted default") || strings.HasPrefix(line, "Deleted 10.250.0.0/16") {
			t.Errorf("host1 deleted BIRD's route during its restart: %s", line)
		}
	}
	t.Logf("over 15s of host1's restart, BIRD lacked %s in %d of %d polls", sub, missing, polls)
}

// TestBIRDImportPrefixes: a top-of-rack router limited to importPrefixes
// gets only those routes installed; the rest are refused with a warning.
func TestBIRDImportPrefixes(t *testing.T) {
	t.Parallel()
	f := newFabric(t, lab.Spec{Hosts: 1})
	tor, _ := startBIRD(t, f, func(addr string) string {
		return "protocol static { ipv4; route 10.250.0.0/16 blackhole; route 0.0.0.0/0 blackhole; route 172.16.0.0/12 blackhole; }\n" +
			torTemplate(addr, "")
	}, torNeighbor)
	peerFile := peersFile(t, f, fmt.Sprintf("peers:\n- name: tor\n  address: %s\n  asn: 65000\n  importPrefixes: [0.0.0.0/0, 10.250.0.0/16]\n", tor.Addr))
	h := f.lab.Hosts()[0]
	f.start(h, "--config", peerFile)
	f.eventually(30*time.Second, "default and 10.250.0.0/16 installed", func() error {
		owned := f.ownedRoutes(h)
		for _, p := range []string{"default", "10.250.0.0/16"} {
			if _, ok := owned[p]; !ok {
				return fmt.Errorf("no %s; owned: %v", p, owned)
			}
		}
		return nil
	})
	if _, ok := f.ownedRoutes(h)["172.16.0.0/12"]; ok {
		t.Errorf("172.16.0.0/12 installed although tor may only send 0.0.0.0/0 and 10.250.0.0/16")
	}
	log, _ := os.ReadFile(f.agents[h.Name].proc.LogPath())
	if !strings.Contains(string(log), "peer tor may only send routes inside") {
		t.Errorf("the refused route is not logged")
	}
}

// TestRogueSpeakerCannotTakeASubnet: a speaker on the underlay (BIRD, peered
// as a router) announces host2's /24 and a /25 inside it. Longest match
// would send host2's containers' traffic to it; fabric installs neither on
// host1 (a pool prefix only from the host that holds it, with that host as
// next hop), and host1 still reaches host2's container through the tunnel.
func TestRogueSpeakerCannotTakeASubnet(t *testing.T) {
	t.Parallel()
	f := newFabric(t, lab.Spec{Hosts: 2})
	rogue, err := f.lab.AddOutside(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	peerFile := peersFile(t, f, fmt.Sprintf("peers:\n- name: rogue\n  address: %s\n  asn: 65000\n", rogue.Addr))
	hosts := f.startMesh("--config", peerFile)
	h1, h2 := hosts[0], hosts[1]
	s2 := f.subnet(h2)
	half := netip.PrefixFrom(s2.Addr(), 25)
	startBIRD(t, f, func(addr string) string {
		return fmt.Sprintf("protocol static { ipv4; route %s blackhole; route %s blackhole; }\n", s2, half) +
			torTemplate(addr, "")
	}, torNeighbor)
	// The /25 is the best (only) path for itself: it must be refused. The
	// /24 loses BGP's choice to host2's own (shorter AS path); whichever
	// path wins, only host2 as next hop may reach the kernel.
	f.eventually(30*time.Second, "host1 has received the rogue's two routes", func() error {
		ps, err := f.peers(h1)
		if err != nil {
			return err
		}
		for _, p := range ps {
			if p.Name == "rogue" && p.State == "established" && p.Received >= 2 {
				return nil
			}
		}
		return fmt.Errorf("peers %+v", ps)
	})
	// The refusal is logged by the same planning that writes the data
	// plane: once it is there, the routes of that update are decided.
	want := half.String() + " is not the subnet " + s2.String()
	f.eventually(15*time.Second, "host1 logs the refusal of the rogue's "+half.String(), func() error {
		if log, _ := os.ReadFile(f.agents[h1.Name].proc.LogPath()); !strings.Contains(string(log), want) {
			return fmt.Errorf("no %q in host1's log", want)
		}
		return nil
	})
	owned := f.ownedRoutes(h1)
	if r, ok := owned[half.String()]; ok {
		t.Errorf("host1 installed the rogue's %s: %s", half, r)
	}
	if r := owned[s2.String()]; strings.Contains(r, rogue.Addr.String()) || !strings.Contains(r, "fabric.") {
		t.Errorf("host1's route to %s is %q, want it through the tunnel to %s", s2, r, h2.Name)
	}
	f.containersTalk(hosts)
}

// torTemplate is BIRD's side of every host session when it plays a
// top-of-rack router (AS 65000, eBGP, short timers), with extra options.
func torTemplate(addr, extra string) string {
	return "template bgp host { local " + addr + " as 65000; " + extra + " hold time 9; keepalive time 3; connect retry time 2; " +
		"ipv4 { import all; export all; }; }\n"
}

// torNeighbor is one host's session on a torTemplate router.
func torNeighbor(h *lab.Host) string {
	return fmt.Sprintf("protocol bgp %s from host { neighbor %s as 64512; }", h.Name, h.Addr)
}
