// Package lab builds a multi-host network out of network namespaces on one
// machine: fabric hosts on one or more underlay subnets, a router between the
// subnets, real etcd members, containers and an "outside world" namespace.
// It is used by integration tests, the demo and benchmarks.
//
// Every namespace, link, directory and process a lab creates carries the lab's
// per-run prefix, and Close removes all of it. Nothing is ever addressed or
// routed in the root namespace: the test process reaches etcd over a unix
// socket.
//
// Typical use in a test:
//
//	l := lab.ForTest(t, lab.Spec{Hosts: 3})
//	h1 := l.Host("host1")
//	p, _ := h1.Start("fabricd", "/path/fabricd", "--etcd-endpoints", strings.Join(l.EtcdEndpoints(), ","))
//	defer p.Stop()
//	cli, _ := l.EtcdClient() // root namespace, over the unix socket
//	err := h1.Ping(ctx, l.Host("host2").Addr, 3*time.Second)
//
// The machine has no ping binary; Host.Ping and Container.Ping send ICMP
// from inside the namespace in-process.
package lab

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"time"
)

// Spec describes the lab to build.
type Spec struct {
	// Hosts is the number of fabric hosts (host1..hostN).
	Hosts int
	// Subnets is the number of underlay subnets. 1 (default) puts all hosts on
	// one L2 segment; more spreads hosts round-robin over that many subnets
	// joined by a router namespace.
	Subnets int
	// EtcdMembers is 1 (default) or 3.
	EtcdMembers int
	// Prefix starts every name the lab creates; default "fb" + 4 random hex
	// characters. At most 8 characters of [a-z0-9], starting with a letter.
	Prefix string
	// LogDir receives per-process logs; default a temporary directory that
	// Close removes. A caller-supplied LogDir is kept.
	LogDir string
	// MTU of the underlay links, default 1500.
	MTU int
	// Logger for the lab's own progress messages; default slog.Default().
	Logger *slog.Logger
	// IPv6Underlay gives the underlay IPv6 addresses only
	// (2001:db8:<100+i>::<host>/64, no IPv4 on it): etcd, BGP and the
	// tunnels between hosts run over IPv6. One subnet only.
	IPv6Underlay bool
	// EtcdNice runs etcd at this niceness (e.g. -10) instead of the
	// default 0. The scheduler gives every runnable thread an equal share:
	// with a few hundred agents on two cores, one etcd serving all of them
	// would get one agent's share, where a real fabric runs etcd on
	// machines of its own.
	EtcdNice int
}

// Host is one network namespace attached to the underlay: a fabric host, the
// router or the outside world.
type Host struct {
	Name        string       // "host1", "router", "outside"
	Netns       string       // namespace name, e.g. "fb1a2b-host1"
	Addr        netip.Addr   // underlay address of Dev
	Dev         string       // underlay interface inside the namespace ("eth0")
	SubnetIndex int          // which underlay subnet Dev is on
	Subnet      netip.Prefix // underlay prefix of Dev

	lab *Lab
}

// Container is a namespace hanging off a bridge inside a host namespace.
type Container struct {
	Name  string
	Netns string
	Addr  netip.Addr
	Host  *Host

	lab *Lab
}

// Lab is a running multi-host network. Create it with New or ForTest and
// always Close it.
type Lab struct {
	spec      Spec
	log       *slog.Logger
	prefix    string
	runDir    string // /run/fabriclab/<prefix>: pid files, etcd data, sockets
	logDir    string
	ownLogDir bool
	underlay  string // namespace holding the underlay bridges

	mu         sync.Mutex
	closed     bool
	closeOnce  sync.Once
	closeErr   error
	namespaces []string // created namespaces, in creation order
	hosts      []*Host
	router     *Host
	outside    *Host
	containers []*Container
	etcd       []*etcdMember
	procs      map[*Process]struct{}
	// dockerds stop before every other process: removing their containers
	// calls the network plugin fabricd serves, and with fabricd gone first
	// dockerd retried it past the stop grace, so its supervisor was killed
	// and dockerd lived on.
	dockerds  map[*Process]bool
	vethSeq   int
	stopGrace time.Duration // SIGTERM to SIGKILL, 10 s; tests shorten it
	// releaseNeigh gives back a raised neighbour table (labs of many hosts).
	releaseNeigh func() error
}

