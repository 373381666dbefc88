// Package sdnotify tells systemd about fabricd's state (sd_notify(3)): a
// Type=notify unit is started only once fabricd says READY=1, so units
// ordered after it (dockerd) find the lease, the bridge and the docker
// options file in place.
package sdnotify

import (
	"fmt"
	"net"
	"os"
)

// Ready is sent once the host side is in place.
const Ready = "READY=1"

// Stopping is sent when fabricd begins to stop.
const Stopping = "STOPPING=1"

// Send sends state to the socket in $NOTIFY_SOCKET. Without it (not started
// by systemd) it does nothing and returns nil.
func Send(state string) error {
	path := os.Getenv("NOTIFY_SOCKET")
	if path == "" {
		return nil
	}
	if path[0] == '@' { // an abstract socket
		path = "\x00" + path[1:]
	}
	conn, err := net.DialUnix("unixgram", nil, &net.UnixAddr{Name: path, Net: "unixgram"})
	if err != nil {
		return fmt.Errorf("sd_notify %s: %w", os.Getenv("NOTIFY_SOCKET"), err)
	}
	defer conn.Close()
	if _, err := conn.Write([]byte(state)); err != nil {
		return fmt.Errorf("sd_notify %s: %w", os.Getenv("NOTIFY_SOCKET"), err)
	}
	return nil
}
