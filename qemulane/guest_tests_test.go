package qemulane

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/fabricnet/fabric/internal/testreq"
	"github.com/fabricnet/fabric/internal/testwait"
)

// guestSuites are host test packages that touch the kernel's tunnels, run
// again inside the guest on Debian's stock kernel (which has IPIP, unlike
// the build machines): the same test binaries must pass on both, so no test
// may assume which kernel it is on. run selects tests (-test.run); empty
// runs the whole package. parallel is how many of its tests run at once
// (0: guestParallel).
var guestSuites = []struct {
	pkg, run string
	parallel int
}{
	{"ipip", "", 0},
	{"vxlanfallback", "", 0},
	// Two at a time: it ends well before e2e all the same (145 s against
	// 460 s alone; one at a time, 436 s), and leaves e2e the CPU.
	{"dataplane", "", 2},
	{"flowoffload", "", 0},
	// The e2e tests whose outcome depends on the encapsulation auto mode
	// picks, its MTU and the tunnel devices fabricd owns, and the NAT wire
	// check (what a server outside the pool sees).
	{"e2e", "^(TestMeshLifecycle|TestEncapsulationFallback|TestRestartKeepsEncapsulation|TestVXLANHostJoinsAutoHosts|TestPathMTUDiscovery|TestMTUNoBlackHole|TestCrossSubnetDirectAndVXLAN|TestForgedTunnelPacketsDropped|TestCleanupLeavesNothing|TestMasqueradeLeavingThePool|TestEncryptedRestart|TestKeyRotation|TestIPv6OverTheTunnels|TestFlowOffload)$", 0},
}

// guestInit starts every suite at once (they wait on timers and sessions
// more than they compute, even under TCG), e2e with several tests at a time
// as on the host; then prints each test's verdict line as
// "GUESTTEST <pkg> <line>", what the tests logged (their figures: how
// long a switch took, what was lost) as "GUESTNOTE <pkg> <line>", the
// tail of a failing suite's output as
// "GUESTLOG <pkg> <line>", and "GUESTSUITE <pkg> ok|FAIL". Missing
// dependencies fail (FABRIC_REQUIRE_ALL) instead of skipping.
func guestInit() string {
	var b strings.Builder
	// FABRIC_KERNEL_WIREGUARD: Debian's kernel has WireGuard, so the e2e
	// tests must find fabricd running the kernel's (not wireguard-go);
	// FABRIC_KERNEL_FLOWTABLE: it has nftables flowtables too.
	fmt.Fprintf(&b, "export FABRIC_REQUIRE_ALL=1 FABRIC_BIN=/bin/fabric FABRIC_KERNEL_WIREGUARD=1 FABRIC_KERNEL_FLOWTABLE=1 %s=%d\nfailed=0\n", testwait.ScaleEnv, guestTimeScale)
	// Where the guest's CPU goes: every 30 s the CPU split and the busiest
	// processes of the last 30 s (processes that start and end between two
	// samples, such as an ip, show only in the split).
	b.WriteString("top -b -d 30 -n 60 > /tmp/top.log 2>&1 &\ntop=$!\n")
	for _, s := range guestSuites {
		run := ""
		if s.run != "" {
			run = fmt.Sprintf(" -test.run '%s'", s.run)
		}
		parallel := guestParallel
		if s.parallel > 0 {
			parallel = s.parallel
		}
		fmt.Fprintf(&b, `echo "GUESTSUITE %[1]s start at $(cut -d' ' -f1 /proc/uptime)s"
(/bin/tests/%[1]s.test -test.v -test.count=1 -test.timeout=18m -test.parallel=%[3]d%[2]s > /tmp/%[1]s.log 2>&1; echo $? > /tmp/%[1]s.status; echo "GUESTSUITE %[1]s ended at $(cut -d' ' -f1 /proc/uptime)s") &
suites="$suites $!"
`, s.pkg, run, parallel)
	}
	b.WriteString("wait $suites\nkill $top\n")
	b.WriteString(`awk '/^Mem:/ {n = 0} n++ < 12' /tmp/top.log | cut -c1-160 | sed 's/^/GUESTTOP /'` + "\n")
	for _, s := range guestSuites {
		fmt.Fprintf(&b, `status=$(cat /tmp/%[1]s.status)
grep -E '^(--- |ok |FAIL|PASS|panic)' /tmp/%[1]s.log | sed 's/^/GUESTTEST %[1]s /'
grep -E '^ +[a-z0-9_]+_test\.go:[0-9]+: ' /tmp/%[1]s.log | head -n 200 | sed 's/^/GUESTNOTE %[1]s /'
if [ "$status" -eq 0 ]; then
	echo "GUESTSUITE %[1]s ok"
else
	tail -n 60 /tmp/%[1]s.log | sed 's/^/GUESTLOG %[1]s /'
	echo "GUESTSUITE %[1]s FAIL (exit $status)"
	failed=1
fi
`, s.pkg)
	}
	// A failed suite may have waited on the kernel (ci88: every `ip` stood
	// still for minutes): the tasks blocked now and the kernel's own reports
	// of stuck tasks, from the ring buffer (the console is quiet).
	b.WriteString(`if [ "$failed" -ne 0 ]; then
	echo w > /proc/sysrq-trigger
	dmesg | grep -A 40 -E 'blocked for more than|soft lockup|self-detected stall|Show Blocked State' | head -n 600 | sed 's/^/GUESTKERNEL /'
fi
`)
	fmt.Fprintf(&b, "[ \"$failed\" -eq 0 ] && echo %q || echo %q\n", PassLine, FailPrefix+" a guest suite failed")
	return b.String()
}

