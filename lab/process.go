package lab

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"strings"
	"sync"
	"syscall"
	"time"
)

// nsCommand builds a command that runs name inside namespace ns. nsenter is
// used instead of `ip netns exec` because the latter remounts /sys, which
// breaks dockerd's cgroup mounts. nsenter execs the program, so the command's
// pid is the program's pid.
func nsCommand(ctx context.Context, ns, name string, args ...string) *exec.Cmd {
	full := append([]string{"--net=" + filepath.Join(netnsDir, ns), "--", name}, args...)
	var cmd *exec.Cmd
	if ctx == nil {
		cmd = exec.Command("nsenter", full...)
	} else {
		cmd = exec.CommandContext(ctx, "nsenter", full...)
	}
	// A child that keeps the output pipe open must not hang Run forever.
	cmd.WaitDelay = 2 * time.Second
	cmd.Env = HostEnviron()
	return cmd
}

// HostEnviron is the environment of programs on lab hosts, and of fabricd
// wherever a test starts it: the test's own, without FABRIC_* variables
// (FABRIC_BIN, FABRIC_REQUIRE_ALL are the test run's, and fabricd refuses
// FABRIC_* variables that are no setting), as a service manager would start
// fabricd with only what its unit sets.
func HostEnviron() []string {
	var env []string
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "FABRIC_") {
			env = append(env, kv)
		}
	}
	return env
}

// runOutput runs cmd and returns its combined output; the error names the
// command and includes its output.
func runOutput(cmd *exec.Cmd) (string, error) {
	out, err := cmd.CombinedOutput()
	if err != nil {
		return string(out), fmt.Errorf("%s: %w: %s", strings.Join(cmd.Args, " "), err, strings.TrimSpace(string(out)))
	}
	return string(out), nil
}

// Command returns a command that runs name inside the host's namespace.
func (h *Host) Command(ctx context.Context, name string, args ...string) *exec.Cmd {
	return nsCommand(ctx, h.Netns, name, args...)
}

// Run runs name inside the host's namespace and returns its combined output.
// Use Start for anything that keeps running: Run gives up on output pipes
// held open by background children 2 s after the command exits.
func (h *Host) Run(ctx context.Context, name string, args ...string) (string, error) {
	return runOutput(h.Command(ctx, name, args...))
}

// Start starts a long-running process inside the host's namespace. label
// names its log file <LogDir>/<host>-<label>.log; args[0] is the program.
func (h *Host) Start(label string, args ...string) (*Process, error) {
	return h.lab.start(h.Netns, h.Name+"-"+label, "", nil, args)
}

// StartEnv is Start with extra environment variables ("KEY=value") added to
// the lab process's environment.
func (h *Host) StartEnv(label string, env []string, args ...string) (*Process, error) {
	return h.lab.start(h.Netns, h.Name+"-"+label, "", env, args)
}

// Command returns a command that runs name inside the container's namespace.
func (c *Container) Command(ctx context.Context, name string, args ...string) *exec.Cmd {
	return nsCommand(ctx, c.Netns, name, args...)
}

// Run runs name inside the container's namespace and returns its combined
// output.
func (c *Container) Run(ctx context.Context, name string, args ...string) (string, error) {
	return runOutput(c.Command(ctx, name, args...))
}

// Start starts a long-running process inside the container's namespace,
// logging to <LogDir>/<host>-<container>-<label>.log.
func (c *Container) Start(label string, args ...string) (*Process, error) {
	return c.lab.start(c.Netns, c.Host.Name+"-"+c.Name+"-"+label, "", nil, args)
}

// StartEnv is Start with extra environment variables.
func (c *Container) StartEnv(label string, env []string, args ...string) (*Process, error) {
	return c.lab.start(c.Netns, c.Host.Name+"-"+c.Name+"-"+label, "", env, args)
}

// Process is a long-running process the lab started in a namespace, in its
// own process group.
type Process struct {
	Label   string
	cmd     *exec.Cmd
	logPath string
	pidFile string
	logFile *os.File
	done    chan struct{}
	waitErr error
	lab     *Lab
	// minGrace is the least time from SIGTERM to SIGKILL this process
	// needs to clean up after itself (0: the lab's).
	minGrace time.Duration

	stopOnce sync.Once
	stopErr  error
}

var errStoppedBySignal = errors.New("stopped by signal")

var labelPattern = regexp.MustCompile(`[^A-Za-z0-9_.-]+`)

