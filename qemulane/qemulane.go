// Package qemulane boots a stock Debian kernel under qemu (TCG) with a small
// initramfs built in pure Go, runs a test script inside it and reports the
// verdict the script printed on the serial console.
//
// It exists because the development and CI kernels lack ipip: the kernel IPIP
// data plane can only be exercised for real inside such a VM.
//
// Typical use from a test:
//
//	kernel, _, _ := qemulane.FindKernel()
//	qemulane.BuildGoTestStatic("github.com/fabricnet/fabric/e2e", bin)
//	initrd, _ := qemulane.Build(dir, qemulane.Image{Kernel: kernel,
//		Modules: []string{"ipip", "veth", "bridge", "vxlan"},
//		Binaries: map[string]string{"/bin/e2e.test": bin}, Init: "/bin/e2e.test -test.run X\n"})
//	res, err := qemulane.Run(ctx, kernel, initrd, qemulane.RunOptions{})
//	// err: qemu failed, timed out or printed no verdict; res.Passed(): PASS seen.
package qemulane

import (
	"bufio"
	"bytes"
	"compress/gzip"
	"context"
	"debug/elf"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"time"
)

// Markers printed on the console by programs running in the VM.
const (
	// ResultPrefix starts the verdict line: "QEMULANE-RESULT: PASS" or
	// "QEMULANE-RESULT: FAIL <reason>". The first verdict line wins.
	ResultPrefix = "QEMULANE-RESULT: "
	PassLine     = ResultPrefix + "PASS"
	FailPrefix   = ResultPrefix + "FAIL"
)

// DefaultBusybox is where Debian's busybox-static installs its binary.
const DefaultBusybox = "/bin/busybox"

// Paths inside the image.
const (
	imageModuleDir  = "lib/modules/qemulane"
	imageModuleList = "etc/qemulane/modules"
	imageInitScript = "etc/qemulane/init.sh"
)

// Image describes the initramfs Build writes.
type Image struct {
	// Kernel is the vmlinuz the image will boot with; its version selects
	// /lib/modules/<version>. Empty means FindKernel.
	Kernel string
	// Busybox is the host path of a static busybox; empty means DefaultBusybox.
	Busybox string
	// Modules are kernel module names (as in modules.dep, "-" and "_" are
	// equivalent). Dependencies are added and everything is loaded in
	// dependency order. Modules built into the kernel are skipped.
	Modules []string
	// Binaries maps a path in the image to the host path of a static binary
	// (or of a dynamic one, see AddHostBinary). /usr/local/sbin and
	// /usr/local/bin come first on PATH, so a program there wins over the
	// busybox applet of the same name (busybox --install overwrites /bin).
	Binaries map[string]string
	// Files maps a path in the image to its content. Content starting with
	// "#!" is made executable.
	Files map[string][]byte
	// Symlinks maps a path in the image to the link's target.
	Symlinks map[string]string
	// Init is a shell script run by /init once busybox is installed, modules
	// are loaded and /proc, /sys, /dev, /run, /tmp and /var/run/netns exist.
	// It should print a verdict line; /init powers the VM off afterwards.
	Init string
}

// initScript is /init: the fixed part every image shares. A failing step
// prints a FAIL verdict and powers off, so Run never waits for a timeout on a
// broken image.
const initScript = `#!/bin/busybox sh
/bin/busybox --install -s /bin
# Programs in /usr/local come first: busybox --install replaces same-named
# files in /bin (e.g. a real ip) with its applets.
export PATH=/usr/local/sbin:/usr/local/bin:/bin:/sbin:/usr/bin:/usr/sbin
fail() { echo "` + FailPrefix + ` $*"; sync; poweroff -f; }
mount -t proc proc /proc || fail "mount /proc"
mount -t sysfs sysfs /sys || fail "mount /sys"
mount -t devtmpfs devtmpfs /dev || fail "mount /dev"
mount -t tmpfs tmpfs /run || fail "mount /run"
mount -t tmpfs tmpfs /tmp || fail "mount /tmp"
mkdir -p /var/run/netns
# Keep kernel messages from interleaving with the result lines.
echo 1 > /proc/sys/kernel/printk
echo "QEMULANE-INIT: userspace up at $(cut -d' ' -f1 /proc/uptime)s"
while read -r mod; do
	[ -n "$mod" ] || continue
	insmod "/` + imageModuleDir + `/$mod.ko" || fail "insmod $mod"
done < /` + imageModuleList + `
echo "QEMULANE-INIT: modules loaded at $(cut -d' ' -f1 /proc/uptime)s"
sh /` + imageInitScript + `
status=$?
echo "QEMULANE-INIT: init script exited with status $status at $(cut -d' ' -f1 /proc/uptime)s"
[ "$status" -eq 0 ] || echo "` + FailPrefix + ` init script exited with status $status"
sync
poweroff -f
`

