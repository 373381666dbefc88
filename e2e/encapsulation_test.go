package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/fabricnet/fabric/internal/testwait"
	"github.com/fabricnet/fabric/lab"
)

// TestEncapsulationFallback is auto mode's ladder on a routed underlay:
// host1 and host3 share a segment, host2 is behind a router. Every pair
// starts on what auto mode gives (ipip where the kernel has it, as in the
// qemu guest; vxlan here), with the container traffic on that tunnel
// device; a router that drops IP protocol 4 moves exactly the pairs across
// it to vxlan while traffic keeps flowing, and lifting the block moves them
// back. On a kernel without IPIP the block changes nothing, which the test
// checks too; the guest lane proves the other branch.
func TestEncapsulationFallback(t *testing.T) {
	t.Parallel()
	f := newFabric(t, lab.Spec{Hosts: 3, Subnets: 2}, "--vxlan-port", "8472")
	hosts := f.startMesh()
	h1, h2, h3 := hosts[0], hosts[1], hosts[2]
	auto := f.autoEncap(h1)
	ctrs := f.containersTalk(hosts)
	all := func(string, string) string { return auto }
	f.waitEncaps(hosts, all)
	f.pairsTalk(hosts, ctrs)
	f.tunnelCarries(h1, ctrs[h1.Name], ctrs[h2.Name], auto)

	ctx := context.Background()
	undo, err := f.lab.DropIPProto(ctx, 4, h1.SubnetIndex, h2.SubnetIndex)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { undo() })
	acrossRouter := func(a, b string) string {
		if a == h2.Name || b == h2.Name {
			return "vxlan"
		}
		return auto
	}
	d := f.waitEncaps(hosts, acrossRouter)
	t.Logf("IP protocol 4 dropped by the router: pairs across it on vxlan %.1fs later (auto mode here: %s)", d.Seconds(), auto)
	f.pairsTalk(hosts, ctrs)
	f.tunnelCarries(h1, ctrs[h1.Name], ctrs[h2.Name], "vxlan")
	f.tunnelCarries(h1, ctrs[h1.Name], ctrs[h3.Name], auto)

	if err := undo(); err != nil {
		t.Fatal(err)
	}
	d = f.waitEncaps(hosts, all)
	t.Logf("block lifted: every pair back on %s %.1fs later", auto, d.Seconds())
	f.pairsTalk(hosts, ctrs)

	if auto == "ipip" {
		f.lossKeepsIPIP(hosts, ctrs, all)
	} else {
		t.Logf("auto mode gives %s here: the random-loss check of the IPIP probe runs where IPIP does (qemu lane)", auto)
	}
}

// TestRestartKeepsEncapsulation: a restarted fabricd in auto mode starts
// from its saved probe verdicts, so its routes stay on their device (ipip
// where the kernel has it) from the stop until its session is back, and it
// logs no change of a peer's encapsulation.
func TestRestartKeepsEncapsulation(t *testing.T) {
	t.Parallel()
	f := newFabric(t, lab.Spec{Hosts: 2}, "--vxlan-port", "8472")
	hosts := f.startMesh()
	h2 := hosts[1]
	auto := f.autoEncap(h2)
	all := func(string, string) string { return auto }
	f.waitEncaps(hosts, all)
	f.pairsTalk(hosts, f.containersTalk(hosts))

	before := f.ownedRoutes(h2)
	logPath := f.agents[h2.Name].proc.LogPath()
	logged, _ := os.ReadFile(logPath) // the restarted fabricd appends to it
	f.restart(h2)
	f.eventually(30*time.Second, "restarted host2 has its peer established on "+auto, func() error {
		for p, want := range before {
			if got, ok := f.ownedRoutes(h2)[p]; ok && got != want {
				return fmt.Errorf("host2's route %s changed during the restart: %q, was %q", p, got, want)
			}
		}
		if err := f.allEstablished(h2, 1); err != nil {
			return err
		}
		return f.encapsAre(h2, hosts, all)
	})
	if t.Failed() {
		return
	}
	if log, _ := os.ReadFile(logPath); strings.Contains(string(log[len(logged):]), "peer encapsulation changed") {
		t.Errorf("the restarted host2 changed a peer's encapsulation:\n%s", tail(logPath))
	}
}

