package agent

import (
	"context"
	"errors"
	"runtime"
	"slices"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/fabricnet/fabric/backend/encaps"
	"github.com/fabricnet/fabric/bfd"
	"github.com/fabricnet/fabric/bgp"
	"github.com/fabricnet/fabric/dataplane"
	"github.com/fabricnet/fabric/ipip"
	"github.com/fabricnet/fabric/metrics"
	"github.com/fabricnet/fabric/version"
)

// Counters and histograms, observed where the work happens (dataplaneLoop,
// natLoop, policyLoop). Everything else is read at scrape time by
// agentCollector from what the agent already reports to fabricctl.
var (
	dataplaneApplySeconds = prometheus.NewHistogram(prometheus.HistogramOpts{
		Name:    "fabric_dataplane_apply_seconds",
		Help:    "Time taken by one apply of the desired routes to the kernel (routes, tunnel neighbours and FDB entries).",
		Buckets: []float64{.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10},
	})
	dataplaneApplyErrors = prometheus.NewCounter(prometheus.CounterOpts{
		Name: "fabric_dataplane_apply_errors_total",
		Help: "Applies of the desired routes to the kernel that failed (retried with backoff, 2s up to 1m).",
	})
	natApplyErrors = prometheus.NewCounter(prometheus.CounterOpts{
		Name: "fabric_nat_apply_errors_total",
		Help: "Applies of the NAT rules (MASQUERADE and published ports) that failed.",
	})
	policyApplyErrors = prometheus.NewCounter(prometheus.CounterOpts{
		Name: "fabric_policy_apply_errors_total",
		Help: "Policy updates that did not take effect: the policy did not compile (the rules in force are kept) or enforcing it failed.",
	})
	bfdFailures = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "fabric_bfd_failures_total",
		Help: "BFD sessions that failed while up, by what followed: the peer's routes dropped, kept (a fabric host whose kernel still answers: its fabricd restarts), or unknown (the host could not be asked).",
	}, []string{"action"})
)

// metricsLoop serves the metrics on cfg.MetricsAddress until ctx is done.
func (a *Agent) metricsLoop(ctx context.Context) error {
	if a.cfg.MetricsAddress == "" {
		return nil
	}
	for _, action := range []string{"dropped", "kept", "unknown"} {
		bfdFailures.WithLabelValues(action) // every series from the start
	}
	reg := metrics.NewRegistry()
	reg.MustRegister(dataplaneApplySeconds, dataplaneApplyErrors, natApplyErrors, policyApplyErrors, bfdFailures, &agentCollector{a: a})
	return metrics.Serve(ctx, a.cfg.MetricsAddress, reg, a, a.log.With("component", "metrics"))
}

// Ready implements metrics.Health: the host carries fabric traffic once it
// holds its lease (it does from start) and the data plane has been applied
// with the node set known.
func (a *Agent) Ready() error {
	a.in.mu.Lock()
	defer a.in.mu.Unlock()
	switch {
	case !a.in.nodesKnown:
		return errors.New("node records and leases not read from etcd yet")
	case !a.in.dataplaneApplied:
		return errors.New("data plane not applied yet")
	}
	return nil
}

var (
	descPeerUp = prometheus.NewDesc("fabric_bgp_peer_up",
		"Whether the BGP session with the peer is established (1) or not (0).", []string{"peer", "type"}, nil)
	descRoutesOwned = prometheus.NewDesc("fabric_routes_owned",
		"Kernel routes carrying fabricd's route protocol, by encapsulation (ipip, vxlan, direct, none).", []string{"encapsulation"}, nil)
	descProbeIPIP = prometheus.NewDesc("fabric_probe_ipip_works",
		"Whether IP protocol 4 (IPIP) to the peer is known to work (1) or not (0), as the probe last decided. Only with ipip support in this kernel.", []string{"peer"}, nil)
	descLease = prometheus.NewDesc("fabric_subnet_lease_info",
		"The subnet this host leases from the pool; always 1.", []string{"subnet"}, nil)
	descEtcd = prometheus.NewDesc("fabric_etcd_reachable",
		"Whether etcd answered a read within 2s at scrape time (1) or not (0).", nil, nil)
	descBFDUp = prometheus.NewDesc("fabric_bfd_session_up",
		"Whether the BFD session with the peer is up (1) or not (0); only peers with BFD.", []string{"peer"}, nil)
	descPrefixesReceived = prometheus.NewDesc("fabric_bgp_peer_prefixes_received",
		"Prefixes the peer sends.", []string{"peer", "type"}, nil)
	descPrefixesAccepted = prometheus.NewDesc("fabric_bgp_peer_prefixes_accepted",
		"Prefixes of the peer taken into the routing table (after import limits).", []string{"peer", "type"}, nil)
	// Fabric-wide gauges: every host reports the same value (aggregate with
	// max, not sum), and their series have no label to add up.
	descPoolSubnets = prometheus.NewDesc("fabric_pool_subnets",
		"Subnets the pool has (fabric-wide: every host reports it; aggregate with max).", nil, nil)
	descPoolSubnetsLeased = prometheus.NewDesc("fabric_pool_subnets_leased",
		"Subnets of the pool leased to hosts, as etcd last told (fabric-wide: every host reports it; aggregate with max).", nil, nil)
	descContainerRecords = prometheus.NewDesc("fabric_container_records",
		"Container name records of the whole fabric: answered by DNS and used by policy (state=trusted), or refused because the address is not in the node's lease (state=refused) (fabric-wide: every host reports it; aggregate with max).", []string{"state"}, nil)
	descBuildInfo = prometheus.NewDesc("fabric_build_info",
		"The running fabricd's version and Go version; always 1.", []string{"version", "goversion"}, nil)
)

