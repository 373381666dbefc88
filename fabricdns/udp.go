package fabricdns

import (
	"net/netip"
	"runtime"
	"sync"
	"sync/atomic"

	"github.com/miekg/dns"
	"golang.org/x/sys/unix"

	"github.com/fabricnet/fabric/names"
)

// udpSocket is the server's UDP socket, read by one thread blocked in
// recvfrom, as dnsmasq reads its socket: a query wakes that thread and
// nothing else, where a goroutine per query (miekg/dns's server) spent
// most of a query's CPU in the Go scheduler. One thread is what the names
// of one host's containers need (`make bench`: ~70,000 queries/s here);
// more sockets (SO_REUSEPORT) or recvmmsg batches measured no better.
type udpSocket struct {
	fd      int
	closing atomic.Bool
	// forwarding counts the queries sent upstream whose reply is still to
	// be sent on fd.
	forwarding sync.WaitGroup
}

// listenUDP opens a blocking UDP socket on ap (SO_REUSEPORT).
func listenUDP(ap netip.AddrPort) (*udpSocket, error) {
	family := unix.AF_INET
	var sa unix.Sockaddr = &unix.SockaddrInet4{Port: int(ap.Port()), Addr: ap.Addr().Unmap().As4()}
	if !ap.Addr().Unmap().Is4() {
		family = unix.AF_INET6
		sa = &unix.SockaddrInet6{Port: int(ap.Port()), Addr: ap.Addr().As16()}
	}
	fd, err := unix.Socket(family, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, err
	}
	// As before this socket was one thread's: a fabricd starting while the
	// one it replaces still holds the port is not refused.
	if err := unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_REUSEPORT, 1); err != nil {
		unix.Close(fd)
		return nil, err
	}
	if err := unix.Bind(fd, sa); err != nil {
		unix.Close(fd)
		return nil, err
	}
	return &udpSocket{fd: fd}, nil
}

// stop wakes the reader (a shut down socket's recvfrom returns at once)
// and makes it return.
func (u *udpSocket) stop() {
	u.closing.Store(true)
	unix.Shutdown(u.fd, unix.SHUT_RDWR) // ENOTCONN for UDP, but the reader is woken
}

// maxCachedReplies bounds the replies kept per view.
const maxCachedReplies = 4096

// serveUDP answers u's queries until u is stopped. The replies this
// server gives from its own names are kept per view (replier), so a
// repeated query is answered by copying bytes; anything else is unpacked
// and answered as over TCP, forwarded queries on a goroutine of their own.
func (s *Server) serveUDP(u *udpSocket) {
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	buf, out := make([]byte, 65535), make([]byte, 0, 512)
	r := replier{s: s, cache: map[string]map[string][]byte{}}
	for {
		n, sa, err := unix.Recvfrom(u.fd, buf, 0)
		if u.closing.Load() {
			return
		}
		if err != nil {
			continue
		}
		reply, forward := r.reply(buf[:n], sockaddrAddr(sa), out[:0])
		if forward != nil {
			u.forwarding.Add(1)
			go func() {
				defer u.forwarding.Done()
				if wire, err := s.forward(forward, "udp").Pack(); err == nil {
					unix.Sendto(u.fd, wire, 0, sa)
				}
			}()
		}
		if reply != nil {
			out = reply[:0] // keep a grown buffer
			unix.Sendto(u.fd, reply, 0, sa)
		}
	}
}

// replier builds one socket's replies, keeping those it can give again.
type replier struct {
	s      *Server
	view   *names.View
	cache  map[string]map[string][]byte // network ("" the bridge) -> query after the ID -> reply after the ID
	cached int
}

// reply is the reply to query q from from, built in out, or nil; forward
// is the query to send upstream instead (its reply goes out later).
func (r *replier) reply(q []byte, from netip.Addr, out []byte) (reply []byte, forward *dns.Msg) {
	if len(q) < 12 || q[2]&0x80 != 0 {
		return nil, nil // too short for a header, or a response: never answered
	}
	if v := r.s.view.Load(); v != r.view {
		r.view, r.cached = v, 0
		clear(r.cache)
	}
	network, _ := r.view.NetworkOf(from)
	if kept, ok := r.cache[network][string(q[2:])]; ok {
		return append(append(out, q[0], q[1]), kept...), nil
	}
	req := new(dns.Msg)
	if err := req.Unpack(q); err != nil {
		return append(out, q[0], q[1], 0x80|q[2]&0x78, dns.RcodeFormatError, 0, 0, 0, 0, 0, 0, 0, 0), nil
	}
	m, cacheable := r.s.local(req, from)
	if m == nil {
		return nil, req
	}
	wire, err := m.PackBuffer(out[:cap(out)])
	if err != nil {
		return nil, nil
	}
	if cacheable {
		if r.cached >= maxCachedReplies { // queries that differ every time (EDNS cookies): start again
			clear(r.cache)
			r.cached = 0
		}
		if r.cache[network] == nil {
			r.cache[network] = map[string][]byte{}
		}
		r.cache[network][string(q[2:])] = append([]byte(nil), wire[2:]...)
		r.cached++
	}
	return wire, nil
}

// sockaddrAddr is the address of a datagram's sender.
func sockaddrAddr(sa unix.Sockaddr) netip.Addr {
	switch sa := sa.(type) {
	case *unix.SockaddrInet4:
		return netip.AddrFrom4(sa.Addr)
	case *unix.SockaddrInet6:
		return netip.AddrFrom16(sa.Addr).Unmap()
	}
	return netip.Addr{}
}
