// Package bgp is fabricd's embedded BGP speaker: an in-process GoBGP server
// that advertises this host's subnet, peers with the other hosts (iBGP mesh),
// with external routers (top-of-rack, route reflectors) and with route
// reflector clients, and reports the best learned routes so the data plane
// can install them.
package bgp

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"net/netip"
	"slices"
	"sync"
	"time"

	"github.com/google/uuid"
	api "github.com/osrg/gobgp/v4/api"
	"github.com/osrg/gobgp/v4/pkg/apiutil"
	bgppacket "github.com/osrg/gobgp/v4/pkg/packet/bgp"
	"github.com/osrg/gobgp/v4/pkg/server"
)

// DefaultASN is the private ASN used when Config.ASN is zero.
const DefaultASN uint32 = 64512

// Timer defaults: a dead peer is noticed within seconds (BGP's own default
// hold time is 90 s), and a joining host is dialled again within seconds.
const (
	DefaultHoldTime          = 9 * time.Second
	DefaultKeepaliveInterval = 3 * time.Second
	DefaultConnectRetry      = 2 * time.Second
)

// PeerType says what role a peer plays; it decides the GoBGP neighbor config
// and is reported with every route learned from that peer.
type PeerType string

const (
	// PeerMesh is another fabric host in the iBGP full mesh.
	PeerMesh PeerType = "mesh"
	// PeerExternal is an eBGP or iBGP router such as a top-of-rack switch.
	PeerExternal PeerType = "external"
	// PeerRouteReflector reflects routes for us; we are its client.
	PeerRouteReflector PeerType = "route-reflector"
	// PeerRRClient is a client for which this speaker acts as route reflector.
	PeerRRClient PeerType = "rr-client"
)

// Peer is one configured BGP neighbor.
type Peer struct {
	Name     string
	Address  netip.Addr
	ASN      uint32 // 0 = our own ASN (iBGP)
	Port     uint16 // 0 = 179
	Password string // TCP MD5 signature key; empty = none
	Multihop uint8  // eBGP multihop TTL, 0 = off
	Type     PeerType
	Passive  bool // only accept connections, never dial
	// MaxPrefixes, if set, closes the session (a Cease NOTIFICATION, logged
	// by GoBGP as "prefix limit reached") when the peer sends more routes.
	MaxPrefixes uint32
}

// Config configures a Speaker.
type Config struct {
	RouterID netip.Addr // default: ListenAddress (must be IPv4)
	ASN      uint32     // default DefaultASN
	// ListenAddress is the underlay address: BGP listens on it and every
	// session is sourced from it. Required; never the unspecified address.
	ListenAddress netip.Addr
	ListenPort    int // default 179; -1 = do not listen (dial only)

	HoldTime          time.Duration // default 9s
	KeepaliveInterval time.Duration // default 3s
	ConnectRetry      time.Duration // default 2s

	// GracefulRestartTime turns on BGP graceful restart (RFC 4724) on
	// every session: a peer whose session ends without a NOTIFICATION
	// keeps its routes (stale) for this long, until it is back and has
	// sent End-of-RIB, and this speaker asks its peers to do the same for
	// it. 0 = off. Whole seconds up to 4095.
	GracefulRestartTime time.Duration
	// Restarting says this speaker comes back after a restart with its
	// forwarding state kept: peers added before EndRestart are told so
	// (the Restart State and Forwarding State bits), keep our routes
	// until our End-of-RIB, and we send ours only once theirs are in.
	Restarting bool

	// IPv6 adds the IPv6 unicast family to every session over an IPv4
	// underlay: the fabric's IPv6 subnets travel with IPv4 next hops.
	IPv6 bool

	// APISocket, if set, serves GoBGP's gRPC API on this unix socket
	// (mode 0600) and nowhere else. Empty = no API server at all.
	APISocket string

	Logger *slog.Logger // default slog.Default()
}

// Route is one learned best path (never one of our own).
type Route struct {
	Prefix      netip.Prefix
	NextHop     netip.Addr
	PeerAddress netip.Addr // the neighbor the path came from
	PeerName    string
	PeerType    PeerType
}

// SessionState is a BGP session's state, named as GoBGP and RFC 4271 do.
type SessionState string

// sessionSeen is a peer's session as GoBGP's state events tell it.
type sessionSeen struct {
	since time.Time    // of the state, or when the peer was added
	state SessionState // "": no event yet
}