const (
	etcdClientPort = 2379
	etcdPeerPort   = 2380
	// runBase holds one directory per live lab; Sweep uses it to find what a
	// crashed run left behind.
	runBase  = "/run/fabriclab"
	netnsDir = "/var/run/netns"
)

var prefixPattern = regexp.MustCompile(`^[a-z][a-z0-9]{1,7}$`)

// SubnetPrefix returns the underlay prefix of subnet i: 192.168.(100+i).0/24.
func SubnetPrefix(i int) netip.Prefix {
	return netip.PrefixFrom(netip.AddrFrom4([4]byte{192, 168, byte(100 + i), 0}), 24)
}

func subnetAddr(i int, host byte) netip.Addr {
	return netip.AddrFrom4([4]byte{192, 168, byte(100 + i), host})
}

// subnet is underlay subnet i: SubnetPrefix, or its IPv6 counterpart
// 2001:db8:<100+i>::/64 (Spec.IPv6Underlay).
func (l *Lab) subnet(i int) netip.Prefix {
	if !l.spec.IPv6Underlay {
		return SubnetPrefix(i)
	}
	return netip.PrefixFrom(netip.AddrFrom16([16]byte{0x20, 0x01, 0x0d, 0xb8, 0, byte(100 + i)}), 64)
}

// addrOn is host's address on underlay subnet i.
func (l *Lab) addrOn(i int, host byte) netip.Addr {
	if !l.spec.IPv6Underlay {
		return subnetAddr(i, host)
	}
	a := l.subnet(i).Addr().As16()
	a[15] = host
	return netip.AddrFrom16(a)
}

// New builds the lab described by spec and waits until etcd is healthy. On
// failure it removes whatever it had built.
func New(ctx context.Context, spec Spec) (*Lab, error) {
	if spec.Hosts < 0 {
		return nil, fmt.Errorf("lab: Hosts must not be negative, got %d", spec.Hosts)
	}
	if spec.Subnets == 0 {
		spec.Subnets = 1
	}
	if spec.Subnets < 1 || spec.Subnets > 100 {
		return nil, fmt.Errorf("lab: Subnets must be 1..100, got %d", spec.Subnets)
	}
	if spec.IPv6Underlay && spec.Subnets > 1 {
		return nil, errors.New("lab: an IPv6 underlay has one subnet (the router forwards IPv4 only)")
	}
	if spec.EtcdMembers == 0 {
		spec.EtcdMembers = 1
	}
	if spec.EtcdMembers != 1 && spec.EtcdMembers != 3 {
		return nil, fmt.Errorf("lab: EtcdMembers must be 1 or 3, got %d", spec.EtcdMembers)
	}
	if spec.MTU == 0 {
		spec.MTU = 1500
	}
	if spec.MTU < 576 || spec.MTU > 65535 {
		return nil, fmt.Errorf("lab: MTU %d out of range", spec.MTU)
	}
	if spec.Logger == nil {
		spec.Logger = slog.Default()
	}
	if err := checkTools(); err != nil {
		return nil, err
	}

	l := &Lab{spec: spec, procs: map[*Process]struct{}{}, dockerds: map[*Process]bool{}, stopGrace: 10 * time.Second}
	if err := l.claimPrefix(spec.Prefix); err != nil {
		return nil, err
	}
	if spec.Hosts > neighHosts {
		release, err := raiseNeighTable()
		if err != nil {
			return nil, err
		}
		l.releaseNeigh = release
	}
	l.log = spec.Logger.With("lab", l.prefix)
	register(l)
	if err := l.build(ctx); err != nil {
		if cerr := l.Close(); cerr != nil {
			err = errors.Join(err, fmt.Errorf("cleaning up after failure: %w", cerr))
		}
		return nil, err
	}
	return l, nil
}

func checkTools() error {
	for _, tool := range []string{"ip", "nsenter", "etcd"} {
		if _, err := exec.LookPath(tool); err != nil {
			return fmt.Errorf("lab: %s not found on PATH (install iproute2, util-linux, etcd-server): %w", tool, err)
		}
	}
	if os.Geteuid() != 0 {
		return errors.New("lab: needs root to create network namespaces")
	}
	return nil
}

