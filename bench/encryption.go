package main

import (
	"context"
	"fmt"
	"os"
	"strconv"
	"strings"

	"github.com/fabricnet/fabric/lab"
	"github.com/fabricnet/fabric/localapi"
)

// encryptionBench measures container to container throughput between two
// fabricd hosts with encryption wireguard against two in clear, side by side
// on one CPU as the throughput part does, one stream. The encrypted pair's
// fabricd is pinned to that CPU too: with userspace WireGuard the crypto
// runs in fabricd, and it must pay from the same CPU for the ratio to be
// the cost of a byte. It also reports fabricd's own CPU per Gbit/s moved,
// and runs again in the qemu guest, where the kernel's WireGuard runs.
func encryptionBench(ctx context.Context, binDir string) error {
	if err := encryptionTable(ctx, binDir); err != nil {
		return err
	}
	// The kernel's WireGuard, where this kernel has none; the lab above is
	// gone by now, so the guest has the machine.
	return guestBench(ctx, "encryption")
}

func encryptionTable(ctx context.Context, binDir string) error {
	l, err := lab.New(ctx, lab.Spec{Hosts: 4, Logger: warnLog})
	if err != nil {
		return err
	}
	defer l.Close()
	h := l.Hosts()
	clear, err := startFabricPair(ctx, l, binDir, h[0], h[1])
	if err != nil {
		return fmt.Errorf("clear pair: %w", err)
	}
	enc, err := startFabricPairWith(ctx, l, binDir, h[2], h[3], []string{"taskset", "-c", throughputCPU}, "--encryption", "wireguard")
	if err != nil {
		return fmt.Errorf("encrypted pair: %w", err)
	}
	st, err := localapi.NewClient(h[2].FabricdRunDir() + "/fabricd.sock").Status(ctx)
	if err != nil {
		return err
	}
	before, err := cpuSeconds(enc.procs)
	if err != nil {
		return err
	}
	e, c, err := sideBySideRounds(ctx, &enc.containerPair, &clear.containerPair, 1)
	if err != nil {
		return err
	}
	after, err := cpuSeconds(enc.procs)
	if err != nil {
		return err
	}
	moved := 0.0 // Gbit, over every round's 3 s
	for _, v := range e {
		moved += v / 1e9 * 3
	}
	fmt.Printf("## Encryption: fabricd with encryption wireguard against fabricd in clear (%s), container to container, one stream\n\n", clear.encap)
	fmt.Printf("Encrypted: %s (MTU %d). Both pairs side by side on CPU %s, the encrypted pair's fabricd pinned there too; %d rounds, median (min-max).\n\n", st.Encryption, st.MTU, throughputCPU, throughputRounds)
	fmt.Printf("| encrypted Gbit/s | clear Gbit/s | encrypted / clear | fabricd CPU s per Gbit encrypted |\n|---|---|---|---|\n")
	fmt.Printf("| %s | %s | %s | %.2f |\n\n", gbits(summarize(e)), gbits(summarize(c)), ratioStats(e, c), (after-before)/moved)
	if strings.Contains(st.Encryption, "kernel") {
		fmt.Printf("With the kernel's WireGuard fabricd does no crypto: its CPU here is what it spends anyway (probes, BFD, repair), spread over the bytes moved.\n\n")
	}
	return nil
}

// cpuSeconds is the user and system CPU time the processes have used.
func cpuSeconds(procs []*lab.Process) (float64, error) {
	total := 0.0
	for _, p := range procs {
		raw, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", p.Pid()))
		if err != nil {
			return 0, err
		}
		// Fields after the command name (which may hold spaces): utime and
		// stime are the 14th and 15th of the line, in clock ticks (100/s).
		rest := strings.Fields(string(raw[strings.LastIndexByte(string(raw), ')')+2:]))
		for _, f := range rest[11:13] {
			v, err := strconv.ParseFloat(f, 64)
			if err != nil {
				return 0, err
			}
			total += v / 100
		}
	}
	return total, nil
}