// Session states.
const (
	Established SessionState = "established"
	Active      SessionState = "active"
	Connect     SessionState = "connect"
	OpenSent    SessionState = "opensent"
	OpenConfirm SessionState = "openconfirm"
	Idle        SessionState = "idle"
)

// Up reports whether the session is established.
func (p PeerStatus) Up() bool { return p.State == Established }

// FabricHost reports whether a peer of this type is another fabric host
// (mesh, reflector or reflector client), not a router.
func (t PeerType) FabricHost() bool {
	return t == PeerMesh || t == PeerRRClient || t == PeerRouteReflector
}

// PeerStatus is the live state of one configured peer.
type PeerStatus struct {
	Name    string
	Address netip.Addr
	ASN     uint32
	Type    PeerType
	State   SessionState
	Since   time.Time // last state change seen by this speaker
	// Received and Accepted count prefixes from this peer.
	Received, Accepted int
	// GracefulRestart: both sides negotiated graceful restart.
	GracefulRestart bool
	// Restarting: the session went down without a NOTIFICATION and the
	// peer's routes are kept (stale) while it restarts.
	Restarting bool
	// EndOfRIB: the peer has sent all its routes since the session came up.
	EndOfRIB bool
}

// advertisement is our own prefix as installed in GoBGP.
type advertisement struct {
	prefix  netip.Prefix
	nextHop netip.Addr
	uuid    uuid.UUID // AddPath's handle; withdrawing by it never touches other paths
}

// Speaker is a running embedded BGP speaker.
type Speaker struct {
	cfg    Config
	log    *slog.Logger
	server *server.BgpServer
	api    *apiSocket

	// configMu serializes SetPeers/Advertise/Withdraw/Stop.
	configMu    sync.Mutex
	advertised  map[netip.Prefix]advertisement
	rrClientSet map[string]bool // neighbor-set entries that get reflected routes
	stopped     bool
	restarting  bool // peers added now get LocalRestarting; see Config.Restarting

	// peersMu guards the peer table read by the route publisher.
	peersMu  sync.RWMutex
	peers    map[netip.Addr]Peer
	sessions map[netip.Addr]sessionSeen

	ribChanged chan struct{} // cap 1: "something changed, rebuild"
	// sessionWatchers (under peersMu) are signalled when a session changes
	// state; each has cap 1.
	sessionWatchers []chan struct{}
	// changesMu guards the best-path changes the watcher queued and the
	// publisher has not applied yet.
	changesMu       sync.Mutex
	bestPathChanges []*apiutil.Path
	routes          chan []Route // cap 1: latest full route set

	cancel        context.CancelFunc
	publisherDone chan struct{}
}

