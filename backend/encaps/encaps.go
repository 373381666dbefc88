// Package encaps lists every encapsulation fabric can run, in order of
// preference, and builds the ones a host's mode asks for. It is the one
// place that names them: adding one (WireGuard, say) is a package behind
// backend.Backend and one entry here.
package encaps

import (
	"fmt"
	"log/slog"
	"net/netip"
	"slices"
	"strings"

	"github.com/vishvananda/netlink"

	"github.com/fabricnet/fabric/backend"
	"github.com/fabricnet/fabric/ipip"
	"github.com/fabricnet/fabric/vxlanfallback"
)

// Auto is the mode that runs every encapsulation the kernel supports and
// gives each peer the first one usable for it.
const Auto = "auto"

// Settings are what the encapsulations are built from.
type Settings struct {
	Handle       *netlink.Handle // nil = current namespace
	UnderlayAddr netip.Addr
	UnderlayDev  string
	Subnet       netip.Prefix // this host's container subnet
	VXLANVNI     int
	VXLANPort    int
	// PathWorks is the probe's verdict on IP protocol 4 per peer; used in
	// auto mode only, where ipip may fall back to another encapsulation.
	PathWorks func(peer netip.Addr) bool
	Logger    *slog.Logger
}

// Kind is one encapsulation fabric can run.
type Kind struct {
	Name      string
	Device    string                                // the device its backend owns
	Supported func(h *netlink.Handle) (bool, error) // whether the kernel can run it
	New       func(s Settings) (backend.Backend, error)
}

// Cleanup removes what the kind's backend owns on a host (`fabricd
// --cleanup`, with no backend running): its device, and with it every
// neighbour and FDB entry on it.
func (k Kind) Cleanup(h *netlink.Handle) error { return backend.DeleteLink(h, k.Device) }

// Kinds are every encapsulation, most preferred first: ipip has the least
// overhead; VXLAN passes where IP protocol 4 is blocked.
var Kinds = []Kind{
	{
		Name:      ipip.Name,
		Device:    ipip.DefaultDevice,
		Supported: ipip.Supported,
		New: func(s Settings) (backend.Backend, error) {
			return ipip.New(ipip.Config{Handle: s.Handle, UnderlayAddr: s.UnderlayAddr, Subnet: s.Subnet, PathWorks: s.PathWorks, Logger: s.Logger})
		},
	},
	{
		Name:      vxlanfallback.Name,
		Device:    vxlanfallback.DefaultDevice,
		Supported: func(*netlink.Handle) (bool, error) { return true, nil }, // vxlan is in every kernel fabric runs on
		New: func(s Settings) (backend.Backend, error) {
			return vxlanfallback.New(vxlanfallback.Config{Handle: s.Handle, VNI: s.VXLANVNI, Port: s.VXLANPort,
				UnderlayAddr: s.UnderlayAddr, UnderlayDev: s.UnderlayDev, Subnet: s.Subnet, Logger: s.Logger})
		},
	},
}

// Modes are the valid values of the encapsulation setting.
func Modes() []string {
	out := []string{Auto}
	for _, k := range Kinds {
		out = append(out, k.Name)
	}
	return out
}

// Devices are the names of every device an encapsulation may own.
func Devices() []string {
	var out []string
	for _, k := range Kinds {
		out = append(out, k.Device)
	}
	return out
}

// Select returns the kinds mode runs on a kernel that supports the ones in
// supported: the one named, or in auto mode every supported kind. A named
// kind the kernel cannot run is an error that says what to do instead.
func Select(mode string, supported map[string]bool) ([]Kind, error) {
	var out []Kind
	for _, k := range Kinds {
		if mode != Auto && mode != k.Name {
			continue
		}
		if !supported[k.Name] {
			if mode == k.Name {
				return nil, fmt.Errorf("encapsulation %s: this kernel has no %s support; use --encapsulation=auto to fall back to another encapsulation, or one of %s",
					mode, k.Name, strings.Join(slices.DeleteFunc(Modes(), func(m string) bool { return m == mode }), ", "))
			}
			continue
		}
		out = append(out, k)
	}
	if len(out) == 0 {
		return nil, fmt.Errorf("encapsulation %q: want one of %s", mode, strings.Join(Modes(), ", "))
	}
	return out, nil
}
