package e2e

import (
	"context"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/fabricnet/fabric/lab"

	"github.com/fabricnet/fabric/internal/testreq"
)

// TestDockerIsolationKept: fabric must not open what Docker closes. A
// container on docker0 cannot reach a container on a user-defined Docker
// network (DOCKER-ISOLATION), and a DOCKER-USER rule still applies to
// containers' traffic, exactly as on a host without fabric; containers of
// the fabric still reach each other across hosts.
func TestDockerIsolationKept(t *testing.T) {
	t.Parallel()
	if reason := lab.DockerMissing(); reason != "" {
		testreq.Missing(t, "%s", reason)
	}
	f := newFabric(t, lab.Spec{Hosts: 2})
	hosts := f.startMesh()
	h1 := hosts[0]
	dh := f.startDockerd(h1)
	dh.ctr = "client"
	d := dh.d
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	img, err := f.lab.BusyboxImage(ctx, d, map[string]string{"/bin/tcpprobe": filepath.Join(binDir, "tcpprobe")})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := dh.docker("network", "create", "--subnet", "172.30.0.0/24", "iso"); err != nil {
		t.Fatal(err)
	}
	if _, err := dh.docker("run", "-d", "--name", "isolated", "--network", "iso", img, "tcpprobe", "serve", "0.0.0.0:8000", "1000"); err != nil {
		t.Fatal(err)
	}
	if _, err := dh.docker("run", "-d", "--name", "client", img, "sleep", "3600"); err != nil {
		t.Fatal(err)
	}
	isoIP, err := dh.docker("inspect", "-f", "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}", "isolated")
	if err != nil {
		t.Fatal(err)
	}
	// docker0 -> user-defined network: Docker's isolation drops it.
	if seen, err := dh.dial(isoIP + ":8000"); err == nil {
		t.Errorf("a docker0 container reached %s on the isolated network iso (server saw %s): Docker's isolation is bypassed", isoIP, seen)
	}

	// The fabric still works across hosts: a container of host2 reaches
	// the docker0 container of host1.
	srv := f.container(hosts[1], "srv", 2)
	if _, err := srv.Start("serve", filepath.Join(binDir, "tcpprobe"), "serve", srv.Addr.String()+":8001", "1000"); err != nil {
		t.Fatal(err)
	}
	f.eventually(10*time.Second, "docker0 container reaches host2's container over the fabric", func() error {
		_, err := dh.dial(srv.Addr.String() + ":8001")
		return err
	})

	// DOCKER-USER still applies to containers' traffic that is not the
	// fabric's: an operator's rule there refusing the outside server holds.
	outside, err := f.lab.AddOutside(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if _, err := outside.Start("serve", filepath.Join(binDir, "tcpprobe"), "serve", outside.Addr.String()+":8002", "1000"); err != nil {
		t.Fatal(err)
	}
	target := outside.Addr.String() + ":8002"
	f.eventually(10*time.Second, "docker0 container reaches the outside server", func() error {
		_, err := dh.dial(target)
		return err
	})
	if out, err := h1.Run(context.Background(), "iptables", "-I", "DOCKER-USER", "-i", "docker0", "-d", outside.Addr.String(), "-j", "DROP"); err != nil {
		t.Fatalf("DOCKER-USER rule: %v: %s", err, out)
	}
	if seen, err := dh.dial(target); err == nil {
		t.Errorf("a DOCKER-USER DROP for %s did not apply: the container connected (server saw %s)", outside.Addr, seen)
	}
	out, _ := h1.Run(context.Background(), "iptables", "-S", "FORWARD")
	t.Logf("host1 FORWARD:\n%s", out)
	if !strings.Contains(out, "FABRIC-FORWARD") {
		t.Errorf("FORWARD has no jump to FABRIC-FORWARD")
	}
}