// Start starts the speaker: the BGP listener (if any), the optional API
// socket, and the route publisher. It sends an initial, possibly empty,
// route set on Routes().
func Start(ctx context.Context, cfg Config) (*Speaker, error) {
	cfg, err := withDefaults(cfg)
	if err != nil {
		return nil, err
	}
	logger := cfg.Logger.With("component", "bgp")
	disableListenerMPTCP(logger)

	// GoBGP logs with slog itself (peers up and down at Info, per-message
	// detail at Debug); its level follows ours, so that it skips building
	// Debug records nobody will see.
	level := new(slog.LevelVar)
	if !cfg.Logger.Enabled(ctx, slog.LevelDebug) {
		level.Set(slog.LevelInfo)
	} else {
		level.Set(slog.LevelDebug)
	}
	opts := []server.ServerOption{server.LoggerOption(cfg.Logger.With("component", "gobgp"), level)}
	var apiSock *apiSocket
	if cfg.APISocket != "" {
		apiSock, err = prepareAPISocket(cfg.APISocket)
		if err != nil {
			return nil, err
		}
		opts = append(opts, server.GrpcListenAddress("unix://"+apiSock.tempPath))
	}
	bgpServer := server.NewBgpServer(opts...)
	go bgpServer.Serve()

	fail := func(err error) (*Speaker, error) {
		bgpServer.Stop()
		if apiSock != nil {
			apiSock.cleanup()
		}
		return nil, err
	}

	listenPort := int32(cfg.ListenPort)
	err = bgpServer.StartBgp(ctx, &api.StartBgpRequest{Global: &api.Global{
		Asn:             cfg.ASN,
		RouterId:        cfg.RouterID.String(),
		ListenPort:      listenPort,
		ListenAddresses: []string{cfg.ListenAddress.String()},
	}})
	if err != nil {
		return fail(fmt.Errorf("bgp: start speaker on %s port %d: %w", cfg.ListenAddress, cfg.ListenPort, err))
	}
	if apiSock != nil {
		if err := apiSock.publish(ctx); err != nil {
			return fail(err)
		}
	}

	runCtx, cancel := context.WithCancel(context.Background())
	s := &Speaker{
		cfg:           cfg,
		advertised:    map[netip.Prefix]advertisement{},
		log:           logger,
		server:        bgpServer,
		api:           apiSock,
		peers:         map[netip.Addr]Peer{},
		sessions:      map[netip.Addr]sessionSeen{},
		ribChanged:    make(chan struct{}, 1),
		routes:        make(chan []Route, 1),
		cancel:        cancel,
		restarting:    cfg.Restarting && cfg.GracefulRestartTime > 0,
		publisherDone: make(chan struct{}),
	}

	// The callback runs on GoBGP's watcher goroutine: only note the time and
	// signal; the publisher does the heavy lifting.
	err = bgpServer.WatchEvent(runCtx, server.WatchEventMessageCallbacks{
		OnPeerUpdate: s.onPeerEvent,
		OnBestPath:   s.onBestPath,
	}, server.WatchPeer(), server.WatchBestPath(false))
	if err != nil {
		cancel()
		return fail(fmt.Errorf("bgp: watch events: %w", err))
	}

	if err := s.installExportPolicy(ctx); err != nil {
		cancel()
		return fail(err)
	}

	s.signalRIBChanged() // the initial (empty) set
	go s.publishRoutes(runCtx)

	logger.Info("bgp speaker started", "router_id", cfg.RouterID, "asn", cfg.ASN,
		"listen", cfg.ListenAddress, "port", cfg.ListenPort, "api_socket", cfg.APISocket)
	return s, nil
}

func withDefaults(cfg Config) (Config, error) {
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	if cfg.ASN == 0 {
		cfg.ASN = DefaultASN
	}
	if !cfg.ListenAddress.IsValid() || cfg.ListenAddress.IsUnspecified() {
		return cfg, fmt.Errorf("bgp: ListenAddress must be the underlay address, got %q", cfg.ListenAddress)
	}
	cfg.ListenAddress = cfg.ListenAddress.Unmap()
	if !cfg.RouterID.IsValid() {
		cfg.RouterID = cfg.ListenAddress
	}
	if !cfg.RouterID.Unmap().Is4() {
		return cfg, fmt.Errorf("bgp: RouterID must be an IPv4 address, got %q (set Config.RouterID when listening on IPv6)", cfg.RouterID)
	}
	cfg.RouterID = cfg.RouterID.Unmap()
	switch {
	case cfg.ListenPort == 0:
		cfg.ListenPort = 179
	case cfg.ListenPort == -1:
	case cfg.ListenPort < 0 || cfg.ListenPort > 65535:
		return cfg, fmt.Errorf("bgp: ListenPort %d out of range", cfg.ListenPort)
	}
	if cfg.HoldTime == 0 {
		cfg.HoldTime = DefaultHoldTime
	}
	if cfg.KeepaliveInterval == 0 {
		cfg.KeepaliveInterval = DefaultKeepaliveInterval
	}
	if cfg.ConnectRetry == 0 {
		cfg.ConnectRetry = DefaultConnectRetry
	}
	// GoBGP's timers are whole seconds; BGP forbids a hold time of 1 or 2.
	if cfg.HoldTime < 3*time.Second {
		return cfg, fmt.Errorf("bgp: HoldTime %s below the BGP minimum of 3s", cfg.HoldTime)
	}
	if cfg.KeepaliveInterval < time.Second || cfg.KeepaliveInterval >= cfg.HoldTime {
		return cfg, fmt.Errorf("bgp: KeepaliveInterval %s must be at least 1s and below HoldTime %s", cfg.KeepaliveInterval, cfg.HoldTime)
	}
	if cfg.ConnectRetry < time.Second {
		cfg.ConnectRetry = time.Second
	}
	if cfg.GracefulRestartTime < 0 || cfg.GracefulRestartTime > 4095*time.Second {
		return cfg, fmt.Errorf("bgp: GracefulRestartTime %s outside 0..4095s", cfg.GracefulRestartTime)
	}
	return cfg, nil
}