func (l *Lab) start(ns, label, dir string, env []string, args []string) (*Process, error) {
	if len(args) == 0 {
		return nil, errors.New("lab: Start needs the program as the first argument")
	}
	label = labelPattern.ReplaceAllString(label, "_")
	l.mu.Lock()
	if l.closed {
		l.mu.Unlock()
		return nil, errors.New("lab: closed")
	}
	l.mu.Unlock()

	logPath := filepath.Join(l.logDir, label+".log")
	logFile, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return nil, fmt.Errorf("lab: %w", err)
	}
	fmt.Fprintf(logFile, "=== %s lab %s: %s\n", time.Now().Format(time.RFC3339Nano), l.prefix, strings.Join(args, " "))

	cmd := nsCommand(nil, ns, args[0], args[1:]...)
	cmd.Stdout, cmd.Stderr = logFile, logFile
	cmd.Dir = dir
	cmd.Env = append(HostEnviron(), env...)
	cmd.SysProcAttr = &syscall.SysProcAttr{
		Setpgid: true,
		// If the test binary dies without cleanup (e.g. -timeout panic), the
		// children are told to go too. Safe because spawnLocked forks from a
		// thread that never exits.
		Pdeathsig: syscall.SIGTERM,
	}
	p := &Process{Label: label, cmd: cmd, logPath: logPath, logFile: logFile, done: make(chan struct{}), lab: l}
	if err := spawnLocked(cmd.Start); err != nil {
		logFile.Close()
		return nil, fmt.Errorf("lab: starting %s (%s): %w", label, strings.Join(args, " "), err)
	}
	p.pidFile = filepath.Join(l.runDir, "pids", fmt.Sprintf("%s.%d.pid", label, cmd.Process.Pid))
	if err := writePidFile(p.pidFile, cmd.Process.Pid, label); err != nil {
		l.log.Warn("cannot record pid; Sweep will not find this process", "process", label, "err", err)
	}
	l.mu.Lock()
	l.procs[p] = struct{}{}
	closed := l.closed
	l.mu.Unlock()
	go p.wait()
	if closed { // Close raced with us: do not leave the process behind.
		_ = p.stop()
		return nil, errors.New("lab: closed")
	}
	l.log.Debug("process started", "process", label, "pid", cmd.Process.Pid, "netns", ns, "log", logPath)
	return p, nil
}

func (p *Process) wait() {
	p.waitErr = p.cmd.Wait()
	p.logFile.Close()
	_ = os.Remove(p.pidFile)
	close(p.done)
	p.lab.mu.Lock()
	delete(p.lab.procs, p)
	p.lab.mu.Unlock()
}

// Pid returns the process id (the program's: nsenter execs it).
func (p *Process) Pid() int { return p.cmd.Process.Pid }

// LogPath returns the file receiving the process's stdout and stderr.
func (p *Process) LogPath() string { return p.logPath }

// Exited reports whether the process has ended.
func (p *Process) Exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// Done is closed when the process has ended.
func (p *Process) Done() <-chan struct{} { return p.done }

// Wait blocks until the process ends (or ctx is done) and returns how it
// ended.
func (p *Process) Wait(ctx context.Context) error {
	select {
	case <-p.done:
		return p.waitErr
	case <-ctx.Done():
		return ctx.Err()
	}
}

// Signal sends sig to the process (only the process, not its group).
func (p *Process) Signal(sig syscall.Signal) error {
	if p.Exited() {
		return errors.New("lab: process already exited")
	}
	return p.cmd.Process.Signal(sig)
}

// Stop sends SIGTERM to the process group, waits up to 10 s, then SIGKILLs.
// It returns nil if the process exited cleanly or because of the SIGTERM, and
// an error if it had to be killed or had exited with a failure before.
func (p *Process) Stop() error {
	err := p.stop()
	if errors.Is(err, errStoppedBySignal) {
		return nil
	}
	return err
}

func (p *Process) stop() error {
	p.stopOnce.Do(func() { p.stopErr = p.terminate(max(p.lab.stopGrace, p.minGrace)) })
	return p.stopErr
}

func (p *Process) terminate(grace time.Duration) error {
	pid := p.cmd.Process.Pid
	if p.Exited() {
		return p.waitErr
	}
	_ = syscall.Kill(-pid, syscall.SIGTERM)
	select {
	case <-p.done:
		// Leftover group members (children of the process) go too.
		_ = syscall.Kill(-pid, syscall.SIGKILL)
		if isSignal(p.waitErr, syscall.SIGTERM) || p.waitErr == nil {
			return errStoppedBySignal
		}
		return fmt.Errorf("lab: %s exited on SIGTERM with: %w", p.Label, p.waitErr)
	case <-time.After(grace):
	}
	_ = syscall.Kill(-pid, syscall.SIGKILL)
	<-p.done
	return fmt.Errorf("lab: %s did not exit within %s of SIGTERM and was killed", p.Label, grace)
}

// Kill sends SIGKILL to the process group and waits for the process to end.
func (p *Process) Kill() error {
	p.stopOnce.Do(func() {
		if !p.Exited() {
			_ = syscall.Kill(-p.cmd.Process.Pid, syscall.SIGKILL)
			<-p.done
		}
		p.stopErr = errStoppedBySignal
	})
	<-p.done
	return nil
}

func isSignal(err error, sig syscall.Signal) bool {
	var exitErr *exec.ExitError
	if !errors.As(err, &exitErr) {
		return false
	}
	ws, ok := exitErr.Sys().(syscall.WaitStatus)
	return ok && ws.Signaled() && ws.Signal() == sig
}

// spawnLocked runs f (a cmd.Start) on one OS thread that never exits.
// Pdeathsig fires when the *thread* that forked the child exits, and Go may
// retire threads that a goroutine left locked; forking from a dedicated
// thread keeps Pdeathsig meaning "the test process died".
func spawnLocked(f func() error) error {
	spawnOnce.Do(func() {
		spawnRequests = make(chan func())
		go func() {
			runtime.LockOSThread()
			for req := range spawnRequests {
				req()
			}
		}()
	})
	result := make(chan error, 1)
	spawnRequests <- func() { result <- f() }
	return <-result
}

var (
	spawnOnce     sync.Once
	spawnRequests chan func()
)
