// Package wireguard is the encrypting encapsulation: one WireGuard device,
// fabric.wg, with one WireGuard peer per fabric host (its public key from its
// node record, its underlay address as the endpoint, every prefix routed to
// it as allowed IPs) and per peer a route "<prefix> dev fabric.wg".
//
// The kernel's WireGuard runs where the module is present; elsewhere the
// device is a TUN served by wireguard-go inside fabricd, which costs
// fabricd's CPU per packet and stops carrying traffic while fabricd
// restarts. Both are configured from the same peer list.
package wireguard

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"slices"
	"sync"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"

	"github.com/fabricnet/fabric/backend"
)

const (
	// Name is the encapsulation's name in config and node records.
	Name          = "wireguard"
	DefaultDevice = "fabric.wg"
	DefaultPort   = 51820
	// Overhead is an IPv4 header, UDP, WireGuard's 16-byte data header and
	// its 16-byte authentication tag; Overhead6 over an IPv6 underlay.
	Overhead  = 20 + 8 + 16 + 16
	Overhead6 = Overhead + 20
)

// Keepalive is every peer's persistent keepalive. Setting it makes a device
// send to a new peer at once, so a host whose sessions are gone (a restarted
// wireguard-go, a new key) handshakes with every peer right away; without it
// a peer kept sending on the old session until its 15 s no-reply timer
// (KEEPALIVE_TIMEOUT + REKEY_TIMEOUT) started a new handshake. One 32-byte
// packet per peer every 25 s when idle.
const Keepalive = 25 * time.Second

// initiateDelay is how long a host waits before it initiates a handshake
// with a peer it has just added whose public key sorts before its own
// (answerFirst). Two hosts usually add each other within milliseconds (both
// see both node records at once); when both initiated then, the
// initiations crossed, each dropped the other's answer, and nothing passed
// until WireGuard's next try 5 s later, or, when wireguard-go kept a
// session the other side did not have, until its 15 s "sent, heard
// nothing" timer (TestHostsAddingEachOtherAtOnceTalkAtOnce). The host that
// sorts first initiates at once; the second turns its keepalive on after
// this delay, which sends on the session that exists by then, or starts
// the handshake itself when the first one's initiation came before it knew
// that host (and was dropped). While the first one's handshake is under
// way (answered, not yet confirmed) it waits on. Two seconds: on a loaded
// machine (CI, 16 devices made at once) a received initiation waited over
// a second to be processed, and one second crossed it.
const initiateDelay = 2 * time.Second

// answerFirst are the peers of want that are new on the device and wait
// for the other host to initiate: those whose key sorts before self. Not
// a new key at the endpoint of a peer that goes: that host replaced its
// key (fabricctl rotate-key) and initiated before it published the new
// one, so that nothing crosses; its own retry comes only after 5 s.
func answerFirst(self wgtypes.Key, have, want map[wgtypes.Key]peerConfig) []wgtypes.Key {
	replaced := map[netip.AddrPort]bool{}
	for key, h := range have {
		if _, ok := want[key]; !ok {
			replaced[h.Endpoint] = true
		}
	}
	var out []wgtypes.Key
	for key, w := range want {
		if _, had := have[key]; !had && bytes.Compare(key[:], self[:]) < 0 && !replaced[w.Endpoint] {
			out = append(out, key)
		}
	}
	return out
}

// Implementations of the device.
const (
	Kernel    = "kernel"
	Userspace = "userspace"
)

// Config describes this host's WireGuard device.
type Config struct {
	Handle       *netlink.Handle // nil = current namespace
	Device       string          // default DefaultDevice
	Port         int             // UDP listen port, default DefaultPort
	PrivateKey   wgtypes.Key
	UnderlayAddr netip.Addr
	Subnet       netip.Prefix // own container subnet; its network address goes on the device
	// Implementation is Kernel, Userspace, or "" for the kernel's where it
	// has WireGuard and userspace elsewhere.
	Implementation string
	Logger         *slog.Logger
}

// Backend owns the WireGuard device and its peers.
type Backend struct {
	cfg    Config
	handle *netlink.Handle
	log    *slog.Logger

	mu   sync.Mutex
	dev  device // nil until Ensure
	impl string
	// delayed are the peers added without keepalive (initiateDelay), each
	// with the timer that turns it on.
	delayed map[wgtypes.Key]*peerTimer
	// nudged are the new peers this host initiates with, each with the
	// timer that starts a handshake again while they have no session.
	nudged map[wgtypes.Key]*peerTimer
	// fellBack are the new peers this host initiated with after
	// initiateDelay (keepaliveOn), and when: the initiations that can cross
	// the other host's, which startOver mends once.
	fellBack map[wgtypes.Key]time.Time
	// rotated is when this host's key was last rotated: crossings for
	// startOverWithin after it are the rotation's own.
	rotated time.Time
}