// Routes delivers the full set of learned best paths after every change,
// coalesced: a slow reader only ever sees the latest set. The channel is
// closed by Stop.
func (s *Speaker) Routes() <-chan []Route { return s.routes }

// WatchSessions returns a channel signalled once at once and then after
// every change of a session's state, changes coalesced while the reader is
// busy: whoever acts on session states reads Peers on a signal instead of
// asking GoBGP on a timer, which an idle host would pay for every second.
func (s *Speaker) WatchSessions() <-chan struct{} {
	c := make(chan struct{}, 1)
	c <- struct{}{}
	s.peersMu.Lock()
	s.sessionWatchers = append(s.sessionWatchers, c)
	s.peersMu.Unlock()
	return c
}

// NextHops are this host's addresses as next hops: IPv4 for IPv4
// prefixes, and IPv6 (where the host has one on its underlay) for IPv6
// ones. Without IPv6 an IPv6 prefix carries the IPv4 address IPv4-mapped
// (RFC 4798): the routes lead to the same host over the IPv4 underlay,
// which fabric hosts can use and routers cannot.
type NextHops struct{ IPv4, IPv6 netip.Addr }

// For is the next hop of prefix.
func (n NextHops) For(prefix netip.Prefix) netip.Addr {
	if prefix.Addr().Is6() && n.IPv6.IsValid() {
		return n.IPv6
	}
	return n.IPv4.Unmap()
}

// Advertise makes the paths this host originates exactly prefixes (ORIGIN
// IGP, NEXT_HOP from nextHops): its subnet, its IPv6 subnet and its blocks
// of Docker networks. New paths are added before gone ones are withdrawn,
// each by the UUID AddPath gave it; advertising the same set again is a
// no-op.
func (s *Speaker) Advertise(ctx context.Context, nextHops NextHops, prefixes ...netip.Prefix) error {
	if !nextHops.IPv4.Unmap().Is4() || (nextHops.IPv6.IsValid() && (!nextHops.IPv6.Is6() || nextHops.IPv6.Is4In6())) {
		return fmt.Errorf("bgp: advertise: next hops %v and %v: want an IPv4 address and an IPv6 one or none", nextHops.IPv4, nextHops.IPv6)
	}
	want := map[netip.Prefix]bool{}
	for _, p := range prefixes {
		if !p.IsValid() {
			return fmt.Errorf("bgp: advertise: invalid prefix %q", p)
		}
		want[p.Masked()] = true
	}

	s.configMu.Lock()
	defer s.configMu.Unlock()
	if s.stopped {
		return errStopped
	}
	for _, prefix := range slices.SortedFunc(maps.Keys(want), comparePrefixes) {
		nextHop := nextHops.For(prefix)
		if old, ok := s.advertised[prefix]; ok && old.nextHop == nextHop {
			continue
		}
		path, err := localPath(prefix, nextHop)
		if err != nil {
			return err
		}
		resp, err := s.server.AddPath(apiutil.AddPathRequest{Paths: []*apiutil.Path{path}})
		if err == nil && (len(resp) != 1 || resp[0].Error != nil) {
			err = fmt.Errorf("no path handle: %v", resp)
		}
		if err != nil {
			return fmt.Errorf("bgp: advertise %s via %s: %w", prefix, nextHop, err)
		}
		// The same prefix again: AddPath replaced the path in place (and its UUID).
		s.advertised[prefix] = advertisement{prefix: prefix, nextHop: nextHop, uuid: resp[0].UUID}
		s.log.Info("advertising prefix", "prefix", prefix, "next_hop", nextHop)
	}
	for _, prefix := range slices.SortedFunc(maps.Keys(s.advertised), comparePrefixes) {
		if want[prefix] {
			continue
		}
		if err := s.deletePath(s.advertised[prefix].uuid); err != nil {
			return fmt.Errorf("bgp: withdraw %s: %w", prefix, err)
		}
		delete(s.advertised, prefix)
		s.log.Info("withdrew prefix", "prefix", prefix)
	}
	return nil
}

