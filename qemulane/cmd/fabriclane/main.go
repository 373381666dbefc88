// Command fabriclane runs inside the qemulane VM (a stock kernel with ipip)
// and tests the real fabricd there: it builds three hosts on a routed
// underlay (host1 and host2 on one segment, host3 behind a router), runs
// etcd on the underlay, starts fabricd in every host namespace, puts a
// container namespace on the bridge fabricd created, and checks with
// fabricctl, the kernel and traffic counters on the underlay.
//
// Phases, each on a fresh lab, etcd and set of fabricd:
//   - ipip: --encapsulation ipip. Full BGP mesh, routes proto 93 via
//     fabric.ipip, container ICMP and TCP across every pair, IP protocol 4 on
//     the underlay and no bare container packets, fabricd --cleanup.
//   - auto: --encapsulation auto. Every pair uses ipip; a router rule that
//     blackholes IP protocol 4 moves the routed pairs (host1/host2 <-> host3)
//     to vxlan while host1<->host2 stays on ipip and traffic keeps flowing;
//     removing the rule moves them back.
//
// Evidence goes to stdout, one fact a line, each prefixed with its kind and
// phase; "PHASE-RESULT <phase> PASS|FAIL ..." closes each phase and the last
// line is the qemulane verdict marker. Exit status 1 on failure.
package main

import (
	"bufio"
	"bytes"
	"crypto/rand"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/fabricnet/fabric/qemulane"
	"github.com/fabricnet/fabric/qemulane/vmlab"
)

const (
	echoPort    = 7000
	payloadSize = 16 << 10 // several segments at either MTU
	blockRulePr = 100      // FIB rule priority, before the main table (32766)
	etcdNS      = "etcd"
	etcdAddr    = "192.168.100.200"
	routeProto  = 93 // fabricd's default --route-protocol
	ipipDev     = "fabric.ipip"
	vxlanDev    = "fabric.vxlan"
	poolCIDR    = "10.244.0.0/16"
)

var (
	fabricdBin   = flag.String("fabricd", "/bin/fabricd", "fabricd binary")
	fabricctlBin = flag.String("fabricctl", "/bin/fabricctl", "fabricctl binary")
	etcdBin      = flag.String("etcd", "/usr/bin/etcd", "etcd binary")
	phasesFlag   = flag.String("phases", "ipip,auto,mixed", "phases to run, comma-separated: ipip, auto, mixed (host1 vxlan, the others auto)")
	holdTime     = flag.String("bgp-hold-time", "3s", "fabricd --bgp-hold-time")
	keepalive    = flag.String("bgp-keepalive", "1s", "fabricd --bgp-keepalive")
	settle       = flag.Duration("timeout", 40*time.Second, "how long to wait for each convergence")
)

func main() {
	prefix := flag.String("prefix", "fl-", "prefix of every namespace this run creates (phase letter appended)")
	flag.Parse()

	start := time.Now()
	var failed []string
	for i, ph := range strings.Split(*phasesFlag, ",") {
		ph = strings.TrimSpace(ph)
		p := &phase{name: ph, start: start, prefix: fmt.Sprintf("%s%c-", *prefix, 'a'+i)}
		switch ph {
		case "ipip", "auto", "mixed":
		default:
			fmt.Printf("%s unknown phase %q\n", qemulane.FailPrefix, ph)
			os.Exit(2)
		}
		p.run()
		if len(p.failures) > 0 {
			fmt.Printf("PHASE-RESULT %s FAIL %s\n", ph, strings.Join(p.failures, "; "))
			failed = append(failed, ph+": "+strings.Join(p.failures, "; "))
		} else {
			fmt.Printf("PHASE-RESULT %s PASS in %.1fs\n", ph, time.Since(p.phaseStart).Seconds())
		}
	}
	if len(failed) > 0 {
		fmt.Printf("%s %s\n", qemulane.FailPrefix, strings.Join(failed, " | "))
		os.Exit(1)
	}
	fmt.Println(qemulane.PassLine)
}

// phase is one fresh lab with its own etcd and fabricd processes.
type phase struct {
	name       string
	prefix     string
	start      time.Time
	phaseStart time.Time
	failures   []string

	lab     *vmlab.Lab
	topo    *vmlab.Topology
	etcd    *proc
	daemons map[string]*proc // host name -> fabricd
	hosts   []*host
	servers map[string]*vmlab.EchoServer // host name -> echo server in its container
	payload []byte
}

// host is a fabric host as fabricd set it up.
type host struct {
	vmlab.Host // Name, Underlay; PodNet etc. are replaced by the lease
	Status     status
	Bridge     string
	MTU        int
	runDir     string
}

type status struct {
	Node, Subnet, Gateway, Bridge, Encapsulation string
	MTU                                          int
}

type peer struct {
	Name, Address, State string
	Encap                string `json:"encapsulation"`
	EncapReason          string `json:"encapsulationReason"`
}

type proc struct {
	name string
	log  string
	cmd  *exec.Cmd
	done chan struct{}
	err  error
}

func (p *phase) logf(kind, format string, args ...any) {
	fmt.Printf("%s %s %s\n", kind, p.name, fmt.Sprintf(format, args...))
}

func (p *phase) failf(format string, args ...any) {
	msg := fmt.Sprintf(format, args...)
	p.failures = append(p.failures, msg)
	fmt.Printf("FAILED %s %s\n", p.name, msg)
}

func (p *phase) step(name string) {
	fmt.Printf("PHASE %s %s at %.1fs\n", p.name, name, time.Since(p.start).Seconds())
}

