package qemulane

import (
	"bytes"
	"context"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/fabricnet/fabric/internal/testreq"
)

// TestRunTimeoutKillsQEMU checks that a hung guest costs the timeout, not more.
func TestRunTimeoutKillsQEMU(t *testing.T) {
	testreq.Lab(t, "booting a VM")
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
	mods, err := ResolveModules(modDir, FabricModules)
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

// The watch stops the VM on the first report of a CPU stuck at least its
// limit, also when the report arrives in pieces, and not on a shorter one
// (a busy host can starve the guest for a while).
func TestLockupWatch(t *testing.T) {
	for _, tc := range []struct {
		name   string
		writes []string
		want   string
	}{
		{"short lockup", []string{"[  124.77] watchdog: BUG: soft lockup - CPU#0 stuck for 23s! [ksoftirqd/0:14]\n"}, ""},
		{"long lockup", []string{"x\n[  236.98] watchdog: BUG: soft lockup - CPU#1 stuck for 126s! [kworker/1:0:22]\nafter\n"},
			"[  236.98] watchdog: BUG: soft lockup - CPU#1 stuck for 126s! [kworker/1:0:22]"},
		{"in pieces", []string{"[ 1.0] watchdog: BUG: soft lock", "up - CPU#0 stuck for 200", "s! [k]\n"}, "[ 1.0] watchdog: BUG: soft lockup - CPU#0 stuck for 200s! [k]"},
		{"no newline yet", []string{"soft lockup - CPU#0 stuck for 500s!"}, "soft lockup - CPU#0 stuck for 500s!"},
		{"other noise", []string{"stuck for 500s!\nrcu: INFO: rcu_preempt self-detected stall\n"}, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			stops := 0
			w := &lockupWatch{limit: 2 * time.Minute, stop: func() { stops++ }}
			for _, s := range tc.writes {
				w.Write([]byte(s))
			}
			w.Write([]byte("\n")) // ends a line left open: judged now, not before
			w.Write([]byte("watchdog: BUG: soft lockup - CPU#0 stuck for 999s!\n"))
			if tc.want != "" && (w.seen != tc.want || stops != 1) {
				t.Errorf("seen %q after %d stops, want %q once (a later report stops nothing more)", w.seen, stops, tc.want)
			}
			if tc.want == "" && w.seen != "watchdog: BUG: soft lockup - CPU#0 stuck for 999s!" {
				t.Errorf("seen %q, want only the final long report", w.seen)
			}
		})
	}
}
