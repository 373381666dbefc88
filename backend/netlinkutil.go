package backend

import (
	"errors"
	"fmt"
	"net/netip"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// IsLinkNotFound reports whether err means the link does not exist.
func IsLinkNotFound(err error) bool {
	var nf netlink.LinkNotFoundError
	return errors.As(err, &nf) || errors.Is(err, unix.ENODEV)
}

// SetSoleAddress makes addr (a host address, /32) the only IPv4 address on
// link, so a changed subnet lease does not leave the old gateway address behind.
func SetSoleAddress(h *netlink.Handle, link netlink.Link, addr netip.Addr) error {
	want := netip.PrefixFrom(addr, addr.BitLen())
	have, err := h.AddrList(link, unix.AF_INET)
	if err != nil {
		return fmt.Errorf("list addresses on %s: %w", link.Attrs().Name, err)
	}
	present := false
	for _, a := range have {
		a := a
		if a.IPNet != nil {
			got, ok := netip.AddrFromSlice(a.IPNet.IP)
			ones, _ := a.IPNet.Mask.Size()
			if ok && netip.PrefixFrom(got.Unmap(), ones) == want {
				present = true
				continue
			}
		}
		if err := h.AddrDel(link, &a); err != nil {
			return fmt.Errorf("remove stale address %s from %s: %w", a.IPNet, link.Attrs().Name, err)
		}
	}
	if present {
		return nil // already right; avoid needless churn
	}
	if err := h.AddrReplace(link, &netlink.Addr{IPNet: IPNet(want)}); err != nil {
		return fmt.Errorf("add address %s to %s: %w", want, link.Attrs().Name, err)
	}
	return nil
}

// DefaultHandle returns h, or a handle on the calling thread's namespace.
func DefaultHandle(h *netlink.Handle) *netlink.Handle {
	if h == nil {
		return &netlink.Handle{}
	}
	return h
}

// DeleteLink deletes the named link if it exists.
func DeleteLink(h *netlink.Handle, name string) error {
	h = DefaultHandle(h)
	link, err := h.LinkByName(name)
	if IsLinkNotFound(err) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("look up %s: %w", name, err)
	}
	if err := h.LinkDel(link); err != nil && !IsLinkNotFound(err) {
		return fmt.Errorf("delete %s: %w", name, err)
	}
	return nil
}