// Withdraw withdraws every path this host originates (graceful shutdown).
func (s *Speaker) Withdraw(ctx context.Context) error {
	s.configMu.Lock()
	defer s.configMu.Unlock()
	if s.stopped {
		return errStopped
	}
	var errs []error
	for prefix, ad := range s.advertised {
		if err := s.deletePath(ad.uuid); err != nil {
			errs = append(errs, fmt.Errorf("bgp: withdraw %s: %w", prefix, err))
			continue
		}
		delete(s.advertised, prefix)
		s.log.Info("withdrew prefix", "prefix", prefix)
	}
	return errors.Join(errs...)
}

func comparePrefixes(a, b netip.Prefix) int {
	if c := a.Addr().Compare(b.Addr()); c != 0 {
		return c
	}
	return a.Bits() - b.Bits()
}

// deletePath withdraws exactly one of our paths. An empty UUID would make
// GoBGP delete every local path, so refuse it.
func (s *Speaker) deletePath(id uuid.UUID) error {
	if id == uuid.Nil {
		return errors.New("no path handle (refusing a DeletePath that would remove every local path)")
	}
	return s.server.DeletePath(apiutil.DeletePathRequest{UUIDs: []uuid.UUID{id}})
}

func localPath(prefix netip.Prefix, nextHop netip.Addr) (*apiutil.Path, error) {
	nlri, err := bgppacket.NewIPAddrPrefix(prefix)
	if err != nil {
		return nil, err
	}
	origin := bgppacket.NewPathAttributeOrigin(bgppacket.BGP_ORIGIN_ATTR_TYPE_IGP)
	family := familyOf(prefix.Addr())
	var nh bgppacket.PathAttributeInterface
	if prefix.Addr().Is4() {
		nh, err = bgppacket.NewPathAttributeNextHop(nextHop)
	} else {
		nh, err = bgppacket.NewPathAttributeMpReachNLRI(family, []bgppacket.PathNLRI{{NLRI: nlri}}, nextHop)
	}
	if err != nil {
		return nil, err
	}
	return &apiutil.Path{Family: family, Nlri: nlri, Attrs: []bgppacket.PathAttributeInterface{origin, nh}}, nil
}

func familyOf(a netip.Addr) bgppacket.Family {
	if a.Unmap().Is4() {
		return bgppacket.RF_IPv4_UC
	}
	return bgppacket.RF_IPv6_UC
}

var errStopped = errors.New("bgp: speaker stopped")

// Stop closes every session (peers see a Cease notification and drop our
// routes at once), the listener and the API socket, and closes the Routes
// channel. Safe to call twice, and after Detach.
func (s *Speaker) Stop() {
	if s.shutdown(true) {
		s.log.Info("bgp speaker stopped")
	}
}

// Detach is the stop before a restart: it stops the route publisher and the
// API socket but sends peers nothing. The sessions end when the process
// exits, without a NOTIFICATION, which graceful-restart peers treat as a
// restart: they keep our routes until we are back. The process must exit
// soon after.
func (s *Speaker) Detach() {
	if s.shutdown(false) {
		s.log.Info("bgp speaker detached; sessions end with the process, peers keep our routes", "restartTime", s.cfg.GracefulRestartTime)
	}
}

// shutdown stops the publisher and the API socket, and GoBGP itself when
// closeSessions is set. It reports whether it did anything.
func (s *Speaker) shutdown(closeSessions bool) bool {
	s.configMu.Lock()
	defer s.configMu.Unlock()
	if s.stopped {
		return false
	}
	s.stopped = true
	s.cancel()
	<-s.publisherDone
	if closeSessions {
		s.server.Stop()
	}
	if s.api != nil {
		s.api.cleanup()
	}
	close(s.routes)
	return true
}

// EndRestart says the restart is over (every peer has sent its routes, or
// the wait ended): peers added from now on are not told we are restarting.
func (s *Speaker) EndRestart() {
	s.configMu.Lock()
	defer s.configMu.Unlock()
	s.restarting = false
}

// peerSnapshot returns the configured peers, sorted by address.
func (s *Speaker) peerSnapshot() []Peer {
	s.peersMu.RLock()
	defer s.peersMu.RUnlock()
	return s.peerSnapshotLocked()
}

func (s *Speaker) peerSnapshotLocked() []Peer {
	out := make([]Peer, 0, len(s.peers))
	for _, p := range s.peers {
		out = append(out, p)
	}
	slices.SortFunc(out, func(a, b Peer) int { return a.Address.Compare(b.Address) })
	return out
}