// claimPrefix picks the prefix and creates the run directory, which doubles
// as a lock: two labs never share a prefix.
func (l *Lab) claimPrefix(prefix string) error {
	if err := os.MkdirAll(runBase, 0o755); err != nil {
		return fmt.Errorf("lab: %w", err)
	}
	random := prefix == ""
	for attempt := 0; ; attempt++ {
		if random {
			b := make([]byte, 2)
			_, _ = rand.Read(b)
			prefix = "fb" + hex.EncodeToString(b)
		}
		if !prefixPattern.MatchString(prefix) {
			return fmt.Errorf("lab: prefix %q must be 2-8 characters of [a-z0-9] starting with a letter", prefix)
		}
		dir := filepath.Join(runBase, prefix)
		err := os.Mkdir(dir, 0o700)
		if err == nil {
			leftovers, lerr := namespacesWithPrefix(prefix)
			if lerr == nil && len(leftovers) == 0 {
				l.prefix, l.runDir = prefix, dir
				return writeOwnerFile(dir)
			}
			_ = os.Remove(dir)
			if lerr != nil {
				return lerr
			}
			err = fmt.Errorf("namespaces %v exist", leftovers)
		}
		if !random || attempt > 20 {
			return fmt.Errorf("lab: prefix %q is in use or has leftovers of a crashed run (remove them with lab.Sweep(%q)): %v", prefix, prefix, err)
		}
	}
}

func (l *Lab) build(ctx context.Context) error {
	start := time.Now()
	if l.spec.LogDir == "" {
		dir, err := os.MkdirTemp("", l.prefix+"-logs-")
		if err != nil {
			return fmt.Errorf("lab: %w", err)
		}
		l.logDir, l.ownLogDir = dir, true
		if err := os.WriteFile(filepath.Join(l.runDir, ownLogDirFile), []byte(dir+"\n"), 0o600); err != nil {
			return fmt.Errorf("lab: %w", err)
		}
	} else {
		if err := os.MkdirAll(l.spec.LogDir, 0o755); err != nil {
			return fmt.Errorf("lab: log dir: %w", err)
		}
		l.logDir = l.spec.LogDir
	}

	l.underlay = l.prefix + "-underlay"
	if err := l.addNamespace(ctx, l.underlay); err != nil {
		return err
	}
	for i := 0; i < l.spec.Subnets; i++ {
		br := l.bridgeName(i)
		if err := l.ipCmd(ctx, "-n", l.underlay, "link", "add", br, "mtu", strconv.Itoa(l.spec.MTU), "type", "bridge"); err != nil {
			return err
		}
		if err := l.ipCmd(ctx, "-n", l.underlay, "link", "set", br, "up"); err != nil {
			return err
		}
	}

	if l.spec.Subnets > 1 {
		if err := l.buildRouter(ctx); err != nil {
			return err
		}
	}
	for i := 0; i < l.spec.EtcdMembers; i++ {
		m, err := l.addEtcdNamespace(ctx, i)
		if err != nil {
			return err
		}
		l.etcd = append(l.etcd, m)
	}
	for i := 0; i < l.spec.Hosts; i++ {
		if _, err := l.AddHost(ctx); err != nil {
			return err
		}
	}
	if err := l.startEtcd(ctx); err != nil {
		return err
	}
	l.log.Info("lab ready", "hosts", l.spec.Hosts, "subnets", l.spec.Subnets,
		"etcd_members", l.spec.EtcdMembers, "log_dir", l.logDir, "took", time.Since(start).Round(time.Millisecond))
	return nil
}

func (l *Lab) bridgeName(subnet int) string { return fmt.Sprintf("%s-b%d", l.prefix, subnet) }

func (l *Lab) buildRouter(ctx context.Context) error {
	ns := l.prefix + "-router"
	if err := l.addNamespace(ctx, ns); err != nil {
		return err
	}
	if err := l.sysctls(ctx, ns, map[string]string{"net/ipv4/ip_forward": "1"}); err != nil {
		return err
	}
	for i := 0; i < l.spec.Subnets; i++ {
		dev := fmt.Sprintf("eth%d", i)
		peer := fmt.Sprintf("%s-r%d", l.prefix, i)
		addr := netip.PrefixFrom(l.addrOn(i, 1), l.subnet(i).Bits())
		if err := l.attach(ctx, ns, dev, peer, i, addr); err != nil {
			return err
		}
	}
	l.mu.Lock()
	l.router = &Host{Name: "router", Netns: ns, Addr: l.addrOn(0, 1), Dev: "eth0", SubnetIndex: 0, Subnet: l.subnet(0), lab: l}
	l.mu.Unlock()
	return nil
}