// peerTimer is a timer kept for one peer, and how often it fired.
type peerTimer struct {
	timer *time.Timer
	tries int
}

// arm starts key's timer in timers unless it has one: fire runs with it
// after d. Called with b.mu held.
func arm(timers map[wgtypes.Key]*peerTimer, key wgtypes.Key, d time.Duration, fire func(wgtypes.Key, *peerTimer)) {
	if timers[key] != nil {
		return
	}
	t := &peerTimer{}
	t.timer = time.AfterFunc(d, func() { fire(key, t) })
	timers[key] = t
}

// disarm stops and forgets the timers of the peers keep does not keep.
func disarm(timers map[wgtypes.Key]*peerTimer, keep func(wgtypes.Key) bool) {
	for key, t := range timers {
		if !keep(key) {
			t.timer.Stop()
			delete(timers, key)
		}
	}
}

var (
	_ backend.Backend       = (*Backend)(nil)
	_ backend.KeyAdvertiser = (*Backend)(nil)
)

// New validates cfg and fills defaults. It does not touch the kernel.
func New(cfg Config) (*Backend, error) {
	if cfg.Device == "" {
		cfg.Device = DefaultDevice
	}
	if cfg.Port == 0 {
		cfg.Port = DefaultPort
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	switch {
	case len(cfg.Device) > 15:
		return nil, fmt.Errorf("wireguard device name %q is longer than 15 bytes", cfg.Device)
	case cfg.Port < 1 || cfg.Port > 65535:
		return nil, fmt.Errorf("wireguard port %d outside 1-65535", cfg.Port)
	case cfg.PrivateKey == wgtypes.Key{}:
		return nil, errors.New("wireguard needs this host's private key")
	case !cfg.UnderlayAddr.IsGlobalUnicast() || cfg.UnderlayAddr.Is4In6() || cfg.UnderlayAddr.Zone() != "":
		return nil, fmt.Errorf("wireguard underlay address %v is not a global IPv4 or IPv6 address", cfg.UnderlayAddr)
	case !cfg.Subnet.IsValid() || !cfg.Subnet.Addr().Is4():
		return nil, fmt.Errorf("wireguard subnet %v is not an IPv4 prefix", cfg.Subnet)
	case cfg.Implementation != "" && cfg.Implementation != Kernel && cfg.Implementation != Userspace:
		return nil, fmt.Errorf("wireguard implementation %q: want %s or %s", cfg.Implementation, Kernel, Userspace)
	}
	cfg.Subnet = cfg.Subnet.Masked()
	return &Backend{
		cfg:     cfg,
		handle:  backend.DefaultHandle(cfg.Handle),
		log:     cfg.Logger.With("backend", Name, "device", cfg.Device),
		delayed: map[wgtypes.Key]*peerTimer{},
		nudged:  map[wgtypes.Key]*peerTimer{},

		fellBack: map[wgtypes.Key]time.Time{},
	}, nil
}

func (b *Backend) Name() string   { return Name }
func (b *Backend) Device() string { return b.cfg.Device }
func (b *Backend) Overhead() int {
	if b.cfg.UnderlayAddr.Is6() {
		return Overhead6
	}
	return Overhead
}

// PublicKey is this host's public key, for its node record.
func (b *Backend) PublicKey() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.cfg.PrivateKey.PublicKey().String()
}

