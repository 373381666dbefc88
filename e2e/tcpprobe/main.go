// tcpprobe is the tests' TCP endpoint: `tcpprobe serve ADDR:PORT N` answers N
// connections with the peer address it saw; `tcpprobe dial ADDR:PORT` prints
// the answer. It lets a test check that a connection works and which source
// address the receiver saw.
package main

import (
	"bufio"
	"fmt"
	"net"
	"os"
	"strconv"
	"time"
)

func main() {
	if len(os.Args) < 3 {
		fmt.Fprintln(os.Stderr, "usage: tcpprobe serve ADDR:PORT [N] | dial ADDR:PORT")
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
	default:
		os.Exit(2)
	}
}
