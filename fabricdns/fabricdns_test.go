package fabricdns

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/miekg/dns"

	"github.com/fabricnet/fabric/names"
)

// freePort returns a port free for both UDP and TCP on 127.0.0.1.
func freePort(t testing.TB) netip.AddrPort {
	t.Helper()
	for range 20 {
		pc, err := net.ListenPacket("udp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		ap := netip.MustParseAddrPort(pc.LocalAddr().String())
		ln, err := net.Listen("tcp", ap.String())
		pc.Close()
		if err == nil {
			ln.Close()
			return ap
		}
	}
	t.Fatal("no port free for both UDP and TCP")
	return netip.AddrPort{}
}

// upstream is a real DNS server standing in for the host's resolver: it
// knows example.org.
func upstream(t *testing.T) string {
	t.Helper()
	pc, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := &dns.Server{PacketConn: pc, Handler: dns.HandlerFunc(func(w dns.ResponseWriter, r *dns.Msg) {
		m := new(dns.Msg)
		m.SetReply(r)
		if r.Question[0].Name == "example.org." {
			m.Answer = append(m.Answer, &dns.A{Hdr: dns.RR_Header{Name: "example.org.", Rrtype: dns.TypeA, Class: dns.ClassINET, Ttl: 60},
				A: net.ParseIP("192.0.2.80")})
		} else {
			m.SetRcode(r, dns.RcodeNameError)
		}
		w.WriteMsg(m)
	})}
	go srv.ActivateAndServe()
	t.Cleanup(func() { srv.Shutdown() })
	return pc.LocalAddr().String()
}

func start(t testing.TB, cfg Config) (*Server, string) {
	t.Helper()
	cfg.Listen = freePort(t)
	if cfg.Domain == "" {
		cfg.Domain = "fabric"
	}
	cfg.Pool = netip.MustParsePrefix("10.244.0.0/16")
	s, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- s.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Run: %v", err)
		}
	})
	// Serving once a query is answered.
	c := &dns.Client{Timeout: 200 * time.Millisecond}
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		if _, _, err := c.Exchange(question("probe.fabric.", dns.TypeA), cfg.Listen.String()); err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the server never answered")
		}
	}
	return s, cfg.Listen.String()
}

func question(name string, qtype uint16) *dns.Msg {
	m := new(dns.Msg)
	m.SetQuestion(name, qtype)
	return m
}

func ask(t *testing.T, network, addr, name string, qtype uint16) *dns.Msg {
	t.Helper()
	c := &dns.Client{Net: network, Timeout: 5 * time.Second}
	resp, _, err := c.Exchange(question(name, qtype), addr)
	if err != nil {
		t.Fatalf("%s %s over %s: %v", name, dns.TypeToString[qtype], network, err)
	}
	return resp
}

func TestAnswersContainerNamesAndForwardsTheRest(t *testing.T) {
	s, addr := start(t, Config{Upstreams: []string{upstream(t)}})
	web := names.Record{Name: "web", Node: "host2", Address: netip.MustParseAddr("10.244.2.5"), Created: time.Unix(1, 0)}
	s.SetView(names.NewView([]names.Record{web}, nil))

	for _, network := range []string{"udp", "tcp"} {
		resp := ask(t, network, addr, "web.fabric.", dns.TypeA)
		if resp.Rcode != dns.RcodeSuccess || len(resp.Answer) != 1 || resp.Answer[0].(*dns.A).A.String() != "10.244.2.5" || !resp.Authoritative {
			t.Errorf("web.fabric A over %s: %v", network, resp)
		}
	}
	// Case does not matter; AAAA has no data but the name exists.
	if resp := ask(t, "udp", addr, "WEB.Fabric.", dns.TypeA); len(resp.Answer) != 1 {
		t.Errorf("WEB.Fabric: %v", resp)
	}
	if resp := ask(t, "udp", addr, "web.fabric.", dns.TypeAAAA); resp.Rcode != dns.RcodeSuccess || len(resp.Answer) != 0 {
		t.Errorf("web.fabric AAAA: want no data, got %v", resp)
	}
	if resp := ask(t, "udp", addr, "nothing.fabric.", dns.TypeA); resp.Rcode != dns.RcodeNameError {
		t.Errorf("nothing.fabric: want NXDOMAIN, got %v", resp)
	}
	// PTR inside the pool is ours; the reverse name points back.
	resp := ask(t, "udp", addr, "5.2.244.10.in-addr.arpa.", dns.TypePTR)
	if len(resp.Answer) != 1 || resp.Answer[0].(*dns.PTR).Ptr != "web.fabric." {
		t.Errorf("PTR 10.244.2.5: %v", resp)
	}
	if resp := ask(t, "udp", addr, "9.2.244.10.in-addr.arpa.", dns.TypePTR); resp.Rcode != dns.RcodeNameError {
		t.Errorf("PTR of an unused pool address: want NXDOMAIN, got %v", resp)
	}
	// Everything else goes upstream.
	if resp := ask(t, "udp", addr, "example.org.", dns.TypeA); len(resp.Answer) != 1 || resp.Answer[0].(*dns.A).A.String() != "192.0.2.80" {
		t.Errorf("example.org via the upstream: %v", resp)
	}
	if resp := ask(t, "udp", addr, "missing.example.org.", dns.TypeA); resp.Rcode != dns.RcodeNameError {
		t.Errorf("upstream's NXDOMAIN not passed on: %v", resp)
	}

	// The container goes: the name stops resolving with the next view.
	s.SetView(names.NewView(nil, nil))
	if resp := ask(t, "udp", addr, "web.fabric.", dns.TypeA); resp.Rcode != dns.RcodeNameError {
		t.Errorf("removed web still resolves: %v", resp)
	}
}

