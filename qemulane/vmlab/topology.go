package vmlab

import (
	"fmt"
	"net"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// Namespace names used by a Topology (before the lab prefix).
const (
	UnderlayNS = "underlay" // holds one bridge per segment
	RouterNS   = "router"   // routes between segments
	// UnderlayDev is the host's underlay interface name inside its namespace.
	UnderlayDev = "eth0"
	// ContainerBridge is the bridge in each host the containers hang off.
	ContainerBridge = "cbr0"
)

// Segment is one underlay L2 network; the router owns RouterAddr on it.
type Segment struct {
	Name       string // bridge name in the underlay namespace, e.g. "seg0"
	CIDR       string // e.g. "192.168.100.0/24"
	RouterAddr string // e.g. "192.168.100.1"
}

// HostSpec is one host: a namespace with an underlay address on a segment and
// a container subnet behind a bridge.
type HostSpec struct {
	Name         string // namespace name, e.g. "host1"
	Segment      int    // index into TopologySpec.Segments
	UnderlayAddr string // e.g. "192.168.100.11"
	PodCIDR      string // e.g. "10.244.1.0/24"; gateway .1, container .2
}

// TopologySpec describes the whole lab network.
type TopologySpec struct {
	Segments     []Segment
	Hosts        []HostSpec
	ContainerMTU int // 0: leave the default
	// SkipContainers builds hosts without the container bridge and container
	// namespace, for an agent under test that creates its own bridge (see
	// Lab.AddContainer to add containers afterwards).
	SkipContainers bool
}

// Host is a built host with parsed addresses.
type Host struct {
	Name        string
	Underlay    net.IP
	SegmentMask net.IPMask
	PodNet      *net.IPNet
	Gateway     net.IP // bridge address in the host
	Container   net.IP // container address
	ContainerNS string // namespace of the container
}

// Topology is a built lab network.
type Topology struct {
	Lab   *Lab
	Spec  TopologySpec
	Hosts []Host
}

// ThreeHostSpec is the lane's standard layout: host1 and host2 share
// 192.168.100.0/24, host3 sits on 192.168.101.0/24 behind the router, and
// host N owns 10.244.N.0/24.
func ThreeHostSpec() TopologySpec {
	return TopologySpec{
		Segments: []Segment{
			{Name: "seg0", CIDR: "192.168.100.0/24", RouterAddr: "192.168.100.1"},
			{Name: "seg1", CIDR: "192.168.101.0/24", RouterAddr: "192.168.101.1"},
		},
		Hosts: []HostSpec{
			{Name: "host1", Segment: 0, UnderlayAddr: "192.168.100.11", PodCIDR: "10.244.1.0/24"},
			{Name: "host2", Segment: 0, UnderlayAddr: "192.168.100.12", PodCIDR: "10.244.2.0/24"},
			{Name: "host3", Segment: 1, UnderlayAddr: "192.168.101.13", PodCIDR: "10.244.3.0/24"},
		},
		// Room for a 20-byte IPIP header on a 1500-byte underlay.
		ContainerMTU: 1480,
	}
}

// RouterDev is the router's interface on segment i.
func RouterDev(i int) string { return fmt.Sprintf("eth%d", i) }

// BuildTopology creates the underlay, router, hosts and one container per
// host. It does not create any tunnel: that is the data plane under test.
func BuildTopology(l *Lab, spec TopologySpec) (*Topology, error) {
	t := &Topology{Lab: l, Spec: spec}
	for _, ns := range []string{UnderlayNS, RouterNS} {
		if err := l.AddNamespace(ns); err != nil {
			return nil, err
		}
	}
	if err := l.Sysctl(RouterNS, "net.ipv4.ip_forward", "1"); err != nil {
		return nil, err
	}
	for i, seg := range spec.Segments {
		_, segNet, err := net.ParseCIDR(seg.CIDR)
		if err != nil {
			return nil, fmt.Errorf("segment %s: %w", seg.Name, err)
		}
		ones, _ := segNet.Mask.Size()
		if err := l.AddBridge(UnderlayNS, seg.Name); err != nil {
			return nil, err
		}
		port := fmt.Sprintf("rt-%s", seg.Name)
		if err := l.AddVeth(UnderlayNS, port, RouterNS, RouterDev(i), 0); err != nil {
			return nil, err
		}
		if err := l.SetMaster(UnderlayNS, port, seg.Name); err != nil {
			return nil, err
		}
		if err := l.AddAddr(RouterNS, RouterDev(i), fmt.Sprintf("%s/%d", seg.RouterAddr, ones)); err != nil {
			return nil, err
		}
	}
	for _, hs := range spec.Hosts {
		h, err := t.addHost(hs)
		if err != nil {
			return nil, err
		}
		t.Hosts = append(t.Hosts, h)
	}
	return t, nil
}

func (t *Topology) addHost(hs HostSpec) (Host, error) {
	l := t.Lab
	if hs.Segment < 0 || hs.Segment >= len(t.Spec.Segments) {
		return Host{}, fmt.Errorf("host %s: no segment %d", hs.Name, hs.Segment)
	}
	seg := t.Spec.Segments[hs.Segment]
	_, segNet, err := net.ParseCIDR(seg.CIDR)
	if err != nil {
		return Host{}, err
	}
	_, podNet, err := net.ParseCIDR(hs.PodCIDR)
	if err != nil {
		return Host{}, fmt.Errorf("host %s: %w", hs.Name, err)
	}
	h := Host{
		Name:        hs.Name,
		Underlay:    net.ParseIP(hs.UnderlayAddr).To4(),
		SegmentMask: segNet.Mask,
		PodNet:      podNet,
		Gateway:     nthAddr(podNet, 1),
		Container:   nthAddr(podNet, 2),
		ContainerNS: "c-" + hs.Name,
	}
	if h.Underlay == nil {
		return Host{}, fmt.Errorf("host %s: bad underlay address %q", hs.Name, hs.UnderlayAddr)
	}
	if err := t.attach(hs.Name, seg, h.Underlay); err != nil {
		return Host{}, err
	}
	if t.Spec.SkipContainers {
		return h, nil
	}

	// Container namespace behind the host's bridge, as docker's bridge driver does.
	podOnes, _ := podNet.Mask.Size()
	if err := l.AddBridge(hs.Name, ContainerBridge); err != nil {
		return Host{}, err
	}
	if err := l.AddAddr(hs.Name, ContainerBridge, fmt.Sprintf("%s/%d", h.Gateway, podOnes)); err != nil {
		return Host{}, err
	}
	cidr := fmt.Sprintf("%s/%d", h.Container, podOnes)
	if err := l.AddContainer(hs.Name, ContainerBridge, h.ContainerNS, cidr, h.Gateway, t.Spec.ContainerMTU); err != nil {
		return Host{}, err
	}
	return h, nil
}

// attach creates namespace ns with UnderlayDev on segment seg holding addr,
// a default route via the segment's router and forwarding on.
func (t *Topology) attach(ns string, seg Segment, addr net.IP) error {
	l := t.Lab
	_, segNet, err := net.ParseCIDR(seg.CIDR)
	if err != nil {
		return err
	}
	ones, _ := segNet.Mask.Size()
	if err := l.AddNamespace(ns); err != nil {
		return err
	}
	port := "u-" + ns
	if len(port) > 15 {
		port = port[:15]
	}
	if err := l.AddVeth(UnderlayNS, port, ns, UnderlayDev, 0); err != nil {
		return err
	}
	if err := l.SetMaster(UnderlayNS, port, seg.Name); err != nil {
		return err
	}
	if err := l.AddAddr(ns, UnderlayDev, fmt.Sprintf("%s/%d", addr, ones)); err != nil {
		return err
	}
	if err := l.AddDefaultRoute(ns, net.ParseIP(seg.RouterAddr)); err != nil {
		return err
	}
	return l.Sysctl(ns, "net.ipv4.ip_forward", "1")
}

// AddNode attaches an extra namespace (a service such as etcd, not a fabric
// host) to segment seg with underlay address addr.
func (t *Topology) AddNode(ns string, seg int, addr string) error {
	if seg < 0 || seg >= len(t.Spec.Segments) {
		return fmt.Errorf("node %s: no segment %d", ns, seg)
	}
	ip := net.ParseIP(addr).To4()
	if ip == nil {
		return fmt.Errorf("node %s: bad address %q", ns, addr)
	}
	return t.attach(ns, t.Spec.Segments[seg], ip)
}

// AddContainer creates container namespace cns with eth0 (MTU mtu, 0 for the
// default) holding cidr, its peer end attached to bridge in hostNS, and a
// default route via gw: what docker's bridge driver does for a container.
func (l *Lab) AddContainer(hostNS, bridge, cns, cidr string, gw net.IP, mtu int) error {
	if err := l.AddNamespace(cns); err != nil {
		return err
	}
	hostEnd := "veth-" + cns
	if len(hostEnd) > 15 {
		hostEnd = hostEnd[:15]
	}
	if err := l.AddVeth(hostNS, hostEnd, cns, "eth0", mtu); err != nil {
		return err
	}
	if err := l.SetMaster(hostNS, hostEnd, bridge); err != nil {
		return err
	}
	if err := l.AddAddr(cns, "eth0", cidr); err != nil {
		return err
	}
	return l.AddDefaultRoute(cns, gw)
}

// Host returns the built host by name.
func (t *Topology) Host(name string) (Host, bool) {
	for _, h := range t.Hosts {
		if h.Name == name {
			return h, true
		}
	}
	return Host{}, false
}

func nthAddr(n *net.IPNet, i byte) net.IP {
	ip := make(net.IP, 4)
	copy(ip, n.IP.To4())
	ip[3] += i
	return ip
}

// IPIPDev is the name of the hand-built tunnel device (tunl0 belongs to the
// ipip module's fallback device, present in every namespace).
const IPIPDev = "ipip0"

// AddIPIP creates an NBMA IPIP device in the host: local address set, no
// remote, so each route's gateway picks the outer destination.
func (t *Topology) AddIPIP(host Host) error {
	h, err := t.Lab.Handle(host.Name)
	if err != nil {
		return err
	}
	tun := &netlink.Iptun{
		LinkAttrs: netlink.LinkAttrs{Name: IPIPDev},
		Local:     host.Underlay,
		PMtuDisc:  1,
	}
	if err := h.LinkAdd(tun); err != nil {
		return fmt.Errorf("%s: add ipip %s: %w", t.Lab.FullName(host.Name), IPIPDev, err)
	}
	return t.Lab.setUp(h, host.Name, IPIPDev)
}

// AddIPIPRoute installs "<peer pod net> via <peer underlay> dev ipip0 onlink"
// in host.
func (t *Topology) AddIPIPRoute(host, peer Host) error {
	h, err := t.Lab.Handle(host.Name)
	if err != nil {
		return err
	}
	idx, err := t.Lab.LinkIndex(host.Name, IPIPDev)
	if err != nil {
		return err
	}
	r := &netlink.Route{
		LinkIndex: idx,
		Dst:       peer.PodNet,
		Gw:        peer.Underlay,
		Flags:     int(netlink.FLAG_ONLINK),
	}
	if err := h.RouteAdd(r); err != nil {
		return fmt.Errorf("%s: route %s via %s dev %s onlink: %w",
			t.Lab.FullName(host.Name), peer.PodNet, peer.Underlay, IPIPDev, err)
	}
	return nil
}

// ProtoBlockRule is a FIB rule that blackholes forwarded (and local) packets
// of one IP protocol, the way a firewall between sites drops IPIP.
func ProtoBlockRule(proto int, priority int) *netlink.Rule {
	r := netlink.NewRule()
	r.Family = unix.AF_INET
	r.Priority = priority
	r.IPProto = proto
	r.Type = unix.RTN_BLACKHOLE // FR_ACT_BLACKHOLE shares the value
	return r
}

// AddRule adds a FIB rule in ns.
func (l *Lab) AddRule(ns string, r *netlink.Rule) error {
	h, err := l.Handle(ns)
	if err != nil {
		return err
	}
	if err := h.RuleAdd(r); err != nil {
		return fmt.Errorf("%s: add rule %s: %w", l.FullName(ns), r, err)
	}
	return nil
}

// DelRule removes a FIB rule in ns.
func (l *Lab) DelRule(ns string, r *netlink.Rule) error {
	h, err := l.Handle(ns)
	if err != nil {
		return err
	}
	if err := h.RuleDel(r); err != nil {
		return fmt.Errorf("%s: delete rule %s: %w", l.FullName(ns), r, err)
	}
	return nil
}

// Rules lists the IPv4 FIB rules in ns.
func (l *Lab) Rules(ns string) ([]netlink.Rule, error) {
	h, err := l.Handle(ns)
	if err != nil {
		return nil, err
	}
	return h.RuleList(unix.AF_INET)
}
