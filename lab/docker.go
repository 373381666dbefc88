package lab

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"
)

// Real dockerd on lab hosts.
//
// Each host gets its own dockerd (which starts its own containerd) inside the
// host's network namespace, with every path under the lab's run directory
// and containers in a per-run cgroup parent, so nothing is shared with the
// machine's own docker or with another lab.
//
// dockerd is not started directly: a small shell supervisor is the lab
// process. dockerd runs in its own session (setsid), so the SIGTERM that
// Lab.Close or Sweep sends to the supervisor's process group does not reach
// it first; the supervisor then removes the containers (fast: SIGKILL instead
// of dockerd's 10 s per-container stop timeout), stops dockerd, kills what a
// dead dockerd may have left (container processes found by their cgroup,
// containerd shims found by their containerd socket), unmounts what is left
// under the daemon's directories, removes them and the cgroups. The same
// cleanup runs when the test process dies (Pdeathsig) and on Dockerd.Stop.

// Paths of Debian's docker.io package. The client is named explicitly: a
// newer client may come first on PATH.
const (
	DockerdPath      = "/usr/sbin/dockerd"
	DockerClientPath = "/usr/bin/docker"
	BusyboxPath      = "/bin/busybox"
)

// DockerdOptions are the network options of a lab dockerd: usually what
// fabricd wrote (--bip=gateway/len --mtu=M --ip-masq=false).
type DockerdOptions struct {
	Bip       string   // --bip, e.g. "10.244.3.1/24"; empty: dockerd's default
	MTU       int      // --mtu; 0: dockerd's default
	ExtraArgs []string // more dockerd options, e.g. "--ip-masq=false"
	// PluginDir, if set, is what this dockerd alone sees as
	// /run/docker/plugins (where dockerd finds plugins; there is no flag
	// to move it): it runs in a mount namespace of its own with PluginDir
	// bound there, so each host's dockerd finds its own fabricd.
	PluginDir string
	// Timeout for dockerd to answer; default 90 s (a bound for a busy machine).
	Timeout time.Duration
}

// Dockerd is a dockerd running in a lab host's namespace.
type Dockerd struct {
	Host   *Host
	Root   string // holds data/, exec/, docker.sock, dockerd.pid
	Socket string // unix socket path of the API
	Cgroup string // cgroup parent of its containers, "/<prefix>-<host>"

	proc *Process

	imageMu sync.Mutex
	image   string
}

// DockerMissing returns why lab dockerds cannot run on this machine (for
// t.Skip), or "" when docker.io and busybox-static are installed.
func DockerMissing() string {
	var missing []string
	for _, p := range []string{DockerdPath, DockerClientPath, "/usr/bin/containerd", "/usr/bin/runc"} {
		if _, err := os.Stat(p); err != nil {
			missing = append(missing, p)
		}
	}
	if len(missing) > 0 {
		return "docker.io is not installed (missing " + strings.Join(missing, ", ") + "): apt-get install -y docker.io"
	}
	if out, err := exec.Command(BusyboxPath, "--list").Output(); err != nil || !strings.Contains(string(out), "\nsh\n") {
		return "busybox-static is not installed (" + BusyboxPath + " with applets is needed to build a container image): apt-get install -y busybox-static"
	}
	if _, err := exec.LookPath("setsid"); err != nil {
		return "setsid not found on PATH (util-linux)"
	}
	return ""
}

