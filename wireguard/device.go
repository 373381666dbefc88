package wireguard

import (
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
	"golang.zx2c4.com/wireguard/conn"
	wgdevice "golang.zx2c4.com/wireguard/device"
	"golang.zx2c4.com/wireguard/tun"
	"golang.zx2c4.com/wireguard/wgctrl"
	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"

	"github.com/fabricnet/fabric/backend"
	"github.com/fabricnet/fabric/internal/nsthread"
)

// device is one WireGuard implementation: the kernel's, configured over
// generic netlink, or wireguard-go's, configured through its UAPI text.
type device interface {
	// alive tells whether the device still exists (someone may delete it).
	alive(h *netlink.Handle) bool
	// setIdentity sets the private key and listen port where they differ.
	setIdentity(key wgtypes.Key, port int) error
	peers() (map[wgtypes.Key]peerConfig, error)
	configurePeers(cfg []wgtypes.PeerConfig) error
	status() ([]PeerStatus, error)
	close()
}

var errNoKernelWireGuard = errors.New("this kernel has no WireGuard")

// KernelSupported tries to create a kernel WireGuard device.
func KernelSupported(h *netlink.Handle) (bool, error) {
	name := fmt.Sprintf("fabwgprobe%d", unix.Getpid()%100000)
	dev, err := newKernelDevice(backend.DefaultHandle(h), name)
	if errors.Is(err, errNoKernelWireGuard) {
		return false, nil
	}
	if err != nil {
		return false, err
	}
	dev.close()
	return true, backend.DeleteLink(h, name)
}

type kernelDevice struct {
	name   string
	client *wgctrl.Client
}

func newKernelDevice(h *netlink.Handle, name string) (*kernelDevice, error) {
	err := h.LinkAdd(&netlink.Wireguard{LinkAttrs: netlink.LinkAttrs{Name: name}})
	if errors.Is(err, unix.EOPNOTSUPP) || errors.Is(err, unix.EAFNOSUPPORT) || errors.Is(err, unix.EPROTONOSUPPORT) {
		return nil, errNoKernelWireGuard
	}
	if err != nil {
		return nil, fmt.Errorf("wireguard: create device %s: %w", name, err)
	}
	dev, err := adoptKernelDevice(name)
	if err != nil {
		backend.DeleteLink(h, name)
	}
	return dev, err
}

// adoptKernelDevice opens the control of an existing kernel device.
func adoptKernelDevice(name string) (*kernelDevice, error) {
	c, err := wgctrl.New()
	if err != nil {
		return nil, fmt.Errorf("wireguard: open generic netlink: %w", err)
	}
	return &kernelDevice{name: name, client: c}, nil
}

func (d *kernelDevice) alive(h *netlink.Handle) bool {
	link, err := h.LinkByName(d.name)
	return err == nil && link.Type() == "wireguard"
}

func (d *kernelDevice) setIdentity(key wgtypes.Key, port int) error {
	have, err := d.client.Device(d.name)
	if err != nil {
		return fmt.Errorf("wireguard: read %s: %w", d.name, err)
	}
	if have.PrivateKey == key && have.ListenPort == port {
		return nil
	}
	cfg := wgtypes.Config{PrivateKey: &key}
	if have.ListenPort != port {
		cfg.ListenPort = &port // only then: it rebinds the socket
	}
	if err := d.client.ConfigureDevice(d.name, cfg); err != nil {
		return fmt.Errorf("wireguard: set key and port %d on %s: %w", port, d.name, err)
	}
	return nil
}

func (d *kernelDevice) peers() (map[wgtypes.Key]peerConfig, error) {
	have, err := d.client.Device(d.name)
	if err != nil {
		return nil, fmt.Errorf("wireguard: read %s: %w", d.name, err)
	}
	out := make(map[wgtypes.Key]peerConfig, len(have.Peers))
	for _, p := range have.Peers {
		var pc peerConfig
		if p.Endpoint != nil {
			pc.Endpoint = p.Endpoint.AddrPort()
			pc.Endpoint = netip.AddrPortFrom(pc.Endpoint.Addr().Unmap(), pc.Endpoint.Port())
		}
		for _, n := range p.AllowedIPs {
			addr, _ := netip.AddrFromSlice(n.IP)
			ones, _ := n.Mask.Size()
			pc.AllowedIPs = append(pc.AllowedIPs, netip.PrefixFrom(addr.Unmap(), ones))
		}
		sortPrefixes(pc.AllowedIPs)
		pc.Keepalive = p.PersistentKeepaliveInterval
		out[p.PublicKey] = pc
	}
	return out, nil
}

