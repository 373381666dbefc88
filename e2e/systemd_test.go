package e2e

import (
	"net"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/fabricnet/fabric/internal/testwait"
	"github.com/fabricnet/fabric/lab"
)

// TestSystemdWatchdogAndStatus: what systemd hears from fabricd over the
// sd_notify socket with WatchdogSec set (WATCHDOG_USEC): READY=1, STATUS=
// lines that count the established peers, WATCHDOG=1 pings within the
// interval, STOPPING=1 at a stop. (TestSystemdNotify checks READY=1 comes
// only once the host side is in place.)
func TestSystemdWatchdogAndStatus(t *testing.T) {
	t.Parallel()
	f := newFabric(t, lab.Spec{Hosts: 2})
	hosts := f.lab.Hosts()
	f.start(hosts[1])
	sock := filepath.Join(t.TempDir(), "notify.sock")
	conn, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: sock, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	h := hosts[0]
	const watchdog = 2 * time.Second
	p, err := h.StartEnv("fabricd", []string{"NOTIFY_SOCKET=" + sock, "WATCHDOG_USEC=2000000"},
		f.fabricdArgs(h, filepath.Join(f.lab.LogDir(), h.Name+"-run"))...)
	if err != nil {
		t.Fatal(err)
	}
	defer p.Stop()

	var pings []time.Time
	seen := map[string]string{} // kind -> last message
	deadline := time.Now().Add(testwait.Scale(30 * time.Second))
	buf := make([]byte, 4096)
	for time.Now().Before(deadline) && (len(pings) < 3 || !strings.Contains(seen["STATUS"], "1 of 1 BGP peers established")) {
		conn.SetReadDeadline(deadline)
		n, err := conn.Read(buf)
		if err != nil {
			break
		}
		msg := string(buf[:n])
		kind, _, _ := strings.Cut(msg, "=")
		seen[kind] = msg
		if msg == "WATCHDOG=1" {
			pings = append(pings, time.Now())
		}
	}
	if seen["READY"] != "READY=1" {
		t.Errorf("no READY=1; heard %v", seen)
	}
	if !strings.Contains(seen["STATUS"], "1 of 1 BGP peers established") {
		t.Errorf("STATUS never said the peer is established; last %q", seen["STATUS"])
	}
	if len(pings) < 3 {
		t.Fatalf("%d watchdog pings within %s (WatchdogSec %s)", len(pings), testwait.Scale(30*time.Second), watchdog)
	}
	for i := 1; i < len(pings); i++ {
		if gap := pings[i].Sub(pings[i-1]); gap >= watchdog {
			t.Errorf("watchdog pings %s apart, want within WatchdogSec %s", gap, watchdog)
		}
	}
	if err := p.Stop(); err != nil {
		t.Fatal(err)
	}
	conn.SetReadDeadline(time.Now().Add(testwait.Scale(5 * time.Second)))
	for {
		n, err := conn.Read(buf)
		if err != nil {
			t.Fatalf("no STOPPING=1 after the stop: %v", err)
		}
		if string(buf[:n]) == "STOPPING=1" {
			break
		}
	}
}
