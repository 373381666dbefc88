// Package packaging holds the systemd units, the default config and the
// test of the .deb that `make deb` builds.
package packaging

import (
	"debug/buildinfo"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"

	"github.com/fabricnet/fabric/config"
	"github.com/fabricnet/fabric/internal/testreq"
)

// TestDebInstallsEveryFile builds the .deb, installs it with dpkg into a
// fresh root, and checks every file, its mode, the units (systemd-analyze
// verify) and the binaries.
func TestDebInstallsEveryFile(t *testing.T) {
	testreq.Lab(t, "building and installing the .deb")
	for _, tool := range []string{"dpkg-deb", "dpkg", "go", "git"} {
		if _, err := exec.LookPath(tool); err != nil {
			testreq.Missing(t, "%s not found: %v", tool, err)
		}
	}
	out, err := exec.Command("../scripts/build-deb.sh", t.TempDir()).CombinedOutput()
	if err != nil {
		t.Fatalf("build-deb.sh: %v\n%s", err, out)
	}
	deb := strings.TrimSpace(string(out[strings.LastIndex(strings.TrimSpace(string(out)), "\n")+1:]))
	root := t.TempDir()
	for _, d := range []string{"var/lib/dpkg/info", "var/lib/dpkg/updates", "var/lib/dpkg/triggers"} {
		if err := os.MkdirAll(filepath.Join(root, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	for _, f := range []string{"var/lib/dpkg/status", "var/lib/dpkg/available"} {
		if err := os.WriteFile(filepath.Join(root, f), nil, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	install := exec.Command("dpkg", "--root="+root, "--force-not-root", "--force-depends", "--force-script-chrootless", "-i", deb)
	if out, err := install.CombinedOutput(); err != nil {
		t.Fatalf("dpkg -i %s: %v\n%s", deb, err, out)
	}
	want := map[string]os.FileMode{
		"usr/bin/fabricd":                                  0o755,
		"usr/bin/fabricctl":                                0o755,
		"lib/systemd/system/fabricd.service":               0o644,
		"lib/systemd/system/docker.service.d/fabric.conf":  0o644,
		"etc/fabric/fabricd.yaml":                          0o600, // may hold BGP MD5 passwords
		"usr/share/bash-completion/completions/fabricctl":  0o644,
		"usr/share/man/man8/fabricd.8.gz":                  0o644,
		"usr/share/man/man8/fabricctl.8.gz":                0o644,
		"usr/share/man/man8/fabricctl-peers-status.8.gz":   0o644,
		"usr/share/doc/fabric/README.md":                   0o644,
		"usr/share/doc/fabric/copyright":                   0o644,
		"usr/share/doc/fabric/examples/fabric-alerts.yaml": 0o644,
		"usr/share/doc/fabric/architecture.md":             0o644,
		"usr/share/doc/fabric/operations.md":               0o644,
		"usr/share/doc/fabric/security.md":                 0o644,
		"usr/share/doc/fabric/troubleshooting.md":          0o644,
	}
	for path, mode := range want {
		fi, err := os.Stat(filepath.Join(root, path))
		if err != nil {
			t.Errorf("%s not installed: %v", path, err)
			continue
		}
		if fi.Mode().Perm() != mode {
			t.Errorf("%s has mode %v, want %v", path, fi.Mode().Perm(), mode)
		}
	}
	listed, err := exec.Command("dpkg", "--root="+root, "-L", "fabric").Output()
	if err != nil {
		t.Fatalf("dpkg -L fabric: %v", err)
	}
	for path := range want {
		if !strings.Contains(string(listed), "/"+path+"\n") {
			t.Errorf("dpkg -L fabric does not list /%s", path)
		}
	}
	conffiles, _ := os.ReadFile(filepath.Join(root, "var/lib/dpkg/info/fabric.conffiles"))
	if strings.TrimSpace(string(conffiles)) != "/etc/fabric/fabricd.yaml" {
		t.Errorf("conffiles %q, want /etc/fabric/fabricd.yaml (kept across upgrades)", conffiles)
	}

	for _, script := range []string{"postinst", "prerm", "postrm"} {
		if fi, err := os.Stat(filepath.Join(root, "var/lib/dpkg/info/fabric."+script)); err != nil || fi.Mode().Perm()&0o111 == 0 {
			t.Errorf("maintainer script %s: %v (want it installed and executable)", script, err)
		}
	}
	if completion, _ := os.ReadFile(filepath.Join(root, "usr/share/bash-completion/completions/fabricctl")); !strings.Contains(string(completion), "__start_fabricctl") {
		t.Errorf("bash completion of fabricctl: %.200q", completion)
	}

	// Every Go module built into the binaries has its licence in the
	// copyright file (the binaries are static: they carry the modules).
	copyright, _ := os.ReadFile(filepath.Join(root, "usr/share/doc/fabric/copyright"))
	for _, bin := range []string{"usr/bin/fabricd", "usr/bin/fabricctl"} {
		info, err := buildinfo.ReadFile(filepath.Join(root, bin))
		if err != nil {
			t.Fatalf("build information of %s: %v", bin, err)
		}
		for _, dep := range info.Deps {
			if !regexp.MustCompile(`(?m)^Files: ` + regexp.QuoteMeta(dep.Path) + `/\*\nComment: .*\nCopyright: .+\n(?: .*\n)*License: \S`).Match(copyright) {
				t.Errorf("%s links %s %s, which has no stanza with copyright and licence in /usr/share/doc/fabric/copyright", bin, dep.Path, dep.Version)
			}
		}
	}

	// The installed binaries run and say which build they are; versions
	// grow with every commit, so apt upgrades (the commit count decides,
	// not the hash).
	v, err := exec.Command(filepath.Join(root, "usr/bin/fabricd"), "--version").Output()
	m := regexp.MustCompile(`^fabricd 0\.1\.0\+(\d+)\.g[0-9a-f]+(\.dirty)?\n$`).FindSubmatch(v)
	if err != nil || m == nil {
		t.Fatalf("installed fabricd --version: %q, %v; want 0.1.0+COUNT.gCOMMIT", v, err)
	}
	n, _ := strconv.Atoi(string(m[1]))
	this := strings.TrimPrefix(strings.TrimSpace(string(v)), "fabricd ")
	earlier := fmt.Sprintf("0.1.0+%d.gffffff", n-1)
	if err := exec.Command("dpkg", "--compare-versions", this, "gt", earlier).Run(); err != nil {
		t.Errorf("dpkg does not sort %s after %s (the commit before): apt would not upgrade", this, earlier)
	}
	// The shipped config file is valid as it is (with a machine id, which
	// a real host has in /etc/machine-id).
	if _, err := config.Load([]string{"--config", filepath.Join(root, "etc/fabric/fabricd.yaml"), "--machine-id", "m"}, nil); err != nil {
		t.Errorf("the shipped /etc/fabric/fabricd.yaml does not load: %v", err)
	}

	// systemd accepts the units; ExecStart must point at an existing file,
	// so verify a copy that names the installed binary.
	if _, err := exec.LookPath("systemd-analyze"); err != nil {
		testreq.Missing(t, "systemd-analyze not found: %v", err)
	}
	unit, _ := os.ReadFile(filepath.Join(root, "lib/systemd/system/fabricd.service"))
	dir := t.TempDir()
	verify := filepath.Join(dir, "fabricd.service")
	os.WriteFile(verify, []byte(strings.ReplaceAll(string(unit), "/usr/bin/fabricd", filepath.Join(root, "usr/bin/fabricd"))), 0o644)
	if out, err := exec.Command("systemd-analyze", "verify", verify).CombinedOutput(); err != nil || strings.TrimSpace(string(out)) != "" {
		t.Errorf("systemd-analyze verify fabricd.service: %v\n%s", err, out)
	}
	dropin, _ := os.ReadFile(filepath.Join(root, "lib/systemd/system/docker.service.d/fabric.conf"))
	for _, line := range []string{"EnvironmentFile=-/run/fabric/docker.env", "After=fabricd.service", "Wants=fabricd.service",
		// Not a fixed path: Docker's packages install /usr/bin/dockerd, Debian's /usr/sbin/dockerd.
		"ExecStart=/usr/bin/env dockerd -H fd:// --containerd=/run/containerd/containerd.sock $DOCKER_OPTS"} {
		if !strings.Contains(string(dropin), line+"\n") {
			t.Errorf("docker drop-in lacks %q", line)
		}
	}
}
