package main

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/fabricnet/fabric/internal/testwait"
	"github.com/fabricnet/fabric/qemulane"
)

// inGuestEnv is set for a bench running inside the qemu guest, so that it
// does not boot another.
const inGuestEnv = "FABRIC_BENCH_IN_GUEST"

// guestBench runs `bench -only part` inside the qemu guest (Debian's stock
// kernel: the kernel's WireGuard and IPIP) and prints its tables. Under
// TCG every figure is slow; only the ratios within the guest's run mean
// anything.
func guestBench(ctx context.Context, part string) error {
	if os.Getenv(inGuestEnv) != "" {
		return nil
	}
	if err := qemulane.Available(); err != nil {
		fmt.Printf("\n(the %s part in the qemu guest is left out: %v)\n", part, err)
		return nil
	}
	kernel, _, err := qemulane.FindKernel()
	if err != nil {
		return err
	}
	dir, err := os.MkdirTemp("", "fabric-bench-guest-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	bins := map[string]string{}
	for _, pkg := range []string{"cmd/fabricd", "cmd/fabricctl", "bench"} {
		out := filepath.Join(dir, filepath.Base(pkg))
		if err := qemulane.BuildGoStatic("github.com/fabricnet/fabric/"+pkg, out); err != nil {
			return err
		}
		bins["/bin/fabric/"+filepath.Base(pkg)] = out
	}
	init := fmt.Sprintf("export FABRIC_BIN=/bin/fabric %s=1 %s=8\ncd /tmp\n/bin/fabric/bench -only %s > /tmp/bench.out 2>&1\nstatus=$?\nsed 's/^/GUESTBENCH /' /tmp/bench.out\n[ $status -eq 0 ] && echo %q || echo %q\n",
		inGuestEnv, testwait.ScaleEnv, part, qemulane.PassLine, qemulane.FailPrefix+" the bench failed in the guest")
	img, err := qemulane.FabricImage(kernel, bins, init, map[string]string{"/usr/bin/iperf3": "/usr/local/bin/iperf3", "/usr/bin/taskset": "/usr/local/bin/taskset", "/usr/bin/ss": "/usr/local/bin/ss"})
	if err != nil {
		return err
	}
	initrd, err := qemulane.Build(dir, img)
	if err != nil {
		return err
	}
	res, err := qemulane.Run(ctx, kernel, initrd, qemulane.RunOptions{MemoryMB: 2048, Timeout: 20 * time.Minute})
	var out []string
	for _, l := range res.Lines("GUESTBENCH") {
		out = append(out, strings.TrimPrefix(strings.TrimPrefix(l, "GUESTBENCH"), " "))
	}
	if err == nil && !res.Passed() {
		err = fmt.Errorf("%s:\n%s", res.Reason, strings.Join(out, "\n"))
	}
	if err != nil {
		return fmt.Errorf("the %s part in the qemu guest: %w", part, err)
	}
	fmt.Printf("\n### The same in the qemu guest (Debian's kernel %s under TCG: compare ratios, not figures)\n\n%s\n", filepath.Base(kernel), strings.Join(out, "\n"))
	return nil
}