func (d *kernelDevice) configurePeers(cfg []wgtypes.PeerConfig) error {
	if err := d.client.ConfigureDevice(d.name, wgtypes.Config{Peers: cfg}); err != nil {
		return fmt.Errorf("wireguard: configure peers of %s: %w", d.name, err)
	}
	return nil
}

func (d *kernelDevice) status() ([]PeerStatus, error) {
	have, err := d.client.Device(d.name)
	if err != nil {
		return nil, fmt.Errorf("wireguard: read %s: %w", d.name, err)
	}
	var out []PeerStatus
	for _, p := range have.Peers {
		s := PeerStatus{PublicKey: p.PublicKey.String(), LastHandshake: p.LastHandshakeTime, RxBytes: p.ReceiveBytes, TxBytes: p.TransmitBytes}
		if p.Endpoint != nil {
			s.Endpoint = p.Endpoint.String()
		}
		if s.LastHandshake.Unix() == 0 {
			s.LastHandshake = time.Time{}
		}
		out = append(out, s)
	}
	return out, nil
}

// close leaves the kernel device in place: routes through it keep working
// while fabricd restarts.
func (d *kernelDevice) close() { d.client.Close() }

// userspaceDevice is wireguard-go serving a TUN device inside fabricd.
type userspaceDevice struct {
	name    string
	ifindex int
	dev     *wgdevice.Device
	netns   netns.NsHandle // where its TUN device is, and so its sockets
	key     wgtypes.Key
	port    int
}

// newUserspaceDevice starts wireguard-go on a new TUN device. crossed is
// called, on a goroutine of its own, with the endpoint of a peer whose
// handshake initiation crossed this device's (see crossings).
func newUserspaceDevice(name string, mtu int, log *slog.Logger, crossed func(netip.AddrPort)) (*userspaceDevice, error) {
	here, err := netns.Get()
	if err != nil {
		return nil, fmt.Errorf("wireguard: this thread's network namespace: %w", err)
	}
	t, err := tun.CreateTUN(name, mtu)
	if err != nil {
		here.Close()
		return nil, fmt.Errorf("wireguard: create TUN device %s for wireguard-go: %w", name, err)
	}
	link, err := netlink.LinkByName(name)
	if err != nil {
		t.Close()
		here.Close()
		return nil, fmt.Errorf("wireguard: look up new TUN device %s: %w", name, err)
	}
	logger := &wgdevice.Logger{
		Verbosef: func(format string, args ...any) { log.Debug(fmt.Sprintf(format, args...)) },
		Errorf:   func(format string, args ...any) { log.Warn(fmt.Sprintf(format, args...)) },
	}
	bind := nsBind{Bind: conn.NewDefaultBind(), netns: here, crossings: &crossings{initiated: map[netip.AddrPort]bool{}}, crossed: crossed}
	return &userspaceDevice{name: name, ifindex: link.Attrs().Index, netns: here, dev: wgdevice.NewDevice(t, bind, logger)}, nil
}

// nsBind opens wireguard-go's sockets in the network namespace of its
// device. wireguard-go opens them again whenever the device comes up, on
// whichever goroutine sees that (its TUN event worker among them); in a
// process with threads in several namespaces (the package tests: two
// hosts in one process) they would otherwise land in another one, and the
// device would hear nothing (seen in CI: neither side of a pair received
// the other's handshake).
type nsBind struct {
	conn.Bind
	netns     netns.NsHandle
	crossings *crossings
	crossed   func(netip.AddrPort) // on a goroutine of its own: Send must not wait
}

func (b nsBind) Send(bufs [][]byte, ep conn.Endpoint) error {
	for _, to := range b.crossings.sent(bufs, ep) {
		go b.crossed(to)
	}
	return b.Bind.Send(bufs, ep)
}

