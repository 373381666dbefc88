package packaging

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/fabricnet/fabric/internal/testreq"
	"github.com/fabricnet/fabric/internal/testwait"
	"github.com/fabricnet/fabric/lab"
)

// rootPackages are what the booted Debian needs besides the minimal base:
// systemd to boot, what the .deb depends on, and Debian's dockerd.
var rootPackages = []string{"systemd", "systemd-sysv", "dbus", "iproute2", "iptables", "ipset", "kmod", "docker.io"}

// rootCache keeps one debootstrapped root across runs (debootstrap downloads
// and unpacks for half a minute); each test works on a copy.
const rootCache = "/var/cache/fabric-tests/bookworm-systemd-v3"

// TestDebUnderSystemd installs the .deb into Debian 12 booted under systemd
// (systemd-nspawn, in a lab host's network namespace) and runs it as an
// operator would: `systemctl start fabricd` reaches active once fabricd says
// READY=1 and its status line counts the established peer; an upgrade to a
// newer .deb restarts fabricd on the new binary while the peer keeps its
// route all along; removing the package leaves the host as it was (no
// route, bridge or chain of fabric's).
func TestDebUnderSystemd(t *testing.T) {
	testreq.Lab(t, "a Debian root booted under systemd-nspawn")
	for _, tool := range []string{"debootstrap", "systemd-nspawn", "dpkg-deb", "nsenter", "etcd"} {
		if _, err := exec.LookPath(tool); err != nil {
			testreq.Missing(t, "%s not found (apt-get install debootstrap systemd-container): %v", tool, err)
		}
	}
	root := debianRoot(t)
	l := lab.ForTest(t, lab.Spec{Hosts: 2})
	h1, h2 := l.Hosts()[0], l.Hosts()[1]

	// Two builds: the one installed, and a newer one to upgrade to.
	older, newer := "0.1.0+1.gtest", "0.1.0+2.gtest"
	for _, v := range []string{older, newer} {
		cmd := exec.Command("../scripts/build-deb.sh", filepath.Join(root, "root"))
		cmd.Env = append(os.Environ(), "FABRIC_DEB_VERSION="+v)
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("build-deb.sh %s: %v\n%s", v, err, out)
		}
	}

	// The peer: fabricd on host2, started by the lab, from this build.
	bin := filepath.Join(t.TempDir(), "bin")
	if out, err := exec.Command("go", "build", "-o", bin+"/", "../cmd/fabricd").CombinedOutput(); err != nil {
		t.Fatalf("go build fabricd: %v\n%s", err, out)
	}
	peer, err := h2.Start("fabricd", l.FabricdArgs(bin, h2)...)
	if err != nil {
		t.Fatal(err)
	}
	defer peer.Stop()

	c := bootDebian(t, root, h1.Netns)
	deb := func(v string) string { return "/root/fabric_" + v + "_" + runtime.GOARCH + ".deb" }
	c.must(t, "dpkg", "-i", deb(older))
	conf := fmt.Sprintf("nodeName: %s\nmachineID: %s-%s\netcdEndpoints: [%s]\npool: 10.244.0.0/16\nunderlayInterface: %s\n",
		h1.Name, l.Prefix(), h1.Name, strings.Join(l.EtcdEndpoints(), ", "), h1.Dev)
	if err := os.WriteFile(filepath.Join(root, "etc/fabric/fabricd.yaml"), []byte(conf), 0o600); err != nil {
		t.Fatal(err)
	}
	c.must(t, "fabricd", "--config", "/etc/fabric/fabricd.yaml", "--check-config")
	start := time.Now()
	c.must(t, "systemctl", "start", "fabricd") // returns once READY=1 came (Type=notify)
	t.Logf("systemctl start fabricd returned after %.1fs", time.Since(start).Seconds())
	if state := c.must(t, "systemctl", "is-active", "fabricd"); state != "active" {
		t.Fatalf("fabricd is %q after systemctl start", state)
	}
	if out, err := c.run("cat", "/run/fabric/docker.env"); err != nil || !strings.Contains(out, "--bip=") {
		t.Errorf("active before the docker options file exists: %v %s", err, out)
	}
	testwait.For(t, 30*time.Second, "the status line counts the established peer", func() error {
		if s := c.must(t, "systemctl", "show", "-p", "StatusText", "--value", "fabricd"); !strings.Contains(s, "1 of 1 BGP peers established") {
			return fmt.Errorf("StatusText %q", s)
		}
		return nil
	})
	// dockerd, restarted, takes fabric's options through the drop-in: its
	// bridge network is this host's subnet, at the fabric MTU.
	c.must(t, "systemctl", "restart", "docker")
	opts := c.must(t, "fabricctl", "--config", "/etc/fabric/fabricd.yaml", "docker-opts", "--format", "json")
	bridge := c.must(t, "docker", "network", "inspect", "bridge", "--format", `{{range .IPAM.Config}}{{.Subnet}} {{.Gateway}}{{end}} mtu={{index .Options "com.docker.network.driver.mtu"}}`)
	t.Logf("dockerd's bridge network after systemctl restart docker: %s (fabricctl docker-opts: %s)", bridge, strings.Join(strings.Fields(opts), " "))
	subnet := c.must(t, "fabricctl", "--config", "/etc/fabric/fabricd.yaml", "status", "-o", "json")
	var mySubnet string
	if i := strings.Index(subnet, `"subnet": "`); i >= 0 {
		mySubnet, _, _ = strings.Cut(subnet[i+len(`"subnet": "`):], `"`)
	}
	routeOnPeer := func() bool {
		out, _ := h2.Run(context.Background(), "ip", "route", "show", mySubnet, "proto", "93")
		return strings.TrimSpace(out) != ""
	}
	if !strings.HasPrefix(bridge, mySubnet+" ") || !strings.Contains(bridge, "mtu=1450") {
		t.Errorf("dockerd's bridge network %q, want fabric's subnet %s and MTU 1450", bridge, mySubnet)
	}
	testwait.For(t, 30*time.Second, "host2 routes to "+mySubnet, func() error {
		if mySubnet == "" || !routeOnPeer() {
			return fmt.Errorf("no route to %q on host2", mySubnet)
		}
		return nil
	})

	// Upgrade: the package restarts fabricd on the new binary; the peer
	// keeps the route throughout (graceful restart).
	pid := c.must(t, "systemctl", "show", "-p", "MainPID", "--value", "fabricd")
	var missing int
	var watch sync.WaitGroup
	stop := make(chan struct{})
	watch.Add(1)
	go func() {
		defer watch.Done()
		for {
			select {
			case <-stop:
				return
			case <-time.After(50 * time.Millisecond):
			}
			if !routeOnPeer() {
				missing++
			}
		}
	}()
	c.must(t, "dpkg", "-i", deb(newer))
	testwait.For(t, 60*time.Second, "fabricd back on the new binary with its peer", func() error {
		if v := c.must(t, "fabricd", "--version"); v != "fabricd "+newer {
			return fmt.Errorf("installed %q", v)
		}
		if p := c.must(t, "systemctl", "show", "-p", "MainPID", "--value", "fabricd"); p == pid || p == "0" {
			return fmt.Errorf("fabricd not restarted (MainPID %s, was %s)", p, pid)
		}
		if s := c.must(t, "systemctl", "show", "-p", "StatusText", "--value", "fabricd"); !strings.Contains(s, "1 of 1 BGP peers established") {
			return fmt.Errorf("StatusText %q", s)
		}
		return nil
	})
	close(stop)
	watch.Wait()
	if missing > 0 {
		t.Errorf("host2 lost its route to %s %d times (50 ms apart) during the upgrade", mySubnet, missing)
	}

	// Removal leaves the host as it was (dockerd stopped first, as the docs
	// say: the bridge is fabric's).
	c.must(t, "systemctl", "stop", "docker", "docker.socket")
	t.Logf("dpkg --remove fabric:\n%s", c.must(t, "dpkg", "--remove", "fabric"))
	if out, _ := h1.Run(context.Background(), "ip", "route", "show", "proto", "93"); strings.TrimSpace(out) != "" {
		t.Errorf("routes of fabric's left after removal:\n%s", out)
	}
	if out, err := h1.Run(context.Background(), "ip", "link", "show", "docker0"); err == nil {
		t.Errorf("docker0 left after removal:\n%s", out)
	}
	if out, _ := c.run("iptables-save"); strings.Contains(out, "FABRIC") { // the iptables fabricd used
		t.Errorf("fabric's iptables chains left after removal:\n%s", out)
	}
	if state, _ := c.run("systemctl", "is-active", "fabricd"); state == "active" {
		t.Error("fabricd still active after removal")
	}
}

