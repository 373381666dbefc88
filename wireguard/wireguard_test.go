package wireguard

import (
	"bytes"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"golang.zx2c4.com/wireguard/conn"
	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"

	"github.com/fabricnet/fabric/backend"
)

func key(t *testing.T) wgtypes.Key {
	t.Helper()
	k, err := wgtypes.GeneratePrivateKey()
	if err != nil {
		t.Fatal(err)
	}
	return k.PublicKey()
}

// Peers whose settings match are left alone (their sessions stay), the
// rest are written, and peers no longer wanted are removed.
func TestPlanPeers(t *testing.T) {
	same, moved, gone, added := key(t), key(t), key(t), key(t)
	cfg := func(addr string, prefixes ...string) peerConfig {
		c := peerConfig{Endpoint: netip.MustParseAddrPort(addr), Keepalive: Keepalive}
		for _, p := range prefixes {
			c.AllowedIPs = append(c.AllowedIPs, netip.MustParsePrefix(p))
		}
		return c
	}
	have := map[wgtypes.Key]peerConfig{
		same:  cfg("192.0.2.2:51820", "10.244.2.0/24"),
		moved: cfg("192.0.2.3:51820", "10.244.3.0/24"),
		gone:  cfg("192.0.2.4:51820", "10.244.4.0/24"),
	}
	want := map[wgtypes.Key]peerConfig{
		same:  cfg("192.0.2.2:51820", "10.244.2.0/24"),
		moved: cfg("192.0.2.3:51820", "10.244.3.0/24", "10.250.0.0/26"), // a Docker network's block
		added: cfg("192.0.2.5:51820", "10.244.5.0/24"),
	}
	got := map[wgtypes.Key]wgtypes.PeerConfig{}
	for _, p := range planPeers(have, want) {
		got[p.PublicKey] = p
	}
	if _, ok := got[same]; ok || len(got) != 3 {
		t.Fatalf("plan %+v: want moved, gone and added only", got)
	}
	if !got[gone].Remove {
		t.Errorf("peer no longer wanted not removed: %+v", got[gone])
	}
	if p := got[moved]; !p.ReplaceAllowedIPs || len(p.AllowedIPs) != 2 || p.Endpoint.String() != "192.0.2.3:51820" || *p.PersistentKeepaliveInterval != Keepalive {
		t.Errorf("changed peer: %+v", p)
	}
	if planPeers(want, want) != nil {
		t.Error("a device that matches got changes")
	}
	// A device of an earlier version, without the keepalive, is brought up to date.
	old := map[wgtypes.Key]peerConfig{same: cfg("192.0.2.2:51820", "10.244.2.0/24")}
	old[same] = peerConfig{Endpoint: old[same].Endpoint, AllowedIPs: old[same].AllowedIPs}
	if p := planPeers(old, map[wgtypes.Key]peerConfig{same: want[same]}); len(p) != 1 {
		t.Errorf("peer without keepalive left as it is: %+v", p)
	}
}

// What wireguard-go answers to "get" reads back into the peers it was set
// to, and a set rendered from a plan is the UAPI wireguard-go takes.
func TestUAPIRoundTrip(t *testing.T) {
	k := key(t)
	text := "private_key=0000000000000000000000000000000000000000000000000000000000000000\nlisten_port=51820\n" +
		uapiPeers([]wgtypes.PeerConfig{{PublicKey: k, Endpoint: nil}}) +
		"endpoint=192.0.2.2:51820\npersistent_keepalive_interval=25\nallowed_ip=10.250.0.0/26\nallowed_ip=10.244.2.0/24\n" +
		"last_handshake_time_sec=1700000000\nlast_handshake_time_nsec=5\nrx_bytes=10\ntx_bytes=20\n"
	peers, err := parseUAPI(text)
	if err != nil {
		t.Fatal(err)
	}
	if len(peers) != 1 || peers[0].key != k {
		t.Fatalf("peers %+v", peers)
	}
	p := peers[0]
	if p.config.Endpoint.String() != "192.0.2.2:51820" || len(p.config.AllowedIPs) != 2 || p.config.AllowedIPs[0].String() != "10.244.2.0/24" || p.config.Keepalive != Keepalive {
		t.Errorf("config %+v (allowed IPs must come sorted)", p.config)
	}
	if p.status.LastHandshake.Unix() != 1700000000 || p.status.RxBytes != 10 || p.status.TxBytes != 20 {
		t.Errorf("status %+v", p.status)
	}
	if _, err := parseUAPI("public_key=zz\n"); err == nil {
		t.Error("a malformed key from the device was accepted")
	}
}

// Allowed IPs are the peer's subnet and every prefix routed to it, once.
func TestAllowed(t *testing.T) {
	p := backend.Peer{Subnet: netip.MustParsePrefix("10.244.2.0/24"),
		Routed: []netip.Prefix{netip.MustParsePrefix("10.250.0.0/26"), netip.MustParsePrefix("10.244.2.0/24")}}
	if got := allowed(p); len(got) != 2 || got[0].String() != "10.244.2.0/24" || got[1].String() != "10.250.0.0/26" {
		t.Errorf("allowed %v", got)
	}
}