// RotateKey makes a new key pair, writes its private key to keyPath (the
// next start uses it) and puts it on the device; it returns the old and
// the new public key, which the caller publishes. In this order nothing is
// lost: the device keeps decrypting what peers send on their current
// sessions, and holds what it sends (WireGuard stages up to 128 packets
// per peer) until a handshake with the new key, which a peer starts as
// soon as it installs the new public key (its persistent keepalive, or
// its traffic). A crash in between leaves the old key or the new one,
// both usable.
func (b *Backend) RotateKey(keyPath string) (oldKey, newKey string, err error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	oldKey = b.cfg.PrivateKey.PublicKey().String()
	key, err := CreateKey(keyPath)
	if err != nil {
		return "", "", err
	}
	b.cfg.PrivateKey = key
	if b.dev != nil {
		if err := b.dev.setIdentity(key, b.cfg.Port); err != nil {
			return "", "", fmt.Errorf("the new key is in %s but not on the device (the next start uses it): %w", keyPath, err)
		}
		if err := b.initiateNow(); err != nil {
			b.log.Warn("cannot start handshakes with the new key at once; peers start them", "err", err)
		}
		// The rotation's handshakes cross the peers' by design (each
		// peer initiates once it has the new key, after this device's
		// initiations were refused): not the fallback crossing startOver
		// mends, though a fallback initiation may have gone out in the 7 s
		// before or go out just after (ci111: a rotation 5 s after the
		// start made both peers anew; 1 ping lost).
		b.rotated = time.Now()
	}
	newKey = key.PublicKey().String()
	b.log.Info("wireguard key pair replaced", "old", oldKey, "new", newKey)
	return oldKey, newKey, nil
}

// initiateNow makes the device start a handshake with every peer now,
// while no peer knows the new key yet (so it fails): the device then waits
// REKEY_TIMEOUT (5 s) before it initiates again. When a peer installs the
// new key it initiates itself, and the two initiations do not cross:
// crossed ones void each other, and both sides wait for that retry (CI
// beside stress-ng: no handshake for 5 s, pings lost). Turning a peer's
// persistent keepalive off and on sends a keepalive, and with no session
// to send it on, a handshake initiation. Called with b.mu held.
func (b *Backend) initiateNow() error {
	peers, err := b.dev.peers()
	if err != nil {
		return err
	}
	off, on := make([]wgtypes.PeerConfig, 0, len(peers)), make([]wgtypes.PeerConfig, 0, len(peers))
	zero := time.Duration(0)
	for key, pc := range peers {
		keepalive := pc.Keepalive
		off = append(off, wgtypes.PeerConfig{PublicKey: key, UpdateOnly: true, PersistentKeepaliveInterval: &zero})
		on = append(on, wgtypes.PeerConfig{PublicKey: key, UpdateOnly: true, PersistentKeepaliveInterval: &keepalive})
	}
	if err := b.dev.configurePeers(off); err != nil {
		return err
	}
	return b.dev.configurePeers(on)
}

// Close lets go of the device: wireguard-go stops (its TUN goes with it),
// a kernel device stays with its peers for the next start. Idempotent.
func (b *Backend) Close() {
	b.mu.Lock()
	defer b.mu.Unlock()
	none := func(wgtypes.Key) bool { return false }
	disarm(b.delayed, none)
	disarm(b.nudged, none)
	if b.dev != nil {
		b.dev.close()
		b.dev = nil
	}
}

// Implementation says which WireGuard runs ("" before the first Ensure).
func (b *Backend) Implementation() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.impl
}

// Usable: the peer runs WireGuard and its record carries a key.
func (b *Backend) Usable(peer backend.Peer) (bool, string) {
	switch {
	case !slices.Contains(peer.Encaps, Name):
		return false, "the peer does not encrypt (its node record offers no wireguard)"
	case peer.WireGuardKey == "":
		return false, "the peer's node record has no usable WireGuard public key"
	case peer.Address.Is4() != b.cfg.UnderlayAddr.Is4():
		return false, fmt.Sprintf("the peer's underlay address %s and this host's %s are of different families", peer.Address, b.cfg.UnderlayAddr)
	}
	return true, "both hosts encrypt with WireGuard"
}

// Ingress matches WireGuard's UDP port.
func (b *Backend) Ingress() string { return fmt.Sprintf("-p udp -m udp --dport %d", b.cfg.Port) }

