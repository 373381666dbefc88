package e2e

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/fabricnet/fabric/lab"
)

// scrapeMetrics GETs fabricd's /metrics on h's underlay address from inside
// h's namespace, as a Prometheus on that host would.
func (f *fabric) scrapeMetrics(h *lab.Host) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	return h.Run(ctx, filepath.Join(binDir, "tcpprobe"), "get", fmt.Sprintf("http://%s:9815/metrics", h.Addr))
}

// metricValue finds the sample of name whose labels include every one of
// labels (`key="value"`) in the text exposition format.
func metricValue(body, name string, labels ...string) (float64, bool) {
	for _, line := range strings.Split(body, "\n") {
		series, value, ok := strings.Cut(line, " ")
		if !ok || (series != name && !strings.HasPrefix(series, name+"{")) {
			continue
		}
		all := true
		for _, l := range labels {
			all = all && strings.Contains(series, l)
		}
		if !all {
			continue
		}
		v, err := strconv.ParseFloat(value, 64)
		return v, err == nil
	}
	return 0, false
}

// TestMetrics scrapes fabricd's Prometheus endpoint on a 2-host lab: the
// session with the other host is up and the one route to it goes over VXLAN
// (this kernel has no IPIP).
func TestMetrics(t *testing.T) {
	t.Parallel()
	f := newFabric(t, lab.Spec{Hosts: 2}, "--bgp-hold-time", "3s", "--bgp-keepalive", "1s")
	hosts := f.lab.Hosts()
	for _, h := range hosts {
		f.start(h)
	}
	h1, h2 := hosts[0], hosts[1]
	f.eventually(20*time.Second, "sessions established", func() error { return f.allEstablished(h1, 1) })

	encap := f.autoEncap(h1)
	var body string
	f.eventually(15*time.Second, "metrics of "+h1.Name+" show the session and the route", func() error {
		var err error
		if body, err = f.scrapeMetrics(h1); err != nil {
			return err
		}
		if v, ok := metricValue(body, "fabric_bgp_peer_up", `peer="`+h2.Name+`"`, `type="mesh"`); !ok || v != 1 {
			return fmt.Errorf("fabric_bgp_peer_up for %s: %v (found %v)", h2.Name, v, ok)
		}
		if v, ok := metricValue(body, "fabric_routes_owned", `encapsulation="`+encap+`"`); !ok || v != 1 {
			return fmt.Errorf("fabric_routes_owned{encapsulation=%q}: %v (found %v)", encap, v, ok)
		}
		return nil
	})

	// Probes beside the metrics: alive, and ready once the data plane is applied.
	for _, path := range []string{"/healthz", "/readyz"} {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		out, err := h1.Run(ctx, filepath.Join(binDir, "tcpprobe"), "get", fmt.Sprintf("http://%s:9815%s", h1.Addr, path))
		cancel()
		if err != nil || !strings.Contains(out, map[string]string{"/healthz": "ok", "/readyz": "ready"}[path]) {
			t.Errorf("GET %s on %s: %v %q", path, h1.Name, err, out)
		}
	}

	sub := f.subnet(h1)
	for _, want := range []struct {
		name   string
		labels []string
		value  float64
	}{
		{"fabric_subnet_lease_info", []string{`subnet="` + sub.String() + `"`}, 1},
		{"fabric_etcd_reachable", nil, 1},
		{"fabric_routes_owned", []string{`encapsulation="ipip"`}, 0},
		{"fabric_dataplane_apply_errors_total", nil, 0},
		{"fabric_bgp_peer_prefixes_received", []string{`peer="` + h2.Name + `"`}, 1},
		{"fabric_bgp_peer_prefixes_accepted", []string{`peer="` + h2.Name + `"`}, 1},
		{"fabric_pool_subnets", nil, 256}, // a /16 in /24s
		{"fabric_pool_subnets_leased", nil, 2},
		{"fabric_container_records", []string{`state="refused"`}, 0},
	} {
		if v, ok := metricValue(body, want.name, want.labels...); !ok || v != want.value {
			t.Errorf("%s%v = %v (found %v), want %v", want.name, want.labels, v, ok, want.value)
		}
	}
	// Every metric the shipped alert rules use is exported.
	alerts, err := os.ReadFile("../packaging/fabric-alerts.yaml")
	if err != nil {
		t.Fatal(err)
	}
	used := regexp.MustCompile(`fabric_[a-z_]+`).FindAllString(string(alerts), -1)
	if len(used) < 6 {
		t.Fatalf("alert rules use %d metrics: %v", len(used), used)
	}
	for _, name := range used {
		if _, ok := metricValue(body, name); !ok {
			t.Errorf("the alert rules use %s, which fabricd does not export", name)
		}
	}
	if !strings.Contains(body, `fabric_build_info{goversion="go`) {
		t.Error("scrape lacks fabric_build_info with the Go version")
	}
	for _, name := range []string{"fabric_dataplane_apply_seconds_count", "fabric_nat_apply_errors_total", "fabric_policy_apply_errors_total", "go_goroutines", "process_resident_memory_bytes"} {
		if _, ok := metricValue(body, name); !ok {
			t.Errorf("scrape lacks %s", name)
		}
	}
	if n, ok := metricValue(body, "fabric_dataplane_apply_seconds_count"); ok && n < 1 {
		t.Errorf("fabric_dataplane_apply_seconds_count = %v: no apply was timed", n)
	}
	if t.Failed() {
		t.Logf("scrape of %s:\n%s", h1.Name, body)
	}

	// A stopped peer shows as 0, or goes once its node record is withdrawn.
	if err := f.agents[h2.Name].proc.Stop(); err != nil {
		t.Fatal(err)
	}
	f.eventually(15*time.Second, "fabric_bgp_peer_up for a stopped peer", func() error {
		body, err := f.scrapeMetrics(h1)
		if err != nil {
			return err
		}
		if v, ok := metricValue(body, "fabric_bgp_peer_up", `peer="`+h2.Name+`"`); ok && v != 0 {
			return fmt.Errorf("fabric_bgp_peer_up for %s still %v", h2.Name, v)
		}
		return nil
	})
}
