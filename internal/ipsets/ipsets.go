// Package ipsets is the one owner of fabric's ipsets (every set whose name
// starts with "fabric-"): the node set of ingress and the address sets of
// policy are made, filled, read and destroyed here, over netlink, without
// running the ipset command. It reads only what fabric needs: the
// vishvananda/netlink reader logs every attribute it does not know, and
// sets made by the ipset command carry some (bucket size, initval). Writes
// go through vishvananda/netlink.
package ipsets

import (
	"errors"
	"fmt"
	"net/netip"
	"syscall"
	"time"

	"github.com/vishvananda/netlink/nl"
	"golang.org/x/sys/unix"

	"github.com/fabricnet/fabric/internal/nfnetlink"
)

// Set is what Read returns of one set.
type Set struct {
	Name   string
	Type   string // "hash:ip", "hash:net", ...
	Family uint8  // unix.AF_INET, unix.AF_INET6
	// Addrs are the entries' addresses (for hash:net, without their
	// prefix length: fabric only reads hash:ip sets' entries).
	Addrs []netip.Addr
}

// Read returns the set called name in the network namespace at nsPath (""
// is this process's), or nil and no error when there is no such set.
func Read(nsPath, name string) (*Set, error) {
	var set *Set
	err := dump(nsPath, name, func(attrs []syscall.NetlinkRouteAttr) error {
		if set == nil {
			set = &Set{}
		}
		return set.merge(attrs)
	})
	if errors.Is(err, unix.ENOENT) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("ipset %s: %w", name, err)
	}
	return set, nil
}

// merge takes one message of a set's dump: the first carries its header,
// each carries some of its entries.
func (s *Set) merge(attrs []syscall.NetlinkRouteAttr) error {
	for _, a := range attrs {
		switch a.Attr.Type & nl.NLA_TYPE_MASK {
		case nl.IPSET_ATTR_SETNAME:
			s.Name = cString(a.Value)
		case nl.IPSET_ATTR_TYPENAME:
			s.Type = cString(a.Value)
		case nl.IPSET_ATTR_FAMILY:
			if len(a.Value) > 0 {
				s.Family = a.Value[0]
			}
		case nl.IPSET_ATTR_ADT:
			entries, err := nl.ParseRouteAttr(a.Value)
			if err != nil {
				return fmt.Errorf("entries: %w", err)
			}
			for _, e := range entries {
				if e.Attr.Type&nl.NLA_TYPE_MASK != nl.IPSET_ATTR_DATA {
					continue
				}
				addr, err := entryAddr(e.Value)
				if err != nil {
					return err
				}
				if addr.IsValid() {
					s.Addrs = append(s.Addrs, addr)
				}
			}
		}
	}
	return nil
}

// entryAddr returns the address of one entry (its IPSET_ATTR_IP).
func entryAddr(data []byte) (netip.Addr, error) {
	attrs, err := nl.ParseRouteAttr(data)
	if err != nil {
		return netip.Addr{}, fmt.Errorf("entry: %w", err)
	}
	for _, a := range attrs {
		if a.Attr.Type&nl.NLA_TYPE_MASK != nl.IPSET_ATTR_IP {
			continue
		}
		ips, err := nl.ParseRouteAttr(a.Value)
		if err != nil {
			return netip.Addr{}, fmt.Errorf("entry address: %w", err)
		}
		for _, ip := range ips {
			if addr, ok := netip.AddrFromSlice(ip.Value); ok {
				return addr, nil
			}
		}
	}
	return netip.Addr{}, nil
}

// dump runs IPSET_CMD_LIST for the set called name (every set when name
// is "") and hands each reply's attributes to fn.
func dump(nsPath, name string, fn func([]syscall.NetlinkRouteAttr) error) error {
	req := nl.NewNetlinkRequest(nl.IPSET_CMD_LIST|unix.NFNL_SUBSYS_IPSET<<8, unix.NLM_F_DUMP)
	req.AddData(&nl.Nfgenmsg{NfgenFamily: unix.AF_INET, Version: nl.NFNETLINK_V0})
	req.AddData(nl.NewRtAttr(nl.IPSET_ATTR_PROTOCOL, nl.Uint8Attr(nl.IPSET_PROTOCOL)))
	if name != "" {
		req.AddData(nl.NewRtAttr(nl.IPSET_ATTR_SETNAME, nl.ZeroTerminated(name)))
	}
	return nfnetlink.Exchange(nsPath, req, 5*time.Second, func(_ uint16, attrs []syscall.NetlinkRouteAttr) (bool, error) {
		return false, fn(attrs)
	})
}

func cString(b []byte) string {
	for i, c := range b {
		if c == 0 {
			return string(b[:i])
		}
	}
	return string(b)
}