// FindKernel returns the newest /boot/vmlinuz-<v> that has a matching
// /lib/modules/<v> directory with modules.dep.
func FindKernel() (vmlinuz, modulesDir string, err error) {
	candidates, _ := filepath.Glob("/boot/vmlinuz-*")
	sort.Sort(sort.Reverse(sort.StringSlice(candidates)))
	for _, k := range candidates {
		dir, err := modulesDirFor(k)
		if err == nil {
			return k, dir, nil
		}
	}
	return "", "", errors.New("no /boot/vmlinuz-<v> with /lib/modules/<v>/modules.dep found " +
		"(install with: apt-get install -y linux-image-amd64)")
}

func modulesDirFor(kernel string) (string, error) {
	version := strings.TrimPrefix(filepath.Base(kernel), "vmlinuz-")
	if version == filepath.Base(kernel) {
		return "", fmt.Errorf("kernel %s is not named vmlinuz-<version>", kernel)
	}
	dir := filepath.Join("/lib/modules", version)
	if _, err := os.Stat(filepath.Join(dir, "modules.dep")); err != nil {
		return "", fmt.Errorf("modules for kernel %s: %w", kernel, err)
	}
	return dir, nil
}

// FindQEMU returns the path of qemu-system-x86_64.
func FindQEMU() (string, error) {
	p, err := exec.LookPath("qemu-system-x86_64")
	if err != nil {
		return "", errors.New("qemu-system-x86_64 not found (install with: apt-get install -y qemu-system-x86)")
	}
	return p, nil
}

// CheckBusybox verifies that path is a statically linked busybox, the only
// kind that runs in an image without a C library.
func CheckBusybox(path string) error {
	f, err := elf.Open(path)
	if err != nil {
		return fmt.Errorf("busybox %s: %w (install with: apt-get install -y busybox-static)", path, err)
	}
	defer f.Close()
	for _, p := range f.Progs {
		if p.Type == elf.PT_INTERP {
			return fmt.Errorf("busybox %s is dynamically linked (install busybox-static)", path)
		}
	}
	return nil
}

// Available reports why the lane cannot run on this machine, or nil.
func Available() error {
	var problems []string
	if _, err := FindQEMU(); err != nil {
		problems = append(problems, err.Error())
	}
	if _, _, err := FindKernel(); err != nil {
		problems = append(problems, err.Error())
	}
	if err := CheckBusybox(DefaultBusybox); err != nil {
		problems = append(problems, err.Error())
	}
	if len(problems) > 0 {
		return errors.New(strings.Join(problems, "; "))
	}
	return nil
}