func (p *phase) run() {
	p.phaseStart = time.Now()
	p.lab = vmlab.New(p.prefix)
	p.daemons = map[string]*proc{}
	p.payload = make([]byte, payloadSize)
	rand.Read(p.payload)
	err := p.body()
	if err != nil {
		p.failf("%v", err)
	}
	if len(p.failures) > 0 {
		p.dumpLogs()
	}
	p.stopAll()
	if err := p.lab.Close(); err != nil {
		p.failf("cleanup: %v", err)
	} else if left := vmlab.NamespacesWithPrefix(p.prefix); len(left) > 0 {
		p.failf("cleanup: namespaces left behind: %v", left)
	} else {
		p.logf("CLEANUP", "all %s* namespaces removed", p.prefix)
	}
}

func (p *phase) body() error {
	p.step("topology")
	spec := vmlab.ThreeHostSpec()
	spec.SkipContainers = true // fabricd makes the bridge; containers come after its lease
	topo, err := vmlab.BuildTopology(p.lab, spec)
	if err != nil {
		return fmt.Errorf("build topology: %w", err)
	}
	p.topo = topo
	if err := topo.AddNode(etcdNS, 0, etcdAddr); err != nil {
		return err
	}

	p.step("etcd")
	if err := p.startEtcd(); err != nil {
		return err
	}

	p.step("fabricd")
	encap := p.name // the phase names are the --encapsulation values, but mixed
	for i, h := range topo.Hosts {
		hostEncap := encap
		if encap == "mixed" {
			// host1 runs vxlan only, the others auto: they must not send
			// host1 IPIP it has no device for.
			hostEncap = "auto"
			if i == 0 {
				hostEncap = "vxlan"
			}
		}
		if err := p.startFabricd(h, hostEncap); err != nil {
			return err
		}
	}
	for _, h := range topo.Hosts {
		hh, err := p.waitStatus(h)
		if err != nil {
			return err
		}
		p.hosts = append(p.hosts, hh)
	}
	wantMTU := 1480 // 1500 - 20 (ipip)
	if encap == "auto" || encap == "mixed" {
		wantMTU = 1450 // 1500 - 50 (vxlan, the largest overhead auto may use)
	}
	for _, h := range p.hosts {
		p.logf("HOST", "%s underlay=%s subnet=%s gateway=%s bridge=%s mtu=%d encapsulation=%s",
			h.Name, h.Underlay, h.Status.Subnet, h.Status.Gateway, h.Bridge, h.MTU, h.Status.Encapsulation)
		if h.MTU != wantMTU {
			p.failf("HOST %s: fabricd chose MTU %d, want %d for encapsulation %s", h.Name, h.MTU, wantMTU, encap)
		}
		if err := p.checkBridge(h); err != nil {
			p.failf("%v", err)
		}
	}
	memLine(p.name + " with etcd and 3 fabricd running")
	if err := p.checkDistinctSubnets(); err != nil {
		return err
	}

	p.step("containers")
	for _, h := range p.hosts {
		ones, _ := h.PodNet.Mask.Size()
		cidr := fmt.Sprintf("%s/%d", h.Container, ones)
		if err := p.lab.AddContainer(h.Name, h.Bridge, h.ContainerNS, cidr, h.Gateway, h.MTU); err != nil {
			return err
		}
		p.logf("CONTAINER", "%s %s on %s/%s mtu=%d gateway=%s", h.Name, cidr, h.Name, h.Bridge, h.MTU, h.Gateway)
	}
	p.servers = map[string]*vmlab.EchoServer{}
	defer func() {
		for _, s := range p.servers {
			s.Close()
		}
	}()
	for _, h := range p.hosts {
		s, err := p.lab.StartEchoServer(h.ContainerNS, echoAddr(h))
		if err != nil {
			return err
		}
		p.servers[h.Name] = s
	}

	p.step("converge")
	want := func(a, b *host) string { return "ipip" }
	if encap == "mixed" {
		want = func(a, b *host) string {
			if a.Name == "host1" || b.Name == "host1" {
				return "vxlan"
			}
			return "ipip"
		}
	}
	if err := p.waitPeers(want); err != nil {
		return err
	}
	if err := p.waitRoutes(want); err != nil {
		return err
	}

	switch encap {
	case "ipip":
		p.step("traffic")
		if err := p.trafficWithEvidence("mesh", allHosts, p.checkIPIPOnly); err != nil {
			return err
		}
		p.checkSources()
		p.step("forged")
		p.forgedIPIP()
	case "mixed":
		p.step("traffic")
		if err := p.trafficWithEvidence("mixed", []string{"host1", "host3"}, p.checkMixedWire); err != nil {
			return err
		}
	}
	p.printFabricctl("host1")
	p.checkNATRules()

	if encap == "auto" {
		// On the wire before the block: auto mode chose IPIP for every pair.
		p.step("traffic")
		if err := p.trafficWithEvidence("auto", allHosts, p.checkIPIPOnly); err != nil {
			return err
		}
		if err := p.blockAndRestore(); err != nil {
			return err
		}
		if err := p.restartKeepsIPIP(); err != nil {
			return err
		}
	}

	p.step("cleanup")
	p.stopDaemons()
	p.checkCleanup()
	p.checkNATRulesGone()
	p.step("done")
	return nil
}

// allHosts are the hosts whose underlay is watched where every pair runs
// IPIP: each one's traffic must be IPIP only.
var allHosts = []string{"host1", "host2", "host3"}

