package dockerwatch

import (
	"encoding/json"
	"net/netip"
	"testing"
)

// The shape of GET /containers/json as dockerd 20.10 answers it (trimmed).
const listJSON = `[
 {"Id":"b1","Names":["/web"],"Created":1700000000,"Labels":{"role":"frontend"},
  "NetworkSettings":{"Networks":{"bridge":{"IPAddress":"10.244.7.2","GlobalIPv6Address":"fd00:10:244:7::2"}}}},
 {"Id":"b2","Names":["/host-net"],"Created":1700000001,"Labels":{},
  "NetworkSettings":{"Networks":{"host":{"IPAddress":""}}}},
 {"Id":"b3","Names":["/elsewhere"],"Created":1700000002,"Labels":{},
  "NetworkSettings":{"Networks":{"mynet":{"IPAddress":"172.18.0.2"}}}},
 {"Id":"b4","Names":["/api"],"Created":1700000003,"Labels":null,
  "NetworkSettings":{"Networks":{"zeta":{"IPAddress":"172.18.0.3"},"bridge":{"IPAddress":"10.244.7.3"}}}}
]`

// Only containers with an address in the host's subnet are the fabric's;
// host-network containers and user networks are not.
func TestFromAPIKeepsContainersOnTheFabricBridge(t *testing.T) {
	var list []apiContainer
	if err := json.Unmarshal([]byte(listJSON), &list); err != nil {
		t.Fatal(err)
	}
	got := fromAPI(list, nil, Filter{Subnet: netip.MustParsePrefix("10.244.7.0/24")}).Containers
	if len(got) != 2 || got[0].Name != "api" || got[1].Name != "web" {
		t.Fatalf("got %+v, want api and web", got)
	}
	if got[1].Addr != netip.MustParseAddr("10.244.7.2") || got[1].AddrV6 != netip.MustParseAddr("fd00:10:244:7::2") || got[1].Labels["role"] != "frontend" || got[1].Created.Unix() != 1700000000 {
		t.Errorf("web: %+v", got[1])
	}
	if got[0].Addr != netip.MustParseAddr("10.244.7.3") {
		t.Errorf("api's fabric address: %v", got[0].Addr)
	}
	again := fromAPI(list, nil, Filter{Subnet: netip.MustParsePrefix("10.244.7.0/24")})
	if !again.Equal(Snapshot{Containers: got}) {
		t.Error("the same list is not Equal to itself")
	}
}

// The shape of GET /networks?filters={"driver":["fabric"]} (trimmed), and
// containers on one of them.
const networksJSON = `[
 {"Name":"net1","Id":"n1","Driver":"fabric","IPAM":{"Driver":"fabric","Config":[{"Subnet":"172.16.1.0/24","Gateway":"172.16.1.254"}]}}
]`

const onNetworkJSON = `[
 {"Id":"c1abcdef","Names":["/proj_web_1"],"Created":1700000000,
  "NetworkSettings":{"Networks":{"net1":{"NetworkID":"n1","EndpointID":"e1","IPAddress":"172.16.1.2","Aliases":["web","c1abcdef","proj_web_1"]}}}},
 {"Id":"c2","Names":["/elsewhere"],"Created":1700000001,
  "NetworkSettings":{"Networks":{"mynet":{"NetworkID":"m1","IPAddress":"172.18.0.2"}}}}
]`

// A container on a fabric network is reported with its endpoint there and
// its aliases (its own name left out); one only on another user network is
// not the fabric's.
func TestFromAPIKeepsFabricNetworks(t *testing.T) {
	var list []apiContainer
	var nets []apiNetwork
	if err := json.Unmarshal([]byte(onNetworkJSON), &list); err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal([]byte(networksJSON), &nets); err != nil {
		t.Fatal(err)
	}
	snap := fromAPI(list, nets, Filter{Subnet: netip.MustParsePrefix("10.244.7.0/24"), Driver: "fabric"})
	if len(snap.Networks) != 1 || snap.Networks[0].Subnet != netip.MustParsePrefix("172.16.1.0/24") || snap.Networks[0].Gateway != netip.MustParseAddr("172.16.1.254") {
		t.Fatalf("networks %+v", snap.Networks)
	}
	if len(snap.Containers) != 1 {
		t.Fatalf("containers %+v, want proj_web_1 only", snap.Containers)
	}
	c := snap.Containers[0]
	if c.Addr.IsValid() || len(c.Networks) != 1 {
		t.Fatalf("%+v", c)
	}
	a := c.Networks[0]
	if a.Network != "net1" || a.EndpointID != "e1" || a.Addr != netip.MustParseAddr("172.16.1.2") || len(a.Aliases) != 2 || a.Aliases[0] != "c1abcdef" || a.Aliases[1] != "web" {
		t.Errorf("attachment %+v", a)
	}
}