// Build writes dir/initrd.gz (cpio newc, gzip) for img and returns its path.
func Build(dir string, img Image) (initrdPath string, err error) {
	kernel := img.Kernel
	if kernel == "" {
		if kernel, _, err = FindKernel(); err != nil {
			return "", err
		}
	}
	modDir, err := modulesDirFor(kernel)
	if err != nil {
		return "", err
	}
	busybox := img.Busybox
	if busybox == "" {
		busybox = DefaultBusybox
	}
	if err := CheckBusybox(busybox); err != nil {
		return "", err
	}

	a := newCpioArchive()
	for _, d := range []string{"proc", "sys", "dev", "run", "tmp", "bin", "sbin", "usr/bin", "usr/sbin", "etc", "root"} {
		if err := a.addDir(d); err != nil {
			return "", err
		}
	}
	// The kernel opens /dev/console for init's stdio before /init can mount devtmpfs.
	if err := a.addCharDev("dev/console", 5, 1); err != nil {
		return "", err
	}
	if err := a.addSymlink("var/run", "/run"); err != nil {
		return "", err
	}
	bb, err := os.ReadFile(busybox)
	if err != nil {
		return "", err
	}
	if err := a.addFile("bin/busybox", 0o755, bb); err != nil {
		return "", err
	}
	if err := a.addFile("init", 0o755, []byte(initScript)); err != nil {
		return "", err
	}
	if err := a.addFile(imageInitScript, 0o755, []byte(img.Init)); err != nil {
		return "", err
	}

	modules, err := ResolveModules(modDir, img.Modules)
	if err != nil {
		return "", err
	}
	var order []string
	for _, m := range modules {
		data, err := readModule(m.Path)
		if err != nil {
			return "", err
		}
		if err := a.addFile(imageModuleDir+"/"+m.Name+".ko", 0o644, data); err != nil {
			return "", err
		}
		order = append(order, m.Name)
	}
	if err := a.addFile(imageModuleList, 0o644, []byte(strings.Join(order, "\n")+"\n")); err != nil {
		return "", err
	}

	for imagePath, hostPath := range img.Binaries {
		data, err := os.ReadFile(hostPath)
		if err != nil {
			return "", fmt.Errorf("binary for %s: %w", imagePath, err)
		}
		if err := a.addFile(imagePath, 0o755, data); err != nil {
			return "", err
		}
	}
	for imagePath, target := range img.Symlinks {
		if err := a.addSymlink(strings.TrimPrefix(imagePath, "/"), target); err != nil {
			return "", err
		}
	}
	for imagePath, data := range img.Files {
		perm := uint32(0o644)
		if bytes.HasPrefix(data, []byte("#!")) {
			perm = 0o755
		}
		if err := a.addFile(imagePath, perm, data); err != nil {
			return "", err
		}
	}

	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", err
	}
	initrdPath = filepath.Join(dir, "initrd.gz")
	f, err := os.Create(initrdPath)
	if err != nil {
		return "", err
	}
	bw := bufio.NewWriterSize(f, 1<<20)
	// BestSpeed: the kernel inflates it under TCG either way, and building stays fast.
	zw, _ := gzip.NewWriterLevel(bw, gzip.BestSpeed)
	werr := a.write(zw)
	if werr == nil {
		werr = zw.Close()
	}
	if werr == nil {
		werr = bw.Flush()
	}
	if cerr := f.Close(); werr == nil {
		werr = cerr
	}
	if werr != nil {
		return "", fmt.Errorf("write %s: %w", initrdPath, werr)
	}
	return initrdPath, nil
}

// libDirs is where AddHostBinary looks for shared libraries (Debian amd64).
var libDirs = []string{"/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu", "/lib64", "/usr/lib", "/lib"}

// AddHostBinary adds a dynamically (or statically) linked program or shared
// object of this machine to the image at imagePath (empty: the same path),
// with its ELF interpreter and every shared library it needs, transitively,
// at their host paths. Symlinks in hostPath are followed.
func (img *Image) AddHostBinary(hostPath, imagePath string) error {
	if imagePath == "" {
		imagePath = hostPath
	}
	if img.Binaries == nil {
		img.Binaries = map[string]string{}
	}
	real, err := filepath.EvalSymlinks(hostPath)
	if err != nil {
		return err
	}
	img.Binaries[imagePath] = real
	return img.addLibraries(real, map[string]bool{})
}

func (img *Image) addLibraries(path string, seen map[string]bool) error {
	f, err := elf.Open(path)
	if err != nil {
		return fmt.Errorf("%s: %w", path, err)
	}
	defer f.Close()
	for _, p := range f.Progs {
		if p.Type != elf.PT_INTERP {
			continue
		}
		data, err := io.ReadAll(p.Open())
		if err != nil {
			return fmt.Errorf("%s: interpreter: %w", path, err)
		}
		interp := strings.TrimRight(string(data), "\x00")
		if _, ok := img.Binaries[interp]; !ok {
			real, err := filepath.EvalSymlinks(interp)
			if err != nil {
				return fmt.Errorf("%s: interpreter %s: %w", path, interp, err)
			}
			img.Binaries[interp] = real
		}
	}
	needed, err := f.ImportedLibraries()
	if err != nil {
		return fmt.Errorf("%s: %w", path, err)
	}
	for _, lib := range needed {
		if seen[lib] {
			continue
		}
		seen[lib] = true
		found := ""
		for _, dir := range libDirs {
			if _, err := os.Stat(filepath.Join(dir, lib)); err == nil {
				found = filepath.Join(dir, lib)
				break
			}
		}
		if found == "" {
			return fmt.Errorf("%s needs %s, not found in %v", path, lib, libDirs)
		}
		real, err := filepath.EvalSymlinks(found)
		if err != nil {
			return err
		}
		img.Binaries[found] = real
		if err := img.addLibraries(real, seen); err != nil {
			return err
		}
	}
	return nil
}

