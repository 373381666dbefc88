package vmlab

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"maps"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"
)

// Ping sends one ICMP echo from ns to dst with the system ping (busybox in
// the VM) and waits up to wait for the reply.
func (l *Lab) Ping(ns string, dst net.IP, wait time.Duration) error {
	secs := int(wait / time.Second)
	if secs < 1 {
		secs = 1
	}
	_, err := l.Exec(ns, "ping", "-c", "1", "-W", fmt.Sprint(secs), dst.String())
	return err
}

// EchoServer accepts TCP connections in a namespace and echoes each one back.
type EchoServer struct {
	ln      net.Listener
	wg      sync.WaitGroup
	mu      sync.Mutex
	clients map[string]int // client IP -> connections accepted
}

// StartEchoServer listens on addr ("ip:port") inside ns.
func (l *Lab) StartEchoServer(ns, addr string) (*EchoServer, error) {
	var ln net.Listener
	err := l.Do(ns, func() error {
		var err error
		ln, err = net.Listen("tcp4", addr)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("%s: listen %s: %w", l.FullName(ns), addr, err)
	}
	s := &EchoServer{ln: ln, clients: map[string]int{}}
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			if ta, ok := c.RemoteAddr().(*net.TCPAddr); ok {
				s.mu.Lock()
				s.clients[ta.IP.String()]++
				s.mu.Unlock()
			}
			go func() {
				defer c.Close()
				c.SetDeadline(time.Now().Add(30 * time.Second))
				io.Copy(c, c)
			}()
		}
	}()
	return s, nil
}

// Clients returns how many connections came from each client IP so far: the
// source addresses as they arrived, after any NAT on the way.
func (s *EchoServer) Clients() map[string]int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return maps.Clone(s.clients)
}

// Close stops accepting connections.
func (s *EchoServer) Close() error {
	err := s.ln.Close()
	s.wg.Wait()
	return err
}

// TCPEcho connects from ns to addr, sends payload, half-closes and expects the
// same bytes back, all within timeout.
func (l *Lab) TCPEcho(ns, addr string, payload []byte, timeout time.Duration) error {
	return l.Do(ns, func() error {
		deadline := time.Now().Add(timeout)
		c, err := net.DialTimeout("tcp4", addr, timeout)
		if err != nil {
			return err
		}
		defer c.Close()
		c.SetDeadline(deadline)
		writeErr := make(chan error, 1)
		go func() {
			_, err := c.Write(payload)
			if err == nil {
				err = c.(*net.TCPConn).CloseWrite()
			}
			writeErr <- err
		}()
		got, err := io.ReadAll(c)
		if werr := <-writeErr; werr != nil {
			return fmt.Errorf("write: %w", werr)
		}
		if err != nil {
			return fmt.Errorf("read after %d bytes: %w", len(got), err)
		}
		if !bytes.Equal(got, payload) {
			return fmt.Errorf("echo mismatch: sent %d bytes, got %d", len(payload), len(got))
		}
		return nil
	})
}

// WatchStats counts what a Watch saw on one link.
type WatchStats struct {
	Frames uint64           // all frames, both directions
	IPv4   uint64           // IPv4 frames
	Proto  map[uint8]uint64 // IPv4 frames by outer protocol
	// ProtoOut is the part of Proto the link transmitted (the rest it received).
	ProtoOut map[uint8]uint64
	// Inner counts IPIP (protocol 4) frames by the protocol of the
	// encapsulated packet: 1 ICMP, 6 TCP.
	Inner map[uint8]uint64
	// VXLAN counts UDP frames to or from VXLANPort that carry an inner IPv4
	// packet, by the inner packet's protocol: 1 ICMP, 6 TCP.
	VXLAN map[uint8]uint64
	// Bare counts non-encapsulated IPv4 frames with an overlay source or
	// destination: container traffic leaking onto the underlay unwrapped.
	Bare uint64
}

// VXLANPort is the UDP port Watch decodes as VXLAN (IANA, fabric's default).
const VXLANPort = 4789

// Watch counts frames on one link with an AF_PACKET socket.
type Watch struct {
	fd      int
	overlay *net.IPNet
	stop    atomic.Bool
	done    chan struct{}
	mu      sync.Mutex
	stats   WatchStats
	err     error
}

