// Package bridge creates or adopts the container bridge (docker0 by default)
// with the gateway address of this host's subnet and the fabric MTU, and
// repairs it when someone changes it.
package bridge

import (
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// Ensure makes the bridge `name` exist, be up, carry exactly gw (e.g.
// 10.244.3.1/24) as its IPv4 address and have the given MTU. Other IPv4
// addresses on it (an old lease, dockerd's default 172.17.0.1/16) are removed
// because they would route a subnet that is not ours into the bridge.
// Changes are logged; an unchanged bridge costs three netlink reads.
func Ensure(h *netlink.Handle, name string, gw netip.Prefix, mtu int, log *slog.Logger) error {
	if h == nil {
		h = &netlink.Handle{}
	}
	link, err := h.LinkByName(name)
	var notFound netlink.LinkNotFoundError
	switch {
	case errors.As(err, &notFound):
		br := &netlink.Bridge{LinkAttrs: netlink.LinkAttrs{Name: name, MTU: mtu}}
		if err := h.LinkAdd(br); err != nil {
			return fmt.Errorf("bridge %s: create: %w", name, err)
		}
		log.Info("created bridge", "bridge", name, "mtu", mtu)
		if link, err = h.LinkByName(name); err != nil {
			return fmt.Errorf("bridge %s: %w", name, err)
		}
	case err != nil:
		return fmt.Errorf("bridge %s: %w", name, err)
	case link.Type() != "bridge":
		return fmt.Errorf("bridge %s: an interface of type %s has that name; rename it or set --bridge", name, link.Type())
	}
	if link.Attrs().MTU != mtu {
		if err := h.LinkSetMTU(link, mtu); err != nil {
			return fmt.Errorf("bridge %s: set MTU %d: %w", name, mtu, err)
		}
		log.Info("set bridge MTU", "bridge", name, "from", link.Attrs().MTU, "to", mtu)
	}
	addrs, err := h.AddrList(link, unix.AF_INET)
	if err != nil {
		return fmt.Errorf("bridge %s: list addresses: %w", name, err)
	}
	want := &net.IPNet{IP: gw.Addr().AsSlice(), Mask: net.CIDRMask(gw.Bits(), 32)}
	have := false
	for _, a := range addrs {
		if a.IPNet.String() == want.String() {
			have = true
			continue
		}
		if err := h.AddrDel(link, &a); err != nil {
			return fmt.Errorf("bridge %s: remove foreign address %s: %w", name, a.IPNet, err)
		}
		log.Info("removed address that is not this host's gateway", "bridge", name, "address", a.IPNet.String())
	}
	if !have {
		if err := h.AddrAdd(link, &netlink.Addr{IPNet: want}); err != nil {
			return fmt.Errorf("bridge %s: add gateway %s: %w", name, gw, err)
		}
		log.Info("set bridge gateway", "bridge", name, "gateway", gw.String())
	}
	if link.Attrs().Flags&net.FlagUp == 0 {
		if err := h.LinkSetUp(link); err != nil {
			return fmt.Errorf("bridge %s: set up: %w", name, err)
		}
	}
	return nil
}

// Remove deletes the bridge if it exists (fabricd --cleanup).
func Remove(h *netlink.Handle, name string) error {
	if h == nil {
		h = &netlink.Handle{}
	}
	link, err := h.LinkByName(name)
	var notFound netlink.LinkNotFoundError
	if errors.As(err, &notFound) {
		return nil
	}
	if err != nil {
		return err
	}
	if link.Type() != "bridge" {
		return nil
	}
	return h.LinkDel(link)
}

// Hairpin turns on hairpin mode on every port of the bridge `name` that
// lacks it, so a container that connects to its own published port gets
// the packet back out of the port it came in by. Ports added later get it
// at the next call.
func Hairpin(h *netlink.Handle, name string) error {
	if h == nil {
		h = &netlink.Handle{}
	}
	br, err := h.LinkByName(name)
	if err != nil {
		return fmt.Errorf("bridge %s: %w", name, err)
	}
	links, err := h.LinkList()
	if err != nil {
		return fmt.Errorf("bridge %s: list its ports: %w", name, err)
	}
	for _, l := range links {
		if l.Attrs().MasterIndex != br.Attrs().Index {
			continue
		}
		if p, err := h.LinkGetProtinfo(l); err == nil && p.Hairpin {
			continue
		}
		if err := h.LinkSetHairpin(l, true); err != nil {
			return fmt.Errorf("bridge %s: hairpin on port %s: %w", name, l.Attrs().Name, err)
		}
	}
	return nil
}