// AddHostDir adds every regular file in hostDir (not recursive) with
// AddHostBinary: e.g. the xtables extensions iptables loads at run time.
func (img *Image) AddHostDir(hostDir string) error {
	entries, err := os.ReadDir(hostDir)
	if err != nil {
		return err
	}
	for _, e := range entries {
		p := filepath.Join(hostDir, e.Name())
		if fi, err := os.Stat(p); err != nil || !fi.Mode().IsRegular() {
			continue
		}
		if err := img.AddHostBinary(p, ""); err != nil {
			return err
		}
	}
	return nil
}

// Module is a kernel module file resolved from modules.dep.
type Module struct {
	Name string // canonical name, "_" instead of "-"
	Path string // absolute host path (.ko, .ko.xz, .ko.zst or .ko.gz)
}

func moduleName(file string) string {
	base := filepath.Base(file)
	if i := strings.Index(base, ".ko"); i >= 0 {
		base = base[:i]
	}
	return strings.ReplaceAll(base, "-", "_")
}

// ResolveModules returns names plus their dependencies from modDir/modules.dep,
// ordered so every module comes after the modules it needs. Modules listed in
// modules.builtin are left out because the kernel already has them.
func ResolveModules(modDir string, names []string) ([]Module, error) {
	depFile, err := os.ReadFile(filepath.Join(modDir, "modules.dep"))
	if err != nil {
		return nil, err
	}
	deps := map[string][]string{} // name -> dependency names
	paths := map[string]string{}  // name -> relative path
	for _, line := range strings.Split(string(depFile), "\n") {
		target, rest, ok := strings.Cut(line, ":")
		if !ok {
			continue
		}
		name := moduleName(target)
		paths[name] = target
		for _, d := range strings.Fields(rest) {
			deps[name] = append(deps[name], moduleName(d))
		}
	}
	builtin := map[string]bool{}
	if data, err := os.ReadFile(filepath.Join(modDir, "modules.builtin")); err == nil {
		for _, line := range strings.Fields(string(data)) {
			builtin[moduleName(line)] = true
		}
	}

	var order []Module
	state := map[string]int{} // 1 visiting, 2 done
	var visit func(name, wantedBy string) error
	visit = func(name, wantedBy string) error {
		switch state[name] {
		case 1:
			return fmt.Errorf("module dependency cycle at %s", name)
		case 2:
			return nil
		}
		rel, ok := paths[name]
		if !ok {
			if builtin[name] {
				state[name] = 2
				return nil
			}
			if wantedBy != "" {
				return fmt.Errorf("module %s (needed by %s) not in %s/modules.dep", name, wantedBy, modDir)
			}
			return fmt.Errorf("module %s not in %s/modules.dep nor modules.builtin", name, modDir)
		}
		state[name] = 1
		// modules.dep lists the full transitive closure, most basic last;
		// visiting in reverse keeps the output close to modprobe's order.
		ds := deps[name]
		for i := len(ds) - 1; i >= 0; i-- {
			if err := visit(ds[i], name); err != nil {
				return err
			}
		}
		state[name] = 2
		p := rel
		if !filepath.IsAbs(p) {
			p = filepath.Join(modDir, rel)
		}
		order = append(order, Module{Name: name, Path: p})
		return nil
	}
	for _, n := range names {
		if err := visit(strings.ReplaceAll(n, "-", "_"), ""); err != nil {
			return nil, err
		}
	}
	return order, nil
}