// attach connects namespace ns to underlay subnet with a veth pair: dev
// inside ns with addr, peer enslaved to the subnet's bridge. Both ends are
// created directly in their namespaces so nothing appears in the root
// namespace.
func (l *Lab) attach(ctx context.Context, ns, dev, peer string, subnet int, addr netip.Prefix) error {
	mtu := strconv.Itoa(l.spec.MTU)
	steps := [][]string{
		{"link", "add", dev, "netns", ns, "mtu", mtu, "type", "veth", "peer", "name", peer, "netns", l.underlay, "mtu", mtu},
		{"-n", l.underlay, "link", "set", peer, "master", l.bridgeName(subnet), "up"},
		append([]string{"-n", ns, "addr", "add", addr.String(), "dev", dev}, nodad(addr.Addr())...),
		{"-n", ns, "link", "set", dev, "up"},
	}
	for _, args := range steps {
		if err := l.ipCmd(ctx, args...); err != nil {
			return err
		}
	}
	return nil
}

// routeToOtherSubnets gives ns routes to every other underlay subnet via the
// router. Specific routes instead of a default route, so a missing fabric
// route fails locally instead of disappearing into the router.
// nodad adds no duplicate address detection to an IPv6 address, so the
// address is usable at once.
func nodad(a netip.Addr) []string {
	if a.Is6() {
		return []string{"nodad"}
	}
	return nil
}

func (l *Lab) routeToOtherSubnets(ctx context.Context, ns string, subnet int) error {
	for i := 0; i < l.spec.Subnets; i++ {
		if i == subnet {
			continue
		}
		if err := l.ipCmd(ctx, "-n", ns, "route", "add", l.subnet(i).String(), "via", l.addrOn(subnet, 1).String()); err != nil {
			return err
		}
	}
	return nil
}

// AddHost adds the next fabric host (host<N+1>) to the lab, on the next
// subnet round-robin.
func (l *Lab) AddHost(ctx context.Context) (*Host, error) {
	l.mu.Lock()
	if l.closed {
		l.mu.Unlock()
		return nil, errors.New("lab: closed")
	}
	n := len(l.hosts) + 1
	subnet := (n - 1) % l.spec.Subnets
	position := (n-1)/l.spec.Subnets + 1
	if 10+position > 199 {
		l.mu.Unlock()
		return nil, fmt.Errorf("lab: subnet %d is full", subnet)
	}
	h := &Host{
		Name:        fmt.Sprintf("host%d", n),
		Netns:       fmt.Sprintf("%s-host%d", l.prefix, n),
		Addr:        l.addrOn(subnet, byte(10+position)),
		Dev:         "eth0",
		SubnetIndex: subnet,
		Subnet:      l.subnet(subnet),
		lab:         l,
	}
	// Reserve the slot before building so concurrent AddHost calls differ.
	l.hosts = append(l.hosts, h)
	l.mu.Unlock()

	if err := l.buildHost(ctx, h, fmt.Sprintf("%s-h%d", l.prefix, n)); err != nil {
		return nil, fmt.Errorf("lab: adding %s: %w", h.Name, err)
	}
	l.log.Debug("host added", "host", h.Name, "netns", h.Netns, "addr", h.Addr)
	return h, nil
}

func (l *Lab) buildHost(ctx context.Context, h *Host, peer string) error {
	if err := l.addNamespace(ctx, h.Netns); err != nil {
		return err
	}
	// Tunnels deliver packets on a different interface than the reverse
	// route points at, so strict reverse-path filtering must be off.
	if err := l.sysctls(ctx, h.Netns, map[string]string{
		"net/ipv4/ip_forward":             "1",
		"net/ipv4/conf/all/rp_filter":     "0",
		"net/ipv4/conf/default/rp_filter": "0",
	}); err != nil {
		return err
	}
	if err := l.attach(ctx, h.Netns, h.Dev, peer, h.SubnetIndex, netip.PrefixFrom(h.Addr, h.Subnet.Bits())); err != nil {
		return err
	}
	if err := l.sysctls(ctx, h.Netns, map[string]string{"net/ipv4/conf/" + h.Dev + "/rp_filter": "0"}); err != nil {
		return err
	}
	return l.routeToOtherSubnets(ctx, h.Netns, h.SubnetIndex)
}

