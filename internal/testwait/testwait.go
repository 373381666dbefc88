// Package testwait polls a condition in a test until it holds or time runs
// out: the one wait loop of the package tests that have no lab of their own.
package testwait

import (
	"os"
	"strconv"
	"testing"
	"time"
)

// Until checks cond every 50 ms and fails t when it has not held within
// timeout; what names the awaited state in that failure.
func Until(t testing.TB, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	timeout = Scale(timeout)
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %s waiting for: %s", timeout, what)
		}
		time.Sleep(50 * time.Millisecond)
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
