package qemulane

import (
	"context"
	"go/parser"
	"go/token"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"
)

// etcd for the VM: Debian's etcd-server 3.4 needs only the C library.
const (
	hostEtcd   = "/usr/bin/etcd"
	hostLibc   = "/lib/x86_64-linux-gnu/libc.so.6"
	hostLdso   = "/lib64/ld-linux-x86-64.so.2"
	probePkg   = "github.com/fabricnet/fabric/probe"
	laneMemory = 1024
)

// autoFallbackWired reports whether fabricd's auto mode has the per-peer
// probe that moves a peer to vxlan when IP protocol 4 stops passing: the
// agent package imports the probe package. FABRIC_LANE_AUTO=1 forces the
// phase, =0 skips it.
func autoFallbackWired(t *testing.T) (bool, string) {
	switch os.Getenv("FABRIC_LANE_AUTO") {
	case "1":
		return true, "forced by FABRIC_LANE_AUTO=1"
	case "0":
		return false, "skipped by FABRIC_LANE_AUTO=0"
	}
	files, _ := filepath.Glob("../agent/*.go")
	fset := token.NewFileSet()
	for _, f := range files {
		if strings.HasSuffix(f, "_test.go") {
			continue
		}
		af, err := parser.ParseFile(fset, f, nil, parser.ImportsOnly)
		if err != nil {
			continue
		}
		for _, imp := range af.Imports {
			if p, _ := strconv.Unquote(imp.Path.Value); p == probePkg {
				return true, "agent imports " + probePkg
			}
		}
	}
	return false, "fabricd's auto mode has no per-peer IPIP probe yet (package agent does not import " + probePkg +
		"; dataplane.Config.Prober is left at its always-true default), so IPIP loss cannot move a peer to VXLAN"
}

