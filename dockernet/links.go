package dockernet

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/fabricnet/fabric/backend"
)

// LinkPrefix starts the name of the host side of every endpoint's veth
// pair: fabricd owns every link whose name starts with it.
const LinkPrefix = "fnep"

// tempPrefix names the container side until dockerd moves and renames it.
const tempPrefix = "fntp"

// HostLink is the host side's name of endpoint id's veth pair.
func HostLink(endpointID string) string { return LinkPrefix + shortID(endpointID) }

func tempLink(endpointID string) string { return tempPrefix + shortID(endpointID) }

// shortID keeps names within the kernel's 15 bytes.
func shortID(id string) string { return id[:min(len(id), 11)] }

// Links owns the endpoints' veth pairs in one namespace: the host side is
// routed (a /32 to the container, owned by the data plane), answers ARP for
// the network's gateway (the gateway address on it, as a /32) and for
// every other address of the subnet (proxy ARP: a container's packets to a
// neighbour in its subnet go through this host, which routes them), and
// drops packets whose source is not the container's (strict reverse-path
// filter: the only route to the container's address is this link). Proxy
// ARP answers at once: the kernel's default delays each answer by up to
// 0.8 s, and a container's neighbour probes then fail while its packets
// queue (seen: 496 of 500 pings lost).
//
// On a network with IPv6 the host side also has GatewayV6, the container's
// IPv6 gateway; the container's IPv6 address is a /128, so it has no
// neighbours but this one. The reverse-path check for IPv6 is an ip6tables
// rule (nat's), the kernel having no rp_filter for it.
type Links struct {
	h *netlink.Handle
	// sysctl is where the namespace's /proc/sys/net is.
	sysctl string
}

// GatewayV6 is the IPv6 gateway of every container on a fabric network: a
// link-local address of the host side of its veth pair.
var GatewayV6 = netip.MustParseAddr("fe80::1")

// NewLinks returns the owner of endpoint links on h (nil: this namespace).
func NewLinks(h *netlink.Handle) *Links {
	return &Links{h: backend.DefaultHandle(h), sysctl: "/proc/sys/net"}
}

// Create makes endpoint id's veth pair: the host side configured and up,
// the container side (its name returned) for dockerd to move into the
// container. A pair left by an earlier attempt is replaced.
func (l *Links) Create(id string, gateway netip.Addr, ipv6 bool, mtu int) (containerSide string, err error) {
	host, temp := HostLink(id), tempLink(id)
	for _, name := range []string{host, temp} {
		if err := backend.DeleteLink(l.h, name); err != nil {
			return "", err
		}
	}
	veth := &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: host, MTU: mtu}, PeerName: temp}
	if err := l.h.LinkAdd(veth); err != nil {
		return "", fmt.Errorf("create veth pair %s/%s: %w", host, temp, err)
	}
	undo := func(err error) (string, error) {
		backend.DeleteLink(l.h, host)
		return "", err
	}
	peer, err := l.h.LinkByName(temp)
	if err != nil {
		return undo(fmt.Errorf("veth pair %s: %w", temp, err))
	}
	if err := l.h.LinkSetMTU(peer, mtu); err != nil {
		return undo(fmt.Errorf("set MTU of %s: %w", temp, err))
	}
	settings := map[string]string{"ipv4/conf/" + host + "/proxy_arp": "1", "ipv4/conf/" + host + "/rp_filter": "1",
		"ipv4/conf/" + host + "/forwarding": "1", "ipv4/neigh/" + host + "/proxy_delay": "0"}
	if ipv6 {
		settings["ipv6/conf/"+host+"/disable_ipv6"] = "0"
	}
	for key, value := range settings {
		if err := os.WriteFile(filepath.Join(l.sysctl, key), []byte(value), 0o644); err != nil {
			return undo(fmt.Errorf("net.%s: %w", strings.ReplaceAll(key, "/", "."), err))
		}
	}
	link, err := l.h.LinkByName(host)
	if err != nil {
		return undo(err)
	}
	if err := backend.SetSoleAddress(l.h, link, gateway); err != nil {
		return undo(err)
	}
	if ipv6 {
		// No duplicate detection: every host side has this address, on
		// its own link, and the container's first packets must not wait.
		gw := &netlink.Addr{IPNet: &net.IPNet{IP: GatewayV6.AsSlice(), Mask: net.CIDRMask(64, 128)}, Flags: unix.IFA_F_NODAD}
		if err := l.h.AddrReplace(link, gw); err != nil {
			return undo(fmt.Errorf("add %s to %s: %w", GatewayV6, host, err))
		}
	}
	if err := l.h.LinkSetUp(link); err != nil {
		return undo(fmt.Errorf("set %s up: %w", host, err))
	}
	return temp, nil
}

// Delete removes endpoint id's veth pair (both ends go with either).
func (l *Links) Delete(id string) error {
	return errors.Join(backend.DeleteLink(l.h, HostLink(id)), backend.DeleteLink(l.h, tempLink(id)))
}

// Names lists the endpoint links in the namespace (host sides and container
// sides not yet moved).
func (l *Links) Names() ([]string, error) {
	links, err := l.h.LinkList()
	if err != nil {
		return nil, fmt.Errorf("list links: %w", err)
	}
	var out []string
	for _, link := range links {
		name := link.Attrs().Name
		if strings.HasPrefix(name, LinkPrefix) || strings.HasPrefix(name, tempPrefix) {
			out = append(out, name)
		}
	}
	return out, nil
}

// Sweep deletes the links among names (from Names) whose endpoint is not
// in keep (host link names): left by an endpoint whose Leave never came
// (dockerd killed). names must be listed before keep is known, so a link
// made meanwhile, for an endpoint keep does not know yet, is not among
// them.
func (l *Links) Sweep(names []string, keep map[string]bool) error {
	var errs []error
	for _, name := range names {
		if strings.HasPrefix(name, LinkPrefix) && keep[name] {
			continue
		}
		if strings.HasPrefix(name, tempPrefix) && keep[LinkPrefix+strings.TrimPrefix(name, tempPrefix)] {
			continue
		}
		errs = append(errs, backend.DeleteLink(l.h, name))
	}
	return errors.Join(errs...)
}

// Cleanup deletes every endpoint link (`fabricd --cleanup`).
func (l *Links) Cleanup() error {
	names, err := l.Names()
	if err != nil {
		return err
	}
	return l.Sweep(names, nil)
}