// blockAndRestore is the auto-mode fallback: a router that drops IP
// protocol 4 must move the routed pairs to vxlan and only them.
func (p *phase) blockAndRestore() error {
	routed := func(a, b *host) string {
		if a.Name == "host3" || b.Name == "host3" {
			return "vxlan"
		}
		return "ipip"
	}
	rule := vmlab.ProtoBlockRule(unix.IPPROTO_IPIP, blockRulePr)
	p.step("block")
	if err := p.lab.AddRule(vmlab.RouterNS, rule); err != nil {
		return err
	}
	p.logf("RULE", "router: ipproto 4 blackhole at priority %d added", blockRulePr)
	blockedAt := time.Now()
	if err := p.waitPeers(routed); err != nil {
		return fmt.Errorf("FALLBACK: %w", err)
	}
	p.logf("FALLBACK", "host1<->host3 and host2<->host3 on vxlan, host1<->host2 on ipip %.1fs after the rule",
		time.Since(blockedAt).Seconds())
	if err := p.waitRoutes(routed); err != nil {
		return fmt.Errorf("FALLBACK: %w", err)
	}
	if err := p.trafficWithEvidence("blocked", []string{"host1", "host3"}, p.checkFallbackWire); err != nil {
		return err
	}
	p.checkSources()
	p.printFabricctl("host1")
	p.printFabricctl("host3")

	p.step("restore")
	if err := p.lab.DelRule(vmlab.RouterNS, rule); err != nil {
		return err
	}
	p.logf("RULE", "router: ipproto 4 blackhole removed")
	restoredAt := time.Now()
	allIPIP := func(a, b *host) string { return "ipip" }
	if err := p.waitPeers(allIPIP); err != nil {
		return fmt.Errorf("RESTORED: %w", err)
	}
	p.logf("RESTORED", "every pair back on ipip %.1fs after removing the rule", time.Since(restoredAt).Seconds())
	if err := p.waitRoutes(allIPIP); err != nil {
		return fmt.Errorf("RESTORED: %w", err)
	}
	return p.trafficWithEvidence("restored", allHosts, p.checkIPIPOnly)
}

// restartKeepsIPIP restarts host2's fabricd (SIGTERM, start again): it
// starts from its saved probe verdicts, so every peer stays on ipip: the new
// fabricd logs no vxlan choice and no change, and the peers log none either.
func (p *phase) restartKeepsIPIP() error {
	p.step("restart")
	h := p.topo.Hosts[1]
	mark := map[string]int64{}
	for _, o := range p.topo.Hosts {
		if fi, err := os.Stat(fabricdLog(p.name, o.Name, "")); err == nil {
			mark[o.Name] = fi.Size()
		}
	}
	if err := p.daemons[h.Name].stop(10 * time.Second); err != nil {
		return fmt.Errorf("RESTART: %w", err)
	}
	if err := p.startFabricdLog(h, p.name, "-restarted"); err != nil {
		return fmt.Errorf("RESTART: %w", err)
	}
	restarted := time.Now()
	if _, err := p.waitStatus(h); err != nil {
		return fmt.Errorf("RESTART: %w", err)
	}
	allIPIP := func(a, b *host) string { return "ipip" }
	if err := p.waitPeers(allIPIP); err != nil {
		return fmt.Errorf("RESTART: %w", err)
	}
	p.logf("RESTART", "%s restarted; every pair established on ipip %.1fs after the start", h.Name, time.Since(restarted).Seconds())
	if err := p.trafficWithEvidence("restarted", allHosts, p.checkIPIPOnly); err != nil {
		return err
	}
	changed := 0
	logs := map[string]string{h.Name: fabricdLog(p.name, h.Name, "-restarted")}
	for _, o := range p.topo.Hosts {
		if o.Name != h.Name {
			logs[o.Name] = fabricdLog(p.name, o.Name, "")
		}
	}
	for name, path := range logs {
		data, err := os.ReadFile(path)
		if err != nil {
			return fmt.Errorf("RESTART: %w", err)
		}
		if from := mark[name]; name != h.Name && from <= int64(len(data)) {
			data = data[from:] // only what the peers logged since the restart
		}
		for _, line := range strings.Split(string(data), "\n") {
			if strings.Contains(line, `msg="peer encapsulation changed"`) || (strings.Contains(line, `msg="peer encapsulation"`) && !strings.Contains(line, "encap=ipip")) {
				changed++
				p.failf("RESTART %s logged an encapsulation other than ipip: %s", name, line)
			}
		}
	}
	if changed == 0 {
		p.logf("RESTART", "no encapsulation change logged by %s or its peers across the restart", h.Name)
	}
	return nil
}

// checkMixedWire: host1 runs vxlan only, so nothing reaches or leaves it
// as IPIP; host3 talks ipip to host2 and vxlan to host1.
func (p *phase) checkMixedWire(stage, name string, st vmlab.WatchStats) {
	p.checkVXLANCarried(stage, name, st, " (pairs with host1)")
	switch name {
	case "host1":
		if n := st.Inner[unix.IPPROTO_ICMP] + st.Inner[unix.IPPROTO_TCP]; n != 0 {
			p.failf("UNDERLAY %s host1: %d container packets as ipip to or from a host that runs vxlan only", stage, n)
		}
	case "host3":
		if st.Inner[unix.IPPROTO_TCP] == 0 {
			p.failf("UNDERLAY %s host3: expected ipip to host2", stage)
		}
	}
}

