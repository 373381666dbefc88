package main

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
)

// fabricctlPath is the fabricctl binary TestMain builds once for every test
// that runs it as an operator's script would.
var fabricctlPath string

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "fabricctl-test-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	fabricctlPath = filepath.Join(dir, "fabricctl")
	if out, err := exec.Command("go", "build", "-o", fabricctlPath, ".").CombinedOutput(); err != nil {
		fmt.Fprintf(os.Stderr, "go build: %v\n%s", err, out)
		os.RemoveAll(dir)
		os.Exit(1)
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}