// agentCollector reads the agent's state at scrape time through the same
// methods that answer fabricctl (Peers, Routes, Status).
type agentCollector struct{ a *Agent }

func (c *agentCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{descPeerUp, descBFDUp, descRoutesOwned, descProbeIPIP, descLease, descEtcd,
		descPrefixesReceived, descPrefixesAccepted, descPoolSubnets, descPoolSubnetsLeased, descContainerRecords, descBuildInfo} {
		ch <- d
	}
}

func (c *agentCollector) Collect(ch chan<- prometheus.Metric) {
	a := c.a
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()

	if peers, err := a.Peers(ctx); err != nil {
		ch <- prometheus.NewInvalidMetric(descPeerUp, err)
	} else {
		for _, p := range peers {
			ch <- prometheus.MustNewConstMetric(descPeerUp, prometheus.GaugeValue, boolValue(p.State == string(bgp.Established)), p.Name, p.Type)
			ch <- prometheus.MustNewConstMetric(descPrefixesReceived, prometheus.GaugeValue, float64(p.Received), p.Name, p.Type)
			ch <- prometheus.MustNewConstMetric(descPrefixesAccepted, prometheus.GaugeValue, float64(p.Accepted), p.Name, p.Type)
			if p.BFD != "" {
				ch <- prometheus.MustNewConstMetric(descBFDUp, prometheus.GaugeValue, boolValue(p.BFD == bfd.Up.String()), p.Name)
			}
		}
	}

	if routes, err := a.Routes(ctx); err != nil {
		ch <- prometheus.NewInvalidMetric(descRoutesOwned, err)
	} else {
		// Every encapsulation fabric knows, so each series exists on every host.
		count := map[string]int{dataplane.EncapDirect: 0}
		for _, k := range encaps.Kinds {
			count[k.Name] = 0
		}
		for _, r := range routes {
			count[r.Encap]++
		}
		for encap, n := range count {
			ch <- prometheus.MustNewConstMetric(descRoutesOwned, prometheus.GaugeValue, float64(n), encap)
		}
	}

	if a.own.prober != nil {
		a.in.mu.Lock()
		nodes := slices.Clone(a.in.nodes)
		a.in.mu.Unlock()
		for _, n := range nodes {
			if n.Name != a.cfg.NodeName && slices.Contains(n.Encaps, ipip.Name) {
				ch <- prometheus.MustNewConstMetric(descProbeIPIP, prometheus.GaugeValue, boolValue(a.own.prober.IPIPWorks(n.Address)), n.Name)
			}
		}
	}

	ch <- prometheus.MustNewConstMetric(descLease, prometheus.GaugeValue, 1, a.lease.Subnet.String())
	ch <- prometheus.MustNewConstMetric(descBuildInfo, prometheus.GaugeValue, 1, version.String(), runtime.Version())

	a.in.mu.Lock()
	held := a.in.held
	trusted, refused := len(a.in.containers), a.in.containerRefusals
	a.in.mu.Unlock()
	if held != nil {
		leased := 0
		for _, subnets := range held {
			leased += len(subnets)
		}
		ch <- prometheus.MustNewConstMetric(descPoolSubnets, prometheus.GaugeValue, float64(a.pool.Size()))
		ch <- prometheus.MustNewConstMetric(descPoolSubnetsLeased, prometheus.GaugeValue, float64(leased))
	}
	ch <- prometheus.MustNewConstMetric(descContainerRecords, prometheus.GaugeValue, float64(trusted), "trusted")
	ch <- prometheus.MustNewConstMetric(descContainerRecords, prometheus.GaugeValue, float64(refused), "refused")

	st, err := a.Status(ctx)
	ch <- prometheus.MustNewConstMetric(descEtcd, prometheus.GaugeValue, boolValue(err == nil && st.EtcdHealthy))
}

func boolValue(b bool) float64 {
	if b {
		return 1
	}
	return 0
}
