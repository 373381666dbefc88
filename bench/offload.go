package main

import (
	"context"
	"errors"
	"fmt"

	"github.com/fabricnet/fabric/flowoffload"
	"github.com/fabricnet/fabric/lab"
)

// offloadBench measures container to container throughput between two
// fabricd hosts with flow offload (the default) against two with
// --flow-offload=false, side by side on one CPU as the throughput part does,
// one stream. Where this kernel has no flowtables the table is left out,
// and the part runs again in the qemu guest, whose kernel has them.
func offloadBench(ctx context.Context, binDir string) error {
	if err := offloadTable(ctx, binDir); err != nil {
		return err
	}
	return guestBench(ctx, "offload")
}

func offloadTable(ctx context.Context, binDir string) error {
	l, err := lab.New(ctx, lab.Spec{Hosts: 4, Logger: warnLog})
	if err != nil {
		return err
	}
	defer l.Close()
	h := l.Hosts()
	if err := flowoffload.New(lab.Path(h[0].Netns), nil).Supported(); err != nil {
		if !errors.Is(err, flowoffload.ErrUnsupported) {
			return err
		}
		fmt.Printf("## Flow offload: left out here (%v)\n", err)
		return nil
	}
	off, err := startFabricPairWith(ctx, l, binDir, h[0], h[1], nil, "--flow-offload=false")
	if err != nil {
		return fmt.Errorf("pair without flow offload: %w", err)
	}
	on, err := startFabricPair(ctx, l, binDir, h[2], h[3])
	if err != nil {
		return fmt.Errorf("pair with flow offload: %w", err)
	}
	for _, host := range on.hosts {
		cs, ok, err := flowoffload.Read(lab.Path(host.Netns))
		if err != nil || !ok {
			return fmt.Errorf("%s: no flowtable (%v)", host.Name, err)
		}
		if len(cs.Devices) < 2 {
			return fmt.Errorf("%s: flowtable on %v only", host.Name, cs.Devices)
		}
	}
	with, without, err := sideBySideRounds(ctx, &on.containerPair, &off.containerPair, 1)
	if err != nil {
		return err
	}
	fmt.Printf("## Flow offload: fabricd with its flowtable against fabricd with --flow-offload=false (%s), container to container, one stream\n\n", on.encap)
	fmt.Printf("Both pairs side by side on CPU %s; %d rounds, median (min-max).\n\n", throughputCPU, throughputRounds)
	fmt.Printf("| offloaded Gbit/s | through the rules Gbit/s | offloaded / through the rules |\n|---|---|---|\n")
	fmt.Printf("| %s | %s | %s |\n\n", gbits(summarize(with)), gbits(summarize(without)), ratioStats(with, without))
	return nil
}
