package agent

// The local API provider: what `fabricctl peers status`, `routes` and
// `status` show.

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"sort"
	"time"

	"github.com/fabricnet/fabric/backend/encaps"
	"github.com/fabricnet/fabric/bfd"
	"github.com/fabricnet/fabric/bgp"
	"github.com/fabricnet/fabric/localapi"
	"github.com/fabricnet/fabric/version"
	"github.com/fabricnet/fabric/wireguard"
)

// Peers implements localapi.Provider.
func (a *Agent) Peers(ctx context.Context) ([]localapi.Peer, error) {
	ps, err := a.own.speaker.Peers(ctx)
	if err != nil {
		return nil, err
	}
	choices := a.own.dataplane.Choices()
	bfdSessions := a.bfdStatus()
	handshakes := a.wireGuardHandshakes()
	out := make([]localapi.Peer, 0, len(ps))
	for _, p := range ps {
		e := choices[p.Name].Encap
		switch {
		case e != "":
		case p.Type == bgp.PeerRouteReflector:
			e = "-" // it reflects routes; traffic goes to their originators
		case p.Type != bgp.PeerMesh:
			e = "direct"
		}
		if v6 := choices[p.Name].EncapV6; v6 != "" {
			e += " (IPv6: " + v6 + ")"
		}
		lp := localapi.Peer{
			Name: p.Name, Address: p.Address.String(), ASN: p.ASN, Type: string(p.Type), State: string(p.State),
			Since: p.Since, Received: p.Received, Accepted: p.Accepted, Encap: e, EncapReason: choices[p.Name].Reason,
		}
		if st, ok := bfdSessions[p.Address]; ok {
			lp.BFD, lp.BFDDetect, lp.BFDDowns = st.State.String(), st.DetectionTime, st.Downs
			if st.Downs > 0 || st.Diag != bfd.DiagNone {
				lp.BFDDiag = st.Diag.String()
			}
		}
		lp.WireGuardHandshake = handshakes[p.Name]
		out = append(out, lp)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out, nil
}

// Routes implements localapi.Provider.
func (a *Agent) Routes(ctx context.Context) ([]localapi.Route, error) {
	owned, err := a.own.dataplane.Owned()
	if err != nil {
		return nil, err
	}
	a.in.mu.Lock()
	types := map[netip.Prefix]string{}
	for _, r := range a.in.bgpRoutes {
		types[r.Prefix] = string(r.PeerType)
	}
	a.in.mu.Unlock()
	out := make([]localapi.Route, 0, len(owned))
	for _, r := range owned {
		typ := types[r.Prefix]
		if typ == "" {
			typ = "registry (start-up grace)"
		}
		via := ""
		if r.Via.IsValid() {
			via = r.Via.String()
		}
		out = append(out, localapi.Route{Prefix: r.Prefix.String(), Via: via, Dev: r.Dev, Encap: r.Encap, Peer: r.PeerName, PeerType: typ})
	}
	return out, nil
}

// Status implements localapi.Provider.
func (a *Agent) Status(ctx context.Context) (localapi.Status, error) {
	c, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	_, etcdErr := a.etcd.Get(c, a.cfg.EtcdPrefix+"/config")
	return localapi.Status{
		Node: a.cfg.NodeName, Version: version.String(), Subnet: a.lease.Subnet.String(), Gateway: a.lease.Gateway().String(),
		Underlay: a.underlay.Addr.String(), UnderlayDev: a.underlay.Dev, ASN: a.cfg.ASN,
		Encapsulation: a.cfg.Encapsulation, MTU: a.own.dataplane.MTU(), Bridge: a.cfg.Bridge, Started: a.started,
		EtcdHealthy: etcdErr == nil, Encryption: a.encryptionStatus(), WireGuardKey: a.wireGuardKey(),
		SubnetV6: prefixOrEmpty(a.subnetV6()), UnderlayV6: addrOrEmpty(a.underlay.V6.Addr()),
	}, nil
}

func addrOrEmpty(a netip.Addr) string {
	if !a.IsValid() {
		return ""
	}
	return a.String()
}

func prefixOrEmpty(p netip.Prefix) string {
	if !p.IsValid() {
		return ""
	}
	return p.String()
}

// RotateKey implements localapi.Provider: a new WireGuard key pair on the
// device and in the key file (wireguard.Backend.RotateKey), then in the
// node record, from which peers install it and handshake at once.
func (a *Agent) RotateKey(context.Context) (localapi.RotateKeyResult, error) {
	wg := a.wireGuard()
	if wg == nil {
		return localapi.RotateKeyResult{}, errors.New("this host does not encrypt (encryption: off): there is no WireGuard key to rotate")
	}
	started := time.Now() // every handshake with the new key comes after it
	old, key, err := wg.RotateKey(a.cfg.WireGuardKeyPath())
	if err != nil {
		return localapi.RotateKeyResult{}, err
	}
	a.own.record.Update(a.selfNode())
	a.log.Warn("wireguard key rotated; peers take the new public key from the node record", "old", old, "new", key)
	return localapi.RotateKeyResult{Node: a.cfg.NodeName, OldKey: old, NewKey: key, Rotated: started}, nil
}

// wireGuard is this host's WireGuard backend, nil when it does not encrypt.
func (a *Agent) wireGuard() *wireguard.Backend {
	for _, b := range a.own.backends {
		if wg, ok := b.(*wireguard.Backend); ok {
			return wg
		}
	}
	return nil
}

// encryptionStatus says whether this host encrypts, with which WireGuard,
// and what the userspace one costs.
func (a *Agent) encryptionStatus() string {
	if a.cfg.Encryption == encaps.EncryptionOff {
		return "off"
	}
	impl := "not started"
	if wg := a.wireGuard(); wg != nil && wg.Implementation() != "" {
		impl = wg.Implementation()
	}
	s := fmt.Sprintf("%s (%s WireGuard, udp/%d)", a.cfg.Encryption, impl, a.cfg.WireGuardPort)
	if impl == wireguard.Userspace {
		s += ": wireguard-go in fabricd, so encrypted traffic costs fabricd's CPU and stops while fabricd restarts"
	}
	return s
}

// wireGuardHandshakes is each fabric host's last WireGuard handshake, by
// node name, when this host encrypts.
func (a *Agent) wireGuardHandshakes() map[string]time.Time {
	wg := a.wireGuard()
	if wg == nil {
		return nil
	}
	peers, err := wg.Peers()
	if err != nil {
		return nil
	}
	a.in.mu.Lock()
	byKey := map[string]string{}
	for _, n := range a.in.nodes {
		if n.WireGuardKey != "" {
			byKey[n.WireGuardKey] = n.Name
		}
	}
	a.in.mu.Unlock()
	out := map[string]time.Time{}
	for _, p := range peers {
		if name, ok := byKey[p.PublicKey]; ok {
			out[name] = p.LastHandshake
		}
	}
	return out
}
