// tcpprobe is the tests' TCP endpoint: `tcpprobe serve ADDR:PORT N` answers N
// connections with the peer address it saw; `tcpprobe dial ADDR:PORT` prints
// the answer. It lets a test check that a connection works and which source
// address the receiver saw. `tcpprobe get URL` prints the body of an HTTP GET
// (and fails unless the status is 200), for scraping fabricd's metrics from
// inside a lab namespace. `serve-udp ADDR:PORT` and `dial-udp ADDR:PORT` do
// the same over UDP: each datagram is answered with the address it came from;
// `udp-rounds ADDR:PORT N` sends N datagrams from one socket, one at a time,
// and prints how many were answered.
package main

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"strconv"
	"time"
)

func main() {
	if len(os.Args) < 3 {
		fmt.Fprintln(os.Stderr, "usage: tcpprobe serve ADDR:PORT [N] | dial ADDR:PORT | serve-udp ADDR:PORT | dial-udp ADDR:PORT | udp-rounds ADDR:PORT N | get URL")
		os.Exit(2)
	}
	switch os.Args[1] {
	case "serve":
		n := 1
		if len(os.Args) > 3 {
			n, _ = strconv.Atoi(os.Args[3])
		}
		ln, err := net.Listen("tcp", os.Args[2])
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		fmt.Println("listening")
		for i := 0; i < n; i++ {
			c, err := ln.Accept()
			if err != nil {
				os.Exit(1)
			}
			host, _, _ := net.SplitHostPort(c.RemoteAddr().String())
			fmt.Fprintf(c, "seen-from %s\n", host)
			c.Close()
		}
	case "dial":
		c, err := net.DialTimeout("tcp", os.Args[2], 3*time.Second)
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		c.SetDeadline(time.Now().Add(3 * time.Second))
		line, err := bufio.NewReader(c).ReadString('\n')
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		fmt.Print(line)
	case "serve-udp":
		pc, err := net.ListenPacket("udp", os.Args[2])
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		fmt.Println("listening")
		buf := make([]byte, 1500)
		for {
			_, from, err := pc.ReadFrom(buf)
			if err != nil {
				os.Exit(1)
			}
			host, _, _ := net.SplitHostPort(from.String())
			pc.WriteTo([]byte("seen-from "+host+"\n"), from)
		}
	case "dial-udp":
		c, err := net.Dial("udp", os.Args[2])
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		// Datagrams may be lost: ask a few times.
		buf := make([]byte, 1500)
		for try := 0; try < 3; try++ {
			c.Write([]byte("hello\n"))
			c.SetReadDeadline(time.Now().Add(time.Second))
			if n, err := c.Read(buf); err == nil {
				fmt.Print(string(buf[:n]))
				return
			}
		}
		fmt.Fprintln(os.Stderr, "no UDP answer from", os.Args[2])
		os.Exit(1)
	case "udp-rounds":
		// N round trips on one socket (one connection to conntrack),
		// each waiting for its answer; prints how many were answered.
		n := 1
		if len(os.Args) > 3 {
			n, _ = strconv.Atoi(os.Args[3])
		}
		c, err := net.Dial("udp", os.Args[2])
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		buf, answered := make([]byte, 1500), 0
		for i := 0; i < n; i++ {
			c.Write([]byte("hello\n"))
			c.SetReadDeadline(time.Now().Add(time.Second))
			if _, err := c.Read(buf); err == nil {
				answered++
			}
		}
		fmt.Printf("answered %d of %d\n", answered, n)
	case "get":
		resp, err := (&http.Client{Timeout: 5 * time.Second}).Get(os.Args[2])
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		defer resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			fmt.Fprintln(os.Stderr, resp.Status)
			os.Exit(1)
		}
		if _, err := io.Copy(os.Stdout, resp.Body); err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
	default:
		os.Exit(2)
	}
}
