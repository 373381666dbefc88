package e2e

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/fabricnet/fabric/lab"
)

// TestBIRDTopOfRack peers every host with BIRD 2 acting as a top-of-rack
// router (eBGP, AS 65000): BIRD learns every host's subnet with the host as
// next hop, and the aggregate BIRD originates is installed on the hosts.
func TestBIRDTopOfRack(t *testing.T) {
	if _, err := exec.LookPath("bird"); err != nil {
		t.Skip("bird not installed (apt-get install bird2; make test installs it)")
	}
	f := newFabric(t, lab.Spec{Hosts: 3})
	ctx := context.Background()
	tor, err := f.lab.AddOutside(ctx)
	if err != nil {
		t.Fatal(err)
	}
	dir := filepath.Join(f.lab.LogDir(), "bird")
	os.MkdirAll(dir, 0o755)
	conf := fmt.Sprintf(`router id %s;
log stderr all;
protocol device {}
protocol static { ipv4; route 10.250.0.0/16 blackhole; }
template bgp host { local %s as 65000; hold time 9; keepalive time 3; connect retry time 2; ipv4 { import all; export all; }; }
`, tor.Addr, tor.Addr)
	for _, h := range f.lab.Hosts() {
		conf += fmt.Sprintf("protocol bgp %s from host { neighbor %s as 64512; }\n", h.Name, h.Addr)
	}
	confPath := filepath.Join(dir, "bird.conf")
	sock := filepath.Join(dir, "bird.ctl")
	os.WriteFile(confPath, []byte(conf), 0o644)
	if _, err := tor.Start("bird", "bird", "-f", "-c", confPath, "-s", sock, "-P", filepath.Join(dir, "bird.pid")); err != nil {
		t.Fatal(err)
	}

	peerFile := filepath.Join(dir, "fabricd.yaml")
	os.WriteFile(peerFile, []byte(fmt.Sprintf("peers:\n- name: tor\n  address: %s\n  asn: 65000\n", tor.Addr)), 0o644)
	for _, h := range f.lab.Hosts() {
		f.start(h, "--config", peerFile)
	}

	// BIRD learns every host's subnet, next hop = the host.
	for _, h := range f.lab.Hosts() {
		sub := f.subnet(h)
		f.eventually(30*time.Second, "BIRD learns "+sub.String(), func() error {
			out, err := tor.Run(ctx, "birdc", "-s", sock, "show", "route", "for", sub.Addr().Next().String(), "all")
			if err != nil {
				return err
			}
			if !strings.Contains(out, sub.String()) || !strings.Contains(out, h.Addr.String()) {
				return fmt.Errorf("birdc: %s", out)
			}
			return nil
		})
	}
	out, _ := tor.Run(ctx, "birdc", "-s", sock, "show", "route")
	t.Logf("birdc show route:\n%s", out)

	// Every host installs BIRD's aggregate via BIRD, and its peers status
	// shows the external peer.
	for _, h := range f.lab.Hosts() {
		f.eventually(15*time.Second, h.Name+" installs 10.250.0.0/16", func() error {
			r, ok := f.ownedRoutes(h)["10.250.0.0/16"]
			if !ok || !strings.Contains(r, "via "+tor.Addr.String()) {
				return fmt.Errorf("owned routes: %v", f.ownedRoutes(h))
			}
			return nil
		})
	}
	st, _ := f.fabricctl(f.lab.Hosts()[0], "peers", "status")
	t.Logf("peers status:\n%s", st)
	if !strings.Contains(st, "tor") || !strings.Contains(st, "external") {
		t.Errorf("peers status lacks the external peer tor:\n%s", st)
	}
	rs, _ := f.fabricctl(f.lab.Hosts()[0], "routes")
	t.Logf("routes:\n%s", rs)
}
