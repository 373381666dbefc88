// Command ipipcheck runs inside the qemulane VM (a stock kernel with ipip).
// It builds three hosts on a routed underlay with a hand-made IPIP mesh and a
// container behind each host, then proves:
//   - container-to-container ICMP and TCP across every host pair;
//   - the underlay carries IP protocol 4 and no bare container packets;
//   - a FIB rule in the router that blackholes protocol 4 breaks host1<->host3
//     (routed) but not host1<->host2 (same segment), and removing it heals.
//
// Evidence goes to stdout, one fact a line; the last line is the qemulane
// verdict marker. Exit status 1 on failure.
package main

import (
	"crypto/rand"
	"flag"
	"fmt"
	"net"
	"os"
	"strings"
	"time"

	"github.com/fabricnet/fabric/qemulane"
	"github.com/fabricnet/fabric/qemulane/vmlab"
	"golang.org/x/sys/unix"
)

const (
	echoPort    = 7000
	payloadSize = 16 << 10 // several segments at MTU 1480
	blockRulePr = 100      // FIB rule priority, before the main table (32766)
)

// checker records evidence lines and failures.
type checker struct {
	failures []string
	start    time.Time
}

func (c *checker) logf(format string, args ...any) {
	fmt.Printf(format+"\n", args...)
}

func (c *checker) failf(format string, args ...any) {
	msg := fmt.Sprintf(format, args...)
	c.failures = append(c.failures, msg)
	fmt.Println("FAILED " + msg)
}

func (c *checker) phase(name string) {
	c.logf("PHASE %s at %.1fs", name, time.Since(c.start).Seconds())
}

func main() {
	prefix := flag.String("prefix", "ql-", "prefix of every namespace this run creates")
	flag.Parse()

	c := &checker{start: time.Now()}
	lab := vmlab.New(*prefix)
	err := run(c, lab)
	if cerr := lab.Close(); cerr != nil {
		c.failf("cleanup: %v", cerr)
	} else if left := vmlab.NamespacesWithPrefix(*prefix); len(left) > 0 {
		c.failf("cleanup: namespaces left behind: %v", left)
	} else {
		c.logf("CLEANUP all %s* namespaces removed", *prefix)
	}
	if err != nil {
		c.failf("%v", err)
	}
	if len(c.failures) > 0 {
		fmt.Printf("%s %s\n", qemulane.FailPrefix, strings.Join(c.failures, "; "))
		os.Exit(1)
	}
	fmt.Println(qemulane.PassLine)
}

