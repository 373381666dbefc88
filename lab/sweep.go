package lab

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

// A pid file holds "pid starttime label". The start time (field 22 of
// /proc/PID/stat) proves the pid still names the process we started and
// not a later one that reused the number.

func writePidFile(path string, pid int, label string) error {
	start, err := processStartTime(pid)
	if err != nil {
		return err
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return err
	}
	return os.WriteFile(path, []byte(fmt.Sprintf("%d %d %s\n", pid, start, label)), 0o600)
}

// writeOwnerFile records the process that owns a run directory, so a later
// SweepStale can tell a crashed run from a live one.
func writeOwnerFile(runDir string) error {
	return writePidFile(filepath.Join(runDir, "owner"), os.Getpid(), "owner")
}

// ownLogDirFile in the run dir names the temporary log dir the lab made, so
// Sweep can remove it too.
const ownLogDirFile = "own-logdir"

func processStartTime(pid int) (uint64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, err
	}
	// comm may contain spaces and parentheses; fields resume after the last ')'.
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	if i < 0 {
		return 0, fmt.Errorf("unexpected /proc/%d/stat", pid)
	}
	fields := strings.Fields(s[i+1:])
	// fields[0] is field 3 (state); starttime is field 22.
	if len(fields) < 20 {
		return 0, fmt.Errorf("unexpected /proc/%d/stat", pid)
	}
	return strconv.ParseUint(fields[19], 10, 64)
}

// readPidFile returns the pid if the file names a process that is still the
// one recorded, else 0.
func readPidFile(path string) (int, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return 0, err
	}
	var pid int
	var start uint64
	if _, err := fmt.Sscanf(string(b), "%d %d", &pid, &start); err != nil {
		return 0, fmt.Errorf("%s: %w", path, err)
	}
	now, err := processStartTime(pid)
	if err != nil || now != start {
		return 0, nil // gone, or the pid was reused by someone else
	}
	return pid, nil
}

// Sweep removes what a crashed run with this prefix left behind: processes
// recorded in its pid files (verified by start time), namespaces and
// root-namespace links named "<prefix>-...", and its run directory.
func Sweep(prefix string) error {
	if !prefixPattern.MatchString(prefix) {
		return fmt.Errorf("lab: sweep: invalid prefix %q", prefix)
	}
	var errs []error
	runDir := filepath.Join(runBase, prefix)
	pidFiles, _ := filepath.Glob(filepath.Join(runDir, "pids", "*.pid"))
	var pids []int
	for _, f := range pidFiles {
		pid, err := readPidFile(f)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		if pid > 0 {
			pids = append(pids, pid)
			_ = syscall.Kill(-pid, syscall.SIGTERM)
		}
	}
	deadline := time.Now().Add(5 * time.Second)
	for _, pid := range pids {
		for processAlive(pid) && time.Now().Before(deadline) {
			time.Sleep(50 * time.Millisecond)
		}
		_ = syscall.Kill(-pid, syscall.SIGKILL)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := sweepNamespacesAndLinks(ctx, prefix); err != nil {
		errs = append(errs, err)
	}
	// The lab's own temporary log dir, if it made one.
	if b, err := os.ReadFile(filepath.Join(runDir, ownLogDirFile)); err == nil {
		dir := strings.TrimSpace(string(b))
		if strings.HasPrefix(filepath.Base(dir), prefix+"-logs-") {
			if err := os.RemoveAll(dir); err != nil {
				errs = append(errs, err)
			}
		}
	}
	if err := os.RemoveAll(runDir); err != nil {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}

// SweepStale sweeps every run whose owning process is gone (crashed tests,
// killed demos). Live runs are left alone.
func SweepStale() error {
	dirs, err := os.ReadDir(runBase)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return nil
		}
		return err
	}
	var errs []error
	for _, d := range dirs {
		if !d.IsDir() || !prefixPattern.MatchString(d.Name()) {
			continue
		}
		owner := filepath.Join(runBase, d.Name(), "owner")
		pid, err := readPidFile(owner)
		if errors.Is(err, os.ErrNotExist) {
			// A run being created has its directory a moment before its
			// owner file; only treat old ones as stale.
			if info, serr := d.Info(); serr != nil || time.Since(info.ModTime()) < time.Minute {
				continue
			}
		} else if err != nil || pid > 0 {
			continue
		}
		if err := Sweep(d.Name()); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

func processAlive(pid int) bool {
	return syscall.Kill(pid, 0) == nil
}

// namespacesWithPrefix lists named namespaces starting with "<prefix>-".
func namespacesWithPrefix(prefix string) ([]string, error) {
	entries, err := os.ReadDir(netnsDir)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return nil, nil
		}
		return nil, err
	}
	var out []string
	for _, e := range entries {
		if strings.HasPrefix(e.Name(), prefix+"-") {
			out = append(out, e.Name())
		}
	}
	return out, nil
}