// crossings finds handshakes that crossed: this device sent an initiation
// to an endpoint and then a response to the same endpoint, so it consumed
// the peer's initiation after sending its own. wireguard-go (not the
// kernel's WireGuard, which checks the handshake's state again under its
// write lock) can then end with a session whose receiving index the peer
// never learnt: its two handshake workers take the peer's initiation and
// the response to our own at the same time, the response passes the state
// check, the initiation's answer replaces the handshake's index, and the
// response's keys are stored under the new index. Every packet the peer
// sends is dropped until WireGuard's 15 s "sent, heard nothing" timer
// (seen in CI: a pair with a handshake on both sides answered no ping for
// 5 s). Handshake messages are few; data packets pass on a byte compare.
type crossings struct {
	mu        sync.Mutex
	initiated map[netip.AddrPort]bool // sent an initiation, no response since
}

// WireGuard's message types (the first byte of a little-endian uint32
// whose other three are zero).
const (
	messageInitiation = 1
	messageResponse   = 2
)

// sent notes the handshake messages among bufs, sent to ep, and returns
// the endpoints whose handshakes they show crossed.
func (c *crossings) sent(bufs [][]byte, ep conn.Endpoint) (crossed []netip.AddrPort) {
	for _, b := range bufs {
		if len(b) < 4 || (b[0] != messageInitiation && b[0] != messageResponse) || b[1]|b[2]|b[3] != 0 {
			continue
		}
		to, err := netip.ParseAddrPort(ep.DstToString())
		if err != nil {
			continue
		}
		c.mu.Lock()
		if b[0] == messageResponse && c.initiated[to] {
			crossed = append(crossed, to)
		}
		if b[0] == messageInitiation {
			c.initiated[to] = true
		} else {
			delete(c.initiated, to)
		}
		c.mu.Unlock()
	}
	return crossed
}

func (b nsBind) Open(port uint16) (fns []conn.ReceiveFunc, actual uint16, err error) {
	err = nsthread.In(b.netns, func() error {
		fns, actual, err = b.Bind.Open(port)
		return err
	})
	return fns, actual, err
}

func (d *userspaceDevice) alive(h *netlink.Handle) bool {
	link, err := h.LinkByName(d.name)
	return err == nil && link.Attrs().Index == d.ifindex
}

func (d *userspaceDevice) setIdentity(key wgtypes.Key, port int) error {
	if d.key == key && d.port == port {
		return nil
	}
	// Only what changed: setting listen_port rebinds the socket, which a
	// key rotation has no reason to do.
	set := ""
	if d.key != key {
		set += fmt.Sprintf("private_key=%s\n", hex.EncodeToString(key[:]))
	}
	if d.port != port {
		set += fmt.Sprintf("listen_port=%d\n", port)
	}
	if err := d.dev.IpcSet(set); err != nil {
		return fmt.Errorf("wireguard: set key and port %d on %s: %w", port, d.name, err)
	}
	if err := d.dev.Up(); err != nil {
		return fmt.Errorf("wireguard: start wireguard-go on %s: %w", d.name, err)
	}
	d.key, d.port = key, port
	return nil
}

func (d *userspaceDevice) peers() (map[wgtypes.Key]peerConfig, error) {
	peers, err := d.read()
	if err != nil {
		return nil, err
	}
	out := make(map[wgtypes.Key]peerConfig, len(peers))
	for _, p := range peers {
		out[p.key] = p.config
	}
	return out, nil
}

func (d *userspaceDevice) configurePeers(cfg []wgtypes.PeerConfig) error {
	if err := d.dev.IpcSet(uapiPeers(cfg)); err != nil {
		return fmt.Errorf("wireguard: configure peers of %s: %w", d.name, err)
	}
	return nil
}

func (d *userspaceDevice) status() ([]PeerStatus, error) {
	peers, err := d.read()
	if err != nil {
		return nil, err
	}
	out := make([]PeerStatus, 0, len(peers))
	for _, p := range peers {
		out = append(out, p.status)
	}
	return out, nil
}

