package encaps

import (
	"strings"
	"testing"
)

func names(ks []Kind) string {
	var out []string
	for _, k := range ks {
		out = append(out, k.Name)
	}
	return strings.Join(out, ",")
}

func TestSelect(t *testing.T) {
	both := map[string]bool{"ipip": true, "vxlan": true, "wireguard": true}
	noIPIP := map[string]bool{"vxlan": true, "wireguard": true}
	noWG := map[string]bool{"ipip": true, "vxlan": true}
	for _, c := range []struct {
		mode, encryption string
		supported        map[string]bool
		want             string // kinds, or the error's text
	}{
		{"auto", "off", both, "ipip,vxlan"},
		{"auto", "", noIPIP, "vxlan"},
		{"ipip", "off", both, "ipip"},
		{"vxlan", "off", both, "vxlan"},
		{"ipip", "off", noIPIP, "encapsulation ipip: this kernel has no ipip support; use --encapsulation=auto to fall back to another encapsulation, or one of auto, vxlan"},
		{"gre", "off", both, `encapsulation "gre": want one of auto, ipip, vxlan`},
		{"wireguard", "off", both, `encapsulation "wireguard": want one of auto, ipip, vxlan`},
		// Encryption required: WireGuard only, nothing in clear.
		{"auto", "wireguard", both, "wireguard"},
		{"vxlan", "wireguard", both, "encapsulation vxlan sends in clear, and encryption wireguard sends nothing in clear: leave encapsulation at auto, or use encryption wireguard-optional while you switch"},
		{"auto", "wireguard", noWG, "encryption wireguard: this host can run no wireguard (no kernel module and no /dev/net/tun for the userspace one)"},
		// Optional: WireGuard first, then what the mode sends in clear.
		{"auto", "wireguard-optional", noIPIP, "wireguard,vxlan"},
		{"vxlan", "wireguard-optional", both, "wireguard,vxlan"},
		{"auto", "ipsec", both, `encryption "ipsec": want one of off, wireguard, wireguard-optional`},
	} {
		ks, err := Select(c.mode, c.encryption, c.supported)
		got := names(ks)
		if err != nil {
			got = err.Error()
		}
		if got != c.want {
			t.Errorf("Select(%s, %s, %v) = %s, want %s", c.mode, c.encryption, c.supported, got, c.want)
		}
	}
}