// WatchLink starts counting frames on link in ns. overlay (may be nil) is the
// container address range used for WatchStats.Bare.
func (l *Lab) WatchLink(ns, link string, overlay *net.IPNet) (*Watch, error) {
	ifindex, err := l.LinkIndex(ns, link)
	if err != nil {
		return nil, err
	}
	ethPAll := int(htons(unix.ETH_P_ALL))
	fd := -1
	err = l.Do(ns, func() error {
		var err error
		fd, err = unix.Socket(unix.AF_PACKET, unix.SOCK_RAW|unix.SOCK_CLOEXEC, ethPAll)
		if err != nil {
			return fmt.Errorf("AF_PACKET socket: %w", err)
		}
		return unix.Bind(fd, &unix.SockaddrLinklayer{Protocol: htons(unix.ETH_P_ALL), Ifindex: ifindex})
	})
	if err != nil {
		if fd >= 0 {
			unix.Close(fd)
		}
		return nil, fmt.Errorf("%s: watch %s: %w", l.FullName(ns), link, err)
	}
	// A receive timeout lets the reader notice Close.
	tv := unix.NsecToTimeval((100 * time.Millisecond).Nanoseconds())
	if err := unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv); err != nil {
		unix.Close(fd)
		return nil, err
	}
	w := &Watch{
		fd:      fd,
		overlay: overlay,
		done:    make(chan struct{}),
		stats:   WatchStats{Proto: map[uint8]uint64{}, ProtoOut: map[uint8]uint64{}, Inner: map[uint8]uint64{}, VXLAN: map[uint8]uint64{}},
	}
	go w.read(ifindex)
	return w, nil
}

func (w *Watch) read(ifindex int) {
	defer close(w.done)
	buf := make([]byte, 65536+64)
	for !w.stop.Load() {
		n, from, err := unix.Recvfrom(w.fd, buf, unix.MSG_TRUNC)
		if err != nil {
			if errors.Is(err, unix.EAGAIN) || errors.Is(err, unix.EINTR) {
				continue
			}
			w.mu.Lock()
			w.err = err
			w.mu.Unlock()
			return
		}
		// Frames from other links can queue before bind takes effect.
		ll, ok := from.(*unix.SockaddrLinklayer)
		if ok && ll.Ifindex != ifindex {
			continue
		}
		if n > len(buf) {
			n = len(buf)
		}
		w.count(buf[:n], ok && ll.Pkttype == unix.PACKET_OUTGOING)
	}
}

func (w *Watch) count(frame []byte, outgoing bool) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.stats.Frames++
	const eth = 14
	if len(frame) < eth+20 || frame[12] != 0x08 || frame[13] != 0x00 || frame[eth]>>4 != 4 {
		return
	}
	w.stats.IPv4++
	ip := frame[eth:]
	ihl := int(ip[0]&0x0f) * 4
	proto := ip[9]
	w.stats.Proto[proto]++
	if outgoing {
		w.stats.ProtoOut[proto]++
	}
	if proto == unix.IPPROTO_IPIP {
		if inner := ip[ihl:]; len(inner) >= 20 {
			w.stats.Inner[inner[9]]++
		}
		return
	}
	if proto == unix.IPPROTO_UDP && len(ip) >= ihl+8 {
		udp := ip[ihl:]
		sport, dport := int(udp[0])<<8|int(udp[1]), int(udp[2])<<8|int(udp[3])
		if sport == VXLANPort || dport == VXLANPort {
			// UDP 8 + VXLAN 8 + inner Ethernet 14, then the inner IPv4 header.
			if inner := udp[8+8:]; len(inner) >= 14+20 && inner[12] == 0x08 && inner[13] == 0x00 {
				w.stats.VXLAN[inner[14+9]]++
			}
			return
		}
	}
	if w.overlay != nil && (w.overlay.Contains(net.IP(ip[12:16])) || w.overlay.Contains(net.IP(ip[16:20]))) {
		w.stats.Bare++
	}
}

// Stats returns a copy of the counts so far.
func (w *Watch) Stats() WatchStats {
	w.mu.Lock()
	defer w.mu.Unlock()
	s := w.stats
	s.Proto = maps.Clone(w.stats.Proto)
	s.ProtoOut = maps.Clone(w.stats.ProtoOut)
	s.Inner = maps.Clone(w.stats.Inner)
	s.VXLAN = maps.Clone(w.stats.VXLAN)
	return s
}

// Close stops the watch and returns the final counts.
func (w *Watch) Close() (WatchStats, error) {
	w.stop.Store(true)
	<-w.done
	unix.Close(w.fd)
	w.mu.Lock()
	err := w.err
	w.mu.Unlock()
	return w.Stats(), err
}

// htons converts to network byte order; the lane only runs on amd64 (little endian).
func htons(v uint16) uint16 { return v<<8 | v>>8 }
