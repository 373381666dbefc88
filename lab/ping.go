package lab

import (
	"context"
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"time"

	"golang.org/x/sys/unix"

	"github.com/fabricnet/fabric/internal/nsthread"
)

// Ping sends ICMP echo requests from the host's namespace to dst, one every
// 200 ms, until a reply arrives (nil) or timeout/ctx ends (error). It is done
// in-process, so it needs no ping binary.
func (h *Host) Ping(ctx context.Context, dst netip.Addr, timeout time.Duration) error {
	return ping(ctx, h.Netns, dst, timeout, defaultPayload, false)
}

// PingSize is Ping with payload bytes of ICMP data and the don't-fragment
// bit set, for path MTU checks: the IP packet is payload+28 bytes. A packet
// larger than the path MTU fails with "message too long" once the kernel
// knows the MTU (at once for a local link).
func (h *Host) PingSize(ctx context.Context, dst netip.Addr, payload int, timeout time.Duration) error {
	return ping(ctx, h.Netns, dst, timeout, payload, true)
}

// Ping is Host.Ping from the container's namespace.
func (c *Container) Ping(ctx context.Context, dst netip.Addr, timeout time.Duration) error {
	return ping(ctx, c.Netns, dst, timeout, defaultPayload, false)
}

// PingSize is Host.PingSize from the container's namespace.
func (c *Container) PingSize(ctx context.Context, dst netip.Addr, payload int, timeout time.Duration) error {
	return ping(ctx, c.Netns, dst, timeout, payload, true)
}

const defaultPayload = 56 // as ping(8)

// PingFrom pings dst from the named network namespace ns with payload bytes
// of ICMP data, optionally with don't-fragment set, until a reply of that
// size arrives or timeout ends. A send the kernel refuses as too large
// returns an error wrapping unix.EMSGSIZE, so MTU tests can tell "too big"
// from "lost". Package tests that build their own namespaces use it too.
func PingFrom(ctx context.Context, ns string, dst netip.Addr, timeout time.Duration, payload int, dontFragment bool) error {
	return ping(ctx, ns, dst, timeout, payload, dontFragment)
}

func ping(ctx context.Context, ns string, dst netip.Addr, timeout time.Duration, payload int, dontFragment bool) error {
	if !dst.Is4() {
		return fmt.Errorf("lab: ping: only IPv4, got %v", dst)
	}
	if payload < 0 || payload > 65507 {
		return fmt.Errorf("lab: ping: payload %d out of range", payload)
	}
	fd, err := socketInNamespace(ns, unix.AF_INET, unix.SOCK_RAW, unix.IPPROTO_ICMP)
	if err != nil {
		return fmt.Errorf("lab: ping from %s: %w", ns, err)
	}
	if dontFragment {
		if err := unix.SetsockoptInt(fd, unix.IPPROTO_IP, unix.IP_MTU_DISCOVER, unix.IP_PMTUDISC_DO); err != nil {
			unix.Close(fd)
			return fmt.Errorf("lab: ping: setting don't-fragment: %w", err)
		}
	}
	f := os.NewFile(uintptr(fd), "icmp")
	conn, err := net.FilePacketConn(f)
	f.Close()
	if err != nil {
		return fmt.Errorf("lab: ping from %s: %w", ns, err)
	}
	defer conn.Close()

	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	deadline, _ := ctx.Deadline()
	go func() { <-ctx.Done(); _ = conn.SetDeadline(time.Now()) }()

	var idBytes [2]byte
	_, _ = rand.Read(idBytes[:])
	id := binary.BigEndian.Uint16(idBytes[:])
	to := &net.IPAddr{IP: net.IP(dst.AsSlice())}
	buf := make([]byte, 65536)
	for seq := uint16(1); ; seq++ {
		_, err := conn.WriteTo(echoRequest(id, seq, payload), to)
		if errors.Is(err, unix.EMSGSIZE) {
			return fmt.Errorf("lab: ping %v from %s with %d bytes and don't-fragment: %w", dst, ns, payload+28, err)
		}
		if err != nil && ctx.Err() == nil {
			// "network unreachable" and friends: retry until the deadline, the
			// route may be on its way.
			select {
			case <-ctx.Done():
			case <-time.After(200 * time.Millisecond):
				continue
			}
		}
		next := time.Now().Add(200 * time.Millisecond)
		if next.After(deadline) {
			next = deadline
		}
		_ = conn.SetReadDeadline(next)
		for {
			n, from, err := conn.ReadFrom(buf)
			if err != nil {
				break // read deadline: send the next request
			}
			src, ok := from.(*net.IPAddr)
			if !ok || !src.IP.Equal(to.IP) {
				continue
			}
			if isEchoReply(buf[:n], id, payload) {
				return nil
			}
		}
		if ctx.Err() != nil {
			return fmt.Errorf("lab: ping %v from %s: no reply within %s", dst, ns, timeout)
		}
	}
}

func echoRequest(id, seq uint16, payload int) []byte {
	b := make([]byte, 8+payload)
	b[0] = 8 // echo request
	binary.BigEndian.PutUint16(b[4:], id)
	binary.BigEndian.PutUint16(b[6:], seq)
	for i := 8; i < len(b); i++ {
		b[i] = byte(i)
	}
	binary.BigEndian.PutUint16(b[2:], icmpChecksum(b))
	return b
}

// isEchoReply reports whether b is the reply to our request: our id and
// the full payload back.
func isEchoReply(b []byte, id uint16, payload int) bool {
	// Raw sockets may or may not hand us the IPv4 header; skip it if present.
	if len(b) >= 20 && b[0]>>4 == 4 {
		ihl := int(b[0]&0x0f) * 4
		if len(b) < ihl {
			return false
		}
		b = b[ihl:]
	}
	return len(b) == 8+payload && b[0] == 0 && binary.BigEndian.Uint16(b[4:]) == id
}

func icmpChecksum(b []byte) uint16 {
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

// socketInNamespace opens a socket inside named namespace ns.
func socketInNamespace(ns string, domain, typ, proto int) (int, error) {
	fd := -1
	err := nsthread.Do(ns, func() (err error) {
		fd, err = unix.Socket(domain, typ|unix.SOCK_CLOEXEC, proto)
		return err
	})
	if err != nil && fd >= 0 {
		unix.Close(fd)
		fd = -1
	}
	return fd, err
}
