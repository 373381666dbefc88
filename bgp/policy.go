package bgp

import (
	"context"
	"fmt"
	"net/netip"

	api "github.com/osrg/gobgp/v4/api"
)

// Export policy: a fabric host is never a transit. It sends only its own
// prefix to every peer, except to its route reflector clients, which get
// everything (that is what reflecting means). Without this, an eBGP
// top-of-rack router would also learn every other host's subnet via this
// host (next-hop-self) and might send their traffic the long way, and
// routes from the router would leak into the mesh.
const (
	rrClientSetName    = "fabric-rr-clients"
	exportPolicyName   = "fabric-export"
	globalTable        = "global"
	neverMatchNeighbor = "255.255.255.255/32" // a GoBGP neighbor set that is empty matches everyone
)

func (s *Speaker) installExportPolicy(ctx context.Context) error {
	// Create the set with an entry that never matches: GoBGP treats an
	// empty neighbor set as matching every neighbor.
	err := s.server.AddDefinedSet(ctx, &api.AddDefinedSetRequest{DefinedSet: neighborSet([]string{neverMatchNeighbor})})
	if err != nil {
		return fmt.Errorf("bgp: create route reflector client set: %w", err)
	}
	policy := &api.Policy{
		Name: exportPolicyName,
		Statements: []*api.Statement{
			{
				Name:       exportPolicyName + "-reflect",
				Conditions: &api.Conditions{NeighborSet: &api.MatchSet{Type: api.MatchSet_TYPE_ANY, Name: rrClientSetName}},
				Actions:    &api.Actions{RouteAction: api.RouteAction_ROUTE_ACTION_ACCEPT},
			},
			{
				Name:       exportPolicyName + "-own",
				Conditions: &api.Conditions{RouteType: api.Conditions_ROUTE_TYPE_LOCAL},
				Actions:    &api.Actions{RouteAction: api.RouteAction_ROUTE_ACTION_ACCEPT},
			},
		},
	}
	if err := s.server.AddPolicy(ctx, &api.AddPolicyRequest{Policy: policy}); err != nil {
		return fmt.Errorf("bgp: add export policy: %w", err)
	}
	err = s.server.AddPolicyAssignment(ctx, &api.AddPolicyAssignmentRequest{Assignment: &api.PolicyAssignment{
		Name:          globalTable,
		Direction:     api.PolicyDirection_POLICY_DIRECTION_EXPORT,
		Policies:      []*api.Policy{{Name: exportPolicyName}},
		DefaultAction: api.RouteAction_ROUTE_ACTION_REJECT,
	}})
	if err != nil {
		return fmt.Errorf("bgp: assign export policy: %w", err)
	}
	return nil
}

// setRRClients makes the reflect set exactly clients. The set is changed in
// place (append/remove): GoBGP's "replace" swaps in a new set object that
// the already installed policy statement never sees.
func (s *Speaker) setRRClients(ctx context.Context, clients []netip.Addr) error {
	want := map[string]bool{}
	for _, a := range clients {
		want[netip.PrefixFrom(a, a.BitLen()).String()] = true
	}
	var add, remove []string
	for entry := range want {
		if !s.rrClientSet[entry] {
			add = append(add, entry)
		}
	}
	for entry := range s.rrClientSet {
		if !want[entry] {
			remove = append(remove, entry)
		}
	}
	if len(add) > 0 {
		err := s.server.AddDefinedSet(ctx, &api.AddDefinedSetRequest{DefinedSet: neighborSet(add)})
		if err != nil {
			return fmt.Errorf("bgp: add route reflector clients: %w", err)
		}
	}
	if len(remove) > 0 {
		err := s.server.DeleteDefinedSet(ctx, &api.DeleteDefinedSetRequest{DefinedSet: neighborSet(remove)})
		if err != nil {
			return fmt.Errorf("bgp: remove route reflector clients: %w", err)
		}
	}
	s.rrClientSet = want
	return nil
}

func neighborSet(entries []string) *api.DefinedSet {
	return &api.DefinedSet{DefinedType: api.DefinedType_DEFINED_TYPE_NEIGHBOR, Name: rrClientSetName, List: entries}
}
