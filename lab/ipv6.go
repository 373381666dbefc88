package lab

import (
	"context"
	"fmt"
	"net/netip"
)

// AddIPv6 gives container c the IPv6 address addr (with its /64) and a
// default route through gw, which goes on the host's bridge, as dockerd
// does with --ipv6 --fixed-cidr-v6; the host forwards IPv6. Without
// duplicate address detection, so both are usable at once.
func (c *Container) AddIPv6(ctx context.Context, bridge string, gw, addr netip.Prefix) error {
	for _, step := range []struct {
		on interface {
			Run(context.Context, string, ...string) (string, error)
		}
		args []string
	}{
		{c.Host, []string{"sysctl", "-qw", "net.ipv6.conf.all.forwarding=1"}},
		{c.Host, []string{"ip", "-6", "addr", "replace", gw.String(), "dev", bridge, "nodad"}},
		{c, []string{"ip", "-6", "addr", "add", addr.String(), "dev", "eth0", "nodad"}},
		{c, []string{"ip", "-6", "route", "add", "default", "via", gw.Addr().String()}},
	} {
		if out, err := step.on.Run(ctx, step.args[0], step.args[1:]...); err != nil {
			return fmt.Errorf("lab: %v for %s on %s: %w %s", step.args, c.Name, c.Host.Name, err, out)
		}
	}
	return nil
}
