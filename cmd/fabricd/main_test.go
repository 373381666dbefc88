package main

import (
	"bytes"
	"errors"
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
