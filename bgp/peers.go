package bgp

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"time"

	api "github.com/osrg/gobgp/v4/api"
	bgppacket "github.com/osrg/gobgp/v4/pkg/packet/bgp"
)

// SetPeers makes the configured neighbors exactly peers: new ones are added,
// missing ones deleted (their session and learned routes go at once), and
// changed ones re-created. GoBGP accepts connections only from configured
// neighbors.
func (s *Speaker) SetPeers(ctx context.Context, peers []Peer) error {
	desired := make(map[netip.Addr]Peer, len(peers))
	for _, p := range peers {
		p, err := s.normalizePeer(p)
		if err != nil {
			return err
		}
		if other, dup := desired[p.Address]; dup {
			return fmt.Errorf("bgp: peers %q and %q share address %s", other.Name, p.Name, p.Address)
		}
		desired[p.Address] = p
	}

	s.configMu.Lock()
	defer s.configMu.Unlock()
	if s.stopped {
		return errStopped
	}

	// Clients must be in the reflect set before their sessions come up;
	// a peer that stops being a client is re-created below, after the set
	// no longer holds it.
	var rrClients []netip.Addr
	for _, p := range desired {
		if p.Type == PeerRRClient {
			rrClients = append(rrClients, p.Address)
		}
	}
	if err := s.setRRClients(ctx, rrClients); err != nil {
		return err
	}

	var errs []error
	for _, current := range s.peerSnapshot() {
		want, keep := desired[current.Address]
		if keep && want == current {
			continue
		}
		if err := s.deletePeer(ctx, current); err != nil {
			errs = append(errs, err)
			continue
		}
		s.forgetPeer(current.Address)
		if keep {
			s.log.Info("bgp peer changed", "peer", want.Name, "address", want.Address)
		} else {
			s.log.Info("bgp peer removed", "peer", current.Name, "address", current.Address)
		}
	}
	for _, want := range desired {
		s.peersMu.RLock()
		_, exists := s.peers[want.Address]
		s.peersMu.RUnlock()
		if exists {
			continue
		}
		if err := s.addPeer(ctx, want); err != nil {
			errs = append(errs, err)
			continue
		}
		s.log.Info("bgp peer configured", "peer", want.Name, "address", want.Address,
			"asn", want.ASN, "type", want.Type, "port", want.Port, "passive", want.Passive,
			"multihop", want.Multihop, "md5", want.Password != "")
	}
	// Attribution of existing routes may have changed (names, types).
	s.signalRIBChanged()
	return errors.Join(errs...)
}

func (s *Speaker) normalizePeer(p Peer) (Peer, error) {
	if !p.Address.IsValid() || p.Address.IsUnspecified() {
		return p, fmt.Errorf("bgp: peer %q: invalid address %q", p.Name, p.Address)
	}
	p.Address = p.Address.Unmap()
	if p.Address == s.cfg.ListenAddress {
		return p, fmt.Errorf("bgp: peer %q: address %s is our own listen address", p.Name, p.Address)
	}
	if p.Name == "" {
		p.Name = p.Address.String()
	}
	if p.ASN == 0 {
		p.ASN = s.cfg.ASN
	}
	if p.Port == 0 {
		p.Port = 179
	}
	switch p.Type {
	case "":
		p.Type = PeerMesh
	case PeerMesh, PeerExternal, PeerRouteReflector, PeerRRClient:
	default:
		return p, fmt.Errorf("bgp: peer %q: unknown type %q", p.Name, p.Type)
	}
	if (p.Type == PeerRRClient || p.Type == PeerRouteReflector || p.Type == PeerMesh) && p.ASN != s.cfg.ASN {
		return p, fmt.Errorf("bgp: peer %q: type %s needs our own ASN %d, got %d", p.Name, p.Type, s.cfg.ASN, p.ASN)
	}
	if p.Multihop > 0 && p.ASN == s.cfg.ASN {
		p.Multihop = 0 // iBGP is not TTL-limited; the setting means nothing there
	}
	return p, nil
}

