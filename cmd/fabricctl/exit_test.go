package main

import (
	"errors"
	"net"
	"os"
	"os/exec"
	"path/filepath"
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
	// --config names fabricd's settings file: its etcd is the one dialled.
	conf := filepath.Join(t.TempDir(), "fabricd.yaml")
	if err := os.WriteFile(conf, []byte("etcdEndpoints: ["+closed+"]\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		args []string
		code int
		says string
		env  []string
	}{
		{[]string{"--version"}, 0, "fabricctl ", nil},
		{[]string{"version"}, 0, "fabricctl ", nil},
		{[]string{"--no-such-flag"}, 2, "unknown flag", nil},
		{[]string{"no-such-command"}, 2, "unknown command", nil},
		{[]string{"ipam", "release"}, 2, "accepts 1 arg", nil},
		{[]string{"--etcd-endpoints", closed, "ipam", "show"}, 3, "etcd unreachable", nil},
		{[]string{"--run-dir", runDir, "peers", "status"}, 4, "fabricd is not running", nil},
		{[]string{"--run-dir", runDir, "leave"}, 4, "fabricd is not running", nil},
		// Refused at once, by name, not after a connection timeout.
		{[]string{"ipam", "init"}, 2, `required flag(s) "pool" not set`, nil},
		{[]string{"--etcd-endpoints", "127.0.0.1:1", "nodes"}, 2, `etcdEndpoints: "127.0.0.1:1" is not a URL`, nil},
		{[]string{"nodes"}, 2, "FABRIC_ETCD_ENDPOINT: not a setting (did you mean FABRIC_ETCD_ENDPOINTS?)", []string{"FABRIC_ETCD_ENDPOINT=" + closed}},
		{[]string{"--config", conf, "--timeout", "1s", "nodes"}, 3, "etcd unreachable: etcd " + closed, nil},
		{[]string{"--config=/nonexistent/fabricd.yaml", "nodes"}, 2, "config file: open /nonexistent/fabricd.yaml", nil},
		// version needs no settings: a broken fabricd.yaml does not stop it.
		{[]string{"version"}, 0, "fabricctl ", []string{"FABRIC_CONFIG=/nonexistent/fabricd.yaml"}},
	} {
		cmd := exec.Command(bin, c.args...)
		cmd.Env = append(os.Environ(), c.env...)
		out, err := cmd.CombinedOutput()
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
