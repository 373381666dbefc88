package agent

import (
	"context"
	"fmt"
	"os"
	"time"

	"github.com/coreos/go-systemd/v22/daemon"
)

// notify tells systemd one state (sd_notify(3)); without NOTIFY_SOCKET (not
// started by systemd) it does nothing.
func (a *Agent) notify(state string) {
	if _, err := daemon.SdNotify(false, state); err != nil {
		a.log.Warn("cannot tell systemd", "state", state, "err", err)
	}
}

// statusInterval is how often `systemctl status fabricd` gets a new
// STATUS= line.
const statusInterval = 10 * time.Second

// systemdLoop keeps `systemctl status fabricd` saying how the host is
// (STATUS=), and, with WatchdogSec in the unit, pings systemd's watchdog at
// half its interval while the agent's shared state and the data plane answer:
// a deadlock in either stops the pings, and systemd restarts fabricd (which
// keeps the data plane).
func (a *Agent) systemdLoop(ctx context.Context) error {
	if os.Getenv("NOTIFY_SOCKET") == "" {
		return nil // not run by systemd: nobody to tell, no status to compute
	}
	watchdog, err := daemon.SdWatchdogEnabled(false)
	if err != nil {
		a.log.Warn("systemd watchdog setting unreadable; not pinging it", "err", err)
	}
	every := statusInterval
	if watchdog > 0 {
		every = min(every, watchdog/2)
	}
	tick := time.NewTicker(every)
	defer tick.Stop()
	for {
		a.notify("STATUS=" + a.statusLine(ctx))
		if watchdog > 0 {
			if a.answers(watchdog / 2) {
				a.notify(daemon.SdNotifyWatchdog)
			} else {
				a.log.Error("agent state or data plane did not answer; not pinging systemd's watchdog", "within", watchdog/2)
			}
		}
		select {
		case <-ctx.Done():
			return nil
		case <-tick.C:
		}
	}
}

// statusLine is one line on how this host is: its subnet, its sessions, its
// routes.
func (a *Agent) statusLine(ctx context.Context) string {
	up, total := 0, 0
	if peers, err := a.own.speaker.Peers(ctx); err == nil {
		for _, p := range peers {
			total++
			if p.Up() {
				up++
			}
		}
	}
	return fmt.Sprintf("subnet %s; %d of %d BGP peers established; %d routes; encryption %s", a.lease.Subnet, up, total, a.own.dataplane.RouteCount(), a.cfg.Encryption)
}

// answers reports whether the agent's inputs and the data plane can be
// locked within d.
func (a *Agent) answers(d time.Duration) bool {
	done := make(chan struct{})
	go func() {
		a.in.mu.Lock()
		a.in.mu.Unlock()
		a.own.dataplane.Choices()
		close(done)
	}()
	select {
	case <-done:
		return true
	case <-time.After(d):
		return false
	}
}