// forgedIPIP: the router, which is no fabric host, sends host1 IPIP packets
// whose inner source is an address of host2's subnet. fabricd accepts IP
// protocol 4 only from fabric hosts: none may reach host1's container.
func (p *phase) forgedIPIP() {
	h1, h2 := p.hosts[0], p.hosts[1]
	forged := nthAddr(h2.PodNet, 77).String()
	routerAddr := "192.168.100.1" // the router's address on host1's segment
	run := func(ns string, args ...string) {
		if out, err := p.lab.Exec(ns, args[0], args[1:]...); err != nil {
			p.failf("FORGED %s %v: %v: %s", ns, args, err, out)
		}
	}
	run(h1.ContainerNS, "iptables", "-I", "INPUT", "-s", forged, "-p", "icmp", "-j", "ACCEPT")
	run(vmlab.RouterNS, "ip", "link", "add", "fakeip", "type", "ipip", "remote", h1.Underlay.String(), "local", routerAddr)
	run(vmlab.RouterNS, "ip", "addr", "add", forged+"/32", "dev", "fakeip")
	run(vmlab.RouterNS, "ip", "link", "set", "fakeip", "up")
	run(vmlab.RouterNS, "ip", "route", "add", h1.Container.String()+"/32", "dev", "fakeip")
	p.lab.Exec(vmlab.RouterNS, "ping", "-c", "5", "-W", "1", h1.Container.String())
	out, err := p.lab.Exec(h1.ContainerNS, "iptables", "-L", "INPUT", "-v", "-x", "-n")
	p.lab.Exec(vmlab.RouterNS, "ip", "link", "del", "fakeip")
	if err != nil {
		p.failf("FORGED read counter: %v", err)
		return
	}
	reached := -1
	for _, line := range strings.Split(string(out), "\n") {
		f := strings.Fields(line)
		if len(f) > 7 && f[7] == forged {
			reached, _ = strconv.Atoi(f[0])
		}
	}
	drops, _ := p.lab.Exec(h1.Name, "iptables", "-L", "FABRIC-INPUT", "-v", "-x", "-n")
	switch {
	case reached < 0:
		p.failf("FORGED no counter for %s in host1's container:\n%s", forged, out)
	case reached > 0:
		p.failf("FORGED %d IPIP packets from the router (no fabric host) with inner source %s reached host1's container", reached, forged)
	default:
		p.logf("FORGED", "0 of 5 forged IPIP packets (inner source %s, sent by the router) reached host1's container; FABRIC-INPUT:\n%s", forged, strings.TrimSpace(string(drops)))
	}
}

// ---- processes ----

func (p *phase) startProc(ns, name, logPath string, args ...string) (*proc, error) {
	f, err := os.Create(logPath)
	if err != nil {
		return nil, err
	}
	cmd := exec.Command(args[0], args[1:]...)
	cmd.Stdout, cmd.Stderr = f, f
	if err := p.lab.Start(ns, cmd); err != nil {
		f.Close()
		return nil, err
	}
	pr := &proc{name: name, log: logPath, cmd: cmd, done: make(chan struct{})}
	go func() {
		pr.err = cmd.Wait()
		f.Close()
		close(pr.done)
	}()
	return pr, nil
}

func (pr *proc) exited() bool {
	select {
	case <-pr.done:
		return true
	default:
		return false
	}
}

// stop sends SIGTERM and waits, then SIGKILL. Only processes this program
// started are ever signalled.
func (pr *proc) stop(grace time.Duration) error {
	if pr == nil || pr.exited() {
		return nil
	}
	pr.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-pr.done:
		return nil
	case <-time.After(grace):
		pr.cmd.Process.Kill()
		<-pr.done
		return fmt.Errorf("%s did not stop within %s of SIGTERM; killed", pr.name, grace)
	}
}

func (p *phase) startEtcd() error {
	dataDir := "/tmp/etcd-" + p.name
	os.RemoveAll(dataDir)
	client := "http://" + etcdAddr + ":2379"
	peerURL := "http://127.0.0.1:2380"
	pr, err := p.startProc(etcdNS, "etcd", "/tmp/etcd-"+p.name+".log", *etcdBin,
		"--name", "lane", "--data-dir", dataDir,
		"--listen-client-urls", client, "--advertise-client-urls", client,
		"--listen-peer-urls", peerURL, "--initial-advertise-peer-urls", peerURL,
		"--initial-cluster", "lane="+peerURL, "--initial-cluster-state", "new")
	if err != nil {
		return err
	}
	p.etcd = pr
	t0 := time.Now()
	var last error
	for time.Since(t0) < 30*time.Second {
		if pr.exited() {
			return fmt.Errorf("etcd exited: %v\n%s", pr.err, tailFile(pr.log, 20, ""))
		}
		// From host1's namespace: the path fabricd takes. (busybox wget
		// crashes in the VM: static glibc without NSS.)
		out, err := p.httpGet("host1", etcdAddr+":2379", "/health")
		if err == nil && bytes.Contains(out, []byte(`"health":"true"`)) {
			p.logf("ETCD", "%s healthy after %.1fs (%s)", client, time.Since(t0).Seconds(), strings.TrimSpace(string(out)))
			return nil
		}
		last = err
		time.Sleep(300 * time.Millisecond)
	}
	return fmt.Errorf("etcd not healthy within 30s: %v\n%s", last, tailFile(pr.log, 20, ""))
}

// httpGet does a plain HTTP/1.0 GET from inside ns and returns the body.
// (net/http dials on other threads, outside the namespace.)
func (p *phase) httpGet(ns, addr, path string) ([]byte, error) {
	var body []byte
	err := p.lab.Do(ns, func() error {
		c, err := net.DialTimeout("tcp4", addr, 2*time.Second)
		if err != nil {
			return err
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(3 * time.Second))
		if _, err := fmt.Fprintf(c, "GET %s HTTP/1.0\r\nHost: %s\r\n\r\n", path, addr); err != nil {
			return err
		}
		resp, err := io.ReadAll(c)
		if err != nil {
			return err
		}
		head, b, ok := bytes.Cut(resp, []byte("\r\n\r\n"))
		if !ok || !bytes.HasPrefix(head, []byte("HTTP/1.")) || !bytes.Contains(bytes.SplitN(head, []byte("\r\n"), 2)[0], []byte(" 200")) {
			return fmt.Errorf("GET http://%s%s: unexpected response %q", addr, path, resp)
		}
		body = b
		return nil
	})
	return body, err
}

func (p *phase) startFabricd(h vmlab.Host, encap string) error {
	return p.startFabricdLog(h, encap, "")
}

func fabricdLog(phase, host, suffix string) string {
	return fmt.Sprintf("/tmp/fabricd-%s-%s%s.log", phase, host, suffix)
}