func (d *userspaceDevice) close() {
	d.dev.Close()
	d.netns.Close()
}

func (d *userspaceDevice) read() ([]uapiPeer, error) {
	text, err := d.dev.IpcGet()
	if err != nil {
		return nil, fmt.Errorf("wireguard: read %s: %w", d.name, err)
	}
	return parseUAPI(text)
}

// uapiPeers writes peer changes in WireGuard's cross-platform UAPI text
// (keys in hex).
func uapiPeers(cfg []wgtypes.PeerConfig) string {
	var b strings.Builder
	for _, p := range cfg {
		fmt.Fprintf(&b, "public_key=%s\n", hex.EncodeToString(p.PublicKey[:]))
		if p.Remove {
			b.WriteString("remove=true\n")
			continue
		}
		if p.UpdateOnly {
			b.WriteString("update_only=true\n")
		}
		if p.Endpoint != nil {
			fmt.Fprintf(&b, "endpoint=%s\n", p.Endpoint.AddrPort())
		}
		if p.PersistentKeepaliveInterval != nil {
			fmt.Fprintf(&b, "persistent_keepalive_interval=%d\n", int(p.PersistentKeepaliveInterval.Seconds()))
		}
		if p.ReplaceAllowedIPs {
			b.WriteString("replace_allowed_ips=true\n")
		}
		for _, n := range p.AllowedIPs {
			fmt.Fprintf(&b, "allowed_ip=%s\n", n.String())
		}
	}
	return b.String()
}

type uapiPeer struct {
	key    wgtypes.Key
	config peerConfig
	status PeerStatus
}

// parseUAPI reads the peers out of a UAPI "get" answer.
func parseUAPI(text string) ([]uapiPeer, error) {
	var out []uapiPeer
	var sec, nsec int64
	finish := func() {
		if len(out) == 0 {
			return
		}
		p := &out[len(out)-1]
		sortPrefixes(p.config.AllowedIPs)
		if sec != 0 || nsec != 0 {
			p.status.LastHandshake = time.Unix(sec, nsec)
		}
		sec, nsec = 0, 0
	}
	for line := range strings.SplitSeq(strings.TrimSpace(text), "\n") {
		k, v, ok := strings.Cut(line, "=")
		if !ok {
			continue
		}
		if k == "public_key" {
			finish()
			raw, err := hex.DecodeString(v)
			if err != nil || len(raw) != wgtypes.KeyLen {
				return nil, fmt.Errorf("wireguard: device reported public key %q", v)
			}
			key := wgtypes.Key(raw)
			out = append(out, uapiPeer{key: key, status: PeerStatus{PublicKey: key.String()}})
			continue
		}
		if len(out) == 0 {
			continue // the device's own settings
		}
		p := &out[len(out)-1]
		var err error
		switch k {
		case "endpoint":
			p.config.Endpoint, err = netip.ParseAddrPort(v)
			p.status.Endpoint = v
		case "allowed_ip":
			var pr netip.Prefix
			pr, err = netip.ParsePrefix(v)
			p.config.AllowedIPs = append(p.config.AllowedIPs, pr)
		case "last_handshake_time_sec":
			sec, err = strconv.ParseInt(v, 10, 64)
		case "last_handshake_time_nsec":
			nsec, err = strconv.ParseInt(v, 10, 64)
		case "persistent_keepalive_interval":
			var secs int64
			secs, err = strconv.ParseInt(v, 10, 64)
			p.config.Keepalive = time.Duration(secs) * time.Second
		case "rx_bytes":
			p.status.RxBytes, err = strconv.ParseInt(v, 10, 64)
		case "tx_bytes":
			p.status.TxBytes, err = strconv.ParseInt(v, 10, 64)
		}
		if err != nil {
			return nil, fmt.Errorf("wireguard: device reported %s=%q: %w", k, v, err)
		}
	}
	finish()
	return out, nil
}

func sortPrefixes(ps []netip.Prefix) {
	slices.SortFunc(ps, func(a, b netip.Prefix) int {
		if c := a.Addr().Compare(b.Addr()); c != 0 {
			return c
		}
		return a.Bits() - b.Bits()
	})
}