// dockerSupervisor is run by sh with: ROOT SOCK CGROUP DOCKERD DOCKER
// PLUGINDIR [dockerd args...]; with PLUGINDIR it runs in a mount namespace
// of its own.
const dockerSupervisor = `
ROOT=$1 SOCK=$2 CG=$3 DOCKERD=$4 DOCKER=$5 PLUGINDIR=$6
shift 6
if [ -n "$PLUGINDIR" ]; then
	mkdir -p /run/docker/plugins && mount --bind "$PLUGINDIR" /run/docker/plugins || { echo "supervisor: cannot bind $PLUGINDIR"; exit 1; }
fi
pid=
cleanup() {
	trap '' TERM INT HUP
	if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
		ids=$(timeout 5 "$DOCKER" -H "unix://$SOCK" ps -aq 2>/dev/null)
		if [ -n "$ids" ]; then
			timeout 10 "$DOCKER" -H "unix://$SOCK" rm -f $ids >/dev/null 2>&1
		fi
		kill -TERM "$pid" 2>/dev/null
		i=0
		while kill -0 "$pid" 2>/dev/null && [ $i -lt 60 ]; do sleep 0.1; i=$((i+1)); done
		kill -KILL "$pid" 2>/dev/null
	fi
	# What a dead dockerd may have left: container processes (by cgroup) ...
	for f in /sys/fs/cgroup/*/"$CG"/*/cgroup.procs; do
		[ -f "$f" ] && for p in $(cat "$f"); do kill -KILL "$p" 2>/dev/null; done
	done
	# ... and containerd shims serving this daemon's containerd socket.
	ps -eo pid=,args= | SHIMSOCK="$ROOT/exec/containerd/containerd.sock" awk '
		index($0, "containerd-shim") && index($0, "-address " ENVIRON["SHIMSOCK"]) { print $1 }' |
		while read p; do kill -KILL "$p" 2>/dev/null; done
	sleep 0.2
	awk -v r="$ROOT/" 'index($5, r) == 1 { print $5 }' /proc/self/mountinfo | sort -r |
		while read m; do umount -l "$m" 2>/dev/null; done
	rm -rf "$ROOT"
	for d in /sys/fs/cgroup/*/"$CG"; do
		[ -d "$d" ] || continue
		for c in "$d"/*/; do [ -d "$c" ] && rmdir "$c" 2>/dev/null; done
		rmdir "$d" 2>/dev/null
	done
	echo "supervisor: dockerd stopped, $ROOT removed"
	exit 0
}
trap cleanup TERM INT HUP
while :; do
	setsid "$DOCKERD" "$@" &
	pid=$!
	echo "supervisor: dockerd pid $pid"
	echo "$pid" > "$ROOT/dockerd.supervised"
	wait "$pid"
	echo "supervisor: dockerd exited with $?"
	# Dockerd.Restart asks for a restart that keeps the daemon's state.
	[ -e "$ROOT/restart" ] || break
	rm -f "$ROOT/restart"
	echo "supervisor: starting dockerd again"
done
cleanup
`

func (h *Host) dockerRoot() string { return filepath.Join(h.lab.runDir, "docker-"+h.Name) }

// DockerSocket is where the API of the host's dockerd (StartDockerd) is, or
// will be: fabricd can be pointed at it before dockerd starts.
func (h *Host) DockerSocket() string { return filepath.Join(h.dockerRoot(), "docker.sock") }

// StartDockerd starts dockerd (and, through it, containerd) in h's namespace
// and waits until its API answers. Lab.Close stops it and removes its
// containers, directories and cgroups; so does Stop.
func (h *Host) StartDockerd(ctx context.Context, opts DockerdOptions) (*Dockerd, error) {
	if reason := DockerMissing(); reason != "" {
		return nil, errors.New("lab: " + reason)
	}
	l := h.lab
	root := h.dockerRoot()
	if err := os.MkdirAll(root, 0o700); err != nil {
		return nil, fmt.Errorf("lab: %w", err)
	}
	d := &Dockerd{
		Host:   h,
		Root:   root,
		Socket: h.DockerSocket(),
		Cgroup: "/" + l.prefix + "-" + h.Name,
	}
	args := []string{
		"--data-root", filepath.Join(root, "data"),
		"--exec-root", filepath.Join(root, "exec"),
		"-H", "unix://" + d.Socket,
		"--pidfile", filepath.Join(root, "dockerd.pid"),
		"--cgroup-parent", d.Cgroup,
		"--userland-proxy=false",
	}
	if opts.Bip != "" {
		args = append(args, "--bip="+opts.Bip)
	}
	if opts.MTU > 0 {
		args = append(args, fmt.Sprintf("--mtu=%d", opts.MTU))
	}
	args = append(args, opts.ExtraArgs...)
	// containerd writes a stack dump to $TMPDIR when dockerd kills it on
	// a slow shutdown: into the lab's logs, kept with a failure's.
	tmp := filepath.Join(l.logDir, h.Name+"-dockerd-tmp")
	if err := os.MkdirAll(tmp, 0o700); err != nil {
		return nil, fmt.Errorf("lab: %w", err)
	}
	full := append([]string{"env", "TMPDIR=" + tmp, "sh", "-c", dockerSupervisor, "dockerd-supervisor",
		root, d.Socket, strings.TrimPrefix(d.Cgroup, "/"), DockerdPath, DockerClientPath, opts.PluginDir}, args...)
	if opts.PluginDir != "" {
		if err := os.MkdirAll(opts.PluginDir, 0o755); err != nil {
			return nil, fmt.Errorf("lab: %w", err)
		}
		full = append([]string{"unshare", "--mount", "--propagation", "private"}, full...)
	}
	p, err := h.Start("dockerd", full...)
	if err != nil {
		return nil, err
	}
	d.proc = p
	// The supervisor removes the containers, stops dockerd (6 s at most)
	// and unmounts; a SIGKILL in the middle leaves dockerd running in its
	// own session. Its docker calls are bounded at 15 s together.
	p.minGrace = 30 * time.Second
	l.mu.Lock()
	l.dockerds[p] = true
	l.mu.Unlock()

	timeout := opts.Timeout
	if timeout == 0 {
		timeout = 90 * time.Second
	}
	deadline := time.Now().Add(timeout)
	recorded := false
	for {
		if !recorded {
			// Sweep must find dockerd itself too: it runs in its own session.
			if b, err := os.ReadFile(filepath.Join(root, "dockerd.supervised")); err == nil {
				var pid int
				if _, err := fmt.Sscanf(string(b), "%d", &pid); err == nil && pid > 0 {
					_ = writePidFile(filepath.Join(l.runDir, "pids", fmt.Sprintf("%s-dockerd-daemon.%d.pid", h.Name, pid)), pid, h.Name+"-dockerd-daemon")
					recorded = true
				}
			}
		}
		c, cancel := context.WithTimeout(ctx, 5*time.Second)
		_, err := d.Docker(c, "version", "--format", "{{.Server.Version}}")
		cancel()
		if err == nil {
			break
		}
		if p.Exited() {
			return nil, fmt.Errorf("lab: dockerd on %s exited; log %s:\n%s", h.Name, p.LogPath(), tailFile(p.LogPath(), 20))
		}
		if time.Now().After(deadline) || ctx.Err() != nil {
			_ = p.Stop()
			return nil, fmt.Errorf("lab: dockerd on %s did not answer within %s: %v; log %s:\n%s", h.Name, timeout, err, p.LogPath(), tailFile(p.LogPath(), 20))
		}
		time.Sleep(200 * time.Millisecond)
	}
	l.log.Debug("dockerd started", "host", h.Name, "socket", d.Socket, "bip", opts.Bip, "mtu", opts.MTU)
	return d, nil
}