// startFabricdLog starts fabricd on h, logging to fabricdLog(..., suffix).
func (p *phase) startFabricdLog(h vmlab.Host, encap, suffix string) error {
	runDir := fmt.Sprintf("/run/fabric-%s-%s", p.name, h.Name)
	args := []string{*fabricdBin,
		"--node-name", h.Name,
		"--machine-id", "vm-" + h.Name,
		"--etcd-endpoints", "http://" + etcdAddr + ":2379",
		"--pool", poolCIDR,
		"--encapsulation", encap,
		"--underlay-interface", vmlab.UnderlayDev,
		"--run-dir", runDir,
		"--docker-opts-file", runDir + "/docker.env",
		"--bgp-hold-time", *holdTime,
		"--bgp-keepalive", *keepalive,
		"--log-level", "debug",
	}
	pr, err := p.startProc(h.Name, "fabricd "+h.Name, fabricdLog(p.name, h.Name, suffix), args...)
	if err != nil {
		return err
	}
	p.daemons[h.Name] = pr
	p.logf("FABRICD", "%s started: %s", h.Name, strings.Join(args[1:], " "))
	return nil
}

func (p *phase) stopDaemons() {
	for _, name := range sortedKeys(p.daemons) {
		pr := p.daemons[name]
		if pr.exited() {
			p.failf("FABRICD %s had exited before the end of the phase: %v", name, pr.err)
			continue
		}
		t0 := time.Now()
		if err := pr.stop(10 * time.Second); err != nil {
			p.failf("FABRICD %v", err)
		} else {
			p.logf("FABRICD", "%s stopped on SIGTERM in %.1fs", name, time.Since(t0).Seconds())
		}
	}
}

func (p *phase) stopAll() {
	for _, pr := range p.daemons {
		pr.stop(5 * time.Second)
	}
	if p.etcd != nil {
		p.etcd.stop(5 * time.Second)
	}
}

func (p *phase) dumpLogs() {
	for _, name := range sortedKeys(p.daemons) {
		pr := p.daemons[name]
		if pr.exited() {
			fmt.Printf("LOG %s fabricd %s exited: %v\n", p.name, name, pr.err)
		}
		// Debug lines (GoBGP keepalives, NAT and policy resyncs every
		// second) would push everything useful out of the tail.
		for _, line := range strings.Split(tailFile(pr.log, 40, "level=DEBUG"), "\n") {
			fmt.Printf("LOG %s %s | %s\n", p.name, name, line)
		}
	}
	if p.etcd != nil && p.etcd.exited() {
		for _, line := range strings.Split(tailFile(p.etcd.log, 20, ""), "\n") {
			fmt.Printf("LOG %s etcd | %s\n", p.name, line)
		}
	}
}

// ---- fabricctl ----

func (p *phase) fabricctl(hostName string, args ...string) ([]byte, error) {
	runDir := fmt.Sprintf("/run/fabric-%s-%s", p.name, hostName)
	full := append([]string{"--run-dir", runDir}, args...)
	return p.lab.Exec(hostName, *fabricctlBin, full...)
}

func (p *phase) daemonAlive(name string) error {
	if pr := p.daemons[name]; pr != nil && pr.exited() {
		return fmt.Errorf("fabricd %s exited: %v", name, pr.err)
	}
	return nil
}

func (p *phase) waitStatus(h vmlab.Host) (*host, error) {
	t0 := time.Now()
	var last error
	for time.Since(t0) < *settle {
		if err := p.daemonAlive(h.Name); err != nil {
			return nil, err
		}
		out, err := p.fabricctl(h.Name, "status", "--json")
		if err == nil {
			var st status
			if err := json.Unmarshal(out, &st); err != nil {
				return nil, fmt.Errorf("fabricctl status --json on %s: %w: %s", h.Name, err, out)
			}
			_, podNet, perr := net.ParseCIDR(st.Subnet)
			gw := net.ParseIP(st.Gateway).To4()
			if perr != nil || gw == nil || st.MTU == 0 || st.Bridge == "" {
				return nil, fmt.Errorf("fabricctl status --json on %s: incomplete: %s", h.Name, out)
			}
			hh := &host{Host: h, Status: st, Bridge: st.Bridge, MTU: st.MTU,
				runDir: fmt.Sprintf("/run/fabric-%s-%s", p.name, h.Name)}
			hh.PodNet = podNet
			hh.Gateway = gw
			hh.Container = nthAddr(podNet, 2)
			p.logf("STATUS", "%s answered after %.1fs", h.Name, time.Since(t0).Seconds())
			return hh, nil
		}
		last = err
		time.Sleep(300 * time.Millisecond)
	}
	return nil, fmt.Errorf("fabricd %s: no status within %s: %v", h.Name, *settle, last)
}

func (p *phase) checkDistinctSubnets() error {
	seen := map[string]string{}
	_, pool, _ := net.ParseCIDR(poolCIDR)
	for _, h := range p.hosts {
		if other, ok := seen[h.PodNet.String()]; ok {
			return fmt.Errorf("LEASE %s and %s both hold %s", h.Name, other, h.PodNet)
		}
		seen[h.PodNet.String()] = h.Name
		if !pool.Contains(h.PodNet.IP) {
			p.failf("LEASE %s: subnet %s outside the pool %s", h.Name, h.PodNet, poolCIDR)
		}
	}
	return nil
}

// checkBridge reads the bridge fabricd made from the kernel.
func (p *phase) checkBridge(h *host) error {
	nh, err := p.lab.Handle(h.Name)
	if err != nil {
		return err
	}
	link, err := nh.LinkByName(h.Bridge)
	if err != nil {
		return fmt.Errorf("BRIDGE %s: %s: %w", h.Name, h.Bridge, err)
	}
	addrs, err := nh.AddrList(link, unix.AF_INET)
	if err != nil {
		return err
	}
	ones, _ := h.PodNet.Mask.Size()
	want := fmt.Sprintf("%s/%d", h.Gateway, ones)
	var got []string
	for _, a := range addrs {
		got = append(got, a.IPNet.String())
	}
	if link.Type() != "bridge" || !slices.Contains(got, want) || link.Attrs().MTU != h.MTU {
		return fmt.Errorf("BRIDGE %s: %s type=%s addresses=%v mtu=%d, want bridge with %s mtu %d",
			h.Name, h.Bridge, link.Type(), got, link.Attrs().MTU, want, h.MTU)
	}
	p.logf("BRIDGE", "%s: %s type=bridge address=%s mtu=%d up=%v", h.Name, h.Bridge, want, link.Attrs().MTU,
		link.Attrs().Flags&net.FlagUp != 0)
	return nil
}

