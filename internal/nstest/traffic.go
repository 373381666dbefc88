package nstest

import (
	"crypto/rand"
	"encoding/binary"
	"fmt"
	"io"
	"net"
	"net/netip"
	"time"

	"golang.org/x/sys/unix"
)

// ServeTCP listens on addr in namespace ns. Each client first gets one line
// with the source address the server sees (what NAT and policy tests look
// at), then an echo of everything it sends. The caller closes the listener.
func ServeTCP(ns, addr string) (net.Listener, error) {
	var ln net.Listener
	err := InNS(ns, func() (err error) {
		ln, err = net.Listen("tcp4", addr)
		return err
	})
	if err != nil {
		return nil, err
	}
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				host, _, _ := net.SplitHostPort(c.RemoteAddr().String())
				if _, err := fmt.Fprintf(c, "%s\n", host); err != nil {
					return
				}
				io.Copy(c, c)
			}()
		}
	}()
	return ln, nil
}

// DialTCP connects from namespace ns to a ServeTCP server at addr, from
// local address src unless it is empty, and returns the connection and the
// source address the server reports. Only a server that answers counts as
// reached: a greeting that does not come is an error (wrapping io.EOF if
// the server hung up). The connection's deadline is timeout from now.
func DialTCP(ns, src, addr string, timeout time.Duration) (net.Conn, string, error) {
	d := net.Dialer{Timeout: timeout}
	if src != "" {
		d.LocalAddr = &net.TCPAddr{IP: net.ParseIP(src)}
	}
	var conn net.Conn
	err := InNS(ns, func() (err error) {
		conn, err = d.Dial("tcp4", addr)
		return err
	})
	if err != nil {
		return nil, "", err
	}
	conn.SetDeadline(time.Now().Add(timeout))
	line, err := readLine(conn)
	if err != nil {
		conn.Close()
		return nil, "", fmt.Errorf("greeting from %s: %w", addr, err)
	}
	return conn, line, nil
}

// readLine reads up to a newline one byte at a time, so nothing after the
// greeting is taken from the connection.
func readLine(r io.Reader) (string, error) {
	var line []byte
	b := make([]byte, 1)
	for len(line) < 256 {
		if _, err := r.Read(b); err != nil {
			return "", err
		}
		if b[0] == '\n' {
			return string(line), nil
		}
		line = append(line, b[0])
	}
	return "", fmt.Errorf("no newline in %q", line)
}

// Ping sends ICMP echo requests from namespace ns to dst with payload bytes
// of data, optionally with DF set, and waits for a reply. A send that the
// kernel refuses (EMSGSIZE) is returned as is, so MTU tests can tell "too
// big" from "lost".
func Ping(ns string, dst netip.Addr, payload int, dontFragment bool) error {
	var fd int
	err := InNS(ns, func() error {
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

// checksum is the Internet checksum (RFC 1071) of b.
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
