package main

import (
	"bytes"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/fabricnet/fabric/lab"
)

// What an operator sees when fabricd is started wrong: one line saying
// what is wrong and exit code 2, not the whole flag list.
func TestBadStartsSayWhatIsWrong(t *testing.T) {
	bin := filepath.Join(t.TempDir(), "fabricd")
	if out, err := exec.Command("go", "build", "-o", bin, ".").CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	for _, c := range []struct {
		args []string
		env  []string
		want string
	}{
		{[]string{"--bogus"}, nil, "unknown flag: --bogus"},
		{[]string{"-config", "/etc/fabric/fabricd.yaml"}, nil, "-config: fabricd's flags take two dashes (--config)"},
		{[]string{"--bgp-hold-time", "9"}, nil, `invalid argument "9" for "--bgp-hold-time" flag`},
		{[]string{"--machine-id", "m", "start"}, nil, `unexpected argument "start"`},
		{[]string{"--machine-id", "m"}, []string{"FABRIC_HOLD_TIME=1s"}, "FABRIC_HOLD_TIME: not a fabricd setting (did you mean FABRIC_BGP_HOLD_TIME?)"},
	} {
		cmd := exec.Command(bin, c.args...)
		cmd.Env = append(lab.HostEnviron(), c.env...)
		var stderr bytes.Buffer
		cmd.Stderr = &stderr
		err := cmd.Run()
		var exit *exec.ExitError
		if !errors.As(err, &exit) || exit.ExitCode() != 2 {
			t.Errorf("fabricd %v: %v, want exit code 2", c.args, err)
		}
		if !strings.Contains(stderr.String(), c.want) {
			t.Errorf("fabricd %v said %q, want %q", c.args, stderr.String(), c.want)
		}
		if n := strings.Count(stderr.String(), "\n"); n > 3 {
			t.Errorf("fabricd %v printed %d lines for one mistake:\n%s", c.args, n, stderr.String())
		}
	}
	out, err := exec.Command(bin, "--help").Output()
	if err != nil || !strings.Contains(string(out), "--bgp-hold-time duration") {
		t.Errorf("fabricd --help: %v\n%s", err, out)
	}
}

// --check-config: exit 0 and one line for valid settings, 2 and the problem
// for invalid ones (also a key file others can read), and nothing made.
func TestCheckConfig(t *testing.T) {
	bin := filepath.Join(t.TempDir(), "fabricd")
	if out, err := exec.Command("go", "build", "-o", bin, ".").CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	state := t.TempDir()
	key := filepath.Join(state, "wireguard.key")
	for _, c := range []struct {
		args []string
		prep func()
		code int
		want string
	}{
		{[]string{"--encryption", "wireguard"}, nil, 0, "configuration valid: node n1, etcd http://127.0.0.1:2379, encapsulation auto, encryption wireguard"},
		{[]string{"--encryption", "ipsec"}, nil, 2, `encryption: "ipsec"`},
		{[]string{"--encryption", "wireguard"}, func() { os.WriteFile(key, []byte("x\n"), 0o644) }, 2, "mode 0644 lets others read the private key"},
	} {
		if c.prep != nil {
			c.prep()
		}
		cmd := exec.Command(bin, append([]string{"--check-config", "--node-name", "n1", "--machine-id", "m", "--state-dir", state}, c.args...)...)
		cmd.Env = lab.HostEnviron()
		out, err := cmd.CombinedOutput()
		code := 0
		var exit *exec.ExitError
		if errors.As(err, &exit) {
			code = exit.ExitCode()
		}
		if code != c.code || !strings.Contains(string(out), c.want) {
			t.Errorf("fabricd --check-config %v: exit %d, %q; want %d, %q", c.args, code, out, c.code, c.want)
		}
	}
	// A valid check made no key (it only reads).
	if entries, _ := os.ReadDir(state); len(entries) != 1 {
		t.Errorf("state dir after --check-config: %v, want only the key the test wrote", entries)
	}
}
