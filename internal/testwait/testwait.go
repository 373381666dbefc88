// Package testwait polls a condition in a test until it holds or time runs
// out: the one wait loop of the package tests that have no lab of their own.
package testwait

import (
	"errors"
	"os"
	"strconv"
	"testing"
	"time"
)

// Until checks cond every 50 ms and fails t when it has not held within
// timeout; what names the awaited state in that failure.
func Until(t testing.TB, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	For(t, timeout, what, func() error {
		if cond() {
			return nil
		}
		return errNotYet
	})
}

var errNotYet = errors.New("not yet")

// For is Until for a condition that says what it saw: cond returns nil once
// the state holds, and the failure quotes its last error.
func For(t testing.TB, timeout time.Duration, what string, cond func() error) {
	t.Helper()
	timeout = Scale(timeout)
	deadline := time.Now().Add(timeout)
	for {
		err := cond()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			if err == errNotYet {
				t.Fatalf("timed out after %s waiting for: %s", timeout, what)
			}
			t.Fatalf("timed out after %s waiting for: %s: %v", timeout, what, err)
		}
		time.Sleep(Interval(50 * time.Millisecond))
	}
}

// ScaleEnv stretches every bound a test waits for: the qemu guest lane runs
// the same tests under TCG emulation, many times slower than the host, and
// sets it there. A bound is the longest a state may take to appear, never
// what a test expects; measurements belong in make bench.
const ScaleEnv = "FABRIC_TIME_SCALE"

// Scale is d stretched by FABRIC_TIME_SCALE (a whole number, 1 when unset).
func Scale(d time.Duration) time.Duration {
	n, err := strconv.Atoi(os.Getenv(ScaleEnv))
	if err != nil || n < 1 {
		return d
	}
	return d * time.Duration(n)
}

// Interval is how long a wait sleeps between two checks: d, or half the
// stretched d where time is stretched. There (the TCG guest) a check (an
// exec of ip or fabricctl) costs a good share of the CPU the state being
// waited for needs: four tests polling every 100 ms kept its two CPUs busy
// (a run with six tests at a time instead of four took longer, not
// shorter).
func Interval(d time.Duration) time.Duration {
	if s := Scale(d); s > d {
		return s / 2
	}
	return d
}
