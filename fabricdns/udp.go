package fabricdns

import (
	"net/netip"
	"runtime"
	"sync"
	"sync/atomic"
	"unsafe"

	"github.com/miekg/dns"
	"golang.org/x/sys/unix"

	"github.com/fabricnet/fabric/names"
)

// udpSocket is the server's UDP socket, read by one thread, as dnsmasq
// reads its socket: a query wakes that thread and nothing else, where a
// goroutine per query (miekg/dns's server) spent most of a query's CPU in
// the Go scheduler. One thread is what the names of one host's containers
// need (`make bench`: ~70,000 queries/s here); more sockets (SO_REUSEPORT)
// or recvmmsg batches measured no better.
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
//
// Queries are read and answered with non-blocking raw system calls, into a
// sender address this loop owns: while queries wait in the socket no call
// goes through the Go scheduler (entersyscall, exitsyscall) and nothing is
// allocated per query. Only on an empty socket does recvfrom block, as a
// system call the scheduler knows of.
func (s *Server) serveUDP(u *udpSocket) {
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	buf, out := make([]byte, 65535), make([]byte, 0, 512)
	r := replier{s: s, cache: map[string]map[string][]byte{}}
	var from unix.RawSockaddrAny
	for {
		fromLen := uint32(unix.SizeofSockaddrAny)
		n, _, errno := unix.RawSyscall6(unix.SYS_RECVFROM, uintptr(u.fd), uintptr(unsafe.Pointer(&buf[0])), uintptr(len(buf)),
			unix.MSG_DONTWAIT, uintptr(unsafe.Pointer(&from)), uintptr(unsafe.Pointer(&fromLen)))
		if errno == unix.EAGAIN {
			// Nothing waiting: block in recvfrom, through the scheduler
			// (stop's shutdown wakes it).
			fromLen = uint32(unix.SizeofSockaddrAny)
			n, _, errno = unix.Syscall6(unix.SYS_RECVFROM, uintptr(u.fd), uintptr(unsafe.Pointer(&buf[0])), uintptr(len(buf)),
				0, uintptr(unsafe.Pointer(&from)), uintptr(unsafe.Pointer(&fromLen)))
		}
		if u.closing.Load() {
			return
		}
		if errno != 0 {
			continue
		}
		sender, ok := rawAddr(&from)
		if !ok {
			continue
		}
		reply, forward := r.reply(buf[:n], sender, out[:0])
		if forward != nil {
			to := sockaddrOf(sender, &from)
			u.forwarding.Add(1)
			go func() {
				defer u.forwarding.Done()
				if wire, err := s.forward(forward, "udp").Pack(); err == nil {
					unix.Sendto(u.fd, wire, 0, to)
				}
			}()
		}
		if len(reply) > 0 {
			out = reply[:0] // keep a grown buffer
			unix.RawSyscall6(unix.SYS_SENDTO, uintptr(u.fd), uintptr(unsafe.Pointer(&reply[0])), uintptr(len(reply)),
				unix.MSG_DONTWAIT, uintptr(unsafe.Pointer(&from)), uintptr(fromLen))
		}
	}
}

// rawAddr is the address in a sender's raw socket address.
func rawAddr(sa *unix.RawSockaddrAny) (netip.Addr, bool) {
	switch sa.Addr.Family {
	case unix.AF_INET:
		return netip.AddrFrom4((*unix.RawSockaddrInet4)(unsafe.Pointer(sa)).Addr), true
	case unix.AF_INET6:
		return netip.AddrFrom16((*unix.RawSockaddrInet6)(unsafe.Pointer(sa)).Addr).Unmap(), true
	}
	return netip.Addr{}, false
}

// sockaddrOf is the sender as a unix.Sockaddr, for a forwarded query's
// reply sent later from another goroutine.
func sockaddrOf(a netip.Addr, sa *unix.RawSockaddrAny) unix.Sockaddr {
	if sa.Addr.Family == unix.AF_INET {
		in := (*unix.RawSockaddrInet4)(unsafe.Pointer(sa))
		return &unix.SockaddrInet4{Port: int(in.Port>>8 | in.Port<<8), Addr: a.As4()}
	}
	in := (*unix.RawSockaddrInet6)(unsafe.Pointer(sa))
	return &unix.SockaddrInet6{Port: int(in.Port>>8 | in.Port<<8), ZoneId: in.Scope_id, Addr: in.Addr}
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