// The key is made once, kept 0600, read back the same; a key file others
// can read, or garbage, is refused with the path and what to do.
func TestLoadOrCreateKey(t *testing.T) {
	path := filepath.Join(t.TempDir(), "state", "wireguard.key")
	first, err := LoadOrCreateKey(path)
	if err != nil {
		t.Fatal(err)
	}
	st, err := os.Stat(path)
	if err != nil || st.Mode().Perm() != 0o600 {
		t.Fatalf("key file mode %v (%v), want 0600", st.Mode().Perm(), err)
	}
	again, err := LoadOrCreateKey(path)
	if err != nil || again != first {
		t.Fatalf("second start read %v (%v), want the first key", again, err)
	}
	os.Chmod(path, 0o644)
	if _, err := LoadOrCreateKey(path); err == nil || !strings.Contains(err.Error(), "chmod 600") {
		t.Errorf("world-readable key: %v", err)
	}
	os.WriteFile(path, []byte("not a key\n"), 0o600)
	if _, err := LoadOrCreateKey(path); err == nil || !strings.Contains(err.Error(), path) {
		t.Errorf("garbage key: %v", err)
	}
}

func TestNewRejects(t *testing.T) {
	good := Config{PrivateKey: key(t), UnderlayAddr: netip.MustParseAddr("192.0.2.1"), Subnet: netip.MustParsePrefix("10.244.1.0/24")}
	for name, mutate := range map[string]func(*Config){
		"no key":         func(c *Config) { c.PrivateKey = wgtypes.Key{} },
		"long name":      func(c *Config) { c.Device = "fabric.wireguard0" },
		"port":           func(c *Config) { c.Port = 70000 },
		"mapped":         func(c *Config) { c.UnderlayAddr = netip.MustParseAddr("::ffff:192.0.2.1") },
		"link-local":     func(c *Config) { c.UnderlayAddr = netip.MustParseAddr("fe80::1") },
		"implementation": func(c *Config) { c.Implementation = "boringtun" },
	} {
		c := good
		mutate(&c)
		if _, err := New(c); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
	if _, err := New(good); err != nil {
		t.Errorf("good config: %v", err)
	}
	v6 := good
	v6.UnderlayAddr = netip.MustParseAddr("2001:db8::1")
	b, err := New(v6)
	if err != nil {
		t.Fatalf("IPv6 underlay: %v", err)
	}
	if b.Overhead() != Overhead6 {
		t.Errorf("IPv6 underlay: overhead %d, want %d", b.Overhead(), Overhead6)
	}
	if ok, _ := b.Usable(backend.Peer{Encaps: []string{Name}, WireGuardKey: "k", Address: netip.MustParseAddr("192.0.2.2")}); ok {
		t.Error("an IPv6 underlay host found a peer with an IPv4 underlay address usable")
	}
}

// Of two hosts adding each other, exactly one waits for the other's
// handshake; a host's new key where its old one was is answered at once.
func TestAnswerFirst(t *testing.T) {
	k1, k2 := key(t), key(t)
	low, high := k1, k2
	if bytes.Compare(low[:], high[:]) > 0 {
		low, high = high, low
	}
	at := func(addr string) peerConfig {
		return peerConfig{Endpoint: netip.MustParseAddrPort(addr), Keepalive: Keepalive}
	}
	none := map[wgtypes.Key]peerConfig{}
	if got := answerFirst(high, none, map[wgtypes.Key]peerConfig{low: at("192.0.2.1:51820")}); len(got) != 1 || got[0] != low {
		t.Errorf("the host sorting second waits for: %v, want the other", got)
	}
	if got := answerFirst(low, none, map[wgtypes.Key]peerConfig{high: at("192.0.2.2:51820")}); len(got) != 0 {
		t.Errorf("the host sorting first waits for: %v, want none", got)
	}
	// A peer already on the device is not new.
	if got := answerFirst(high, map[wgtypes.Key]peerConfig{low: at("192.0.2.1:51820")}, map[wgtypes.Key]peerConfig{low: at("192.0.2.1:51820")}); len(got) != 0 {
		t.Errorf("a known peer: %v", got)
	}
	// low's host rotated from old to low: same endpoint, answered at once;
	// a new host elsewhere still waits.
	old, other := key(t), key(t)
	for bytes.Compare(other[:], high[:]) > 0 {
		other = key(t)
	}
	have := map[wgtypes.Key]peerConfig{old: at("192.0.2.1:51820")}
	want := map[wgtypes.Key]peerConfig{low: at("192.0.2.1:51820"), other: at("192.0.2.3:51820")}
	if got := answerFirst(high, have, want); len(got) != 1 || got[0] != other {
		t.Errorf("rotated key and a new host: waits for %v, want only the new host", got)
	}
}

// An initiation and then a response to the same endpoint are initiations
// that crossed; anything else is not (crossings).
func TestCrossings(t *testing.T) {
	msg := func(typ byte) []byte { return append([]byte{typ, 0, 0, 0}, make([]byte, 28)...) }
	ep := func(s string) conn.Endpoint {
		e, err := conn.NewStdNetBind().ParseEndpoint(s)
		if err != nil {
			t.Fatal(err)
		}
		return e
	}
	a, b := "192.0.2.2:51820", "192.0.2.3:51820"
	type send struct {
		typ byte
		to  string
	}
	for _, tc := range []struct {
		name  string
		sends []send
		want  []string
	}{
		{"initiation then response", []send{{1, a}, {2, a}}, []string{a}},
		{"response only (answered a peer that initiated)", []send{{2, a}}, nil},
		{"response then initiation", []send{{2, a}, {1, a}}, nil},
		{"to two endpoints", []send{{1, a}, {2, b}}, nil},
		{"data between", []send{{1, a}, {4, a}, {2, a}}, []string{a}},
		{"once per initiation", []send{{1, a}, {2, a}, {2, a}}, []string{a}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := &crossings{initiated: map[netip.AddrPort]bool{}}
			var got []string
			for _, s := range tc.sends {
				for _, to := range c.sent([][]byte{msg(s.typ)}, ep(s.to)) {
					got = append(got, to.String())
				}
			}
			if !slices.Equal(got, tc.want) {
				t.Errorf("crossed for %v, want %v", got, tc.want)
			}
		})
	}
}