// Ensure creates or repairs the device, its key and port, MTU, address and
// up flag.
func (b *Backend) Ensure(ctx context.Context, mtu int) (int, error) {
	if err := ctx.Err(); err != nil {
		return 0, err
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.dev != nil && !b.dev.alive(b.handle) {
		b.log.Warn("wireguard device is gone; creating it again")
		b.dev.close()
		b.dev = nil
	}
	if b.dev == nil {
		dev, impl, err := b.create(mtu)
		if err != nil {
			return 0, err
		}
		b.dev, b.impl = dev, impl
		b.log.Info("wireguard device ready", "implementation", impl, "port", b.cfg.Port, "mtu", mtu, "publicKey", b.cfg.PrivateKey.PublicKey().String())
	}
	link, err := b.handle.LinkByName(b.cfg.Device)
	if err != nil {
		return 0, fmt.Errorf("wireguard: look up %s: %w", b.cfg.Device, err)
	}
	if err := b.dev.setIdentity(b.cfg.PrivateKey, b.cfg.Port); err != nil {
		return 0, err
	}
	if err := backend.FinishLink(b.handle, Name, link, mtu, b.cfg.Subnet.Addr()); err != nil {
		return 0, err
	}
	return link.Attrs().Index, nil
}

// create makes the device: the kernel's where it can, else wireguard-go. A
// kernel device of an earlier run is adopted as it is, so its peers, their
// sessions and the routes through it carry traffic across a restart.
func (b *Backend) create(mtu int) (device, string, error) {
	if link, err := b.handle.LinkByName(b.cfg.Device); err == nil && link.Type() == "wireguard" && b.cfg.Implementation != Userspace {
		dev, err := adoptKernelDevice(b.cfg.Device)
		if err != nil {
			return nil, "", err
		}
		return dev, Kernel, nil
	}
	if err := backend.DeleteLink(b.handle, b.cfg.Device); err != nil {
		return nil, "", err // a leftover of another kind
	}
	if b.cfg.Implementation != Userspace {
		dev, err := newKernelDevice(b.handle, b.cfg.Device)
		switch {
		case err == nil:
			return dev, Kernel, nil
		case b.cfg.Implementation == Kernel || !errors.Is(err, errNoKernelWireGuard):
			return nil, "", err
		}
		b.log.Info("this kernel has no WireGuard: running wireguard-go in fabricd (userspace, over TUN)")
	}
	dev, err := newUserspaceDevice(b.cfg.Device, mtu, b.log, func(to netip.AddrPort) {
		time.Sleep(startOverAfter)
		b.startOver(to)
	})
	if err != nil {
		return nil, "", err
	}
	return dev, Userspace, nil
}

// SyncPeers makes the device's peers exactly peers: one per key, with its
// underlay endpoint and the prefixes routed to it as allowed IPs. Peers
// whose settings already match are not touched, so their sessions stay.
func (b *Backend) SyncPeers(peers []backend.Peer) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.dev == nil {
		return nil
	}
	want := map[wgtypes.Key]peerConfig{}
	for _, p := range peers {
		key, err := wgtypes.ParseKey(p.WireGuardKey)
		if err != nil {
			return fmt.Errorf("wireguard peer %s: key %q: %w", p.Name, p.WireGuardKey, err)
		}
		want[key] = peerConfig{Endpoint: netip.AddrPortFrom(p.Address, uint16(b.cfg.Port)), AllowedIPs: allowed(p), Keepalive: Keepalive}
	}
	have, err := b.dev.peers()
	if err != nil {
		return err
	}
	for _, key := range answerFirst(b.cfg.PrivateKey.PublicKey(), have, want) {
		arm(b.delayed, key, initiateDelay, b.keepaliveOn)
	}
	for key, w := range want {
		if b.delayed[key] != nil {
			w.Keepalive = 0 // its timer turns it on
			want[key] = w
		}
	}
	wanted := func(key wgtypes.Key) bool { _, ok := want[key]; return ok }
	disarm(b.delayed, wanted)
	for key := range want {
		if _, had := have[key]; !had && b.delayed[key] == nil {
			arm(b.nudged, key, nudgeAfter, b.nudge)
		}
	}
	disarm(b.nudged, wanted)
	for key := range b.fellBack {
		if !wanted(key) {
			delete(b.fellBack, key)
		}
	}
	cfg := planPeers(have, want)
	if len(cfg) == 0 {
		return nil
	}
	return b.dev.configurePeers(cfg)
}

// keepaliveOn turns peer key's keepalive on, initiateDelay after it was
// added (arm).
func (b *Backend) keepaliveOn(key wgtypes.Key, d *peerTimer) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.delayed[key] != d {
		return // removed, or removed and added again, meanwhile
	}
	if b.dev == nil {
		delete(b.delayed, key)
		return
	}
	if peerInitiating(b.dev, key) {
		// The peer's handshake is under way (we answered it, it has not
		// confirmed yet, perhaps only slow to): initiating now could cross
		// it. WireGuard retries it itself; look again later.
		d.timer.Reset(initiateDelay)
		return
	}
	delete(b.delayed, key)
	b.fellBack[key] = time.Now()
	keepalive := Keepalive
	cfg := []wgtypes.PeerConfig{{PublicKey: key, UpdateOnly: true, PersistentKeepaliveInterval: &keepalive}}
	if err := b.dev.configurePeers(cfg); err != nil {
		// The next SyncPeers sets it: the peer is no longer delayed.
		b.log.Warn("cannot turn on the keepalive of a new peer", "peer", key.String(), "err", err)
	}
}