// Restart stops dockerd (SIGTERM: it stops its containers as a daemon
// restart does) and starts it again with the same state, then waits until
// it answers; containers with a restart policy come back.
func (d *Dockerd) Restart(ctx context.Context) error {
	b, err := os.ReadFile(filepath.Join(d.Root, "dockerd.supervised"))
	if err != nil {
		return fmt.Errorf("lab: restart dockerd on %s: %w", d.Host.Name, err)
	}
	var pid int
	if _, err := fmt.Sscanf(string(b), "%d", &pid); err != nil || pid <= 0 {
		return fmt.Errorf("lab: restart dockerd on %s: no pid in %q", d.Host.Name, b)
	}
	if err := os.WriteFile(filepath.Join(d.Root, "restart"), nil, 0o600); err != nil {
		return fmt.Errorf("lab: %w", err)
	}
	// The pid is this lab's dockerd: written by its supervisor.
	if err := syscall.Kill(pid, syscall.SIGTERM); err != nil {
		return fmt.Errorf("lab: restart dockerd on %s: %w", d.Host.Name, err)
	}
	for {
		if _, err := os.Stat(filepath.Join(d.Root, "restart")); errors.Is(err, os.ErrNotExist) {
			break // the supervisor has seen dockerd exit
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("lab: dockerd on %s did not stop: %w", d.Host.Name, ctx.Err())
		case <-time.After(100 * time.Millisecond):
		}
	}
	for {
		c, cancel := context.WithTimeout(ctx, 5*time.Second)
		_, err := d.Docker(c, "version", "--format", "{{.Server.Version}}")
		cancel()
		if err == nil {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("lab: dockerd on %s did not answer after the restart: %v", d.Host.Name, err)
		case <-time.After(200 * time.Millisecond):
		}
	}
}

// Docker runs Debian's docker client against this daemon and returns its
// combined output (trimmed of surrounding space).
func (d *Dockerd) Docker(ctx context.Context, args ...string) (string, error) {
	full := append([]string{"-H", "unix://" + d.Socket}, args...)
	out, err := runOutput(exec.CommandContext(ctx, DockerClientPath, full...))
	return strings.TrimSpace(out), err
}

// Process returns the supervisor process the lab tracks (its log holds
// dockerd's log).
func (d *Dockerd) Process() *Process { return d.proc }

