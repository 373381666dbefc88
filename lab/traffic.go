package lab

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/netip"
	"strings"
	"time"

	"github.com/fabricnet/fabric/internal/nsthread"
)

// ServeTCP listens on addr in namespace ns. Each client first gets one line
// with the source address the server sees (what NAT and policy tests look
// at), then an echo of everything it sends. The caller closes the listener.
func ServeTCP(ns, addr string) (net.Listener, error) {
	var ln net.Listener
	err := nsthread.Do(ns, func() (err error) {
		ln, err = net.Listen(tcpFamily(addr), addr)
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
	err := nsthread.Do(ns, func() (err error) {
		conn, err = d.Dial(tcpFamily(addr), addr)
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

// tcpFamily is "tcp6" for an address written "[v6]:port", else "tcp4".
func tcpFamily(addr string) string {
	if strings.HasPrefix(addr, "[") {
		return "tcp6"
	}
	return "tcp4"
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
// of data, optionally with DF set, for up to 3 s, and waits for a reply. A
// send that the kernel refuses wraps unix.EMSGSIZE, so MTU tests can tell
// "too big" from "lost".
func Ping(ns string, dst netip.Addr, payload int, dontFragment bool) error {
	return ping(context.Background(), ns, dst, 3*time.Second, payload, dontFragment)
}
