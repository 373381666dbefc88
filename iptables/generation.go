package iptables

import (
	"encoding/binary"
	"fmt"
	"syscall"
	"time"

	"github.com/vishvananda/netlink/nl"
	"golang.org/x/sys/unix"

	"github.com/fabricnet/fabric/internal/nfnetlink"
)

// rulesetGeneration returns nf_tables' ruleset generation in the network
// namespace at nsPath ("" is this process's). The kernel increments it with
// every change to any table of any owner (dockerd's, the administrator's,
// ours), so an unchanged number means the rules read last time are still
// the rules: the drift check asks for it, one netlink round trip, instead of
// running iptables-save every tick.
func rulesetGeneration(nsPath string) (uint32, error) {
	req := nl.NewNetlinkRequest(unix.NFNL_SUBSYS_NFTABLES<<8|unix.NFT_MSG_GETGEN, unix.NLM_F_REQUEST)
	req.AddData(&nl.Nfgenmsg{NfgenFamily: unix.AF_UNSPEC, Version: nl.NFNETLINK_V0})
	var gen uint32
	found := false
	err := nfnetlink.Exchange(nsPath, req, 2*time.Second, func(msgType uint16, attrs []syscall.NetlinkRouteAttr) (bool, error) {
		if msgType != unix.NFNL_SUBSYS_NFTABLES<<8|unix.NFT_MSG_NEWGEN {
			return false, nil
		}
		for _, a := range attrs {
			if a.Attr.Type == unix.NFTA_GEN_ID && len(a.Value) >= 4 {
				gen, found = binary.BigEndian.Uint32(a.Value), true
			}
		}
		return true, nil
	})
	if err != nil {
		return 0, fmt.Errorf("nf_tables generation: %w", err)
	}
	if !found {
		return 0, fmt.Errorf("nf_tables generation: no NFTA_GEN_ID in the reply")
	}
	return gen, nil
}
