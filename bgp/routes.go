package bgp

import (
	"context"
	"net/netip"
	"slices"
	"time"

	"github.com/osrg/gobgp/v4/pkg/apiutil"
	bgppacket "github.com/osrg/gobgp/v4/pkg/packet/bgp"

	"github.com/fabricnet/fabric/internal/latest"
)

// onPeerEvent and onBestPath run on GoBGP's watcher goroutine; they must
// stay fast: they note the time or queue the changed best paths for the
// publisher, and wake it.
func (s *Speaker) onPeerEvent(pe *apiutil.WatchEventMessage_PeerEvent, at time.Time) {
	if pe.Type == apiutil.PEER_EVENT_STATE {
		if addr := pe.Peer.State.NeighborAddress.Unmap(); addr.IsValid() {
			s.peersMu.Lock()
			if _, ok := s.peers[addr]; ok {
				s.sessions[addr] = sessionSeen{since: at, state: fsmStateName(pe.Peer.State.SessionState)}
			}
			s.peersMu.Unlock()
			s.log.Debug("bgp peer state", "address", addr, "state", fsmStateName(pe.Peer.State.SessionState))
		}
		s.peersMu.RLock()
		for _, c := range s.sessionWatchers {
			select {
			case c <- struct{}{}:
			default: // its reader has yet to look; it will see this change too
			}
		}
		s.peersMu.RUnlock()
	}
	s.signalRIBChanged()
}

func (s *Speaker) onBestPath(paths []*apiutil.Path, _ time.Time) {
	if len(paths) > 0 {
		s.changesMu.Lock()
		s.bestPathChanges = append(s.bestPathChanges, paths...)
		s.changesMu.Unlock()
	}
	s.signalRIBChanged()
}

func (s *Speaker) signalRIBChanged() {
	select {
	case s.ribChanged <- struct{}{}:
	default: // a rebuild is already pending; it will see this change too
	}
}

// publishRoutes keeps the best paths learned from peers by applying GoBGP's
// best-path changes as they come (never re-listing the RIB: at 100,000
// routes a listing costs more than the changes of a whole table), and hands
// the full set to Routes() after each batch, replacing a set nobody has read
// yet. A peer event republishes too: peer names and types come from the
// current peer table.
func (s *Speaker) publishRoutes(ctx context.Context) {
	defer close(s.publisherDone)
	best := map[netip.Prefix]Route{}
	var last []Route
	first := true
	for {
		select {
		case <-ctx.Done():
			return
		case <-s.ribChanged:
		}
		start := time.Now()
		s.changesMu.Lock()
		changes := s.bestPathChanges
		s.bestPathChanges = nil
		s.changesMu.Unlock()
		for _, p := range changes {
			applyBestPath(best, p)
		}
		routes := s.routeSet(best)
		if !first && slices.Equal(routes, last) {
			continue
		}
		first = false
		last = routes
		s.log.Debug("bgp routes changed", "count", len(routes), "changes", len(changes))
		latest.Put(s.routes, slices.Clone(routes)) // only this goroutine sends
		// A router's full table comes in thousands of small changes, and
		// each set costs the planner and the data plane a pass over every
		// route: let changes gather for a few times what this set took
		// (nothing for a fabric's few hundred routes, up to 200 ms for
		// 100,000), so that those passes stay a small share of the CPU.
		pace := min(4*time.Since(start), 200*time.Millisecond)
		select {
		case <-ctx.Done():
			return
		case <-time.After(pace):
		}
	}
}

// applyBestPath records one best-path change: a path from a peer is the
// prefix's route; a withdrawal, or a best path that is our own, removes it.
func applyBestPath(best map[netip.Prefix]Route, p *apiutil.Path) {
	prefix, ok := pathPrefix(p)
	if !ok {
		return
	}
	if p.Withdrawal {
		delete(best, prefix)
		return
	}
	if r, ok := routeFromPath(p, prefix); ok {
		best[prefix] = r
	} else {
		delete(best, prefix)
	}
}

// routeSet is the learned best paths sorted by prefix, with the names and
// types of their peers as they are now.
func (s *Speaker) routeSet(best map[netip.Prefix]Route) []Route {
	s.peersMu.RLock()
	routes := make([]Route, 0, len(best))
	for _, r := range best {
		if peer, ok := s.peers[r.PeerAddress]; ok {
			r.PeerName, r.PeerType = peer.Name, peer.Type
		} else {
			r.PeerName, r.PeerType = "", ""
		}
		routes = append(routes, r)
	}
	s.peersMu.RUnlock()
	slices.SortFunc(routes, func(a, b Route) int {
		if c := a.Prefix.Addr().Compare(b.Prefix.Addr()); c != 0 {
			return c
		}
		return a.Prefix.Bits() - b.Prefix.Bits()
	})
	return routes
}

// pathPrefix is the prefix a path is for.
func pathPrefix(p *apiutil.Path) (netip.Prefix, bool) {
	nlri, ok := p.Nlri.(*bgppacket.IPAddrPrefix)
	if !ok || !nlri.Prefix.IsValid() {
		return netip.Prefix{}, false
	}
	prefix := nlri.Prefix
	if prefix.Addr().Is4In6() {
		prefix = netip.PrefixFrom(prefix.Addr().Unmap(), prefix.Bits()-96)
	}
	return prefix, prefix.IsValid()
}

// routeFromPath converts a learned path for prefix; our own (local) paths
// have no peer address and are skipped.
func routeFromPath(p *apiutil.Path, prefix netip.Prefix) (Route, bool) {
	neighbor := p.PeerAddress.Unmap()
	if !neighbor.IsValid() || neighbor.IsUnspecified() {
		return Route{}, false
	}
	r := Route{Prefix: prefix, PeerAddress: neighbor}
	for _, attr := range p.Attrs {
		switch a := attr.(type) {
		case *bgppacket.PathAttributeNextHop:
			if a.Value.IsValid() {
				r.NextHop = a.Value.Unmap()
			}
		case *bgppacket.PathAttributeMpReachNLRI:
			if a.Nexthop.IsValid() {
				r.NextHop = a.Nexthop.Unmap()
			}
		}
	}
	return r, r.NextHop.IsValid()
}
