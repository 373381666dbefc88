// Package nfnetlink talks netfilter netlink (nf_tables, ipset) in a network
// namespace given by path: one request and its replies (the iptables owner's
// generation check, the ipset reader), or a vishvananda/netlink handle for
// the ipset writes.
package nfnetlink

import (
	"encoding/binary"
	"fmt"
	"syscall"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netlink/nl"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// Handle returns a netlink handle for netfilter requests in the network
// namespace at nsPath ("" is this process's). The caller closes it.
func Handle(nsPath string) (*netlink.Handle, error) {
	ns, closeNS, err := namespace(nsPath)
	if err != nil {
		return nil, err
	}
	defer closeNS()
	return netlink.NewHandleAt(ns, unix.NETLINK_NETFILTER)
}

// namespace opens the namespace at nsPath, or gives netns.None() (this
// process's) for "", with what closes it.
func namespace(nsPath string) (netns.NsHandle, func(), error) {
	if nsPath == "" {
		return netns.None(), func() {}, nil
	}
	ns, err := netns.GetFromPath(nsPath)
	if err != nil {
		return netns.None(), nil, fmt.Errorf("network namespace %s: %w", nsPath, err)
	}
	return ns, func() { ns.Close() }, nil
}

// Exchange sends req on a netfilter netlink socket in the network namespace
// at nsPath ("" is this process's) and hands each reply to req to fn: its
// message type and its attributes after the nfgenmsg header. It ends when fn
// says done, at NLMSG_DONE or an acknowledgement, or with the kernel's error
// (a unix.Errno), or when no such end comes within timeout.
func Exchange(nsPath string, req *nl.NetlinkRequest, timeout time.Duration, fn func(msgType uint16, attrs []syscall.NetlinkRouteAttr) (done bool, err error)) error {
	ns, closeNS, err := namespace(nsPath)
	if err != nil {
		return err
	}
	defer closeNS()
	s, err := nl.GetNetlinkSocketAt(ns, netns.None(), unix.NETLINK_NETFILTER)
	if err != nil {
		return fmt.Errorf("netfilter netlink socket: %w", err)
	}
	defer s.Close()
	if err := s.SetReceiveTimeout(&unix.Timeval{Sec: 2}); err != nil {
		return err
	}
	if err := s.Send(req); err != nil {
		return fmt.Errorf("send: %w", err)
	}
	deadline := time.Now().Add(timeout)
	for time.Now().Before(deadline) {
		msgs, _, err := s.Receive()
		if err != nil {
			return fmt.Errorf("receive: %w", err)
		}
		for _, m := range msgs {
			if m.Header.Seq != req.Seq {
				continue
			}
			switch m.Header.Type {
			case unix.NLMSG_DONE:
				return nil
			case unix.NLMSG_ERROR:
				if len(m.Data) >= 4 {
					if errno := int32(binary.NativeEndian.Uint32(m.Data)); errno != 0 {
						return unix.Errno(-errno)
					}
				}
				return nil // an acknowledgement
			default:
				if len(m.Data) < nl.SizeofNfgenmsg {
					return fmt.Errorf("short reply")
				}
				attrs, err := nl.ParseRouteAttr(m.Data[nl.SizeofNfgenmsg:])
				if err != nil {
					return fmt.Errorf("reply: %w", err)
				}
				if done, err := fn(m.Header.Type, attrs); done || err != nil {
					return err
				}
			}
		}
	}
	return fmt.Errorf("no end of the reply within %s", timeout)
}