// guestAppend: expedited RCU grace periods. Tearing down a namespace
// waits for grace periods while it holds the RTNL lock (a bridge port's
// deletion: br_dev_delete, nbp_vlan_flush, synchronize_rcu, in the guest's
// blocked-task dumps), and every `ip` of every other test waits for that
// lock; under TCG on a busy machine a normal grace period takes long
// enough that the guest's suites stood still for minutes (ci88, ci92).
//
// loglevel=5: a soft lockup's registers and stack reach the console (quiet
// shows only its first line, which is all ci109's hang left).
const guestAppend = "rcupdate.rcu_expedited=1 loglevel=5"

// guestParallel is how many tests of a suite run at once in the guest.
const guestParallel = 4

// guestTimeScale stretches the bounds the tests wait for in the guest:
// under TCG on a busy 2-core machine it runs some ten times slower than
// the host (a guest run took 8 min with stress-ng beside it, 2 min without).
const guestTimeScale = 8

// TestHostTestsInGuest runs the host-kernel test packages that touch IPIP
// and VXLAN, and the e2e tests of encapsulation choice, inside the qemu
// guest: there auto mode has IPIP, so they prove the other branch of every
// kernel-dependent check.
func TestHostTestsInGuest(t *testing.T) {
	testreq.Lab(t, "the qemu guest lane")
	if err := Available(); err != nil {
		testreq.Missing(t, "guest test lane needs qemu, a stock kernel and busybox-static: %v", err)
	}
	if _, err := exec.LookPath("go"); err != nil {
		testreq.Missing(t, "guest test lane builds test binaries with the go tool: %v", err)
	}
	kernel, _, err := FindKernel()
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	start := time.Now()
	bins := map[string]string{}
	for _, pkg := range []string{"cmd/fabricd", "cmd/fabricctl", "e2e/tcpprobe"} {
		out := filepath.Join(dir, filepath.Base(pkg))
		if err := BuildGoStatic("github.com/fabricnet/fabric/"+pkg, out); err != nil {
			t.Fatal(err)
		}
		bins["/bin/fabric/"+filepath.Base(pkg)] = out
	}
	for _, s := range guestSuites {
		out := filepath.Join(dir, s.pkg+".test")
		if err := BuildGoTestStatic("github.com/fabricnet/fabric/"+s.pkg, out); err != nil {
			t.Fatal(err)
		}
		bins["/bin/tests/"+s.pkg+".test"] = out
	}
	img, err := FabricImage(kernel, bins, guestInit(), nil)
	if err != nil {
		t.Fatal(err)
	}
	initrd, err := Build(dir, img)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("test binaries and image built in %s", time.Since(start).Round(time.Millisecond))

	ctx, cancel := context.WithTimeout(context.Background(), 21*time.Minute)
	defer cancel()
	// 2 GiB: the initramfs alone holds some 200 MB of binaries.
	res, err := Run(ctx, kernel, initrd, RunOptions{MemoryMB: 2048, Timeout: 20 * time.Minute, StopOnLockup: 3 * time.Minute,
		Append: strings.TrimSpace("softlockup_all_cpu_backtrace=1 " + guestAppend + " " + os.Getenv("FABRIC_QEMU_APPEND"))})
	logLockups(t, res.Output)
	if dump := res.Lines("GUESTKERNEL "); len(dump) > 0 {
		t.Logf("guest kernel after a failed suite:\n%s", strings.Join(dump, "\n"))
	}
	t.Logf("VM ran %s", res.Duration.Round(time.Millisecond))
	if testing.Verbose() {
		t.Logf("where the guest's CPU went:\n%s", strings.Join(res.Lines("GUESTTOP "), "\n"))
	}
	for _, l := range res.Lines("GUESTSUITE ") {
		t.Log(l)
	}
	if err != nil {
		t.Fatal(err)
	}
	for _, s := range guestSuites {
		t.Run(s.pkg, func(t *testing.T) {
			verdicts := res.Lines("GUESTTEST " + s.pkg + " ")
			for _, l := range verdicts {
				if strings.Contains(l, "--- FAIL") || strings.Contains(l, "--- SKIP") {
					t.Error(l)
				} else if testing.Verbose() {
					t.Log(l) // how long each test took in the guest
				}
			}
			notes := res.Lines("GUESTNOTE " + s.pkg + " ")
			if len(res.Lines("GUESTSUITE "+s.pkg+" ok")) == 0 {
				t.Errorf("suite %s failed in the guest:\n%s\n%s", s.pkg, strings.Join(notes, "\n"), strings.Join(res.Lines("GUESTLOG "+s.pkg+" "), "\n"))
			} else if testing.Verbose() {
				for _, l := range notes {
					t.Log(l)
				}
			}
			passed := 0
			for _, l := range verdicts {
				if strings.Contains(l, "--- PASS") {
					passed++
				}
			}
			if passed == 0 {
				t.Errorf("no test of %s passed in the guest", s.pkg)
			}
			t.Logf("%d tests of %s passed in the guest", passed, s.pkg)
		})
	}
}

// logLockups logs every soft-lockup, RCU stall and hung-task report the
// guest kernel printed on its console, with the lines that follow it. A
// task stuck in the kernel (an `ip` waiting for the RTNL lock) is reported
// after 120 s (CONFIG_DEFAULT_HUNG_TASK_TIMEOUT); its stack stays in the
// ring buffer (the console is quiet), which a failed run prints as
// GUESTKERNEL lines.
func logLockups(t *testing.T, console string) {
	lines := strings.Split(console, "\n")
	for i, l := range lines {
		if strings.Contains(l, "soft lockup") || strings.Contains(l, "rcu_sched self-detected stall") ||
			strings.Contains(l, "rcu_preempt self-detected stall") || strings.Contains(l, "blocked for more than") {
			t.Logf("guest kernel: %s", strings.Join(lines[i:min(len(lines), i+60)], "\n"))
		}
	}
}
