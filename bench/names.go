package main

import (
	"context"
	"fmt"
	"maps"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/miekg/dns"

	"github.com/fabricnet/fabric/internal/nsthread"
	"github.com/fabricnet/fabric/lab"
	"github.com/fabricnet/fabric/localapi"
	"github.com/fabricnet/fabric/names"
)

const (
	namesHosts   = 4
	namesPerHost = 250 // 1000 in all, inside each host's /24
	qpsWorkers   = 4
	qpsDuration  = 3 * time.Second
)

// namesBench measures container names with fabricd on four lab hosts:
// 1000 records published at once (250 per host, as four dockerds listing
// their containers would) until every host's DNS answers every name; then
// the queries per second of fabricd's responder against dnsmasq serving the
// same names from a hosts file, in the same namespace with the same load.
func namesBench(ctx context.Context, binDir string) error {
	l, err := lab.New(ctx, lab.Spec{Hosts: namesHosts, Logger: warnLog})
	if err != nil {
		return err
	}
	defer l.Close()
	hosts := l.Hosts()
	status := map[string]localapi.Status{}
	for _, h := range hosts {
		args := fabricdArgs(l, binDir, h)
		if _, err := h.Start("fabricd", args...); err != nil {
			return err
		}
	}
	for _, h := range hosts {
		c := localapi.NewClient(filepath.Join(l.LogDir(), h.Name+"-run", "fabricd.sock"))
		deadline := time.Now().Add(time.Minute)
		for {
			st, err := c.Status(ctx)
			if err == nil && st.Gateway != "" {
				status[h.Name] = st
				break
			}
			if time.Now().After(deadline) {
				return fmt.Errorf("fabricd on %s not answering: %v", h.Name, err)
			}
			time.Sleep(200 * time.Millisecond)
		}
	}

	fmt.Printf("\n## Container names: %d records published at once (%d per host), until every one of %d hosts answers every name (median of %d runs, min-max)\n",
		namesHosts*namesPerHost, namesPerHost, namesHosts, runs)
	var last map[string]netip.Addr
	withdraw := func() {}
	defer func() { withdraw() }()
	run := 0
	took, err := samples(func() (float64, error) {
		run++
		withdraw() // the previous run's names; the last run's stay for the queries below
		d, want, undo, err := publishAndResolve(ctx, l, status, fmt.Sprintf("r%d-", run))
		last, withdraw = want, undo
		return d.Seconds(), err
	})
	if err != nil {
		return err
	}
	fmt.Printf("| what | seconds median (min-max) |\n|---|---|\n| publish 1000 to resolvable on all %d hosts | %.2f (%.2f-%.2f) |\n", namesHosts, took.median, took.min, took.max)

	// Queries per second on host1: fabricd's responder against dnsmasq.
	h1 := hosts[0]
	hostsFile := filepath.Join(l.LogDir(), "names.hosts")
	var lines []string
	for name, a := range last {
		lines = append(lines, a.String()+" "+name+".fabric")
	}
	slices.Sort(lines)
	if err := os.WriteFile(hostsFile, []byte(strings.Join(lines, "\n")+"\n"), 0o644); err != nil {
		return err
	}
	dm, err := h1.Start("dnsmasq", "dnsmasq", "--keep-in-foreground", "--conf-file=/dev/null", "--no-resolv", "--no-hosts",
		"--addn-hosts="+hostsFile, "--listen-address=127.0.0.1", "--bind-interfaces", "--port=5353",
		"--cache-size=10000", "--local-ttl=1", "--pid-file=", "--user=root")
	if err != nil {
		return fmt.Errorf("dnsmasq (apt-get install dnsmasq-base): %w", err)
	}
	defer dm.Stop()
	queryNames := make([]string, 0, len(last))
	for name := range last {
		queryNames = append(queryNames, dns.Fqdn(name+".fabric"))
	}
	slices.Sort(queryNames)
	servers := []struct{ name, addr string }{
		{"dnsmasq 2.90, hosts file (baseline)", "127.0.0.1:5353"},
		{"fabricd's responder (fabricdns)", netip.AddrPortFrom(netip.MustParseAddr(status[h1.Name].Gateway), 53).String()},
	}
	// Both answer before measuring.
	for _, s := range servers {
		if err := waitAnswer(h1.Netns, s.addr, queryNames[0]); err != nil {
			return fmt.Errorf("%s: %w", s.name, err)
		}
	}
	results := make([][]float64, len(servers))
	for range runs { // interleaved, so both see the same machine load
		for i, s := range servers {
			q, err := queriesPerSecond(h1.Netns, s.addr, queryNames)
			if err != nil {
				return fmt.Errorf("%s: %w", s.name, err)
			}
			results[i] = append(results[i], q)
		}
	}
	fmt.Printf("\n## DNS queries per second on one host, %d UDP clients for %s each, random names of the 1000 (median of %d runs, min-max)\n", qpsWorkers, qpsDuration, runs)
	fmt.Printf("| server | queries/s median (min-max) | median vs dnsmasq |\n|---|---|---|\n")
	base := summarize(results[0]).median
	for i, s := range servers {
		st := summarize(results[i])
		fmt.Printf("| %s | %.0f (%.0f-%.0f) | %.2f |\n", s.name, st.median, st.min, st.max, st.median/base)
	}
	return nil
}

