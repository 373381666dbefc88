package dockerwatch

import (
	"encoding/json"
	"net/netip"
	"testing"
)

// The shape of GET /containers/json as dockerd 20.10 answers it (trimmed).
const listJSON = `[
 {"Id":"b1","Names":["/web"],"Created":1700000000,"Labels":{"role":"frontend"},
  "NetworkSettings":{"Networks":{"bridge":{"IPAddress":"10.244.7.2"}}}},
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
	got := fromAPI(list, netip.MustParsePrefix("10.244.7.0/24"))
	if len(got) != 2 || got[0].Name != "api" || got[1].Name != "web" {
		t.Fatalf("got %+v, want api and web", got)
	}
	if got[1].Addr != netip.MustParseAddr("10.244.7.2") || got[1].Labels["role"] != "frontend" || got[1].Created.Unix() != 1700000000 {
		t.Errorf("web: %+v", got[1])
	}
	if got[0].Addr != netip.MustParseAddr("10.244.7.3") {
		t.Errorf("api's fabric address: %v", got[0].Addr)
	}
	if !Equal(got, fromAPI(list, netip.MustParsePrefix("10.244.7.0/24"))) {
		t.Error("the same list is not Equal to itself")
	}
}
