package agent

import (
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strings"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// underlay is the interface and address this host uses to reach other hosts.
type underlay struct {
	Dev    string
	Addr   netip.Addr
	Prefix netip.Prefix // the connected subnet, for cross-subnet decisions
	MTU    int
	// V6 is the host's IPv6 address on Dev in an IPv6 fabric, the next hop
	// of its IPv6 subnet, with its connected prefix length (as
	// planner.Host.Underlay); invalid: none.
	V6 netip.Prefix
}

// underlayNetworks are the networks of dev's global addresses, both
// families: no pool may overlap them.
func underlayNetworks(dev string) ([]netip.Prefix, error) {
	link, err := netlink.LinkByName(dev)
	if err != nil {
		return nil, fmt.Errorf("underlay %s: %w", dev, err)
	}
	addrs, err := netlink.AddrList(link, unix.AF_UNSPEC)
	if err != nil {
		return nil, fmt.Errorf("underlay %s: %w", dev, err)
	}
	var out []netip.Prefix
	for _, a := range addrs {
		ip, ok := netip.AddrFromSlice(a.IP)
		ones, _ := a.Mask.Size()
		if ok && ip.Unmap().IsGlobalUnicast() {
			out = append(out, netip.PrefixFrom(ip.Unmap(), ones).Masked())
		}
	}
	return out, nil
}

// findUnderlayV6 returns want if it is on dev, else (want invalid) the
// lowest usable global IPv6 address of dev, or none; with its connected
// prefix length.
func findUnderlayV6(dev string, want netip.Addr) (netip.Prefix, error) {
	link, err := netlink.LinkByName(dev)
	if err != nil {
		return netip.Prefix{}, fmt.Errorf("underlay %s: %w", dev, err)
	}
	addrs, err := netlink.AddrList(link, unix.AF_INET6)
	if err != nil {
		return netip.Prefix{}, fmt.Errorf("underlay %s: %w", dev, err)
	}
	var found []netip.Prefix
	for _, a := range addrs {
		ip, ok := netip.AddrFromSlice(a.IP)
		ones, _ := a.Mask.Size()
		const unusable = unix.IFA_F_TENTATIVE | unix.IFA_F_DADFAILED | unix.IFA_F_DEPRECATED
		if !ok || !ip.IsGlobalUnicast() || ip.Is4In6() || a.Flags&unusable != 0 {
			continue
		}
		if want.IsValid() && ip == want {
			return netip.PrefixFrom(ip, ones), nil
		}
		found = append(found, netip.PrefixFrom(ip, ones))
	}
	if want.IsValid() {
		return netip.Prefix{}, fmt.Errorf("underlayAddressV6 %s is not a usable address of interface %s (found %v)", want, dev, found)
	}
	slices.SortFunc(found, func(a, b netip.Prefix) int { return a.Addr().Compare(b.Addr()) })
	if len(found) == 0 {
		return netip.Prefix{}, nil
	}
	return found[0], nil
}

// findUnderlay picks the configured interface, else chooseUnderlay's; and
// on it want, else its first IPv4 address, else (an IPv6-only underlay)
// its lowest global IPv6 address, which is then also the host's IPv6 next
// hop (V6).
func findUnderlay(dev string, want netip.Addr) (underlay, error) {
	var u underlay
	var link netlink.Link
	var err error
	switch {
	case dev != "":
		if link, err = netlink.LinkByName(dev); err != nil {
			return u, fmt.Errorf("underlayInterface %q: %w", dev, err)
		}
	default:
		if link, err = chooseUnderlay(); err != nil {
			return u, err
		}
	}
	u.Dev = link.Attrs().Name
	u.MTU = link.Attrs().MTU
	if want.Is6() {
		if u.V6, err = findUnderlayV6(u.Dev, want); err != nil {
			return u, fmt.Errorf("underlayAddress: %w", err)
		}
		u.Addr, u.Prefix = u.V6.Addr(), u.V6.Masked()
		return u, nil
	}
	addrs, err := netlink.AddrList(link, unix.AF_INET)
	if err != nil {
		return u, fmt.Errorf("underlay %s: %w", u.Dev, err)
	}
	for _, a := range addrs {
		ip, _ := netip.AddrFromSlice(a.IP.To4())
		ones, _ := a.Mask.Size()
		if want.IsValid() && ip != want {
			continue
		}
		u.Addr = ip
		u.Prefix = netip.PrefixFrom(ip, ones).Masked()
		return u, nil
	}
	if want.IsValid() {
		return u, fmt.Errorf("underlayAddress %s is not on interface %s", want, u.Dev)
	}
	if u.V6, err = findUnderlayV6(u.Dev, netip.Addr{}); err != nil || !u.V6.IsValid() {
		return u, fmt.Errorf("underlay interface %s has neither an IPv4 nor a global IPv6 address; set --underlay-interface", u.Dev)
	}
	u.Addr, u.Prefix = u.V6.Addr(), u.V6.Masked()
	return u, nil
}

// chooseUnderlay is the interface of the IPv4 default route, else the only
// candidate interface with an IPv4 address; only on a host with neither
// (an IPv6-only underlay), the same with IPv6: its default route's, else
// the only one with a global IPv6 address.
func chooseUnderlay() (netlink.Link, error) {
	links, err := netlink.LinkList()
	if err != nil {
		return nil, err
	}
	for _, family := range []int{unix.AF_INET, unix.AF_INET6} {
		if link, err := defaultRouteLink(family); err != nil || link != nil {
			return link, err
		}
		var candidates []netlink.Link
		for _, l := range links {
			// Not fabric's own devices, nor bridges and tunnels: their
			// addresses are container gateways, not the underlay.
			switch {
			case l.Attrs().Flags&1 == 0, l.Attrs().Name == "lo", strings.HasPrefix(l.Attrs().Name, "fabric."),
				l.Type() == "bridge", l.Type() == "vxlan", l.Type() == "ipip", l.Type() == "veth" && l.Attrs().MasterIndex != 0:
				continue
			}
			if family == unix.AF_INET {
				if as, _ := netlink.AddrList(l, unix.AF_INET); len(as) > 0 {
					candidates = append(candidates, l)
				}
			} else if v6, _ := findUnderlayV6(l.Attrs().Name, netip.Addr{}); v6.IsValid() {
				candidates = append(candidates, l)
			}
		}
		switch len(candidates) {
		case 0:
			continue // no IPv4 anywhere: an IPv6-only underlay?
		case 1:
			return candidates[0], nil
		}
		return nil, fmt.Errorf("underlayInterface: cannot choose one (no default route, %d interfaces with addresses); set --underlay-interface", len(candidates))
	}
	return nil, errors.New("underlayInterface: no default route and no interface with an IPv4 or global IPv6 address; set --underlay-interface")
}

// defaultRouteLink is the interface of family's default route; nil
// without one.
func defaultRouteLink(family int) (netlink.Link, error) {
	routes, err := netlink.RouteListFiltered(family, &netlink.Route{Table: unix.RT_TABLE_MAIN}, netlink.RT_FILTER_TABLE)
	if err != nil {
		return nil, fmt.Errorf("underlayInterface: list routes: %w", err)
	}
	for _, r := range routes {
		if r.Dst != nil {
			if ones, _ := r.Dst.Mask.Size(); ones != 0 {
				continue // not a default route
			}
		}
		index := r.LinkIndex
		if index == 0 && len(r.MultiPath) > 0 {
			// An ECMP default route (two top-of-rack routers): its
			// first path's interface.
			index = r.MultiPath[0].LinkIndex
		}
		if link, err := netlink.LinkByIndex(index); err == nil {
			return link, nil
		}
	}
	return nil, nil
}
