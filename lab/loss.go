package lab

import (
	"errors"
	"fmt"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// ErrNoNetem is returned by Loss on a kernel without the netem qdisc
// (sch_netem), such as the build machines'; the qemu guest has it.
var ErrNoNetem = errors.New("lab: this kernel has no netem qdisc (sch_netem)")

// Loss makes h's underlay link drop percent of the packets it sends, at
// random (a netem qdisc as root qdisc of h.Dev). dropped reads how many it
// has dropped so far; undo removes it.
func (h *Host) Loss(percent float32) (dropped func() (uint32, error), undo func() error, err error) {
	ns, err := netns.GetFromName(h.Netns)
	if err != nil {
		return nil, nil, fmt.Errorf("lab: namespace %s: %w", h.Netns, err)
	}
	handle, err := netlink.NewHandleAt(ns, unix.NETLINK_ROUTE)
	ns.Close()
	if err != nil {
		return nil, nil, fmt.Errorf("lab: netlink in %s: %w", h.Netns, err)
	}
	link, err := handle.LinkByName(h.Dev)
	if err != nil {
		handle.Close()
		return nil, nil, fmt.Errorf("lab: %s on %s: %w", h.Dev, h.Name, err)
	}
	qdisc := netlink.NewNetem(netlink.QdiscAttrs{
		LinkIndex: link.Attrs().Index,
		Handle:    netlink.MakeHandle(1, 0),
		Parent:    netlink.HANDLE_ROOT,
	}, netlink.NetemQdiscAttrs{Loss: percent})
	if err := handle.QdiscReplace(qdisc); err != nil {
		handle.Close()
		if errors.Is(err, unix.ENOENT) {
			return nil, nil, fmt.Errorf("%w: %v", ErrNoNetem, err)
		}
		return nil, nil, fmt.Errorf("lab: netem loss on %s of %s: %w", h.Dev, h.Name, err)
	}
	h.lab.log.Info("underlay link drops packets at random", "host", h.Name, "percent", percent)
	dropped = func() (uint32, error) {
		qdiscs, err := handle.QdiscList(link)
		if err != nil {
			return 0, err
		}
		for _, q := range qdiscs {
			if q.Type() == "netem" && q.Attrs().Statistics != nil && q.Attrs().Statistics.Queue != nil {
				return q.Attrs().Statistics.Queue.Drops, nil
			}
		}
		return 0, fmt.Errorf("lab: no netem qdisc on %s of %s any more", h.Dev, h.Name)
	}
	undo = func() error {
		defer handle.Close()
		if err := handle.QdiscDel(qdisc); err != nil && !errors.Is(err, unix.ENOENT) && !errors.Is(err, unix.EINVAL) {
			return fmt.Errorf("lab: removing netem from %s of %s: %w", h.Dev, h.Name, err)
		}
		return nil
	}
	return dropped, undo, nil
}