// nudgeAfter is how long a new peer this host initiates with may be
// without a session before it starts a handshake again, at most maxNudges
// times: more than initiateDelay and WireGuard's 5 s between two handshake
// messages it sends (it drops the new one otherwise; the next nudge then
// gets through). Initiations that crossed (the other host's fallback went out
// before it read ours: seen in CI when a host read an initiation 2.4 s
// late) leave both sides with an answer each took for a handshake sent,
// and WireGuard then skips its own retry: without this, the pair waits for
// traffic or the next persistent keepalive (25 s). Only the initiating
// side nudges, so the new handshakes do not cross again.
const (
	nudgeAfter = 8 * time.Second
	maxNudges  = 5
)

// nudge starts a handshake with peer key if it still has no session:
// turning its persistent keepalive off and on sends a keepalive, and a
// keepalive without a session starts a handshake (in the kernel's
// WireGuard as in wireguard-go).
func (b *Backend) nudge(key wgtypes.Key, n *peerTimer) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.nudged[key] != n {
		return // removed, or removed and added again, meanwhile
	}
	if b.dev == nil || hasSession(b.dev, key) || n.tries >= maxNudges {
		delete(b.nudged, key)
		return
	}
	n.tries++
	off, on := time.Duration(0), Keepalive
	err := b.dev.configurePeers([]wgtypes.PeerConfig{{PublicKey: key, UpdateOnly: true, PersistentKeepaliveInterval: &off}})
	if err == nil {
		err = b.dev.configurePeers([]wgtypes.PeerConfig{{PublicKey: key, UpdateOnly: true, PersistentKeepaliveInterval: &on}})
	}
	if err != nil {
		b.log.Warn("cannot start a handshake again with a new peer", "peer", key.String(), "err", err)
	} else {
		b.log.Info("no session with a new peer yet: asking for a handshake again", "peer", key.String(), "after", time.Duration(n.tries)*nudgeAfter)
	}
	n.timer.Reset(nudgeAfter)
}

// startOverAfter is how long after initiations crossed the peer is made
// anew: the crossing's last messages are through by then, and the new
// initiation does not come within the 20 ms after the last one the other
// host took, which it would drop as a flood.
const startOverAfter = 200 * time.Millisecond

// startOverWithin is how long after this host's fallback initiation a
// crossing is taken for one with it: WireGuard's 5 s retry and 2 s more.
// Other crossings (a peer's key rotated at the same endpoint, or a new
// initiation of the made-anew peer crossing again) are left to WireGuard.
const startOverWithin = 7 * time.Second

// startOver removes and adds again the peer at endpoint to after this
// device's initiation to it crossed the peer's (crossings, wireguard-go
// only), so its session is one both sides hold: a new peer initiates at
// once, where WireGuard would refuse a second initiation within 5 s of
// the first. Only a peer whose fallback initiation (keepaliveOn) went out
// shortly before, once: that is the initiation that crosses, sent by the
// host that answers first (answerFirst), so the new one does not cross
// one of the other host's. The crossing is known by endpoint alone: a
// peer that merely shares it (a key rotated there) is not touched; none
// is while this host's own rotation is recent.
func (b *Backend) startOver(to netip.AddrPort) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.dev == nil {
		return
	}
	if time.Since(b.rotated) < startOverWithin {
		return // the rotation's own crossing (RotateKey)
	}
	have, err := b.dev.peers()
	if err != nil {
		b.log.Warn("cannot read peers after crossed handshakes", "err", err)
		return
	}
	for key, h := range have {
		if at, ok := b.fellBack[key]; h.Endpoint != to || !ok || time.Since(at) > startOverWithin {
			continue
		}
		delete(b.fellBack, key)
		cfg := append([]wgtypes.PeerConfig{{PublicKey: key, Remove: true}}, planPeers(nil, map[wgtypes.Key]peerConfig{key: h})...)
		if err := b.dev.configurePeers(cfg); err != nil {
			b.log.Warn("cannot make a peer anew after crossed handshakes", "peer", key.String(), "err", err)
			continue
		}
		b.log.Info("handshakes crossed: made the peer anew for a session both hosts hold", "peer", key.String(), "endpoint", to.String())
	}
}

