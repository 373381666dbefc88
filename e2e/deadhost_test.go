package e2e

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/fabricnet/fabric/lab"
)

// TestDeadHostRoutedAround: a host whose underlay link goes down says
// nothing to anyone (a power cut, a cable). With the default settings the
// other hosts must stop routing to it once the BGP hold time has passed,
// not keep its routes for the whole graceful-restart time: a dead host is
// not a restarting one.
func TestDeadHostRoutedAround(t *testing.T) {
	t.Parallel()
	f := newFabric(t, lab.Spec{Hosts: 3})
	hosts := f.startMesh()
	dead := hosts[2]
	deadSubnet := f.subnet(dead)
	const hold = 9 * time.Second // fabricd's default hold time
	ctx := context.Background()
	if _, err := dead.Run(ctx, "ip", "link", "set", dead.Dev, "down"); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	for _, h := range hosts[:2] {
		f.eventually(hold+20*time.Second, h.Name+" stops routing to the dead "+dead.Name, func() error {
			if via, ok := f.ownedRoutes(h)[deadSubnet.String()]; ok {
				return fmt.Errorf("%s still routes %s: %s", h.Name, deadSubnet, via)
			}
			return nil
		})
		t.Logf("%s routed around the dead host %.1fs after its link went down", h.Name, time.Since(start).Seconds())
	}
}
