package main

import (
	"errors"
	"net"
	"os/exec"
	"strings"
	"testing"
)

// TestExitCodes runs the built fabricctl as a script would and checks the
// documented exit codes: 0 ok, 2 bad usage, 3 etcd unreachable, 4 fabricd
// not running.
func TestExitCodes(t *testing.T) {
	bin := fabricctlPath
	// A port nothing listens on: etcd is unreachable there.
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	closed := "http://" + l.Addr().String()
	l.Close()
	runDir := t.TempDir()
	for _, c := range []struct {
		args []string
		code int
		says string
	}{
		{[]string{"--version"}, 0, "fabricctl "},
		{[]string{"version"}, 0, "fabricctl "},
		{[]string{"--no-such-flag"}, 2, "unknown flag"},
		{[]string{"no-such-command"}, 2, "unknown command"},
		{[]string{"ipam", "release"}, 2, "accepts 1 arg"},
		{[]string{"--etcd-endpoints", closed, "ipam", "show"}, 3, "etcd unreachable"},
		{[]string{"--run-dir", runDir, "peers", "status"}, 4, "fabricd is not running"},
		{[]string{"--run-dir", runDir, "leave"}, 4, "fabricd is not running"},
	} {
		out, err := exec.Command(bin, c.args...).CombinedOutput()
		code := 0
		var exit *exec.ExitError
		if errors.As(err, &exit) {
			code = exit.ExitCode()
		} else if err != nil {
			t.Fatalf("%v: %v", c.args, err)
		}
		if code != c.code || !strings.Contains(string(out), c.says) {
			t.Errorf("fabricctl %v: exit %d, %q; want exit %d saying %q", c.args, code, out, c.code, c.says)
		}
	}
}