// AddOutside adds (once) an "outside world" namespace that is not a fabric
// host, at 192.168.100.250 on subnet 0, reachable from every host.
func (l *Lab) AddOutside(ctx context.Context) (*Host, error) {
	l.mu.Lock()
	if l.outside != nil {
		o := l.outside
		l.mu.Unlock()
		return o, nil
	}
	o := &Host{Name: "outside", Netns: l.prefix + "-outside", Addr: l.addrOn(0, 250), Dev: "eth0", Subnet: l.subnet(0), lab: l}
	l.outside = o
	l.mu.Unlock()
	if err := l.addNamespace(ctx, o.Netns); err != nil {
		return nil, err
	}
	if err := l.attach(ctx, o.Netns, o.Dev, l.prefix+"-out", 0, netip.PrefixFrom(o.Addr, o.Subnet.Bits())); err != nil {
		return nil, err
	}
	if err := l.routeToOtherSubnets(ctx, o.Netns, 0); err != nil {
		return nil, err
	}
	return o, nil
}

// EnsureBridge makes sure bridge name exists in the host namespace with
// address gw, the given MTU and up. For tests that run without fabricd.
func (h *Host) EnsureBridge(ctx context.Context, name string, gw netip.Prefix, mtu int) error {
	l := h.lab
	if _, err := h.Run(ctx, "ip", "link", "show", "dev", name); err != nil {
		if err := l.ipCmd(ctx, "-n", h.Netns, "link", "add", name, "type", "bridge"); err != nil {
			return err
		}
	}
	if mtu > 0 {
		if err := l.ipCmd(ctx, "-n", h.Netns, "link", "set", name, "mtu", strconv.Itoa(mtu)); err != nil {
			return err
		}
	}
	if gw.IsValid() {
		if err := l.ipCmd(ctx, "-n", h.Netns, "addr", "replace", gw.String(), "dev", name); err != nil {
			return err
		}
	}
	return l.ipCmd(ctx, "-n", h.Netns, "link", "set", name, "up")
}

// AddContainer creates a container namespace with "eth0" at addr, its veth
// peer enslaved to bridge (which must exist) in h's namespace, and a default
// route via gw (skipped when gw is the zero Addr). mtu 0 means the lab MTU.
func (l *Lab) AddContainer(ctx context.Context, h *Host, name string, addr netip.Prefix, gw netip.Addr, bridge string, mtu int) (*Container, error) {
	if h == nil || h.lab != l {
		return nil, errors.New("lab: AddContainer needs a host of this lab")
	}
	if !regexp.MustCompile(`^[A-Za-z0-9_.-]{1,32}$`).MatchString(name) {
		return nil, fmt.Errorf("lab: container name %q must be 1-32 characters of [A-Za-z0-9_.-]", name)
	}
	if mtu == 0 {
		mtu = l.spec.MTU
	}
	l.mu.Lock()
	if l.closed {
		l.mu.Unlock()
		return nil, errors.New("lab: closed")
	}
	l.vethSeq++
	peer := fmt.Sprintf("%s-c%d", l.prefix, l.vethSeq)
	c := &Container{Name: name, Netns: fmt.Sprintf("%s-%s-%s", l.prefix, h.Name, name), Addr: addr.Addr(), Host: h, lab: l}
	l.mu.Unlock()

	if err := l.addNamespace(ctx, c.Netns); err != nil {
		return nil, err
	}
	m := strconv.Itoa(mtu)
	steps := [][]string{
		{"link", "add", "eth0", "netns", c.Netns, "mtu", m, "type", "veth", "peer", "name", peer, "netns", h.Netns, "mtu", m},
		{"-n", h.Netns, "link", "set", peer, "master", bridge, "up"},
		{"-n", c.Netns, "addr", "add", addr.String(), "dev", "eth0"},
		{"-n", c.Netns, "link", "set", "eth0", "up"},
	}
	if gw.IsValid() {
		steps = append(steps, []string{"-n", c.Netns, "route", "add", "default", "via", gw.String(), "dev", "eth0"})
	}
	for _, args := range steps {
		if err := l.ipCmd(ctx, args...); err != nil {
			return nil, fmt.Errorf("lab: adding container %s on %s: %w", name, h.Name, err)
		}
	}
	l.mu.Lock()
	l.containers = append(l.containers, c)
	l.mu.Unlock()
	return c, nil
}