// rootLinksWithPrefix lists links in the root namespace named "<prefix>-...".
func rootLinksWithPrefix(prefix string) ([]string, error) {
	entries, err := os.ReadDir("/sys/class/net")
	if err != nil {
		return nil, err
	}
	var out []string
	for _, e := range entries {
		if strings.HasPrefix(e.Name(), prefix+"-") {
			out = append(out, e.Name())
		}
	}
	return out, nil
}

func deleteNamespace(ctx context.Context, ns string) error {
	if _, err := os.Stat(filepath.Join(netnsDir, ns)); errors.Is(err, os.ErrNotExist) {
		return nil
	}
	_, err := runOutput(exec.CommandContext(ctx, "ip", "netns", "delete", ns))
	if err != nil {
		if _, serr := os.Stat(filepath.Join(netnsDir, ns)); errors.Is(serr, os.ErrNotExist) {
			return nil // a concurrent sweep got there first
		}
	}
	return err
}

func sweepNamespacesAndLinks(ctx context.Context, prefix string) error {
	var errs []error
	namespaces, err := namespacesWithPrefix(prefix)
	if err != nil {
		errs = append(errs, err)
	}
	for _, ns := range namespaces {
		if err := deleteNamespace(ctx, ns); err != nil {
			errs = append(errs, err)
		}
	}
	links, err := rootLinksWithPrefix(prefix)
	if err != nil {
		errs = append(errs, err)
	}
	for _, link := range links {
		if _, err := runOutput(exec.CommandContext(ctx, "ip", "link", "delete", link)); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// Live labs, so an interrupt can close them (see CloseOnInterrupt).
var (
	liveMu     sync.Mutex
	liveLabs   = map[*Lab]struct{}{}
	signalOnce sync.Once
)

func register(l *Lab) {
	liveMu.Lock()
	liveLabs[l] = struct{}{}
	liveMu.Unlock()
}

func unregister(l *Lab) {
	liveMu.Lock()
	delete(liveLabs, l)
	liveMu.Unlock()
}

// CloseOnInterrupt installs (once) a SIGINT/SIGTERM handler that closes every
// live lab and then exits with status 130. ForTest calls it, since Ctrl-C
// would otherwise skip t.Cleanup and leave namespaces and processes behind.
// Programs with their own signal handling should close the lab themselves.
func CloseOnInterrupt() {
	signalOnce.Do(func() {
		ch := make(chan os.Signal, 1)
		signal.Notify(ch, os.Interrupt, syscall.SIGTERM)
		go func() {
			sig := <-ch
			fmt.Fprintf(os.Stderr, "lab: %v: removing labs before exit\n", sig)
			liveMu.Lock()
			labs := make([]*Lab, 0, len(liveLabs))
			for l := range liveLabs {
				labs = append(labs, l)
			}
			liveMu.Unlock()
			for _, l := range labs {
				if err := l.Close(); err != nil {
					fmt.Fprintln(os.Stderr, err)
				}
			}
			os.Exit(130)
		}()
	})
}