// waitPeers polls `fabricctl peers status --json` on every host until each
// sees the other two established with the encapsulation want(a, b) names.
func (p *phase) waitPeers(want func(a, b *host) string) error {
	t0 := time.Now()
	var problems []string
	for {
		problems = nil
		rows := map[string][]peer{}
		for _, a := range p.hosts {
			if err := p.daemonAlive(a.Name); err != nil {
				return err
			}
			out, err := p.fabricctl(a.Name, "peers", "status", "--json")
			if err != nil {
				problems = append(problems, err.Error())
				continue
			}
			var ps []peer
			if err := json.Unmarshal(out, &ps); err != nil {
				return fmt.Errorf("fabricctl peers status --json on %s: %w: %s", a.Name, err, out)
			}
			rows[a.Name] = ps
			for _, b := range p.hosts {
				if a == b {
					continue
				}
				i := slices.IndexFunc(ps, func(x peer) bool { return x.Name == b.Name })
				switch {
				case i < 0:
					problems = append(problems, fmt.Sprintf("%s has no peer %s", a.Name, b.Name))
				case ps[i].State != "established":
					problems = append(problems, fmt.Sprintf("%s->%s state %s", a.Name, b.Name, ps[i].State))
				case ps[i].Encap != want(a, b):
					problems = append(problems, fmt.Sprintf("%s->%s encapsulation %q (%s), want %s",
						a.Name, b.Name, ps[i].Encap, ps[i].EncapReason, want(a, b)))
				}
			}
			if len(ps) != len(p.hosts)-1 {
				problems = append(problems, fmt.Sprintf("%s has %d peers, want %d", a.Name, len(ps), len(p.hosts)-1))
			}
		}
		if len(problems) == 0 {
			for _, a := range p.hosts {
				for _, x := range rows[a.Name] {
					reason := ""
					if x.EncapReason != "" {
						reason = " (" + x.EncapReason + ")"
					}
					p.logf("PEERS", "%s->%s %s state=%s encapsulation=%s%s", a.Name, x.Name, x.Address, x.State, x.Encap, reason)
				}
			}
			p.logf("PEERS", "all 6 sessions established with the expected encapsulation after %.1fs", time.Since(t0).Seconds())
			return nil
		}
		if time.Since(t0) > *settle {
			return fmt.Errorf("peers not as expected within %s: %s", *settle, strings.Join(problems, "; "))
		}
		time.Sleep(500 * time.Millisecond)
	}
}

// waitRoutes checks the kernel of every host: a route proto 93 to each other
// host's subnet, through fabric.ipip (onlink via the peer's underlay address)
// or fabric.vxlan as want(a, b) says.
func (p *phase) waitRoutes(want func(a, b *host) string) error {
	t0 := time.Now()
	for {
		var problems, evidence []string
		for _, a := range p.hosts {
			nh, err := p.lab.Handle(a.Name)
			if err != nil {
				return err
			}
			routes, err := nh.RouteListFiltered(unix.AF_INET, &netlink.Route{Protocol: routeProto, Table: unix.RT_TABLE_MAIN},
				netlink.RT_FILTER_PROTOCOL|netlink.RT_FILTER_TABLE)
			if err != nil {
				return fmt.Errorf("%s: list routes: %w", a.Name, err)
			}
			names := map[int]string{}
			if links, err := nh.LinkList(); err == nil {
				for _, l := range links {
					names[l.Attrs().Index] = l.Attrs().Name
				}
			}
			for _, b := range p.hosts {
				if a == b {
					continue
				}
				dev := ipipDev
				if want(a, b) == "vxlan" {
					dev = vxlanDev
				}
				var found *netlink.Route
				for i := range routes {
					if routes[i].Dst != nil && routes[i].Dst.String() == b.PodNet.String() {
						found = &routes[i]
					}
				}
				switch {
				case found == nil:
					problems = append(problems, fmt.Sprintf("%s: no proto %d route to %s", a.Name, routeProto, b.PodNet))
				case names[found.LinkIndex] != dev:
					problems = append(problems, fmt.Sprintf("%s: route to %s via dev %s, want %s", a.Name, b.PodNet, names[found.LinkIndex], dev))
				case dev == ipipDev && !found.Gw.Equal(b.Underlay):
					problems = append(problems, fmt.Sprintf("%s: route to %s via %s, want via %s", a.Name, b.PodNet, found.Gw, b.Underlay))
				default:
					onlink := ""
					if found.Flags&int(netlink.FLAG_ONLINK) != 0 {
						onlink = " onlink"
					}
					gw := ""
					if found.Gw != nil {
						gw = " via " + found.Gw.String()
					}
					evidence = append(evidence, fmt.Sprintf("%s: %s%s dev %s proto %d%s (peer %s)",
						a.Name, b.PodNet, gw, dev, found.Protocol, onlink, b.Name))
				}
			}
		}
		if len(problems) == 0 {
			for _, e := range evidence {
				p.logf("ROUTE", "%s", e)
			}
			return nil
		}
		if time.Since(t0) > *settle {
			return fmt.Errorf("kernel routes not as expected within %s: %s", *settle, strings.Join(problems, "; "))
		}
		time.Sleep(500 * time.Millisecond)
	}
}