// TestFabricdIPIPLane runs the real fabricd, fabricctl and etcd in the VM:
// three hosts (two on one segment, one behind a router), BGP full mesh,
// kernel IPIP routes and container traffic; then auto mode with the router
// blackholing IP protocol 4.
func TestFabricdIPIPLane(t *testing.T) {
	if err := Available(); err != nil {
		t.Skipf("kernel-IPIP lane needs qemu, a stock kernel and busybox-static: %v", err)
	}
	for _, f := range []string{hostEtcd, hostLibc, hostLdso} {
		if _, err := os.Stat(f); err != nil {
			t.Fatalf("%s: %v (the fabricd lane runs Debian's etcd in the VM: apt-get install -y etcd-server)", f, err)
		}
	}
	kernel, _, err := FindKernel()
	if err != nil {
		t.Fatal(err)
	}
	autoWired, autoWhy := autoFallbackWired(t)
	phases := "ipip"
	if autoWired {
		phases = "ipip,auto"
	}

	// FABRIC_LANE_NO_TUNL0=1 is a diagnostic: lab namespaces get no tunl0
	// fallback device, hiding a probe that collides with it.
	extra := ""
	if os.Getenv("FABRIC_LANE_NO_TUNL0") == "1" {
		extra = " -no-fallback-tunnels"
	}

	dir := t.TempDir()
	start := time.Now()
	bins := map[string]string{}
	for _, pkg := range []string{"cmd/fabricd", "cmd/fabricctl", "qemulane/cmd/fabriclane"} {
		out := filepath.Join(dir, filepath.Base(pkg))
		if err := BuildGoStatic("github.com/fabricnet/fabric/"+pkg, out); err != nil {
			t.Fatal(err)
		}
		bins["/bin/"+filepath.Base(pkg)] = out
	}
	buildTime := time.Since(start)
	bins["/usr/bin/etcd"] = hostEtcd
	bins["/lib/x86_64-linux-gnu/libc.so.6"] = hostLibc
	bins["/lib64/ld-linux-x86-64.so.2"] = hostLdso
	initrd, err := Build(dir, Image{
		Kernel:   kernel,
		Modules:  laneModules,
		Binaries: bins,
		Init:     "/bin/fabriclane -prefix fl -phases " + phases + extra + "\n",
	})
	if err != nil {
		t.Fatal(err)
	}
	if fi, err := os.Stat(initrd); err == nil {
		t.Logf("binaries built in %s, image %.1f MB in %s; phases %s (auto: %s)", buildTime.Round(time.Millisecond),
			float64(fi.Size())/(1<<20), (time.Since(start) - buildTime).Round(time.Millisecond), phases, autoWhy)
	}

	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	res, err := Run(ctx, kernel, initrd, RunOptions{MemoryMB: laneMemory, Timeout: 240 * time.Second})
	t.Logf("VM ran %s (kernel uptime at /init: %s)", res.Duration.Round(time.Millisecond), res.BootToInit)
	evidence := []string{"QEMULANE-INIT:", "PHASE", "ETCD ", "FABRICD ", "STATUS ", "HOST ", "BRIDGE ", "MEM ",
		"CONTAINER ", "PEERS ", "ROUTE ", "PING ", "TCP ", "UNDERLAY ", "FABRICCTL ", "RULE ", "FALLBACK ",
		"RESTORED ", "CLEANUP ", "FAILED ", "LOG ", "WORKAROUND "}
	for _, line := range res.Lines("") {
		for _, prefix := range evidence {
			if strings.HasPrefix(line, prefix) {
				t.Log(line)
				break
			}
		}
	}
	if err != nil {
		t.Fatal(err)
	}

	// count returns how many lines start with kind and phase.
	count := func(kind, phase, contains string) int {
		n := 0
		for _, l := range res.Lines(kind + " " + phase + " ") {
			if strings.Contains(l, contains) {
				n++
			}
		}
		return n
	}
	phasePassed := func(t *testing.T, phase string) {
		if len(res.Lines("PHASE-RESULT "+phase+" PASS")) == 0 {
			t.Fatalf("phase %s did not pass: %v", phase, res.Lines("PHASE-RESULT "+phase))
		}
	}

	t.Run("ipip", func(t *testing.T) {
		phasePassed(t, "ipip")
		for _, c := range []struct {
			kind, contains string
			want           int
		}{
			{"PEERS", "state=established encapsulation=ipip", 6},
			{"ROUTE", "dev fabric.ipip proto 93 onlink", 6},
			{"PING", "mesh", 6},
			{"TCP", "mesh", 6},
			{"UNDERLAY", "mesh", 2},
			{"FABRICCTL", "host1 peers status |", 3},
			{"FABRICCTL", "host1 routes |", 3},
			{"CLEANUP", "fabricd --cleanup removed", 3},
		} {
			if got := count(c.kind, "ipip", c.contains); got < c.want {
				t.Errorf("want %d %s lines containing %q in phase ipip, got %d", c.want, c.kind, c.contains, got)
			}
		}
	})
	t.Run("auto-fallback", func(t *testing.T) {
		if !autoWired {
			t.Skipf("waits for the auto-mode IPIP probe in fabricd: %s", autoWhy)
		}
		phasePassed(t, "auto")
		for _, c := range []struct {
			kind, contains string
			want           int
		}{
			{"PEERS", "state=established encapsulation=vxlan", 4}, // the routed pairs while blocked
			{"FALLBACK", "on vxlan", 1},
			{"ROUTE", "dev fabric.vxlan", 4},
			{"PING", "blocked", 6},
			{"TCP", "blocked", 6},
			{"RESTORED", "back on ipip", 1},
			{"PING", "restored", 6},
			{"TCP", "restored", 6},
		} {
			if got := count(c.kind, "auto", c.contains); got < c.want {
				t.Errorf("want %d %s lines containing %q in phase auto, got %d", c.want, c.kind, c.contains, got)
			}
		}
	})
	if !res.Passed() {
		t.Fatalf("VM verdict %s: %s", res.Verdict, res.Reason)
	}
}