// publishAndResolve writes namesPerHost records for every host (names
// starting with tag) through names.Publisher, as fabricd does for its
// dockerd's containers, and waits until every host's DNS answers all of
// them. withdraw stops the publishers and deletes the records.
func publishAndResolve(ctx context.Context, l *lab.Lab, status map[string]localapi.Status, tag string) (took time.Duration, want map[string]netip.Addr, withdraw func(), err error) {
	etcd, err := l.EtcdClient()
	if err != nil {
		return 0, nil, func() {}, err
	}
	want = map[string]netip.Addr{}
	pctx, stop := context.WithCancel(ctx)
	var pubs []*names.Publisher
	var wg sync.WaitGroup
	start := time.Now()
	for _, h := range l.Hosts() {
		subnet := netip.MustParsePrefix(status[h.Name].Subnet)
		var rs []names.Record
		a := subnet.Addr().Next() // the gateway
		for i := range namesPerHost {
			a = a.Next()
			name := fmt.Sprintf("%s%s-c%03d", tag, h.Name, i)
			rs = append(rs, names.Record{Name: name, Address: a, ID: name, Created: start})
			want[name] = a
		}
		p := names.NewPublisher(etcd, "/fabric/v1", h.Name, 30*time.Second, warnLog)
		pubs = append(pubs, p)
		lists := make(chan []names.Record, 1)
		lists <- rs
		wg.Add(1)
		go func() { defer wg.Done(); p.Run(pctx, lists) }()
	}
	withdraw = func() {
		stop()
		wg.Wait()
		for _, p := range pubs {
			p.Withdraw(context.Background())
		}
		etcd.Close()
	}
	queries := map[string]netip.Addr{}
	for name, a := range want {
		queries[dns.Fqdn(name+".fabric")] = a
	}
	pending := map[string]bool{}
	for _, h := range l.Hosts() {
		pending[h.Name] = true
	}
	deadline := time.Now().Add(2 * time.Minute)
	for len(pending) > 0 {
		for _, h := range l.Hosts() {
			if !pending[h.Name] {
				continue
			}
			server := netip.AddrPortFrom(netip.MustParseAddr(status[h.Name].Gateway), 53).String()
			if allAnswered(h.Netns, server, queries) {
				delete(pending, h.Name)
			}
		}
		if time.Now().After(deadline) {
			return 0, nil, withdraw, fmt.Errorf("names not resolvable on %v after 2 minutes", slices.Sorted(maps.Keys(pending)))
		}
		if len(pending) > 0 {
			time.Sleep(50 * time.Millisecond)
		}
	}
	return time.Since(start), want, withdraw, nil
}

// dialIn opens a UDP socket inside namespace ns connected to server; the
// socket stays in ns whichever thread uses it later.
func dialIn(ns, server string) (*dns.Conn, error) {
	var c net.Conn
	err := nsthread.Do(ns, func() (err error) {
		c, err = net.Dial("udp", server)
		return err
	})
	if err != nil {
		return nil, err
	}
	return &dns.Conn{Conn: c}, nil
}

func exchange(c *dns.Conn, name string) (*dns.Msg, error) {
	m := new(dns.Msg)
	m.SetQuestion(name, dns.TypeA)
	c.SetDeadline(time.Now().Add(time.Second))
	if err := c.WriteMsg(m); err != nil {
		return nil, err
	}
	for {
		r, err := c.ReadMsg()
		if err != nil {
			return nil, err
		}
		if r.Id == m.Id {
			return r, nil
		}
	}
}

// allAnswered asks server every name and reports whether each got its
// address.
func allAnswered(ns, server string, queries map[string]netip.Addr) bool {
	c, err := dialIn(ns, server)
	if err != nil {
		return false
	}
	defer c.Close()
	for name, want := range queries {
		r, err := exchange(c, name)
		if err != nil || len(r.Answer) != 1 {
			return false
		}
		a, ok := r.Answer[0].(*dns.A)
		if !ok || a.A.String() != want.String() {
			return false
		}
	}
	return true
}

func waitAnswer(ns, server, name string) error {
	deadline := time.Now().Add(30 * time.Second)
	for {
		c, err := dialIn(ns, server)
		if err == nil {
			r, qerr := exchange(c, name)
			c.Close()
			if qerr == nil && len(r.Answer) == 1 {
				return nil
			}
			err = qerr
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("no answer for %s from %s: %v", name, server, err)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// queriesPerSecond runs qpsWorkers clients, each sending one query at a
// time for qpsDuration, and counts the answers that carry an address.
func queriesPerSecond(ns, server string, queryNames []string) (float64, error) {
	var answered atomic.Int64
	var wg sync.WaitGroup
	stopAt := time.Now().Add(qpsDuration)
	for w := range qpsWorkers {
		c, err := dialIn(ns, server)
		if err != nil {
			return 0, err
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer c.Close()
			for i := w; time.Now().Before(stopAt); i += 7 {
				r, err := exchange(c, queryNames[i%len(queryNames)])
				if err != nil {
					continue // a lost datagram under load: not counted
				}
				if len(r.Answer) == 1 {
					answered.Add(1)
				}
			}
		}()
	}
	wg.Wait()
	return float64(answered.Load()) / qpsDuration.Seconds(), nil
}
