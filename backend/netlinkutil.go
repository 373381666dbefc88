package backend

import (
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"strconv"
	"strings"

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

// EnsureLink makes the device want.Attrs().Name exist with want's
// attributes: an existing device that mismatch reports different is deleted
// and created again (tunnel attributes cannot be changed in place); a new one
// is created. It returns the link and whether it was created. kind names the
// encapsulation in errors and logs.
func EnsureLink(h *netlink.Handle, kind string, want netlink.Link, mismatch func(have netlink.Link) string, log *slog.Logger) (netlink.Link, bool, error) {
	name := want.Attrs().Name
	existing, err := h.LinkByName(name)
	switch {
	case err == nil:
		why := mismatch(existing)
		if why == "" {
			return existing, false, nil
		}
		log.Info("recreating "+kind+" device with wrong attributes", "device", name, "reason", why)
		if err := h.LinkDel(existing); err != nil {
			return nil, false, fmt.Errorf("%s: delete mismatched device %s: %w", kind, name, err)
		}
	case !IsLinkNotFound(err):
		return nil, false, fmt.Errorf("%s: look up device %s: %w", kind, name, err)
	}
	if err := h.LinkAdd(want); err != nil {
		return nil, false, fmt.Errorf("%s: create device %s: %w", kind, name, err)
	}
	link, err := h.LinkByName(name)
	if err != nil {
		return nil, false, fmt.Errorf("%s: look up new device %s: %w", kind, name, err)
	}
	return link, true, nil
}

// FinishLink sets the MTU, the sole address addr/32 and the up flag of a
// tunnel device, the steps every encapsulation shares after EnsureLink.
func FinishLink(h *netlink.Handle, kind string, link netlink.Link, mtu int, addr netip.Addr) error {
	name := link.Attrs().Name
	if mtu > 0 && link.Attrs().MTU != mtu {
		if err := h.LinkSetMTU(link, mtu); err != nil {
			return fmt.Errorf("%s: set MTU %d on %s: %w", kind, mtu, name, err)
		}
	}
	if err := SetSoleAddress(h, link, addr); err != nil {
		return fmt.Errorf("%s: %w", kind, err)
	}
	if err := h.LinkSetUp(link); err != nil {
		return fmt.Errorf("%s: set %s up: %w", kind, name, err)
	}
	return nil
}

// ProtocolName is the name /etc/protocols gives IP protocol number proto, as
// iptables-save prints it, or the number when the file has none.
func ProtocolName(proto int) string {
	data, err := os.ReadFile("/etc/protocols")
	if err == nil {
		for _, line := range strings.Split(string(data), "\n") {
			line, _, _ = strings.Cut(line, "#")
			f := strings.Fields(line)
			if len(f) >= 2 && f[1] == strconv.Itoa(proto) {
				return f[0]
			}
		}
	}
	return strconv.Itoa(proto)
}