// readModule returns the uncompressed module, so busybox insmod (plain
// init_module) can load it whatever compression the distribution chose.
func readModule(path string) ([]byte, error) {
	var tool []string
	switch {
	case strings.HasSuffix(path, ".ko"):
		return os.ReadFile(path)
	case strings.HasSuffix(path, ".ko.gz"):
		f, err := os.Open(path)
		if err != nil {
			return nil, err
		}
		defer f.Close()
		zr, err := gzip.NewReader(f)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", path, err)
		}
		return io.ReadAll(zr)
	case strings.HasSuffix(path, ".ko.xz"):
		tool = []string{"xz", "-dc", path}
	case strings.HasSuffix(path, ".ko.zst"):
		tool = []string{"zstd", "-dc", path}
	default:
		return nil, fmt.Errorf("module %s: unknown file type", path)
	}
	var stderr bytes.Buffer
	cmd := exec.Command(tool[0], tool[1:]...)
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return nil, fmt.Errorf("decompress %s with %s: %v: %s", path, tool[0], err, strings.TrimSpace(stderr.String()))
	}
	return out, nil
}

// BuildGoStatic builds the Go package pkg (an import path or a path relative
// to the current directory) into out with CGO_ENABLED=0, so it runs in the
// image without a C library.
func BuildGoStatic(pkg, out string) error {
	return goStatic("build", "-trimpath", "-ldflags=-s -w", "-o", out, pkg)
}

// BuildGoTestStatic compiles the tests of pkg into out the same way, for
// running a package's tests inside the image.
func BuildGoTestStatic(pkg, out string) error {
	return goStatic("test", "-c", "-trimpath", "-o", out, pkg)
}

// goStatic runs the go tool with CGO_ENABLED=0.
func goStatic(args ...string) error {
	goTool, err := exec.LookPath("go")
	if err != nil {
		return errors.New("go tool not found on PATH")
	}
	cmd := exec.Command(goTool, args...)
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if output, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("go %s: %v\n%s", strings.Join(args, " "), err, output)
	}
	return nil
}

// RunOptions tunes the VM. Zero values take the defaults noted.
type RunOptions struct {
	QEMU     string        // default FindQEMU
	CPUs     int           // default 2
	MemoryMB int           // default 1024
	Timeout  time.Duration // default 3 minutes; also bounded by ctx
	Append   string        // extra kernel command line
	// Console, if set, receives the serial output as it arrives (e.g. for
	// live test logs); Result.Output has it in full either way.
	Console io.Writer
	// StopOnLockup, if set, stops the VM as soon as its kernel reports a
	// CPU stuck in the kernel that long (a soft lockup): a guest that has
	// stood still for minutes does not recover before the timeout (ci109:
	// both CPUs stuck from 100 s until qemu was killed at 20 min).
	StopOnLockup time.Duration
}

// lockupWatch reads the console as it arrives and calls stop once the
// kernel reports a soft lockup of at least limit ("watchdog: BUG: soft
// lockup - CPU#1 stuck for 126s!").
type lockupWatch struct {
	limit time.Duration
	stop  func()
	line  []byte
	seen  string // the report that stopped the VM
}

var softLockup = regexp.MustCompile(`soft lockup - CPU#\d+ stuck for (\d+)s!`)

func (w *lockupWatch) Write(p []byte) (int, error) {
	for _, c := range p {
		if c != '\n' {
			w.line = append(w.line, c)
			continue
		}
		if m := softLockup.FindSubmatch(w.line); m != nil && w.seen == "" {
			if secs, _ := strconv.Atoi(string(m[1])); time.Duration(secs)*time.Second >= w.limit {
				w.seen = strings.TrimSpace(string(w.line))
				w.stop()
			}
		}
		w.line = w.line[:0]
	}
	return len(p), nil
}

// Verdict is what the VM reported.
type Verdict string

const (
	VerdictNone Verdict = "" // no verdict line seen
	VerdictPass Verdict = "PASS"
	VerdictFail Verdict = "FAIL"
)

// Result is the outcome of one boot.
type Result struct {
	Output   string  // full serial console output, "\r" removed
	Verdict  Verdict // parsed from the first verdict line
	Reason   string  // text after FAIL
	Duration time.Duration
	// BootToInit is when /init reported userspace up (kernel uptime), if seen.
	BootToInit string
}

// Passed reports whether the VM printed a PASS verdict.
func (r Result) Passed() bool { return r.Verdict == VerdictPass }