// DropIPProto makes the router drop forwarded packets of IP protocol proto
// between underlay subnets a and b (both directions). undo removes the rules.
func (l *Lab) DropIPProto(ctx context.Context, proto int, subnetA, subnetB int) (undo func() error, err error) {
	r := l.Router()
	if r == nil {
		return nil, errors.New("lab: DropIPProto needs Subnets > 1 (there is no router)")
	}
	for _, s := range []int{subnetA, subnetB} {
		if s < 0 || s >= l.spec.Subnets {
			return nil, fmt.Errorf("lab: subnet %d out of range 0..%d", s, l.spec.Subnets-1)
		}
	}
	if subnetA == subnetB {
		return nil, errors.New("lab: DropIPProto needs two different subnets; traffic inside one subnet never crosses the router")
	}
	rule := func(src, dst int) []string {
		return []string{"FORWARD", "-p", strconv.Itoa(proto), "-s", SubnetPrefix(src).String(), "-d", SubnetPrefix(dst).String(), "-j", "DROP"}
	}
	rules := [][]string{rule(subnetA, subnetB), rule(subnetB, subnetA)}
	var added [][]string
	undo = func() error {
		var errs []error
		// Fresh context: undo often runs from a cleanup after ctx ended.
		uctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		for _, r0 := range added {
			if _, err := r.Run(uctx, "iptables", append([]string{"-w", "-D"}, r0...)...); err != nil {
				errs = append(errs, err)
			}
		}
		added = nil
		return errors.Join(errs...)
	}
	for _, r0 := range rules {
		if _, err := r.Run(ctx, "iptables", append([]string{"-w", "-A"}, r0...)...); err != nil {
			return nil, errors.Join(err, undo())
		}
		added = append(added, r0)
	}
	l.log.Info("router drops protocol", "proto", proto, "between", []string{SubnetPrefix(subnetA).String(), SubnetPrefix(subnetB).String()})
	return undo, nil
}

// Hosts returns the fabric hosts in order host1..hostN.
func (l *Lab) Hosts() []*Host {
	l.mu.Lock()
	defer l.mu.Unlock()
	return append([]*Host(nil), l.hosts...)
}

// Host returns the host named name ("host1", "router", "outside"), or nil.
func (l *Lab) Host(name string) *Host {
	l.mu.Lock()
	defer l.mu.Unlock()
	for _, h := range l.hosts {
		if h.Name == name {
			return h
		}
	}
	for _, h := range []*Host{l.router, l.outside} {
		if h != nil && h.Name == name {
			return h
		}
	}
	return nil
}

// Containers returns the containers added so far.
func (l *Lab) Containers() []*Container {
	l.mu.Lock()
	defer l.mu.Unlock()
	return append([]*Container(nil), l.containers...)
}

// Router returns the router between the subnets (nil when Subnets == 1).
// Its Addr/Dev are the ones on subnet 0; it has 192.168.(100+i).1 on eth<i>.
func (l *Lab) Router() *Host {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.router
}

// Prefix returns the per-run name prefix.
func (l *Lab) Prefix() string { return l.prefix }

// LogDir returns the directory holding the per-process logs.
func (l *Lab) LogDir() string { return l.logDir }

// RunDir returns the lab's private directory (etcd data, sockets, pid files).
func (l *Lab) RunDir() string { return l.runDir }

// Spec returns the spec with defaults filled in.
func (l *Lab) Spec() Spec { return l.spec }

// Underlay returns the name of the namespace holding the underlay bridges.
func (l *Lab) Underlay() string { return l.underlay }