// TestVXLANHostJoinsAutoHosts: a host in vxlan mode joins two auto hosts,
// which must send it vxlan (it has no IPIP device) and keep auto mode's
// choice between themselves.
func TestVXLANHostJoinsAutoHosts(t *testing.T) {
	t.Parallel()
	f := newFabric(t, lab.Spec{Hosts: 2}, "--vxlan-port", "8472")
	hosts := f.startMesh()
	auto := f.autoEncap(hosts[0])
	ctrs := f.containersTalk(hosts)
	f.waitEncaps(hosts, func(string, string) string { return auto })

	h3, err := f.lab.AddHost(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	f.start(h3, "--encapsulation", "vxlan")
	hosts = append(hosts, h3)
	for _, h := range hosts {
		f.eventually(20*time.Second, h.Name+" routes", func() error { return f.routesTo(h, f.otherSubnets(h, hosts)) })
	}
	ctrs[h3.Name] = f.container(h3, "c1", 2)
	withVXLANHost := func(a, b string) string {
		if a == h3.Name || b == h3.Name {
			return "vxlan"
		}
		return auto
	}
	f.waitEncaps(hosts, withVXLANHost)
	f.pairsTalk(hosts, ctrs)
}

// lossKeepsIPIP: 5 % random loss on host2's underlay link (netem) for
// 20 s, with container traffic across it so that the loss really drops
// something, must not move any pair off IPIP: the probe calls a path
// blocked only after 8 misses in a row.
func (f *fabric) lossKeepsIPIP(hosts []*lab.Host, ctrs map[string]*lab.Container, want encapsOf) {
	f.t.Helper()
	h1, h2 := hosts[0], hosts[1]
	logged := map[string]int{}
	for _, h := range hosts {
		log, _ := os.ReadFile(f.agents[h.Name].proc.LogPath())
		logged[h.Name] = len(log)
	}
	dropped, undo, err := h2.Loss(5)
	if err != nil {
		f.t.Fatal(err)
	}
	f.t.Cleanup(func() { undo() })
	const lossFor = 20 * time.Second
	for end := time.Now().Add(lossFor); time.Now().Before(end); {
		ctx, cancel := context.WithTimeout(context.Background(), testwait.Scale(10*time.Second))
		ctrs[h2.Name].Run(ctx, "ping", "-q", "-c", "20", "-i", "0.05", "-W", "1", ctrs[h1.Name].Addr.String()) // some are lost: that is the point
		cancel()
		for _, h := range hosts {
			if err := f.encapsAre(h, hosts, want); err != nil {
				f.t.Fatalf("under 5 %% random loss on host2's link: %v", err)
			}
		}
	}
	n, err := dropped()
	if err != nil {
		f.t.Fatal(err)
	}
	if n == 0 {
		f.t.Fatalf("netem on host2's link dropped nothing in %s: the check proves nothing", lossFor)
	}
	if err := undo(); err != nil {
		f.t.Fatal(err)
	}
	for _, h := range hosts {
		log, _ := os.ReadFile(f.agents[h.Name].proc.LogPath())
		if changed := strings.Count(string(log[logged[h.Name]:]), "peer encapsulation changed"); changed > 0 {
			f.t.Errorf("%s changed a peer's encapsulation %d times under 5 %% random loss:\n%s", h.Name, changed, tail(f.agents[h.Name].proc.LogPath()))
		}
	}
	f.t.Logf("%s of 5 %% random loss on host2's link (%d packets dropped): every pair stayed on ipip", lossFor, n)
}

// encapsOf is the encapsulation every host should use for each peer, by name.
type encapsOf func(host, peer string) string

// waitEncaps waits until every host uses want's encapsulation for each of
// its peers, in `fabricctl peers status` and in its kernel routes, and
// returns how long that took.
func (f *fabric) waitEncaps(hosts []*lab.Host, want encapsOf) time.Duration {
	f.t.Helper()
	return f.eventually(30*time.Second, "every pair on its encapsulation", func() error {
		for _, h := range hosts {
			if err := f.encapsAre(h, hosts, want); err != nil {
				return err
			}
		}
		return nil
	})
}

func (f *fabric) encapsAre(h *lab.Host, hosts []*lab.Host, want encapsOf) error {
	ps, err := f.peers(h)
	if err != nil {
		return err
	}
	routes := f.ownedRoutes(h)
	for _, p := range ps {
		w := want(h.Name, p.Name)
		if p.Encap != w {
			return fmt.Errorf("%s -> %s: %q (%s), want %s", h.Name, p.Name, p.Encap, p.EncapReason, w)
		}
		for _, o := range hosts {
			if o.Name != p.Name {
				continue
			}
			if r := routes[f.subnet(o).String()]; !strings.Contains(r, "dev "+deviceOf(w)) {
				return fmt.Errorf("%s's route to %s is %q, want it on %s", h.Name, p.Name, r, deviceOf(w))
			}
		}
	}
	return nil
}

// deviceOf is the tunnel device of an encapsulation.
func deviceOf(encap string) string {
	if encap == "wireguard" {
		return "fabric.wg"
	}
	return "fabric." + encap
}

// pairsTalk checks a ping and a TCP connection for every ordered pair of
// the hosts' containers.
func (f *fabric) pairsTalk(hosts []*lab.Host, ctrs map[string]*lab.Container) {
	f.t.Helper()
	for _, a := range hosts {
		for _, b := range hosts {
			if a == b {
				continue
			}
			src, dst := ctrs[a.Name], ctrs[b.Name]
			f.eventually(10*time.Second, fmt.Sprintf("ping %s -> %s", a.Name, b.Name), func() error { return ping(src, dst.Addr) })
			if from, err := tcpExchange(dst, src, 8000); err != nil || from != src.Addr.String() {
				f.t.Fatalf("tcp %s -> %s: receiver saw %q, want %s: %v", a.Name, b.Name, from, src.Addr, err)
			}
		}
	}
}

// tunnelCarries checks that container traffic from src to dst leaves h
// through the tunnel device of encap, not through the other one: the
// kernel's packet counters of both devices around 20 pings.
func (f *fabric) tunnelCarries(h *lab.Host, src, dst *lab.Container, encap string) {
	f.t.Helper()
	other := map[string]string{"ipip": "vxlan", "vxlan": "ipip"}[encap]
	before := map[string]uint64{encap: f.txPackets(h, "fabric."+encap), other: f.txPackets(h, "fabric."+other)}
	for i := 0; i < 20; i++ {
		if err := ping(src, dst.Addr); err != nil {
			f.t.Fatalf("ping %s -> %s: %v", src.Name, dst.Addr, err)
		}
	}
	sent := f.txPackets(h, "fabric."+encap) - before[encap]
	stray := f.txPackets(h, "fabric."+other) - before[other]
	if sent < 20 || stray >= 20 {
		f.t.Errorf("%s: 20 pings %s -> %s: fabric.%s sent %d packets, fabric.%s %d; want them on %s", h.Name, src.Addr, dst.Addr, encap, sent, other, stray, encap)
	}
}

// txPackets is the kernel's count of packets dev on h sent; 0 when there is
// no such device (a kernel without IPIP).
func (f *fabric) txPackets(h *lab.Host, dev string) uint64 {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	out, err := h.Run(ctx, "ip", "-j", "-s", "link", "show", "dev", dev)
	if err != nil {
		return 0
	}
	var links []struct {
		Stats struct {
			TX struct {
				Packets uint64 `json:"packets"`
			} `json:"tx"`
		} `json:"stats64"`
	}
	if err := json.Unmarshal([]byte(out), &links); err != nil || len(links) != 1 {
		f.t.Fatalf("ip -j -s link show dev %s on %s: %v: %s", dev, h.Name, err, out)
	}
	return links[0].Stats.TX.Packets
}