// hasSession: the device has completed a handshake with peer key.
func hasSession(dev device, key wgtypes.Key) bool {
	p, ok := peerStatus(dev, key)
	return ok && !p.LastHandshake.IsZero()
}

// peerStatus is the device's status of peer key.
func peerStatus(dev device, key wgtypes.Key) (PeerStatus, bool) {
	peers, err := dev.status()
	if err != nil {
		return PeerStatus{}, false
	}
	for _, p := range peers {
		if p.PublicKey == key.String() {
			return p, true
		}
	}
	return PeerStatus{}, false
}

// peerInitiating: the device has heard from peer key (its handshake
// initiation) but has no session with it yet.
func peerInitiating(dev device, key wgtypes.Key) bool {
	p, ok := peerStatus(dev, key)
	return ok && p.LastHandshake.IsZero() && p.RxBytes > 0
}

// allowed are the prefixes a peer may send from and receive: its container
// subnet and whatever else is routed to it (its Docker networks' blocks).
func allowed(p backend.Peer) []netip.Prefix {
	out := []netip.Prefix{p.Subnet.Masked()}
	for _, r := range p.Routed {
		if r = r.Masked(); !slices.Contains(out, r) {
			out = append(out, r)
		}
	}
	sortPrefixes(out)
	return out
}

// peerConfig is what fabric sets on one WireGuard peer.
type peerConfig struct {
	Endpoint   netip.AddrPort
	AllowedIPs []netip.Prefix // sorted
	Keepalive  time.Duration
}

func (p peerConfig) equal(o peerConfig) bool {
	return p.Endpoint == o.Endpoint && slices.Equal(p.AllowedIPs, o.AllowedIPs) && p.Keepalive == o.Keepalive
}

// planPeers is the peer configuration that turns have into want: removals
// and the peers that are new or differ; unchanged peers are left out.
func planPeers(have, want map[wgtypes.Key]peerConfig) []wgtypes.PeerConfig {
	var out []wgtypes.PeerConfig
	for key := range have {
		if _, ok := want[key]; !ok {
			out = append(out, wgtypes.PeerConfig{PublicKey: key, Remove: true})
		}
	}
	for key, w := range want {
		if h, ok := have[key]; ok && h.equal(w) {
			continue
		}
		ips := make([]net.IPNet, 0, len(w.AllowedIPs))
		for _, p := range w.AllowedIPs {
			ips = append(ips, *backend.IPNet(p))
		}
		keepalive := w.Keepalive
		out = append(out, wgtypes.PeerConfig{
			PublicKey:                   key,
			Endpoint:                    net.UDPAddrFromAddrPort(w.Endpoint),
			ReplaceAllowedIPs:           true,
			AllowedIPs:                  ips,
			PersistentKeepaliveInterval: &keepalive,
		})
	}
	slices.SortFunc(out, func(a, b wgtypes.PeerConfig) int { return slices.Compare(a.PublicKey[:], b.PublicKey[:]) })
	return out
}

// RouteFor sends dst into the device; WireGuard picks the peer by its
// allowed IPs.
func (b *Backend) RouteFor(dst netip.Prefix, peer backend.Peer) (*netlink.Route, error) {
	link, err := b.handle.LinkByName(b.cfg.Device)
	if err != nil {
		return nil, fmt.Errorf("wireguard route %s to %s: %w", dst, peer.Name, err)
	}
	return &netlink.Route{Dst: backend.IPNet(dst), LinkIndex: link.Attrs().Index, Scope: netlink.SCOPE_LINK}, nil
}

// PeerStatus is one WireGuard peer as the device reports it.
type PeerStatus struct {
	PublicKey     string
	Endpoint      string
	LastHandshake time.Time // zero: none yet
	RxBytes       int64
	TxBytes       int64
}

// Peers reports the device's peers, for status.
func (b *Backend) Peers() ([]PeerStatus, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.dev == nil {
		return nil, nil
	}
	return b.dev.status()
}

// Supported reports whether this host can run WireGuard at all: the kernel
// module, or TUN for wireguard-go.
func Supported(h *netlink.Handle) (bool, error) {
	if f, err := unix.Open("/dev/net/tun", unix.O_RDWR|unix.O_CLOEXEC, 0); err == nil {
		unix.Close(f)
		return true, nil
	}
	return KernelSupported(h)
}