func (s *Speaker) apiPeer(p Peer) *api.Peer {
	secs := func(d time.Duration) uint64 { return uint64(d.Round(time.Second) / time.Second) }
	ap := &api.Peer{
		Conf: &api.PeerConf{
			NeighborAddress: p.Address.String(),
			PeerAsn:         p.ASN,
			AuthPassword:    p.Password,
			Description:     p.Name,
		},
		Timers: &api.Timers{Config: &api.TimersConfig{
			HoldTime:          secs(s.cfg.HoldTime),
			KeepaliveInterval: secs(s.cfg.KeepaliveInterval),
			ConnectRetry:      secs(s.cfg.ConnectRetry),
			// Come back quickly after a session reset instead of GoBGP's 30 s.
			IdleHoldTimeAfterReset: secs(s.cfg.ConnectRetry),
		}},
		Transport: &api.Transport{
			// Source every session from the underlay address: peers match
			// neighbors (and MD5 keys) by source address.
			LocalAddress: s.cfg.ListenAddress.String(),
			RemotePort:   uint32(p.Port),
			PassiveMode:  p.Passive,
		},
	}
	if t := secs(s.cfg.GracefulRestartTime); t > 0 {
		ap.GracefulRestart = &api.GracefulRestart{
			Enabled:     true,
			RestartTime: uint32(t),
			// While restarting, wait for the peers' End-of-RIB at most
			// this long before sending our own routes.
			DeferralTime:    uint32(t),
			LocalRestarting: s.restarting,
		}
	}
	// IPv4 always (the container subnets; over an IPv6-only underlay too,
	// on the IPv6 session), IPv6 with an IPv6 pool or an IPv6 session.
	families := []*api.Family{apiFamilyOf(netip.IPv4Unspecified())}
	if s.cfg.IPv6 || s.cfg.ListenAddress.Is6() {
		families = append(families, apiFamilyOf(netip.IPv6Unspecified()))
	}
	if ap.GracefulRestart != nil || p.MaxPrefixes > 0 || len(families) > 1 {
		for _, family := range families {
			af := &api.AfiSafi{Config: &api.AfiSafiConfig{Family: family, Enabled: true}}
			if ap.GracefulRestart != nil {
				af.MpGracefulRestart = &api.MpGracefulRestart{Config: &api.MpGracefulRestartConfig{Enabled: true}}
			}
			if p.MaxPrefixes > 0 {
				af.PrefixLimits = &api.PrefixLimit{Family: family, MaxPrefixes: p.MaxPrefixes}
			}
			ap.AfiSafis = append(ap.AfiSafis, af)
		}
	}
	if p.Multihop > 0 {
		ap.EbgpMultihop = &api.EbgpMultihop{Enabled: true, MultihopTtl: uint32(p.Multihop)}
	}
	if p.Type == PeerRRClient {
		ap.RouteReflector = &api.RouteReflector{
			RouteReflectorClient:    true,
			RouteReflectorClusterId: s.cfg.RouterID.String(),
		}
	}
	return ap
}

// DropRoutes ends the session with the peer at addr and drops every route
// it sent, stale ones kept for a graceful restart included, then lets the
// session come back: the peer was found dead (BFD), not restarting.
func (s *Speaker) DropRoutes(ctx context.Context, addr netip.Addr) error {
	s.configMu.Lock()
	defer s.configMu.Unlock()
	if s.stopped {
		return errStopped
	}
	s.peersMu.RLock()
	p, ok := s.peers[addr]
	s.peersMu.RUnlock()
	if !ok {
		return fmt.Errorf("bgp: no peer %s", addr)
	}
	// Deleting the peer drops its routes whatever its session state; a
	// hard reset would leave the stale routes of a session already down.
	if err := s.deletePeer(ctx, p); err != nil {
		return err
	}
	s.forgetPeer(addr)
	return s.addPeer(ctx, p)
}

func (s *Speaker) addPeer(ctx context.Context, p Peer) error {
	s.peersMu.Lock()
	s.peers[p.Address] = p
	s.sessions[p.Address] = sessionSeen{since: time.Now()}
	s.peersMu.Unlock()
	if err := s.server.AddPeer(ctx, &api.AddPeerRequest{Peer: s.apiPeer(p)}); err != nil {
		s.forgetPeer(p.Address)
		return fmt.Errorf("bgp: add peer %q (%s): %w", p.Name, p.Address, err)
	}
	return nil
}

func (s *Speaker) forgetPeer(addr netip.Addr) {
	s.peersMu.Lock()
	delete(s.peers, addr)
	delete(s.sessions, addr)
	s.peersMu.Unlock()
}

