package e2e

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/fabricnet/fabric/lab"
)

// TestDeadHostRoutedAround: a host whose underlay link goes down says
// nothing to anyone (a power cut, a cable). With BFD (the default) the
// other hosts stop routing to it well before a BGP hold time could pass;
// with BFD off, once the hold time has passed and its node record expired,
// not after the whole graceful-restart time: a dead host is not a
// restarting one. make bench (-only failover) measures the times.
func TestDeadHostRoutedAround(t *testing.T) {
	t.Parallel()
	const hold = 9 * time.Second // fabricd's default hold time
	for _, tc := range []struct {
		name   string
		bfd    bool
		args   []string
		within time.Duration
	}{
		{"bfd", true, nil, hold / 2},
		{"no bfd", false, []string{"--bfd-interval", "0"}, hold + 10*time.Second},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			took := deadHostRoutedAround(t, tc.bfd, tc.within, tc.args...)
			t.Logf("every host routed around the dead host %.2fs after its link went down", took.Seconds())
		})
	}
}

// deadHostRoutedAround sets the underlay link of one of three hosts down
// and returns how long until both others had no route to its subnet.
func deadHostRoutedAround(t *testing.T, bfd bool, within time.Duration, args ...string) time.Duration {
	f := newFabric(t, lab.Spec{Hosts: 3}, args...)
	hosts := f.startMesh()
	dead := hosts[2]
	deadSubnet := f.subnet(dead)
	if bfd {
		// Up, on the fast timers (3 × 200 ms), not the start-up pace.
		for _, h := range hosts[:2] {
			f.eventually(20*time.Second, h.Name+"'s BFD session with "+dead.Name+" up", func() error {
				ps, err := f.peers(h)
				if err != nil {
					return err
				}
				for _, p := range ps {
					if p.Name == dead.Name && p.BFD == "up" && p.BFDDetect == 600*time.Millisecond {
						return nil
					}
				}
				return fmt.Errorf("peers %+v", ps)
			})
		}
	}
	if _, err := dead.Run(context.Background(), "ip", "link", "set", dead.Dev, "down"); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	for _, h := range hosts[:2] {
		f.eventually(within, h.Name+" stops routing to the dead "+dead.Name, func() error {
			if via, ok := f.ownedRoutes(h)[deadSubnet.String()]; ok {
				return fmt.Errorf("%s still routes %s: %s", h.Name, deadSubnet, via)
			}
			return nil
		})
	}
	return time.Since(start)
}
