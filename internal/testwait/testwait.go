// Package testwait polls a condition in a test until it holds or time runs
// out: the one wait loop of the package tests that have no lab of their own.
package testwait

import (
	"testing"
	"time"
)

// Until checks cond every 50 ms and fails t when it has not held within
// timeout; what names the awaited state in that failure.
func Until(t testing.TB, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %s waiting for: %s", timeout, what)
		}
		time.Sleep(50 * time.Millisecond)
	}
}
