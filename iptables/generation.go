package iptables

import (
	"encoding/binary"
	"fmt"
	"time"

	"github.com/vishvananda/netlink/nl"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// rulesetGeneration returns nf_tables' ruleset generation in the network
// namespace at nsPath ("" is this process's). The kernel increments it with
// every change to any table of any owner (dockerd's, the administrator's,
// ours), so an unchanged number means the rules read last time are still
// the rules: the drift check asks for it, one netlink round trip, instead of
// running iptables-save every tick.
func rulesetGeneration(nsPath string) (uint32, error) {
	ns := netns.None()
	if nsPath != "" {
		h, err := netns.GetFromPath(nsPath)
		if err != nil {
			return 0, fmt.Errorf("network namespace %s: %w", nsPath, err)
		}
		defer h.Close()
		ns = h
	}
	s, err := nl.GetNetlinkSocketAt(ns, netns.None(), unix.NETLINK_NETFILTER)
	if err != nil {
		return 0, fmt.Errorf("netfilter netlink socket: %w", err)
	}
	defer s.Close()
	if err := s.SetReceiveTimeout(&unix.Timeval{Sec: 2}); err != nil {
		return 0, err
	}
	req := nl.NewNetlinkRequest(unix.NFNL_SUBSYS_NFTABLES<<8|unix.NFT_MSG_GETGEN, unix.NLM_F_REQUEST)
	req.AddData(&nl.Nfgenmsg{NfgenFamily: unix.AF_UNSPEC, Version: nl.NFNETLINK_V0})
	if err := s.Send(req); err != nil {
		return 0, fmt.Errorf("asking for the nf_tables generation: %w", err)
	}
	deadline := time.Now().Add(2 * time.Second)
	for time.Now().Before(deadline) {
		msgs, _, err := s.Receive()
		if err != nil {
			return 0, fmt.Errorf("reading the nf_tables generation: %w", err)
		}
		for _, m := range msgs {
			if m.Header.Seq != req.Seq {
				continue
			}
			switch m.Header.Type {
			case unix.NLMSG_ERROR:
				if len(m.Data) >= 4 {
					if errno := int32(binary.NativeEndian.Uint32(m.Data)); errno != 0 {
						return 0, fmt.Errorf("nf_tables generation: %w", unix.Errno(-errno))
					}
				}
			case unix.NFNL_SUBSYS_NFTABLES<<8 | unix.NFT_MSG_NEWGEN:
				if len(m.Data) < nl.SizeofNfgenmsg {
					return 0, fmt.Errorf("nf_tables generation: short reply")
				}
				attrs, err := nl.ParseRouteAttr(m.Data[nl.SizeofNfgenmsg:])
				if err != nil {
					return 0, fmt.Errorf("nf_tables generation: %w", err)
				}
				for _, a := range attrs {
					if a.Attr.Type == unix.NFTA_GEN_ID && len(a.Value) >= 4 {
						return binary.BigEndian.Uint32(a.Value), nil
					}
				}
				return 0, fmt.Errorf("nf_tables generation: no NFTA_GEN_ID in the reply")
			}
		}
	}
	return 0, fmt.Errorf("nf_tables generation: no reply")
}
