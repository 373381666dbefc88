package qemulane

import (
	"bytes"
	"context"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/fabricnet/fabric/internal/testreq"
)

// laneModules are what ipipcheck needs: ipip for the data plane under test,
// veth and bridge for the lab, vxlan for the fallback the lead adds later.
var laneModules = []string{"ipip", "veth", "bridge", "vxlan"}

func TestIPIPKernelLane(t *testing.T) {
	if err := Available(); err != nil {
		testreq.Missing(t, "kernel-IPIP lane needs qemu, a stock kernel and busybox-static: %v", err)
	}
	kernel, modDir, err := FindKernel()
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	start := time.Now()
	check := filepath.Join(dir, "ipipcheck")
	if err := BuildGoStatic("./cmd/ipipcheck", check); err != nil {
		t.Fatal(err)
	}
	initrd, err := Build(dir, Image{
		Kernel:   kernel,
		Modules:  laneModules,
		Binaries: map[string]string{"/bin/ipipcheck": check},
		Init:     "/bin/ipipcheck -prefix ql-\n",
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("kernel %s (modules %s), image built in %s", kernel, modDir, time.Since(start).Round(time.Millisecond))

	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	res, err := Run(ctx, kernel, initrd, RunOptions{Timeout: 150 * time.Second})
	t.Logf("VM ran %s (kernel uptime at /init: %s)", res.Duration.Round(time.Millisecond), res.BootToInit)
	logEvidence(t, res, "QEMULANE-INIT:", "PHASE ", "HOST ", "PING ", "TCP ", "UNDERLAY ", "IPIP ", "RULE ",
		"BLOCKED ", "UNAFFECTED ", "BLOCK ", "RESTORED ", "CLEANUP ", "FAILED ")
	if err != nil {
		t.Fatal(err)
	}
	if !res.Passed() {
		t.Fatalf("VM verdict %s: %s\nconsole:\n%s", res.Verdict, res.Reason, res.Output)
	}
	// Evidence the lead relies on: every pair, and IPIP on the wire.
	if got := len(res.Lines("PING ")); got < 6 {
		t.Errorf("want 6 PING lines, got %d", got)
	}
	if got := len(res.Lines("TCP ")); got < 6 {
		t.Errorf("want 6 TCP lines, got %d", got)
	}
	if len(res.Lines("UNDERLAY ")) == 0 || len(res.Lines("RESTORED ")) == 0 {
		t.Errorf("missing UNDERLAY or RESTORED evidence")
	}
}

// TestRunTimeoutKillsQEMU checks that a hung guest costs the timeout, not more.
func TestRunTimeoutKillsQEMU(t *testing.T) {
	if err := Available(); err != nil {
		testreq.Missing(t, "needs qemu, a stock kernel and busybox-static: %v", err)
	}
	initrd, err := Build(t.TempDir(), Image{Init: "sleep 600\n"})
	if err != nil {
		t.Fatal(err)
	}
	kernel, _, _ := FindKernel()
	start := time.Now()
	res, err := Run(context.Background(), kernel, initrd, RunOptions{Timeout: 2 * time.Second})
	if err == nil || res.Verdict != VerdictNone {
		t.Fatalf("want a timeout error and no verdict, got %v, %q", err, res.Verdict)
	}
	if elapsed := time.Since(start); elapsed > 10*time.Second {
		t.Fatalf("Run returned after %s, qemu was not killed promptly", elapsed)
	}
	t.Logf("timed out as expected: %v", strings.SplitN(err.Error(), "\n", 2)[0])
}

func TestResolveModulesOrder(t *testing.T) {
	_, modDir, err := FindKernel()
	if err != nil {
		testreq.Missing(t, "no stock kernel modules installed: %v", err)
	}
	mods, err := ResolveModules(modDir, laneModules)
	if err != nil {
		t.Fatal(err)
	}
	pos := map[string]int{}
	for i, m := range mods {
		pos[m.Name] = i
	}
	for _, dep := range [][2]string{{"tunnel4", "ipip"}, {"ip_tunnel", "ipip"}, {"llc", "stp"}, {"stp", "bridge"},
		{"udp_tunnel", "vxlan"}, {"ip6_udp_tunnel", "vxlan"}} {
		before, after := dep[0], dep[1]
		pb, okb := pos[before]
		pa, oka := pos[after]
		if !okb || !oka || pb > pa {
			t.Errorf("want %s before %s, got order %v", before, after, mods)
		}
	}
	if _, err := ResolveModules(modDir, []string{"no_such_module_qemulane"}); err == nil {
		t.Error("unknown module resolved without error")
	}
}

// TestCpioNewc parses the archive back to check the format the kernel expects.
func TestCpioNewc(t *testing.T) {
	a := newCpioArchive()
	a.addFile("/bin/hello", 0o755, []byte("hi!"))
	a.addSymlink("var/run", "/run")
	a.addCharDev("dev/console", 5, 1)
	var buf bytes.Buffer
	if err := a.write(&buf); err != nil {
		t.Fatal(err)
	}
	data := buf.Bytes()
	got := map[string]string{}
	for off := 0; ; {
		if off%4 != 0 {
			t.Fatalf("entry at unaligned offset %d", off)
		}
		h := string(data[off : off+110])
		if !strings.HasPrefix(h, "070701") {
			t.Fatalf("bad magic at %d: %q", off, h[:6])
		}
		field := func(i int) int {
			v, err := strconv.ParseUint(h[6+8*i:14+8*i], 16, 32)
			if err != nil {
				t.Fatal(err)
			}
			return int(v)
		}
		mode, size, nameSize := field(1), field(6), field(11)
		name := string(data[off+110 : off+110+nameSize-1])
		off = align4(off + 110 + nameSize)
		content := string(data[off : off+size])
		off = align4(off + size)
		if name == "TRAILER!!!" {
			break
		}
		got[name] = strconv.FormatInt(int64(mode), 8) + " " + content
	}
	want := map[string]string{
		"bin": "40755 ", "bin/hello": "100755 hi!", "var": "40755 ", "var/run": "120777 /run",
		"dev": "40755 ", "dev/console": "20600 ",
	}
	for k, v := range want {
		if got[k] != v {
			t.Errorf("%s: got %q, want %q", k, got[k], v)
		}
	}
	if len(got) != len(want) {
		t.Errorf("entries %v, want %v", got, want)
	}
}

func align4(n int) int { return (n + 3) &^ 3 }

// logEvidence logs, in console order, the VM's lines that start with one of
// prefixes: what the lane proved, readable in the test output.
func logEvidence(t *testing.T, res Result, prefixes ...string) {
	t.Helper()
	for _, line := range res.Lines("") {
		for _, prefix := range prefixes {
			if strings.HasPrefix(line, prefix) {
				t.Log(line)
				break
			}
		}
	}
}
