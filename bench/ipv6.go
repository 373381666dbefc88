package main

import (
	"context"
	"fmt"
	"net/netip"
	"path/filepath"
	"time"

	"github.com/fabricnet/fabric/lab"
	"github.com/fabricnet/fabric/localapi"
)

// ipv6Bench measures container to container throughput over IPv6 against
// IPv4 in the same run: one fabricd pair with an IPv6 pool, two container
// pairs on it side by side on one CPU (as the throughput part runs its
// pairs), one talking IPv6, the other IPv4, one stream each. The IPv6
// side is set up as dockerd would: the /64's first address on the bridge
// and the containers' default route through it. It does so on an IPv4
// underlay and again on an IPv6-only one (the tunnel's outer header then
// IPv6: 20 bytes more per packet).
func ipv6Bench(ctx context.Context, binDir string) error {
	for _, ipv6Underlay := range []bool{false, true} {
		if err := ipv6BenchOn(ctx, binDir, ipv6Underlay); err != nil {
			return err
		}
	}
	return nil
}

func ipv6BenchOn(ctx context.Context, binDir string, ipv6Underlay bool) error {
	l, err := lab.New(ctx, lab.Spec{Hosts: 2, IPv6Underlay: ipv6Underlay, Logger: warnLog})
	if err != nil {
		return err
	}
	defer l.Close()
	h := l.Hosts()
	v4, err := startFabricPairWith(ctx, l, binDir, h[0], h[1], nil, "--pool-v6", "fd00:10:244::/48")
	if err != nil {
		return err
	}
	v6 := &containerPair{hosts: v4.hosts}
	for _, host := range v4.hosts {
		st, err := localapi.NewClient(filepath.Join(l.LogDir(), host.Name+"-run", "fabricd.sock")).Status(ctx)
		if err != nil {
			return err
		}
		sub4, sub6 := netip.MustParsePrefix(st.Subnet), netip.MustParsePrefix(st.SubnetV6)
		gw6, addr6 := sub6.Addr().Next(), sub6.Addr().Next().Next()
		c, err := l.AddContainer(ctx, host, "ip6", netip.PrefixFrom(sub4.Addr().Next().Next().Next(), sub4.Bits()), netip.MustParseAddr(st.Gateway), st.Bridge, st.MTU)
		if err != nil {
			return err
		}
		if err := c.AddIPv6(ctx, st.Bridge, netip.PrefixFrom(gw6, 64), netip.PrefixFrom(addr6, 64)); err != nil {
			return err
		}
		c.Addr = addr6 // what iperf3 binds and dials
		v6.ctrs = append(v6.ctrs, c)
	}
	if err := waitIPv6(ctx, v6); err != nil {
		return err
	}
	x, y, err := sideBySideRounds(ctx, v6, &v4.containerPair, 1)
	if err != nil {
		return err
	}
	underlay := "an IPv4 underlay"
	if ipv6Underlay {
		underlay = "an IPv6-only underlay"
	}
	fmt.Printf("## IPv6 against IPv4 on %s: container to container over fabricd (%s), one stream each\n\n", underlay, v4.encap)
	fmt.Printf("One fabricd pair with an IPv6 pool; an IPv6 and an IPv4 container pair side by side on CPU %s, %d rounds, median (min-max).\n\n", throughputCPU, throughputRounds)
	fmt.Printf("| IPv6 Gbit/s | IPv4 Gbit/s | IPv6 / IPv4 |\n|---|---|---|\n")
	fmt.Printf("| %s | %s | %s |\n\n", gbits(summarize(x)), gbits(summarize(y)), ratioStats(x, y))
	return nil
}

// waitIPv6 waits until the first container of p reaches the second over
// IPv6 (the routes follow BGP, a moment after the start).
func waitIPv6(ctx context.Context, p *containerPair) error {
	var err error
	for start := time.Now(); time.Since(start) < 20*time.Second; time.Sleep(200 * time.Millisecond) {
		if _, err = p.ctrs[0].Run(ctx, "ping", "-6", "-c", "1", "-W", "1", p.ctrs[1].Addr.String()); err == nil {
			return nil
		}
	}
	return fmt.Errorf("the IPv6 containers never reached each other: %w", err)
}
