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
	both := map[string]bool{"ipip": true, "vxlan": true}
	noIPIP := map[string]bool{"vxlan": true}
	for _, c := range []struct {
		mode      string
		supported map[string]bool
		want      string // kinds, or the error's text
	}{
		{"auto", both, "ipip,vxlan"},
		{"auto", noIPIP, "vxlan"},
		{"ipip", both, "ipip"},
		{"vxlan", both, "vxlan"},
		{"ipip", noIPIP, "encapsulation ipip: this kernel has no ipip support; use --encapsulation=auto to fall back to another encapsulation, or one of auto, vxlan"},
		{"gre", both, `encapsulation "gre": want one of auto, ipip, vxlan`},
	} {
		ks, err := Select(c.mode, c.supported)
		got := names(ks)
		if err != nil {
			got = err.Error()
		}
		if got != c.want {
			t.Errorf("Select(%s, %v) = %s, want %s", c.mode, c.supported, got, c.want)
		}
	}
}
