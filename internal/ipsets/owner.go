package ipsets

import (
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"syscall"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netlink/nl"
	"golang.org/x/sys/unix"

	"github.com/fabricnet/fabric/internal/nfnetlink"
)

// Prefix starts the name of every set fabric owns.
const Prefix = "fabric-"

// Owner writes fabric's sets in one network namespace.
type Owner struct {
	nsPath string // "" is this process's namespace
}

// NewOwner returns the owner of fabric's sets in the namespace at nsPath
// ("" is this process's).
func NewOwner(nsPath string) *Owner { return &Owner{nsPath: nsPath} }

// errExists is the kernel's answer to adding what is there or removing
// what is not.
var errExists = nl.IPSetError(nl.IPSET_ERR_EXIST)

// SetIPs makes name a hash:ip set of family (unix.AF_INET or AF_INET6)
// holding exactly addrs, adding before it removes (a host joining is let in
// before one leaving is shut out), and returns how many entries it wrote.
// A set of that name of another type or family is an error: fabric did not
// make it and will not guess whose it is.
func (o *Owner) SetIPs(name string, family uint8, addrs []netip.Addr) (writes int, err error) {
	for _, a := range addrs {
		if a.Unmap().Is4() != (family == unix.AF_INET) {
			return 0, fmt.Errorf("ipset %s: %s is not of the set's family %d", name, a, family)
		}
	}
	set, err := Read(o.nsPath, name)
	if err != nil {
		return 0, err
	}
	if set != nil && (set.Type != "hash:ip" || set.Family != family) {
		return 0, fmt.Errorf("ipset %s exists as %s (family %d), not hash:ip of family %d: remove it (ipset destroy %s) or free the name", name, set.Type, set.Family, family, name)
	}
	have := map[netip.Addr]bool{}
	if set != nil {
		for _, a := range set.Addrs {
			have[a.Unmap()] = true
		}
	}
	want := map[netip.Addr]bool{}
	var add, del []netip.Addr
	for _, a := range addrs {
		want[a.Unmap()] = true
		if !have[a.Unmap()] {
			add = append(add, a.Unmap())
		}
	}
	for a := range have {
		if !want[a] {
			del = append(del, a)
		}
	}
	if set != nil && len(add)+len(del) == 0 {
		return 0, nil
	}
	err = o.with(func(h *netlink.Handle) error {
		if set == nil {
			if err := h.IpsetCreate(name, "hash:ip", netlink.IpsetCreateOptions{Family: family}); err != nil {
				return fmt.Errorf("ipset %s: create: %w", name, err)
			}
		}
		for _, a := range add {
			if err := h.IpsetAdd(name, &netlink.IPSetEntry{IP: a.AsSlice()}); err != nil && !errors.Is(err, errExists) {
				return fmt.Errorf("ipset %s: add %s: %w", name, a, err)
			}
			writes++
		}
		for _, a := range del {
			if err := h.IpsetDel(name, &netlink.IPSetEntry{IP: a.AsSlice()}); err != nil && !errors.Is(err, errExists) {
				return fmt.Errorf("ipset %s: remove %s: %w", name, a, err)
			}
			writes++
		}
		return nil
	})
	return writes, err
}

// SetNets makes name a hash:net set holding every prefix of nets, all of
// one family (the set's); entries already there stay (policy's sets are
// named after their content, so a set of that name holds nothing else).
func (o *Owner) SetNets(name string, nets []netip.Prefix) error {
	fam := uint8(unix.AF_INET)
	if len(nets) > 0 && nets[0].Addr().Is6() {
		fam = unix.AF_INET6
	}
	for _, p := range nets {
		if p.Addr().Is6() != (fam == unix.AF_INET6) {
			return fmt.Errorf("ipset %s: %s and %s are of different families: a set holds one", name, nets[0], p)
		}
	}
	return o.with(func(h *netlink.Handle) error {
		err := h.IpsetCreate(name, "hash:net", netlink.IpsetCreateOptions{Family: fam, MaxElements: uint32(max(65536, len(nets)))})
		if err != nil && !errors.Is(err, unix.EEXIST) && !errors.Is(err, errExists) {
			return fmt.Errorf("ipset %s: create: %w", name, err)
		}
		for _, p := range nets {
			entry := &netlink.IPSetEntry{IP: p.Addr().AsSlice(), CIDR: uint8(p.Bits())}
			if err := h.IpsetAdd(name, entry); err != nil && !errors.Is(err, errExists) {
				return fmt.Errorf("ipset %s: add %s: %w", name, p, err)
			}
		}
		return nil
	})
}

// Names lists fabric's sets.
func (o *Owner) Names() ([]string, error) {
	var names []string
	err := dump(o.nsPath, "", func(attrs []syscall.NetlinkRouteAttr) error {
		for _, a := range attrs {
			if a.Attr.Type&nl.NLA_TYPE_MASK == nl.IPSET_ATTR_SETNAME {
				if n := cString(a.Value); strings.HasPrefix(n, Prefix) && !slices.Contains(names, n) {
					names = append(names, n)
				}
			}
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("list ipsets: %w", err)
	}
	slices.Sort(names)
	return names, nil
}

// Destroy removes the set called name, if it exists. The kernel refuses
// while a rule uses it (unix.EBUSY).
func (o *Owner) Destroy(name string) error {
	return o.with(func(h *netlink.Handle) error {
		if err := h.IpsetDestroy(name); err != nil && !errors.Is(err, unix.ENOENT) {
			return fmt.Errorf("ipset %s: destroy: %w", name, err)
		}
		return nil
	})
}

// Cleanup destroys every fabric set (`fabricd --cleanup`, after the rules
// that use them are gone).
func (o *Owner) Cleanup() error {
	names, err := o.Names()
	if err != nil {
		return err
	}
	var errs []error
	for _, n := range names {
		errs = append(errs, o.Destroy(n))
	}
	return errors.Join(errs...)
}

func (o *Owner) with(f func(h *netlink.Handle) error) error {
	h, err := nfnetlink.Handle(o.nsPath)
	if err != nil {
		return err
	}
	defer h.Close()
	return f(h)
}
