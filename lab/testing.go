package lab

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"testing"
	"time"

	"github.com/fabricnet/fabric/internal/testreq"
	"github.com/fabricnet/fabric/internal/testwait"
)

// ForTest builds a lab for a test. It skips the test when the machine cannot
// run one (not root, ip/nsenter/etcd missing), removes the lab in t.Cleanup,
// and on failure prints the tail of each log and keeps the log dir.
// Leftovers of earlier crashed runs are swept first.
func ForTest(t testing.TB, spec Spec) *Lab {
	t.Helper()
	testreq.Lab(t, "a lab test")
	if reason := cannotRun(); reason != "" {
		testreq.Missing(t, "lab: skipping, %s", reason)
	}
	if err := SweepStale(); err != nil {
		t.Logf("lab: sweeping stale runs: %v", err)
	}
	CloseOnInterrupt()
	// A bound, not an expectation, stretched where time is (the TCG guest:
	// its first labs, built while every suite starts at once, took over 3 min
	// on the project's CI).
	ctx, cancel := context.WithTimeout(context.Background(), testwait.Scale(3*time.Minute))
	defer cancel()
	l, err := New(ctx, spec)
	if err != nil {
		t.Fatalf("lab: %v", err)
	}
	t.Cleanup(func() {
		if t.Failed() {
			l.logLogs(t)
			l.ownLogDir = false // keep the whole logs of a failure for whoever reads it
		}
		if err := l.Close(); err != nil {
			t.Errorf("lab: %v", err)
		}
	})
	return l
}

func cannotRun() string {
	if os.Geteuid() != 0 {
		return "needs root to create network namespaces"
	}
	for _, tool := range []string{"ip", "nsenter", "etcd"} {
		if _, err := exec.LookPath(tool); err != nil {
			return tool + " not found on PATH (install iproute2, util-linux, etcd-server)"
		}
	}
	return ""
}

func (l *Lab) logLogs(t testing.TB) {
	files, _ := filepath.Glob(filepath.Join(l.logDir, "*.log"))
	sort.Strings(files)
	t.Logf("lab %s: logs kept in %s", l.prefix, l.logDir)
	for _, f := range files {
		t.Logf("--- %s (last 40 lines)\n%s", f, tailFile(f, 40))
	}
}
