package dataplane

import (
	"errors"
	"fmt"
	"io"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/fabricnet/fabric/lab"
	"github.com/fabricnet/fabric/vxlanfallback"
	"github.com/vishvananda/netlink"
)

// nsLab is a set of host namespaces on one shared L2 underlay (a bridge in its
// own namespace), each host with a bridge and one container namespace:
//
//	container cN (10.244.N.2) -- bridge (10.244.N.1/24) host hN (192.168.100.1N/24) -- underlay bridge
type nsLab struct {
	t       *testing.T
	prefix  string
	underNS string
	hosts   []*labHost
}

type labHost struct {
	n           int
	ns          string // host namespace
	ctr         string // container namespace
	underlayDev string
	bridge      string
	addr        netip.Addr   // underlay address
	subnet      netip.Prefix // container subnet
	ctrAddr     netip.Addr
	handle      *netlink.Handle
}

func newLab(t *testing.T, hosts int) *nsLab {
	t.Helper()
	lab.RequireRoot(t)
	l := &nsLab{t: t, prefix: lab.Prefix("dp")}
	l.underNS = lab.AddNS(t, l.prefix+"u")
	br := l.prefix + "br"
	lab.Bridge(t, l.underNS, br)
	for n := 1; n <= hosts; n++ {
		h := &labHost{
			n:           n,
			ns:          lab.AddNS(t, fmt.Sprintf("%sh%d", l.prefix, n)),
			ctr:         lab.AddNS(t, fmt.Sprintf("%sc%d", l.prefix, n)),
			underlayDev: fmt.Sprintf("%se%d", l.prefix, n),
			bridge:      fmt.Sprintf("%sb%d", l.prefix, n),
			addr:        netip.MustParseAddr(fmt.Sprintf("192.168.100.%d", 10+n)),
			subnet:      netip.MustParsePrefix(fmt.Sprintf("10.244.%d.0/24", n)),
			ctrAddr:     netip.MustParseAddr(fmt.Sprintf("10.244.%d.2", n)),
		}
		uport := fmt.Sprintf("%su%d", l.prefix, n)
		lab.Veth(t, h.ns, h.underlayDev, l.underNS, uport)
		lab.AddToBridge(t, l.underNS, br, uport)
		lab.Addr(t, h.ns, h.underlayDev, h.addr.String()+"/24")
		lab.Bridge(t, h.ns, h.bridge)
		lab.Addr(t, h.ns, h.bridge, fmt.Sprintf("10.244.%d.1/24", n))
		cdev, hport := fmt.Sprintf("%sv%d", l.prefix, n), fmt.Sprintf("%sp%d", l.prefix, n)
		lab.Veth(t, h.ctr, cdev, h.ns, hport)
		lab.AddToBridge(t, h.ns, h.bridge, hport)
		lab.Addr(t, h.ctr, cdev, h.ctrAddr.String()+"/24")
		lab.Run(t, "ip", "-n", h.ctr, "route", "add", "default", "via", fmt.Sprintf("10.244.%d.1", n))
		lab.Exec(t, h.ns, "sysctl", "-qw", "net.ipv4.ip_forward=1")
		h.handle = lab.Handle(t, h.ns)
		l.hosts = append(l.hosts, h)
	}
	return l
}

// setMTU sets the container-side MTU the way the agent would (bridge and veths).
func (l *nsLab) setContainerMTU(h *labHost, mtu int) {
	m := fmt.Sprint(mtu)
	lab.Run(l.t, "ip", "-n", h.ns, "link", "set", h.bridge, "mtu", m)
	lab.Run(l.t, "ip", "-n", h.ns, "link", "set", fmt.Sprintf("%sp%d", l.prefix, h.n), "mtu", m)
	lab.Run(l.t, "ip", "-n", h.ctr, "link", "set", fmt.Sprintf("%sv%d", l.prefix, h.n), "mtu", m)
}

func (h *labHost) peerInfo(encaps ...string) *PeerInfo {
	return &PeerInfo{
		Name:    h.ns,
		Address: h.addr,
		VTEPMAC: vxlanfallback.MACFor(h.addr, netip.Prefix{}),
		Encaps:  encaps,
		Subnet:  h.subnet,
	}
}

// routesFor returns what BGP would give host self: every other host's subnet.
func (l *nsLab) routesFor(self *labHost, skip ...*labHost) []RemoteRoute {
	var out []RemoteRoute
next:
	for _, h := range l.hosts {
		if h == self {
			continue
		}
		for _, s := range skip {
			if h == s {
				continue next
			}
		}
		out = append(out, RemoteRoute{Prefix: h.subnet, NextHop: h.addr, PeerName: h.ns, Peer: h.peerInfo("vxlan")})
	}
	return out
}

// tcpExchange opens a TCP connection from namespace fromNS to a server in
// toNS at addr and checks a message makes the round trip.
func tcpExchange(fromNS, toNS string, addr netip.Addr) error {
	ln, err := lab.ServeTCP(toNS, netip.AddrPortFrom(addr, 0).String())
	if err != nil {
		return fmt.Errorf("listen in %s: %w", toNS, err)
	}
	defer ln.Close()
	conn, _, err := lab.DialTCP(fromNS, "", ln.Addr().String(), 3*time.Second)
	if err != nil {
		return fmt.Errorf("connect from %s to %s: %w", fromNS, ln.Addr(), err)
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(5 * time.Second))
	msg := []byte("hello from " + fromNS + " " + strings.Repeat("x", 3000)) // several segments
	if _, err := conn.Write(msg); err != nil {
		return err
	}
	got := make([]byte, len(msg))
	if _, err := io.ReadFull(conn, got); err != nil {
		return fmt.Errorf("read echo from %s: %w", ln.Addr(), err)
	}
	if string(got) != string(msg) {
		return errors.New("echo differs from what was sent")
	}
	return nil
}
