package lab

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"net"
	"sync"
	"sync/atomic"

	"golang.org/x/sys/unix"

	"github.com/fabricnet/fabric/internal/nsthread"
)

// Capture records every frame that a device in a namespace sends or
// receives, like tcpdump -w, with a packet socket of the test's own (the
// qemu guest has no tcpdump, and nothing is left unflushed when it stops).
type Capture struct {
	fd      int
	stopped atomic.Bool
	done    chan struct{}
	mu      sync.Mutex
	frames  [][]byte
}

// StartCapture records the frames of dev in ns from the moment it returns.
func StartCapture(ns, dev string) (*Capture, error) {
	all := htons(unix.ETH_P_ALL)
	fd := -1
	err := nsthread.Do(ns, func() error {
		ifi, err := net.InterfaceByName(dev)
		if err != nil {
			return err
		}
		if fd, err = unix.Socket(unix.AF_PACKET, unix.SOCK_RAW|unix.SOCK_CLOEXEC, int(all)); err != nil {
			return err
		}
		return unix.Bind(fd, &unix.SockaddrLinklayer{Protocol: all, Ifindex: ifi.Index})
	})
	if err == nil {
		// A read that waits at most this long lets the reader see Frames'
		// stop after it drained what the socket holds.
		err = unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &unix.Timeval{Usec: 100_000})
	}
	if err != nil {
		if fd >= 0 {
			unix.Close(fd)
		}
		return nil, fmt.Errorf("lab: capture on %s in %s: %w", dev, ns, err)
	}
	c := &Capture{fd: fd, done: make(chan struct{})}
	go c.read()
	return c, nil
}

func (c *Capture) read() {
	defer close(c.done)
	buf := make([]byte, 65536)
	for {
		n, _, err := unix.Recvfrom(c.fd, buf, 0)
		switch {
		case err == nil:
			c.mu.Lock()
			c.frames = append(c.frames, bytes.Clone(buf[:n]))
			c.mu.Unlock()
		case err == unix.EAGAIN || err == unix.EINTR:
			if c.stopped.Load() {
				return
			}
		default:
			return
		}
	}
}

// Frames stops the capture and returns every frame it recorded.
func (c *Capture) Frames() [][]byte {
	c.stopped.Store(true)
	<-c.done
	unix.Close(c.fd)
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.frames
}

// UDPPort reports whether frame is an IPv4 UDP packet from or to port.
func UDPPort(frame []byte, port uint16) bool {
	const eth = 14
	if len(frame) < eth+20 || binary.BigEndian.Uint16(frame[12:]) != unix.ETH_P_IP || frame[eth+9] != unix.IPPROTO_UDP {
		return false
	}
	ihl := int(frame[eth]&0x0f) * 4
	if len(frame) < eth+ihl+4 {
		return false
	}
	udp := frame[eth+ihl:]
	return binary.BigEndian.Uint16(udp) == port || binary.BigEndian.Uint16(udp[2:]) == port
}

func htons(v uint16) uint16 { return v<<8 | v>>8 }