// debianRoot is a fresh copy of a Debian 12 root with systemd: made with
// debootstrap from Debian's archive the first time, then copied from the
// cache.
func debianRoot(t *testing.T) string {
	t.Helper()
	if _, err := os.Stat(filepath.Join(rootCache, "usr/lib/systemd/systemd")); err != nil {
		tmp := rootCache + ".new"
		os.RemoveAll(tmp)
		start := time.Now()
		cmd := exec.Command("debootstrap", "--variant=minbase", "--include="+strings.Join(rootPackages, ","), "bookworm", tmp)
		if out, err := cmd.CombinedOutput(); err != nil {
			os.RemoveAll(tmp)
			testreq.Missing(t, "debootstrap bookworm (Debian's archive must be reachable): %v\n%s", err, lastLines(string(out), 10))
		}
		if err := os.Rename(tmp, rootCache); err != nil {
			t.Fatal(err)
		}
		t.Logf("debootstrap of the Debian root took %.0fs (cached in %s)", time.Since(start).Seconds(), rootCache)
	}
	root := filepath.Join(t.TempDir(), "root")
	if out, err := exec.Command("cp", "-a", "--reflink=auto", rootCache, root).CombinedOutput(); err != nil {
		t.Fatalf("copy the Debian root: %v\n%s", err, out)
	}
	return root
}