// Close stops every process the lab started, deletes its namespaces (which
// takes their links with them) and temporary directories. It is idempotent
// and copes with a half-built lab.
func (l *Lab) Close() error {
	// The first caller tears down; later callers (an interrupt handler and a
	// test cleanup racing) wait for it instead of returning early.
	l.closeOnce.Do(func() { l.closeErr = l.close() })
	return l.closeErr
}

func (l *Lab) close() error {
	l.mu.Lock()
	l.closed = true
	procs := make([]*Process, 0, len(l.procs))
	for p := range l.procs {
		procs = append(procs, p)
	}
	namespaces := append([]string(nil), l.namespaces...)
	l.mu.Unlock()
	defer unregister(l)

	var errs []error
	// Everything else first, while etcd still runs: fabricd may want to
	// release its lease on the way out. etcd itself is killed outright: its
	// data is thrown away, and members shutting down together stall each
	// other for seconds with leadership transfers.
	etcdProcs := map[*Process]bool{}
	for _, m := range l.etcd {
		if m.proc != nil {
			etcdProcs[m.proc] = true
		}
	}
	var errMu sync.Mutex
	stopAll := func(which func(*Process) bool) {
		var wg sync.WaitGroup
		for _, p := range procs {
			if etcdProcs[p] || !which(p) {
				continue
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				if err := p.stop(); err != nil && !errors.Is(err, errStoppedBySignal) {
					// A process exiting badly is not a cleanup failure; log it.
					l.log.Debug("process ended with error", "process", p.Label, "err", err)
				}
				if !p.Exited() {
					errMu.Lock()
					errs = append(errs, fmt.Errorf("process %s (pid %d) did not exit", p.Label, p.Pid()))
					errMu.Unlock()
				}
			}()
		}
		wg.Wait()
	}
	l.mu.Lock()
	dockerds := maps.Clone(l.dockerds)
	l.mu.Unlock()
	stopAll(func(p *Process) bool { return dockerds[p] })
	stopAll(func(p *Process) bool { return !dockerds[p] })
	for p := range etcdProcs {
		_ = p.Kill()
	}

	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	// Reverse order: containers before hosts before the underlay.
	for i := len(namespaces) - 1; i >= 0; i-- {
		if err := deleteNamespace(ctx, namespaces[i]); err != nil {
			errs = append(errs, err)
		}
	}
	// Anything else carrying our prefix (e.g. namespaces a test made itself).
	if err := sweepNamespacesAndLinks(ctx, l.prefix); err != nil {
		errs = append(errs, err)
	}
	if l.runDir != "" {
		if err := os.RemoveAll(l.runDir); err != nil {
			errs = append(errs, err)
		}
	}
	if l.ownLogDir {
		if err := os.RemoveAll(l.logDir); err != nil {
			errs = append(errs, err)
		}
	}
	if l.log != nil {
		l.log.Debug("lab closed")
	}
	if l.releaseNeigh != nil {
		if err := l.releaseNeigh(); err != nil {
			errs = append(errs, err)
		}
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("lab %s: close: %w", l.prefix, err)
	}
	return nil
}

// addNamespace creates a namespace, records it for Close and brings lo up.
func (l *Lab) addNamespace(ctx context.Context, ns string) error {
	if !strings.HasPrefix(ns, l.prefix+"-") {
		return fmt.Errorf("lab: namespace %q lacks prefix %q", ns, l.prefix)
	}
	if err := l.ipCmd(ctx, "netns", "add", ns); err != nil {
		return err
	}
	l.mu.Lock()
	l.namespaces = append(l.namespaces, ns)
	l.mu.Unlock()
	return l.ipCmd(ctx, "-n", ns, "link", "set", "lo", "up")
}

// sysctls writes /proc/sys values inside namespace ns (net sysctls are per
// namespace and resolved from the writer's namespace).
func (l *Lab) sysctls(ctx context.Context, ns string, values map[string]string) error {
	var script strings.Builder
	for k, v := range values {
		fmt.Fprintf(&script, "echo %s > /proc/sys/%s || exit 1\n", v, k)
	}
	_, err := runOutput(nsCommand(ctx, ns, "sh", "-c", script.String()))
	return err
}

// ipCmd runs the ip command in the root namespace's view (use -n NS to act
// inside one).
func (l *Lab) ipCmd(ctx context.Context, args ...string) error {
	_, err := runOutput(exec.CommandContext(ctx, "ip", args...))
	return err
}