func (p *phase) printFabricctl(hostName string) {
	for _, args := range [][]string{{"peers", "status"}, {"routes"}} {
		out, err := p.fabricctl(hostName, args...)
		if err != nil {
			p.failf("FABRICCTL %s %s: %v", hostName, strings.Join(args, " "), err)
			continue
		}
		for _, line := range strings.Split(strings.TrimRight(string(out), "\n"), "\n") {
			p.logf("FABRICCTL", "%s %s | %s", hostName, strings.Join(args, " "), line)
		}
	}
}

// ---- traffic ----

type wireCheck func(stage, name string, st vmlab.WatchStats)

// trafficWithEvidence sends ICMP and TCP between the containers of every
// pair while counting frames on the underlay of the watched hosts.
func (p *phase) trafficWithEvidence(stage string, watched []string, check wireCheck) error {
	_, overlay, _ := net.ParseCIDR(poolCIDR)
	watches := map[string]*vmlab.Watch{}
	for _, name := range watched {
		w, err := p.lab.WatchLink(name, vmlab.UnderlayDev, overlay)
		if err != nil {
			return err
		}
		watches[name] = w
	}
	for _, a := range p.hosts {
		for _, b := range p.hosts {
			if a == b {
				continue
			}
			if err := p.pingWithRetry(a, b); err != nil {
				p.failf("PING %s %s->%s: %v", stage, a.Name, b.Name, err)
			} else {
				p.logf("PING", "%s %s->%s ok (%s -> %s)", stage, a.Name, b.Name, a.Container, b.Container)
			}
			if err := p.lab.TCPEcho(a.ContainerNS, echoAddr(b), p.payload, 10*time.Second); err != nil {
				p.failf("TCP %s %s->%s: %v", stage, a.Name, b.Name, err)
			} else {
				p.logf("TCP", "%s %s->%s ok (%d bytes echoed via %s)", stage, a.Name, b.Name, len(p.payload), echoAddr(b))
			}
		}
	}
	for _, name := range watched {
		st, err := watches[name].Close()
		if err != nil {
			return fmt.Errorf("watch %s: %w", name, err)
		}
		p.logf("UNDERLAY", "%s %s/%s ipproto4=%d (inner icmp=%d tcp=%d) vxlan(inner icmp=%d tcp=%d) bare-overlay=%d ipv4=%d",
			stage, name, vmlab.UnderlayDev, st.Proto[unix.IPPROTO_IPIP], st.Inner[unix.IPPROTO_ICMP], st.Inner[unix.IPPROTO_TCP],
			st.VXLAN[unix.IPPROTO_ICMP], st.VXLAN[unix.IPPROTO_TCP], st.Bare, st.IPv4)
		check(stage, name, st)
	}
	return nil
}

// checkIPIPOnly: container traffic crossed as IP protocol 4, nothing bare,
// nothing in vxlan.
func (p *phase) checkIPIPOnly(stage, name string, st vmlab.WatchStats) {
	if st.Proto[unix.IPPROTO_IPIP] == 0 || st.Inner[unix.IPPROTO_ICMP] == 0 || st.Inner[unix.IPPROTO_TCP] == 0 {
		p.failf("UNDERLAY %s %s: expected IPIP frames carrying ICMP and TCP", stage, name)
	}
	if st.Bare != 0 {
		p.failf("UNDERLAY %s %s: %d container packets crossed the underlay unencapsulated", stage, name, st.Bare)
	}
	if n := st.VXLAN[unix.IPPROTO_ICMP] + st.VXLAN[unix.IPPROTO_TCP]; n != 0 {
		p.failf("UNDERLAY %s %s: %d container packets went over vxlan, want all on ipip", stage, name, n)
	}
}

// checkVXLANCarried: some container ICMP and TCP crossed name's underlay
// as VXLAN, and none crossed it bare.
func (p *phase) checkVXLANCarried(stage, name string, st vmlab.WatchStats, which string) {
	if st.VXLAN[unix.IPPROTO_ICMP] == 0 || st.VXLAN[unix.IPPROTO_TCP] == 0 {
		p.failf("UNDERLAY %s %s: expected vxlan frames carrying ICMP and TCP%s", stage, name, which)
	}
	if st.Bare != 0 {
		p.failf("UNDERLAY %s %s: %d container packets crossed the underlay unencapsulated", stage, name, st.Bare)
	}
}

// checkFallbackWire: with protocol 4 blackholed between the segments,
// host3's container traffic rides vxlan; host1 still sends ipip to host2.
func (p *phase) checkFallbackWire(stage, name string, st vmlab.WatchStats) {
	p.checkVXLANCarried(stage, name, st, "")
	switch name {
	case "host1":
		if st.Inner[unix.IPPROTO_ICMP] == 0 || st.Inner[unix.IPPROTO_TCP] == 0 {
			p.failf("UNDERLAY %s host1: expected ipip frames carrying ICMP and TCP (to host2)", stage)
		}
	case "host3":
		// Probes may still try IP protocol 4; container TCP must not.
		if st.Inner[unix.IPPROTO_TCP] != 0 {
			p.failf("UNDERLAY %s host3: %d container TCP frames still sent as ipip", stage, st.Inner[unix.IPPROTO_TCP])
		}
	}
}

func (p *phase) pingWithRetry(a, b *host) error {
	var err error
	for attempt := 0; attempt < 3; attempt++ {
		if err = p.lab.Ping(a.ContainerNS, b.Container, 2*time.Second); err == nil {
			return nil
		}
	}
	return err
}