// booted is a Debian root running under systemd-nspawn.
type booted struct {
	nspawn *exec.Cmd
	init   int // the container's PID 1, seen from here
}

// bootDebian boots root with systemd in network namespace netns and waits
// until systemd says the system runs. The machine is powered off at the end
// of the test.
func bootDebian(t *testing.T, root, netns string) *booted {
	t.Helper()
	log, err := os.Create(filepath.Join(t.TempDir(), "nspawn.log"))
	if err != nil {
		t.Fatal(err)
	}
	// --keep-unit and --register=no: this machine's PID 1 is not systemd,
	// so there is no system bus or machined to register with.
	cmd := exec.Command("systemd-nspawn", "--boot", "--directory", root, "--register=no", "--keep-unit",
		"--network-namespace-path=/var/run/netns/"+netns, "--machine", "fabric-"+strconv.Itoa(os.Getpid()),
		// The host's network is the lab namespace's: fabricd may manage it,
		// as on a real host.
		"--capability=CAP_NET_ADMIN,CAP_NET_RAW")
	cmd.Stdout, cmd.Stderr = log, log
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	c := &booted{nspawn: cmd}
	exited := make(chan struct{})
	go func() { cmd.Wait(); close(exited) }()
	t.Cleanup(func() {
		if t.Failed() && c.init != 0 {
			if out, err := c.run("journalctl", "--no-pager", "-n", "80", "-u", "fabricd"); err == nil {
				t.Logf("journal of fabricd:\n%s", out)
			}
		}
		// SIGTERM asks the container to power off; nspawn waits for it.
		cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-exited:
		case <-time.After(testwait.Scale(30 * time.Second)):
			syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
			<-exited
		}
		if t.Failed() {
			b, _ := os.ReadFile(log.Name())
			t.Logf("systemd-nspawn's console (last lines):\n%s", lastLines(string(b), 40))
		}
		log.Close()
	})
	testwait.For(t, 60*time.Second, "systemd running in the Debian root", func() error {
		if c.init == 0 {
			children, _ := os.ReadFile(fmt.Sprintf("/proc/%d/task/%d/children", cmd.Process.Pid, cmd.Process.Pid))
			f := strings.Fields(string(children))
			if len(f) == 0 {
				return errors.New("nspawn has not started the container's init yet")
			}
			c.init, _ = strconv.Atoi(f[0])
		}
		// nspawn's first child may be a helper that starts the container's
		// init and exits (CI once kept such a PID for the whole minute):
		// only systemd itself counts, else look again.
		if comm, _ := os.ReadFile(fmt.Sprintf("/proc/%d/comm", c.init)); strings.TrimSpace(string(comm)) != "systemd" {
			pid := c.init
			c.init = 0
			return fmt.Errorf("nspawn's child %d is %q, not the container's systemd yet", pid, strings.TrimSpace(string(comm)))
		}
		state, _ := c.run("systemctl", "is-system-running")
		if state != "running" && state != "degraded" {
			return fmt.Errorf("is-system-running: %q", state)
		}
		return nil
	})
	return c
}

// run runs a command inside the booted system (its namespaces, its root).
func (c *booted) run(args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), testwait.Scale(90*time.Second))
	defer cancel()
	cmd := exec.CommandContext(ctx, "nsenter", append([]string{"--target", strconv.Itoa(c.init), "--all", "--"}, args...)...)
	cmd.Env = []string{"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG=C.UTF-8", "DEBIAN_FRONTEND=noninteractive"}
	out, err := cmd.CombinedOutput()
	return strings.TrimSpace(string(out)), err
}

func (c *booted) must(t *testing.T, args ...string) string {
	t.Helper()
	out, err := c.run(args...)
	if err != nil {
		t.Fatalf("in the Debian root: %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return out
}

func lastLines(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	return strings.Join(lines[max(0, len(lines)-n):], "\n")
}