func (s *Speaker) deletePeer(ctx context.Context, p Peer) error {
	if p.Password != "" {
		// GoBGP's DeletePeer leaves the MD5 key on the listening socket; a
		// password change through UpdatePeer clears the old key. Do that
		// first (admin-down, so it does not dial) so no stale key survives.
		cleared := s.apiPeer(p)
		cleared.Conf.AuthPassword = ""
		cleared.Conf.AdminDown = true
		if _, err := s.server.UpdatePeer(ctx, &api.UpdatePeerRequest{Peer: cleared}); err != nil {
			s.log.Warn("bgp: could not clear MD5 key before deleting peer", "peer", p.Name, "error", err)
		}
	}
	if err := s.server.DeletePeer(ctx, &api.DeletePeerRequest{Address: p.Address.String()}); err != nil {
		return fmt.Errorf("bgp: delete peer %q (%s): %w", p.Name, p.Address, err)
	}
	return nil
}

// Peers reports every configured peer's session state.
func (s *Speaker) Peers(ctx context.Context) ([]PeerStatus, error) {
	live := map[netip.Addr]*api.Peer{}
	err := s.server.ListPeer(ctx, &api.ListPeerRequest{}, func(p *api.Peer) {
		if p.Conf == nil {
			return
		}
		if addr, err := netip.ParseAddr(p.Conf.NeighborAddress); err == nil {
			live[addr.Unmap()] = p
		}
	})
	if err != nil {
		return nil, fmt.Errorf("bgp: list peers: %w", err)
	}

	s.peersMu.RLock()
	defer s.peersMu.RUnlock()
	out := make([]PeerStatus, 0, len(s.peers))
	for _, p := range s.peerSnapshotLocked() {
		seen := s.sessions[p.Address]
		st := PeerStatus{Name: p.Name, Address: p.Address, ASN: p.ASN, Type: p.Type, State: Idle, Since: seen.since}
		if ap, ok := live[p.Address]; ok {
			if ap.State != nil {
				st.State = sessionStateName(ap.State.SessionState)
			}
			st.EndOfRIB = len(ap.AfiSafis) > 0
			for _, af := range ap.AfiSafis {
				if af.State != nil {
					st.Received += int(af.State.Received)
					st.Accepted += int(af.State.Accepted)
				}
				gr := af.GetMpGracefulRestart().GetState()
				st.GracefulRestart = st.GracefulRestart || (gr.GetAdvertised() && gr.GetReceived())
				if (af.GetConfig().GetFamily().GetAfi() == api.Family_AFI_IP6) != s.cfg.ListenAddress.Is6() && !gr.GetReceived() {
					continue // a peer without the session's other family sends no End-of-RIB for it
				}
				st.EndOfRIB = st.EndOfRIB && gr.GetEndOfRibReceived()
			}
			st.Restarting = ap.GetGracefulRestart().GetPeerRestarting()
		}
		if seen.state == Established && st.State == OpenConfirm {
			// GoBGP signals Established before its listing shows it: a
			// reader woken by WatchSessions must see the state it was woken
			// for. A session going down is listed before it is signalled,
			// so the listing is the newer word on anything else.
			st.State = Established
		}
		out = append(out, st)
	}
	return out, nil
}

// apiFamilyOf is the unicast family of a, as GoBGP's peer config names it.
func apiFamilyOf(a netip.Addr) *api.Family {
	if a.Unmap().Is4() {
		return &api.Family{Afi: api.Family_AFI_IP, Safi: api.Family_SAFI_UNICAST}
	}
	return &api.Family{Afi: api.Family_AFI_IP6, Safi: api.Family_SAFI_UNICAST}
}

// fsmStateName is sessionStateName for the state in GoBGP's peer events.
func fsmStateName(st bgppacket.FSMState) SessionState {
	switch st {
	case bgppacket.BGP_FSM_ESTABLISHED:
		return Established
	case bgppacket.BGP_FSM_ACTIVE:
		return Active
	case bgppacket.BGP_FSM_CONNECT:
		return Connect
	case bgppacket.BGP_FSM_OPENSENT:
		return OpenSent
	case bgppacket.BGP_FSM_OPENCONFIRM:
		return OpenConfirm
	default:
		return Idle
	}
}

// sessionStateName is fsmStateName for the state GoBGP's API reports: the
// same states in the same order, from IDLE = 1 (0 is unspecified).
func sessionStateName(st api.PeerState_SessionState) SessionState {
	if st < api.PeerState_SESSION_STATE_IDLE {
		return Idle
	}
	return fsmStateName(bgppacket.FSMState(st - api.PeerState_SESSION_STATE_IDLE))
}