func run(c *checker, lab *vmlab.Lab) error {
	c.phase("topology")
	topo, err := vmlab.BuildTopology(lab, vmlab.ThreeHostSpec())
	if err != nil {
		return fmt.Errorf("build topology: %w", err)
	}
	for _, h := range topo.Hosts {
		if err := topo.AddIPIP(h); err != nil {
			return err
		}
		for _, peer := range topo.Hosts {
			if peer.Name != h.Name {
				if err := topo.AddIPIPRoute(h, peer); err != nil {
					return err
				}
			}
		}
		c.logf("HOST %s underlay=%s pods=%s container=%s", h.Name, h.Underlay, h.PodNet, h.Container)
	}

	servers := map[string]*vmlab.EchoServer{}
	for _, h := range topo.Hosts {
		s, err := lab.StartEchoServer(h.ContainerNS, echoAddr(h))
		if err != nil {
			return err
		}
		servers[h.Name] = s
	}
	defer func() {
		for _, s := range servers {
			s.Close()
		}
	}()

	_, overlay, _ := net.ParseCIDR("10.244.0.0/16")
	watched := []string{"host1", "host3"}
	watches := map[string]*vmlab.Watch{}
	for _, name := range watched {
		w, err := lab.WatchLink(name, vmlab.UnderlayDev, overlay)
		if err != nil {
			return err
		}
		watches[name] = w
	}

	c.phase("mesh")
	payload := make([]byte, payloadSize)
	rand.Read(payload)
	for _, a := range topo.Hosts {
		for _, b := range topo.Hosts {
			if a.Name == b.Name {
				continue
			}
			if err := pingWithRetry(lab, a, b); err != nil {
				c.failf("PING %s->%s: %v", a.Name, b.Name, err)
			} else {
				c.logf("PING %s->%s ok (%s -> %s)", a.Name, b.Name, a.Container, b.Container)
			}
			if err := lab.TCPEcho(a.ContainerNS, echoAddr(b), payload, 10*time.Second); err != nil {
				c.failf("TCP %s->%s: %v", a.Name, b.Name, err)
			} else {
				c.logf("TCP %s->%s ok (%d bytes echoed via %s)", a.Name, b.Name, len(payload), echoAddr(b))
			}
		}
	}

	for _, name := range watched {
		st, err := watches[name].Close()
		if err != nil {
			return fmt.Errorf("watch %s: %w", name, err)
		}
		ipip := st.Proto[unix.IPPROTO_IPIP]
		c.logf("UNDERLAY %s/%s ipproto=4 frames=%d (inner icmp=%d tcp=%d) bare-overlay-frames=%d ipv4-frames=%d",
			name, vmlab.UnderlayDev, ipip, st.Inner[unix.IPPROTO_ICMP], st.Inner[unix.IPPROTO_TCP], st.Bare, st.IPv4)
		if ipip == 0 || st.Inner[unix.IPPROTO_ICMP] == 0 || st.Inner[unix.IPPROTO_TCP] == 0 {
			c.failf("UNDERLAY %s: expected IPIP frames carrying ICMP and TCP", name)
		}
		if st.Bare != 0 {
			c.failf("UNDERLAY %s: %d container packets crossed the underlay unencapsulated", name, st.Bare)
		}
	}
	for _, h := range topo.Hosts {
		stats, err := lab.LinkStats(h.Name, vmlab.IPIPDev)
		if err != nil {
			return err
		}
		c.logf("IPIP %s/%s tx_packets=%d rx_packets=%d tx_errors=%d",
			h.Name, vmlab.IPIPDev, stats.TxPackets, stats.RxPackets, stats.TxErrors)
		if stats.TxPackets == 0 || stats.RxPackets == 0 {
			c.failf("IPIP %s: device counters show no traffic", h.Name)
		}
	}

	c.phase("block")
	return checkProtoBlock(c, lab, topo, payload)
}