// checkSources: every container's echo server saw the other containers'
// own addresses, i.e. nothing on the way (fabricd's NAT rules, a stray
// MASQUERADE) rewrote container-to-container traffic.
func (p *phase) checkSources() {
	for _, b := range p.hosts {
		clients := p.servers[b.Name].Clients()
		var seen []string
		for _, a := range p.hosts {
			if a == b {
				continue
			}
			if clients[a.Container.String()] == 0 {
				p.failf("SOURCE %s: no connection from %s's container address %s (saw %v)", b.Name, a.Name, a.Container, clients)
				continue
			}
			seen = append(seen, fmt.Sprintf("%s=%s", a.Name, a.Container))
		}
		for ip := range clients {
			if ip2 := net.ParseIP(ip); !slices.ContainsFunc(p.hosts, func(h *host) bool { return h.Container.Equal(ip2) }) {
				p.failf("SOURCE %s: connection from %s, not a container address", b.Name, ip)
			}
		}
		p.logf("SOURCE", "%s's container saw clients %s: container addresses kept end to end", b.Name, strings.Join(seen, " "))
	}
}

// checkNATRules reads the rules fabricd's NAT wrote (iptables-legacy in
// the VM): containers keep their addresses inside the pool, MASQUERADE
// only for traffic leaving it.
func (p *phase) checkNATRules() {
	for _, h := range p.hosts {
		out, err := p.lab.Exec(h.Name, "iptables-save", "-t", "nat")
		if err != nil {
			p.failf("NAT %s: %v", h.Name, err)
			continue
		}
		var keep, masq bool
		for _, line := range strings.Split(string(out), "\n") {
			if !strings.HasPrefix(line, "-A FABRIC-POSTROUTING ") {
				continue
			}
			keep = keep || strings.Contains(line, "-s "+poolCIDR+" -d "+poolCIDR) && strings.HasSuffix(line, "-j ACCEPT")
			masq = masq || strings.Contains(line, "-s "+h.PodNet.String()+" ! -d "+poolCIDR) && strings.Contains(line, "-j MASQUERADE")
		}
		if !keep || !masq {
			p.failf("NAT %s: FABRIC-POSTROUTING lacks the pool ACCEPT (%v) or the MASQUERADE of %s (%v):\n%s", h.Name, keep, h.PodNet, masq, out)
			continue
		}
		p.logf("NAT", "%s: FABRIC-POSTROUTING accepts %s->%s and masquerades %s leaving the pool", h.Name, poolCIDR, poolCIDR, h.PodNet)
	}
}

// checkNATRulesGone: fabricd --cleanup also removed every FABRIC-* chain.
func (p *phase) checkNATRulesGone() {
	for _, h := range p.hosts {
		out, err := p.lab.Exec(h.Name, "iptables-save")
		if err != nil {
			p.failf("NAT %s: %v", h.Name, err)
			continue
		}
		var left []string
		for _, line := range strings.Split(string(out), "\n") {
			if strings.Contains(line, "FABRIC-") {
				left = append(left, line)
			}
		}
		if len(left) > 0 {
			p.failf("CLEANUP %s: iptables still has %v", h.Name, left)
		} else {
			p.logf("CLEANUP", "%s: no FABRIC-* chain or rule left in iptables", h.Name)
		}
	}
}

// ---- cleanup ----

// checkCleanup runs fabricd --cleanup in each host after the daemons stopped
// and checks the kernel: no tunnel devices, no bridge, no proto 93 routes.
func (p *phase) checkCleanup() {
	for _, h := range p.hosts {
		out, err := p.lab.Exec(h.Name, *fabricdBin, "--cleanup", "--run-dir", h.runDir,
			"--docker-opts-file", h.runDir+"/docker.env", "--bridge", h.Bridge)
		if err != nil {
			p.failf("CLEANUP %s: fabricd --cleanup: %v", h.Name, err)
			continue
		}
		_ = out
		nh, err := p.lab.Handle(h.Name)
		if err != nil {
			p.failf("%v", err)
			continue
		}
		var left []string
		for _, dev := range []string{ipipDev, vxlanDev, h.Bridge} {
			if _, err := nh.LinkByName(dev); err == nil {
				left = append(left, dev)
			}
		}
		routes, _ := nh.RouteListFiltered(unix.AF_INET, &netlink.Route{Protocol: routeProto}, netlink.RT_FILTER_PROTOCOL)
		for _, r := range routes {
			left = append(left, "route "+r.Dst.String())
		}
		if len(left) > 0 {
			p.failf("CLEANUP %s: fabricd --cleanup left %v", h.Name, left)
		} else {
			p.logf("CLEANUP", "%s: fabricd --cleanup removed %s, %s, %s and every proto %d route",
				h.Name, ipipDev, vxlanDev, h.Bridge, routeProto)
		}
	}
}

// ---- helpers ----

func echoAddr(h *host) string {
	return net.JoinHostPort(h.Container.String(), fmt.Sprint(echoPort))
}

func nthAddr(n *net.IPNet, i byte) net.IP {
	ip := make(net.IP, 4)
	copy(ip, n.IP.To4())
	ip[3] += i
	return ip
}

// tailFile returns the last n lines of path, leaving out lines that contain
// skip (if set).
func tailFile(path string, n int, skip string) string {
	data, err := os.ReadFile(path)
	if err != nil {
		return fmt.Sprintf("(%v)", err)
	}
	var lines []string
	for _, l := range strings.Split(strings.TrimRight(string(data), "\n"), "\n") {
		if skip != "" && strings.Contains(l, skip) {
			continue
		}
		lines = append(lines, l)
	}
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

func sortedKeys[V any](m map[string]V) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	return keys
}

// memLine prints the VM's memory use, to size -m.
func memLine(when string) {
	f, err := os.Open("/proc/meminfo")
	if err != nil {
		return
	}
	defer f.Close()
	vals := map[string]string{}
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		k, v, ok := strings.Cut(sc.Text(), ":")
		if ok {
			vals[k] = strings.TrimSpace(v)
		}
	}
	fmt.Printf("MEM %s total=%s available=%s\n", when, vals["MemTotal"], vals["MemAvailable"])
}
