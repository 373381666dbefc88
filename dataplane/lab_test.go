package dataplane

import (
	"context"
	"crypto/rand"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os/exec"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/fabricnet/fabric/vxlanfallback"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// lab is a set of host namespaces on one shared L2 underlay (a bridge in its
// own namespace), each host with a bridge and one container namespace:
//
//	container cN (10.244.N.2) -- bridge (10.244.N.1/24) host hN (192.168.100.1N/24) -- underlay bridge
type lab struct {
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

func requireRoot(t *testing.T) {
	t.Helper()
	if unix.Geteuid() != 0 {
		t.Skip("needs root to create network namespaces")
	}
}

func randomHex(n int) string {
	b := make([]byte, n)
	rand.Read(b)
	return hex.EncodeToString(b)
}

func run(t *testing.T, args ...string) string {
	t.Helper()
	out, err := exec.Command(args[0], args[1:]...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return string(out)
}

func newLab(t *testing.T, hosts int) *lab {
	t.Helper()
	requireRoot(t)
	l := &lab{t: t, prefix: "dp" + randomHex(2)}
	l.underNS = l.addNS("u")
	br := l.prefix + "br"
	run(t, "ip", "-n", l.underNS, "link", "add", br, "type", "bridge")
	run(t, "ip", "-n", l.underNS, "link", "set", br, "up")
	for n := 1; n <= hosts; n++ {
		h := &labHost{
			n:           n,
			ns:          l.addNS(fmt.Sprintf("h%d", n)),
			ctr:         l.addNS(fmt.Sprintf("c%d", n)),
			underlayDev: fmt.Sprintf("%se%d", l.prefix, n),
			bridge:      fmt.Sprintf("%sb%d", l.prefix, n),
			addr:        netip.MustParseAddr(fmt.Sprintf("192.168.100.%d", 10+n)),
			subnet:      netip.MustParsePrefix(fmt.Sprintf("10.244.%d.0/24", n)),
			ctrAddr:     netip.MustParseAddr(fmt.Sprintf("10.244.%d.2", n)),
		}
		// Created directly inside the namespaces: nothing lands in the root namespace.
		uport := fmt.Sprintf("%su%d", l.prefix, n)
		run(t, "ip", "-n", h.ns, "link", "add", h.underlayDev, "type", "veth", "peer", "name", uport, "netns", l.underNS)
		run(t, "ip", "-n", l.underNS, "link", "set", uport, "master", br, "up")
		run(t, "ip", "-n", h.ns, "link", "set", "lo", "up")
		run(t, "ip", "-n", h.ns, "addr", "add", h.addr.String()+"/24", "dev", h.underlayDev)
		run(t, "ip", "-n", h.ns, "link", "set", h.underlayDev, "up")
		run(t, "ip", "-n", h.ns, "link", "add", h.bridge, "type", "bridge")
		run(t, "ip", "-n", h.ns, "addr", "add", fmt.Sprintf("10.244.%d.1/24", n), "dev", h.bridge)
		run(t, "ip", "-n", h.ns, "link", "set", h.bridge, "up")
		cdev, hport := fmt.Sprintf("%sv%d", l.prefix, n), fmt.Sprintf("%sp%d", l.prefix, n)
		run(t, "ip", "-n", h.ctr, "link", "add", cdev, "type", "veth", "peer", "name", hport, "netns", h.ns)
		run(t, "ip", "-n", h.ns, "link", "set", hport, "master", h.bridge, "up")
		run(t, "ip", "-n", h.ctr, "link", "set", "lo", "up")
		run(t, "ip", "-n", h.ctr, "addr", "add", h.ctrAddr.String()+"/24", "dev", cdev)
		run(t, "ip", "-n", h.ctr, "link", "set", cdev, "up")
		run(t, "ip", "-n", h.ctr, "route", "add", "default", "via", fmt.Sprintf("10.244.%d.1", n))
		run(t, "ip", "netns", "exec", h.ns, "sh", "-c", "echo 1 > /proc/sys/net/ipv4/ip_forward")
		h.handle = nsHandle(t, h.ns)
		l.hosts = append(l.hosts, h)
	}
	return l
}

// addNS creates a namespace named with the run's prefix and removes it at the end.
func (l *lab) addNS(suffix string) string {
	name := l.prefix + suffix
	run(l.t, "ip", "netns", "add", name)
	l.t.Cleanup(func() { exec.Command("ip", "netns", "del", name).Run() })
	return name
}

func nsHandle(t *testing.T, name string) *netlink.Handle {
	t.Helper()
	ns, err := netns.GetFromName(name)
	if err != nil {
		t.Fatalf("open namespace %s: %v", name, err)
	}
	h, err := netlink.NewHandleAt(ns)
	ns.Close()
	if err != nil {
		t.Fatalf("netlink handle for %s: %v", name, err)
	}
	t.Cleanup(h.Close)
	return h
}

// setMTU sets the container-side MTU the way the agent would (bridge and veths).
func (l *lab) setContainerMTU(h *labHost, mtu int) {
	m := fmt.Sprint(mtu)
	run(l.t, "ip", "-n", h.ns, "link", "set", h.bridge, "mtu", m)
	run(l.t, "ip", "-n", h.ns, "link", "set", fmt.Sprintf("%sp%d", l.prefix, h.n), "mtu", m)
	run(l.t, "ip", "-n", h.ctr, "link", "set", fmt.Sprintf("%sv%d", l.prefix, h.n), "mtu", m)
}

func (h *labHost) peerInfo(encaps ...string) *PeerInfo {
	return &PeerInfo{
		Name:    h.ns,
		Address: h.addr,
		VTEPMAC: vxlanfallback.MACFor(h.addr),
		Encaps:  encaps,
		Subnet:  h.subnet,
	}
}

// routesFor returns what BGP would give host self: every other host's subnet.
func (l *lab) routesFor(self *labHost, skip ...*labHost) []RemoteRoute {
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

// inNS runs fn on a thread that is in namespace name. Sockets created there
// stay in that namespace after fn returns.
func inNS(name string, fn func() error) error {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		orig, err := netns.Get()
		if err != nil {
			errc <- err
			return
		}
		defer orig.Close()
		target, err := netns.GetFromName(name)
		if err != nil {
			errc <- err
			return
		}
		defer target.Close()
		if err := netns.Set(target); err != nil {
			errc <- err
			return
		}
		errc <- fn()
		if netns.Set(orig) == nil {
			runtime.UnlockOSThread() // otherwise the thread dies with the goroutine
		}
	}()
	return <-errc
}

// ping sends ICMP echo requests from namespace ns to dst with payload bytes of
// data, optionally with DF set, and waits for a reply. A send that the kernel
// refuses (EMSGSIZE) is returned as is.
func ping(ns string, dst netip.Addr, payload int, dontFragment bool) error {
	var fd int
	err := inNS(ns, func() error {
		var err error
		fd, err = unix.Socket(unix.AF_INET, unix.SOCK_RAW|unix.SOCK_CLOEXEC, unix.IPPROTO_ICMP)
		return err
	})
	if err != nil {
		return err
	}
	defer unix.Close(fd)
	if dontFragment {
		if err := unix.SetsockoptInt(fd, unix.IPPROTO_IP, unix.IP_MTU_DISCOVER, unix.IP_PMTUDISC_DO); err != nil {
			return err
		}
	}
	tv := unix.NsecToTimeval(int64(300 * time.Millisecond))
	if err := unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv); err != nil {
		return err
	}
	var idb [2]byte
	rand.Read(idb[:])
	id := binary.BigEndian.Uint16(idb[:])
	to := &unix.SockaddrInet4{Addr: dst.As4()}
	buf := make([]byte, 65536)
	for seq := uint16(1); seq <= 10; seq++ {
		pkt := make([]byte, 8+payload)
		pkt[0] = 8 // echo request
		binary.BigEndian.PutUint16(pkt[4:], id)
		binary.BigEndian.PutUint16(pkt[6:], seq)
		binary.BigEndian.PutUint16(pkt[2:], checksum(pkt))
		if err := unix.Sendto(fd, pkt, 0, to); err != nil {
			return fmt.Errorf("send echo to %s: %w", dst, err)
		}
		deadline := time.Now().Add(300 * time.Millisecond)
		for time.Now().Before(deadline) {
			n, from, err := unix.Recvfrom(fd, buf, 0)
			if err != nil {
				break // timeout: next sequence number
			}
			src, ok := from.(*unix.SockaddrInet4)
			if !ok || netip.AddrFrom4(src.Addr) != dst || n < 20 {
				continue
			}
			ihl := int(buf[0]&0x0f) * 4
			icmp := buf[ihl:n]
			if len(icmp) >= 8 && icmp[0] == 0 && binary.BigEndian.Uint16(icmp[4:]) == id && len(icmp) == 8+payload {
				return nil
			}
		}
	}
	return fmt.Errorf("no echo reply from %s to %d-byte pings from %s", dst, payload, ns)
}

func checksum(b []byte) uint16 {
	var sum uint32
	for i := 0; i+1 < len(b); i += 2 {
		sum += uint32(binary.BigEndian.Uint16(b[i:]))
	}
	if len(b)%2 == 1 {
		sum += uint32(b[len(b)-1]) << 8
	}
	for sum>>16 != 0 {
		sum = sum&0xffff + sum>>16
	}
	return ^uint16(sum)
}

// tcpExchange opens a TCP connection from namespace fromNS to a server in
// toNS at addr and checks a message makes the round trip.
func tcpExchange(fromNS, toNS string, addr netip.Addr) error {
	var ln net.Listener
	if err := inNS(toNS, func() (err error) {
		ln, err = net.Listen("tcp4", netip.AddrPortFrom(addr, 0).String())
		return err
	}); err != nil {
		return fmt.Errorf("listen in %s: %w", toNS, err)
	}
	defer ln.Close()
	go func() {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(5 * time.Second))
		io.Copy(c, c) // echo
	}()
	var conn net.Conn
	if err := inNS(fromNS, func() (err error) {
		d := net.Dialer{Timeout: 3 * time.Second}
		conn, err = d.DialContext(context.Background(), "tcp4", ln.Addr().String())
		return err
	}); err != nil {
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