// Lines returns the output lines that start with prefix (leading whitespace
// ignored), e.g. Lines("PING ") for the evidence of a check program.
func (r Result) Lines(prefix string) []string {
	var out []string
	for _, line := range strings.Split(r.Output, "\n") {
		line = strings.TrimSpace(line)
		if strings.HasPrefix(line, prefix) {
			out = append(out, line)
		}
	}
	return out
}

const bootMarker = "QEMULANE-INIT: userspace up at "

func parseVerdict(r *Result) {
	for _, line := range strings.Split(r.Output, "\n") {
		line = strings.TrimSpace(line)
		// Markers may follow firmware escape sequences or kernel noise on the same line.
		if i := strings.Index(line, bootMarker); i >= 0 && r.BootToInit == "" {
			r.BootToInit = line[i+len(bootMarker):]
		}
		i := strings.Index(line, ResultPrefix)
		if i < 0 || r.Verdict != VerdictNone {
			continue
		}
		rest := strings.TrimSpace(line[i+len(ResultPrefix):])
		switch {
		case rest == "PASS":
			r.Verdict = VerdictPass
		case strings.HasPrefix(rest, "FAIL"):
			r.Verdict = VerdictFail
			r.Reason = strings.TrimSpace(strings.TrimPrefix(rest, "FAIL"))
		}
	}
}

// Run boots kernel with initrd under qemu TCG and waits for it to power off.
// A FAIL verdict is not an error (see Result.Verdict); an error means the VM
// could not report: qemu failed, timed out, or printed no verdict. qemu is
// killed when ctx ends or the timeout passes.
func Run(ctx context.Context, kernel, initrd string, opts RunOptions) (Result, error) {
	qemu := opts.QEMU
	if qemu == "" {
		var err error
		if qemu, err = FindQEMU(); err != nil {
			return Result{}, err
		}
	}
	cpus, mem, timeout := opts.CPUs, opts.MemoryMB, opts.Timeout
	if cpus <= 0 {
		cpus = 2
	}
	if mem <= 0 {
		mem = 1024
	}
	if timeout <= 0 {
		timeout = 3 * time.Minute
	}
	cmdline := "console=ttyS0 quiet panic=-1"
	if opts.Append != "" {
		cmdline += " " + opts.Append
	}
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()

	// KVM hangs on the project's machines, so always TCG.
	cmd := exec.CommandContext(ctx, qemu,
		"-accel", "tcg,thread=multi",
		"-smp", fmt.Sprint(cpus),
		"-cpu", "max",
		"-m", fmt.Sprint(mem),
		"-nographic", "-no-reboot",
		"-nic", "none",
		"-kernel", kernel,
		"-initrd", initrd,
		"-append", cmdline,
	)
	var output bytes.Buffer
	sinks := []io.Writer{&output}
	if opts.Console != nil {
		sinks = append(sinks, opts.Console)
	}
	var lockup *lockupWatch
	if opts.StopOnLockup > 0 {
		lockup = &lockupWatch{limit: opts.StopOnLockup, stop: cancel}
		sinks = append(sinks, lockup)
	}
	sink := io.MultiWriter(sinks...)
	cmd.Stdout = sink
	cmd.Stderr = sink
	cmd.WaitDelay = 5 * time.Second

	start := time.Now()
	runErr := cmd.Run()
	res := Result{
		Output:   strings.ReplaceAll(output.String(), "\r", ""),
		Duration: time.Since(start),
	}
	parseVerdict(&res)

	switch {
	case lockup != nil && lockup.seen != "":
		return res, fmt.Errorf("guest kernel locked up, VM stopped after %s (%q); console tail:\n%s",
			res.Duration.Round(time.Millisecond), lockup.seen, tail(res.Output, 80))
	case ctx.Err() != nil:
		return res, fmt.Errorf("qemu stopped after %s: %w; console tail:\n%s",
			res.Duration.Round(time.Millisecond), ctx.Err(), tail(res.Output, 30))
	case runErr != nil:
		return res, fmt.Errorf("qemu: %w; console tail:\n%s", runErr, tail(res.Output, 30))
	case res.Verdict == VerdictNone:
		return res, fmt.Errorf("VM powered off without a %q line; console tail:\n%s",
			ResultPrefix, tail(res.Output, 30))
	}
	return res, nil
}

func tail(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}
