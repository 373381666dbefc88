package bgp

import (
	"context"
	"net/netip"
	"slices"
	"time"

	api "github.com/osrg/gobgp/v3/api"

	"github.com/fabricnet/fabric/internal/latest"
)

// onEvent runs on GoBGP's watcher goroutine; it must stay fast.
func (s *Speaker) onEvent(ev *api.WatchEventResponse) {
	if pe := ev.GetPeer(); pe != nil && pe.Type == api.WatchEventResponse_PeerEvent_STATE && pe.Peer != nil && pe.Peer.State != nil {
		if addr, err := netip.ParseAddr(pe.Peer.State.NeighborAddress); err == nil {
			addr = addr.Unmap()
			s.peersMu.Lock()
			if _, ok := s.peers[addr]; ok {
				s.stateSince[addr] = time.Now()
			}
			s.peersMu.Unlock()
			s.log.Debug("bgp peer state", "address", addr, "state", sessionStateName(pe.Peer.State.SessionState))
		}
	}
	s.signalRIBChanged()
}

func (s *Speaker) signalRIBChanged() {
	select {
	case s.ribChanged <- struct{}{}:
	default: // a rebuild is already pending; it will see this change too
	}
}

// publishRoutes rebuilds the full best-path set whenever something changed
// and hands it to Routes(), replacing a set nobody has read yet.
func (s *Speaker) publishRoutes(ctx context.Context) {
	defer close(s.publisherDone)
	var last []Route
	first := true
	for {
		select {
		case <-ctx.Done():
			return
		case <-s.ribChanged:
		}
		routes, err := s.bestRoutes(ctx)
		if err != nil {
			if ctx.Err() != nil {
				return
			}
			s.log.Warn("bgp: reading the RIB failed; retrying", "error", err)
			time.AfterFunc(time.Second, s.signalRIBChanged)
			continue
		}
		if !first && slices.Equal(routes, last) {
			continue
		}
		first = false
		last = routes
		s.log.Debug("bgp routes changed", "count", len(routes))
		latest.Put(s.routes, slices.Clone(routes)) // only this goroutine sends
	}
}

// bestRoutes lists the global RIB's best paths that were learned from
// peers, sorted by prefix.
func (s *Speaker) bestRoutes(ctx context.Context) ([]Route, error) {
	s.peersMu.RLock()
	peers := make(map[netip.Addr]Peer, len(s.peers))
	for a, p := range s.peers {
		peers[a] = p
	}
	s.peersMu.RUnlock()

	routes := []Route{}
	for _, family := range []*api.Family{familyIPv4, familyIPv6} {
		err := s.server.ListPath(ctx, &api.ListPathRequest{TableType: api.TableType_GLOBAL, Family: family}, func(d *api.Destination) {
			for _, p := range d.Paths {
				if !p.Best || p.IsWithdraw {
					continue
				}
				if r, ok := routeFromPath(p, peers); ok {
					routes = append(routes, r)
				}
			}
		})
		if err != nil {
			return nil, err
		}
	}
	slices.SortFunc(routes, func(a, b Route) int {
		if c := a.Prefix.Addr().Compare(b.Prefix.Addr()); c != 0 {
			return c
		}
		return a.Prefix.Bits() - b.Prefix.Bits()
	})
	return routes, nil
}

// routeFromPath converts a learned path; our own (local) paths have no
// neighbor address and are skipped.
func routeFromPath(p *api.Path, peers map[netip.Addr]Peer) (Route, bool) {
	neighbor, err := netip.ParseAddr(p.NeighborIp)
	if err != nil || neighbor.IsUnspecified() {
		return Route{}, false
	}
	neighbor = neighbor.Unmap()
	nlri := &api.IPAddressPrefix{}
	if p.Nlri == nil || p.Nlri.UnmarshalTo(nlri) != nil {
		return Route{}, false
	}
	addr, err := netip.ParseAddr(nlri.Prefix)
	if err != nil {
		return Route{}, false
	}
	prefix, err := addr.Unmap().Prefix(int(nlri.PrefixLen))
	if err != nil {
		return Route{}, false
	}
	r := Route{Prefix: prefix, PeerAddress: neighbor}
	for _, attr := range p.Pattrs {
		msg, err := attr.UnmarshalNew()
		if err != nil {
			continue
		}
		switch a := msg.(type) {
		case *api.NextHopAttribute:
			if nh, err := netip.ParseAddr(a.NextHop); err == nil {
				r.NextHop = nh.Unmap()
			}
		case *api.MpReachNLRIAttribute:
			if len(a.NextHops) > 0 {
				if nh, err := netip.ParseAddr(a.NextHops[0]); err == nil {
					r.NextHop = nh.Unmap()
				}
			}
		}
	}
	if !r.NextHop.IsValid() {
		return Route{}, false
	}
	if peer, ok := peers[neighbor]; ok {
		r.PeerName = peer.Name
		r.PeerType = peer.Type
	}
	return r, true
}
