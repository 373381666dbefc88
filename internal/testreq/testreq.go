// Package testreq decides what a test does when something it needs (root,
// a Debian package, a kernel feature) is missing. On a developer's machine
// it skips with the reason; with FABRIC_REQUIRE_ALL=1 (.ci/run sets it) it
// fails, so a broken install step cannot turn a lane green by skipping it.
package testreq

import (
	"fmt"
	"os"
	"testing"
)

// Env is the switch .ci/run sets.
const Env = "FABRIC_REQUIRE_ALL"

// Strict reports whether missing requirements fail tests.
func Strict() bool { return os.Getenv(Env) == "1" }

// Missing ends t because a requirement is missing: a skip, or a failure
// under FABRIC_REQUIRE_ALL=1.
func Missing(t testing.TB, format string, args ...any) {
	t.Helper()
	reason := fmt.Sprintf(format, args...)
	if Strict() {
		t.Fatalf("required (%s=1): %s", Env, reason)
	}
	t.Skip(reason)
}

// Lab ends t in short mode (`make test-quick`): it needs what only `make
// test` sets up (root, network namespaces, real daemons, a VM). Call it
// before anything else in such a test.
func Lab(t testing.TB, what string) {
	t.Helper()
	if testing.Short() {
		t.Skipf("short mode: %s runs in make test", what)
	}
}
