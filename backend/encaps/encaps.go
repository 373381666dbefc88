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
	"github.com/fabricnet/fabric/wireguard"
	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"
)

// Auto is the mode that runs every encapsulation the kernel supports and
// gives each peer the first one usable for it.
const Auto = "auto"

// Encryption settings: off (the default), wireguard (every peer through
// WireGuard, none in clear), and wireguard-optional (WireGuard to the peers
// that offer it, the clear encapsulations to the rest: the step between
// the two while a fabric turns encryption on or off, one host at a time).
const (
	EncryptionOff      = "off"
	EncryptionRequired = "wireguard"
	EncryptionOptional = "wireguard-optional"
)

// EncryptionModes are the valid values of the encryption setting.
func EncryptionModes() []string {
	return []string{EncryptionOff, EncryptionRequired, EncryptionOptional}
}

// Settings are what the encapsulations are built from.
type Settings struct {
	Handle       *netlink.Handle // nil = current namespace
	UnderlayAddr netip.Addr
	UnderlayDev  string
	Subnet       netip.Prefix // this host's container subnet
	VXLANVNI     int
	VXLANPort    int
	// WireGuard: this host's private key and UDP port, and which
	// implementation ("" = the kernel's where it has one).
	WireGuardKey            wgtypes.Key
	WireGuardPort           int
	WireGuardImplementation string
	// PathWorks is the probe's verdict on IP protocol 4 per peer; used in
	// auto mode only, where ipip may fall back to another encapsulation.
	PathWorks func(peer netip.Addr) bool
	Logger    *slog.Logger
}

// Kind is one encapsulation fabric can run.
type Kind struct {
	Name      string
	Encrypts  bool                                  // runs only where encryption is on
	Device    string                                // the device its backend owns
	Supported func(h *netlink.Handle) (bool, error) // whether the kernel can run it
	New       func(s Settings) (backend.Backend, error)
}

// Cleanup removes what the kind's backend owns on a host (`fabricd
// --cleanup`, with no backend running): its device, and with it every
// neighbour and FDB entry on it.
func (k Kind) Cleanup(h *netlink.Handle) error { return backend.DeleteLink(h, k.Device) }

// Kinds are every encapsulation, most preferred first: WireGuard where
// encryption is on; ipip has the least overhead; VXLAN passes where IP
// protocol 4 is blocked.
var Kinds = []Kind{
	{
		Name:      wireguard.Name,
		Encrypts:  true,
		Device:    wireguard.DefaultDevice,
		Supported: wireguard.Supported,
		New: func(s Settings) (backend.Backend, error) {
			return wireguard.New(wireguard.Config{Handle: s.Handle, Port: s.WireGuardPort, PrivateKey: s.WireGuardKey,
				UnderlayAddr: s.UnderlayAddr, Subnet: s.Subnet, Implementation: s.WireGuardImplementation, Logger: s.Logger})
		},
	},
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

// Modes are the valid values of the encapsulation setting: auto and the
// encapsulations that send in clear (WireGuard comes with the encryption
// setting).
func Modes() []string {
	out := []string{Auto}
	for _, k := range Kinds {
		if !k.Encrypts {
			out = append(out, k.Name)
		}
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

// Select returns the kinds a host runs, most preferred first, for its
// encapsulation mode and encryption setting on a kernel that supports the
// ones in supported: with encryption required only the encrypting kinds;
// optional, those and then the mode's; off, the one named, or in auto mode
// every supported kind that sends in clear. A kind the setting needs and
// the kernel cannot run is an error that says what to do instead.
func Select(mode, encryption string, supported map[string]bool) ([]Kind, error) {
	if encryption == "" {
		encryption = EncryptionOff
	}
	if !slices.Contains(EncryptionModes(), encryption) {
		return nil, fmt.Errorf("encryption %q: want one of %s", encryption, strings.Join(EncryptionModes(), ", "))
	}
	if encryption == EncryptionRequired && mode != Auto {
		return nil, fmt.Errorf("encapsulation %s sends in clear, and encryption %s sends nothing in clear: leave encapsulation at auto, or use encryption %s while you switch",
			mode, encryption, EncryptionOptional)
	}
	var out []Kind
	for _, k := range Kinds {
		if k.Encrypts {
			if encryption == EncryptionOff {
				continue
			}
			if !supported[k.Name] {
				return nil, fmt.Errorf("encryption %s: this host can run no %s (no kernel module and no /dev/net/tun for the userspace one)", encryption, k.Name)
			}
			out = append(out, k)
			continue
		}
		if encryption == EncryptionRequired || (mode != Auto && mode != k.Name) {
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