// checkProtoBlock shows the mechanism the per-peer VXLAN fallback reacts to:
// a router that drops IP protocol 4 cuts only the peers routed through it.
func checkProtoBlock(c *checker, lab *vmlab.Lab, topo *vmlab.Topology, payload []byte) error {
	host1, _ := topo.Host("host1")
	host2, _ := topo.Host("host2")
	host3, _ := topo.Host("host3")

	routerWatches := make([]*vmlab.Watch, 2)
	for i := range routerWatches {
		w, err := lab.WatchLink(vmlab.RouterNS, vmlab.RouterDev(i), nil)
		if err != nil {
			return err
		}
		routerWatches[i] = w
	}

	rule := vmlab.ProtoBlockRule(unix.IPPROTO_IPIP, blockRulePr)
	if err := lab.AddRule(vmlab.RouterNS, rule); err != nil {
		return err
	}
	rules, err := lab.Rules(vmlab.RouterNS)
	if err != nil {
		return err
	}
	// netlink v1.3.1's RuleList does not decode the action, so read the
	// protocol back from it and let the traffic below prove the blackhole.
	found := false
	for _, r := range rules {
		if r.Priority == blockRulePr && r.IPProto == unix.IPPROTO_IPIP {
			found = true
			c.logf("RULE router priority=%d ipproto=%d action=blackhole", r.Priority, r.IPProto)
		}
	}
	if !found {
		c.failf("RULE router: no rule with ipproto 4 at priority %d after adding it", blockRulePr)
	}
	// Best effort: the system ip shows the action (busybox ip does not show ipproto).
	if out, err := lab.Exec(vmlab.RouterNS, "ip", "-4", "rule", "show"); err == nil {
		for _, line := range strings.Split(strings.TrimSpace(string(out)), "\n") {
			c.logf("RULE router (ip rule): %s", strings.TrimSpace(line))
		}
	}

	// Routed pair: must fail in both directions, ICMP and TCP.
	for _, pair := range [][2]vmlab.Host{{host1, host3}, {host3, host1}} {
		a, b := pair[0], pair[1]
		if err := lab.Ping(a.ContainerNS, b.Container, 2*time.Second); err == nil {
			c.failf("BLOCKED %s->%s: ping still works with ipproto 4 blackholed", a.Name, b.Name)
		} else {
			c.logf("BLOCKED %s->%s ping fails as expected", a.Name, b.Name)
		}
	}
	if err := lab.TCPEcho(host1.ContainerNS, echoAddr(host3), payload, 3*time.Second); err == nil {
		c.failf("BLOCKED host1->host3: TCP still works with ipproto 4 blackholed")
	} else {
		c.logf("BLOCKED host1->host3 tcp fails as expected (%v)", err)
	}
	// Same-segment pair never crosses the router.
	if err := pingWithRetry(lab, host1, host2); err != nil {
		c.failf("UNAFFECTED host1->host2 ping: %v", err)
	} else {
		c.logf("UNAFFECTED host1->host2 ping ok")
	}
	if err := lab.TCPEcho(host1.ContainerNS, echoAddr(host2), payload, 10*time.Second); err != nil {
		c.failf("UNAFFECTED host1->host2 tcp: %v", err)
	} else {
		c.logf("UNAFFECTED host1->host2 tcp ok")
	}

	var stats [2]vmlab.WatchStats
	for i, w := range routerWatches {
		if stats[i], err = w.Close(); err != nil {
			return err
		}
	}
	in0 := stats[0].Proto[unix.IPPROTO_IPIP] - stats[0].ProtoOut[unix.IPPROTO_IPIP]
	in1 := stats[1].Proto[unix.IPPROTO_IPIP] - stats[1].ProtoOut[unix.IPPROTO_IPIP]
	out0, out1 := stats[0].ProtoOut[unix.IPPROTO_IPIP], stats[1].ProtoOut[unix.IPPROTO_IPIP]
	c.logf("BLOCK router ipproto=4 eth0 in=%d out=%d, eth1 in=%d out=%d (dropped in the router)", in0, out0, in1, out1)
	if in0 == 0 || in1 == 0 || out0 != 0 || out1 != 0 {
		c.failf("BLOCK router: expected IPIP frames to arrive on both sides and none to leave")
	}

	if err := lab.DelRule(vmlab.RouterNS, rule); err != nil {
		return err
	}
	for _, pair := range [][2]vmlab.Host{{host1, host3}, {host3, host1}} {
		a, b := pair[0], pair[1]
		if err := pingWithRetry(lab, a, b); err != nil {
			c.failf("RESTORED %s->%s ping: %v", a.Name, b.Name, err)
		} else {
			c.logf("RESTORED %s->%s ping ok after removing the rule", a.Name, b.Name)
		}
	}
	if err := lab.TCPEcho(host1.ContainerNS, echoAddr(host3), payload, 10*time.Second); err != nil {
		c.failf("RESTORED host1->host3 tcp: %v", err)
	} else {
		c.logf("RESTORED host1->host3 tcp ok")
	}
	c.phase("done")
	return nil
}

func echoAddr(h vmlab.Host) string {
	return net.JoinHostPort(h.Container.String(), fmt.Sprint(echoPort))
}

// pingWithRetry allows for the first echo racing ARP on a slow TCG guest.
func pingWithRetry(lab *vmlab.Lab, a, b vmlab.Host) error {
	var err error
	for attempt := 0; attempt < 3; attempt++ {
		if err = lab.Ping(a.ContainerNS, b.Container, 2*time.Second); err == nil {
			return nil
		}
	}
	return err
}