// LogPath returns the file holding dockerd's output.
func (d *Dockerd) LogPath() string { return d.proc.LogPath() }

// Stop removes the daemon's containers, stops dockerd and containerd and
// removes their directories and cgroups. Idempotent.
func (d *Dockerd) Stop() error {
	err := d.proc.Stop()
	if _, serr := os.Stat(d.Root); serr == nil {
		err = errors.Join(err, fmt.Errorf("lab: %s still exists after dockerd stopped", d.Root))
	}
	return err
}

// BusyboxImage imports (once per daemon) an image holding busybox-static with
// its applet links and the given extra files (image path -> host path, e.g.
// "/bin/tcpprobe" -> a static binary), and returns its name. Extra files only
// count on the first call for a daemon.
func (l *Lab) BusyboxImage(ctx context.Context, d *Dockerd, extra map[string]string) (string, error) {
	d.imageMu.Lock()
	defer d.imageMu.Unlock()
	if d.image != "" {
		return d.image, nil
	}
	name := l.prefix + "/busybox:lab"
	dir, err := os.MkdirTemp(l.runDir, "image-")
	if err != nil {
		return "", fmt.Errorf("lab: %w", err)
	}
	defer os.RemoveAll(dir)
	for _, sub := range []string{"bin", "tmp", "etc", "proc", "sys", "dev", "root"} {
		if err := os.MkdirAll(filepath.Join(dir, sub), 0o755); err != nil {
			return "", fmt.Errorf("lab: %w", err)
		}
	}
	if err := copyFile(BusyboxPath, filepath.Join(dir, "bin", "busybox"), 0o755); err != nil {
		return "", err
	}
	out, err := exec.Command(BusyboxPath, "--list").Output()
	if err != nil {
		return "", fmt.Errorf("lab: busybox --list: %w", err)
	}
	for _, applet := range strings.Fields(string(out)) {
		if applet == "busybox" || strings.Contains(applet, "/") {
			continue
		}
		if err := os.Symlink("busybox", filepath.Join(dir, "bin", applet)); err != nil && !errors.Is(err, os.ErrExist) {
			return "", fmt.Errorf("lab: %w", err)
		}
	}
	for dst, src := range extra {
		target := filepath.Join(dir, filepath.Clean("/"+dst))
		if err := os.MkdirAll(filepath.Dir(target), 0o755); err != nil {
			return "", fmt.Errorf("lab: %w", err)
		}
		_ = os.Remove(target) // an applet link of the same name
		if err := copyFile(src, target, 0o755); err != nil {
			return "", err
		}
	}
	if err := os.WriteFile(filepath.Join(dir, "etc", "passwd"), []byte("root:x:0:0:root:/root:/bin/sh\n"), 0o644); err != nil {
		return "", fmt.Errorf("lab: %w", err)
	}
	tarCmd := exec.CommandContext(ctx, "tar", "-C", dir, "-cf", "-", ".")
	imp := exec.CommandContext(ctx, DockerClientPath, "-H", "unix://"+d.Socket, "import",
		"-c", `ENV PATH=/bin`, "-c", `CMD ["/bin/sh"]`, "-", name)
	pipe, err := tarCmd.StdoutPipe()
	if err != nil {
		return "", fmt.Errorf("lab: %w", err)
	}
	imp.Stdin = pipe
	var impOut strings.Builder
	imp.Stdout, imp.Stderr = &impOut, &impOut
	var tarErr strings.Builder
	tarCmd.Stderr = &tarErr
	if err := tarCmd.Start(); err != nil {
		return "", fmt.Errorf("lab: tar: %w", err)
	}
	ierr := imp.Run()
	terr := tarCmd.Wait()
	if ierr != nil || terr != nil {
		return "", fmt.Errorf("lab: docker import on %s: %v %v: %s %s", d.Host.Name, ierr, terr, impOut.String(), tarErr.String())
	}
	d.image = name
	return name, nil
}

func copyFile(src, dst string, mode os.FileMode) error {
	b, err := os.ReadFile(src)
	if err != nil {
		return fmt.Errorf("lab: %w", err)
	}
	if err := os.WriteFile(dst, b, mode); err != nil {
		return fmt.Errorf("lab: %w", err)
	}
	return nil
}

// DockerPluginDir is what the host's dockerd sees as /run/docker/plugins
// when started with it as DockerdOptions.PluginDir: fabricd on the host
// serves its plugin socket there.
func (h *Host) DockerPluginDir() string { return filepath.Join(h.lab.runDir, "plugins-"+h.Name) }