func TestUpstreamsFromResolvConf(t *testing.T) {
	up := upstream(t)
	host, port, _ := net.SplitHostPort(up)
	rc := filepath.Join(t.TempDir(), "resolv.conf")
	if err := os.WriteFile(rc, []byte("nameserver "+host+"\noptions timeout:1\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	s, err := New(Config{Listen: netip.MustParseAddrPort("127.0.0.2:53"), Domain: "fabric", ResolvConf: rc})
	if err != nil {
		t.Fatal(err)
	}
	if len(s.upstreams) != 1 || s.upstreams[0] != host+":53" {
		t.Errorf("upstreams %v, want [%s:53] (port %s of the test server is not in resolv.conf)", s.upstreams, host, port)
	}
	// A resolv.conf naming the server itself would loop: left out.
	if err := os.WriteFile(rc, []byte("nameserver 127.0.0.1\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if s, _ := New(Config{Listen: netip.MustParseAddrPort("127.0.0.1:53"), Domain: "fabric", ResolvConf: rc}); len(s.upstreams) != 0 {
		t.Errorf("the server's own address kept as upstream: %v", s.upstreams)
	}
}

func TestNoUpstreamAnswersServfail(t *testing.T) {
	// A UDP port nobody answers on.
	dead := freePort(t).String()
	_, addr := start(t, Config{Upstreams: []string{dead}})
	if resp := ask(t, "udp", addr, "example.org.", dns.TypeA); resp.Rcode != dns.RcodeServerFailure {
		t.Errorf("want SERVFAIL with no upstream answering, got %v", resp)
	}
}

// TestNetworkScopedNames: a query from a fabric network's address is
// answered from that network's names alone, by bare name (what Docker's
// embedded DNS forwards) and by alias; names of the bridge and of other
// networks do not resolve there. The test's queries come from 127.0.0.1,
// so the loopback network plays the part of net1's subnet.
func TestNetworkScopedNames(t *testing.T) {
	s, addr := start(t, Config{Upstreams: []string{upstream(t)}})
	web := names.Record{Name: "proj_web_1", Aliases: []string{"web"}, Node: "host2", Network: "net1", Address: netip.MustParseAddr("172.16.1.5")}
	db := names.Record{Name: "db", Node: "host3", Network: "net2", Address: netip.MustParseAddr("172.16.2.5")}
	bridged := names.Record{Name: "bridged", Node: "host2", Address: netip.MustParseAddr("10.244.2.5")}
	networks := map[string]netip.Prefix{"net1": netip.MustParsePrefix("127.0.0.0/8"), "net2": netip.MustParsePrefix("172.16.2.0/24")}
	s.SetView(names.NewView([]names.Record{web, db, bridged}, networks))

	for _, name := range []string{"web.", "proj_web_1.", "web.fabric."} {
		if resp := ask(t, "udp", addr, name, dns.TypeA); len(resp.Answer) != 1 || resp.Answer[0].(*dns.A).A.String() != "172.16.1.5" {
			t.Errorf("%s from net1: %v", name, resp)
		}
	}
	for _, name := range []string{"db.fabric.", "bridged.fabric."} {
		if resp := ask(t, "udp", addr, name, dns.TypeA); resp.Rcode != dns.RcodeNameError {
			t.Errorf("%s from net1 (another network's, the bridge's): want NXDOMAIN, got %v", name, resp)
		}
	}
	// A bare name that is none of net1's goes upstream as before.
	if resp := ask(t, "udp", addr, "example.org.", dns.TypeA); len(resp.Answer) != 1 || resp.Answer[0].(*dns.A).A.String() != "192.0.2.80" {
		t.Errorf("example.org from net1 via the upstream: %v", resp)
	}
}

// BenchmarkUDPQueries: A queries for 1000 container names over real UDP
// sockets on loopback, several clients at once (go test -bench UDPQueries
// -cpuprofile to see where a query's time goes). The clients share the
// responder's process, whose thread blocked in recvfrom must win a P back
// from them for each query: `make bench` (names) measures the responder
// as containers use it, from another process, against dnsmasq.
func BenchmarkUDPQueries(b *testing.B) {
	s, addr := start(b, Config{Upstreams: []string{"127.0.0.1:1"}})
	var rs []names.Record
	for i := range 1000 {
		rs = append(rs, names.Record{Name: fmt.Sprintf("c%03d", i), Address: netip.AddrFrom4([4]byte{10, 244, byte(i / 250), byte(1 + i%250)})})
	}
	s.SetView(names.NewView(rs, nil))
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		conn, err := net.Dial("udp", addr)
		if err != nil {
			b.Error(err)
			return
		}
		defer conn.Close()
		buf := make([]byte, 512)
		i := 0
		for pb.Next() {
			q := new(dns.Msg)
			q.SetQuestion(fmt.Sprintf("c%03d.fabric.", i%1000), dns.TypeA)
			i++
			wire, _ := q.Pack()
			conn.SetDeadline(time.Now().Add(2 * time.Second))
			if _, err := conn.Write(wire); err != nil {
				b.Error(err)
				return
			}
			n, err := conn.Read(buf)
			if err != nil {
				b.Error(err)
				return
			}
			var m dns.Msg
			if err := m.Unpack(buf[:n]); err != nil || len(m.Answer) != 1 {
				b.Errorf("answer %v: %v", m.Answer, err)
				return
			}
		}
	})
}

// A container with an IPv6 address answers AAAA with it, and A as before.
func TestAAAA(t *testing.T) {
	s, addr := start(t, Config{})
	web := names.Record{Name: "web", Node: "host2", Address: netip.MustParseAddr("10.244.2.5"), AddressV6: netip.MustParseAddr("fd00:10:244:2::5"), Created: time.Unix(1, 0)}
	s.SetView(names.NewView([]names.Record{web}, nil))
	resp := ask(t, "udp", addr, "web.fabric.", dns.TypeAAAA)
	if resp.Rcode != dns.RcodeSuccess || len(resp.Answer) != 1 || resp.Answer[0].(*dns.AAAA).AAAA.String() != "fd00:10:244:2::5" {
		t.Errorf("web.fabric AAAA: %v", resp)
	}
	if resp := ask(t, "udp", addr, "web.fabric.", dns.TypeA); len(resp.Answer) != 1 || resp.Answer[0].(*dns.A).A.String() != "10.244.2.5" {
		t.Errorf("web.fabric A: %v", resp)
	}
}

// TestRepeatedQueries: a query asked again (answered from the replies kept
// per view) gets its own ID and its own spelling of the name back, and the
// next view's answer at once; a DNS response sent to the server is never
// answered (two servers must not answer each other forever), while the
// query after it is.
func TestRepeatedQueries(t *testing.T) {
	s, addr := start(t, Config{Upstreams: []string{upstream(t)}})
	web := names.Record{Name: "web", Node: "host2", Address: netip.MustParseAddr("10.244.2.5")}
	s.SetView(names.NewView([]names.Record{web}, nil))
	conn, err := net.Dial("udp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	exchange := func(m *dns.Msg) *dns.Msg {
		t.Helper()
		wire, _ := m.Pack()
		conn.SetDeadline(time.Now().Add(5 * time.Second))
		if _, err := conn.Write(wire); err != nil {
			t.Fatal(err)
		}
		buf := make([]byte, 512)
		n, err := conn.Read(buf)
		if err != nil {
			t.Fatal(err)
		}
		var r dns.Msg
		if err := r.Unpack(buf[:n]); err != nil {
			t.Fatal(err)
		}
		return &r
	}
	for i, name := range []string{"web.fabric.", "web.fabric.", "WEB.fabric.", "web.fabric.", "WEB.fabric."} {
		q := question(name, dns.TypeA)
		q.Id = uint16(1000 + i)
		r := exchange(q)
		if r.Id != q.Id || r.Question[0].Name != name || len(r.Answer) != 1 || r.Answer[0].(*dns.A).A.String() != "10.244.2.5" {
			t.Errorf("query %d for %s: %v", i, name, r)
		}
	}
	s.SetView(names.NewView(nil, nil))
	if r := exchange(question("web.fabric.", dns.TypeA)); r.Rcode != dns.RcodeNameError {
		t.Errorf("web.fabric after it went: %v, want NXDOMAIN at once", r)
	}

	response := question("web.fabric.", dns.TypeA)
	response.Response, response.Id = true, 7
	wire, _ := response.Pack()
	if _, err := conn.Write(wire); err != nil {
		t.Fatal(err)
	}
	q := question("example.org.", dns.TypeA)
	q.Id = 8
	if r := exchange(q); r.Id != 8 {
		t.Errorf("the first packet back after a response and a query: ID %d, want the query's 8 (the response was answered)", r.Id)
	}
}
