// Package fabricdns answers DNS for the containers of the fabric on each
// host's bridge gateway: A records for <container>.<domain>, PTR records for
// addresses of the pool, from the directory of container names (package
// names). Every other name goes to the host's own resolvers, so containers
// pointed at the gateway (dockerd --dns) resolve both.
package fabricdns

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"strings"
	"sync/atomic"
	"time"

	"github.com/miekg/dns"
	"golang.org/x/sys/unix"

	"github.com/fabricnet/fabric/names"
)

// TTL of the answers: short, so a removed container stops resolving at
// once even behind a caching resolver.
const TTL = 1

// Config of a Server.
type Config struct {
	// Listen is the address to serve on, port 53 unless given.
	Listen netip.AddrPort
	// Domain of the container names, without the trailing dot ("fabric").
	Domain string
	// Pool is the fabric's address pool: PTR queries inside it are answered
	// here, never forwarded.
	Pool netip.Prefix
	// Upstreams receive every other query, in order (host:port). Empty
	// means the nameservers of ResolvConf.
	Upstreams []string
	// ResolvConf is read for upstreams when Upstreams is empty; default
	// /etc/resolv.conf.
	ResolvConf string
	Logger     *slog.Logger
}

// Server is one responder. Its view of the names starts empty; SetView
// replaces it.
type Server struct {
	cfg       Config
	zone      string // "fabric." lower case
	upstreams []string
	log       *slog.Logger
	view      atomic.Pointer[names.View]
}

// New checks cfg and reads the upstream resolvers.
func New(cfg Config) (*Server, error) {
	if !cfg.Listen.IsValid() {
		return nil, errors.New("fabricdns: no listen address")
	}
	if cfg.Domain == "" {
		return nil, errors.New("fabricdns: no domain")
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	s := &Server{cfg: cfg, zone: dns.Fqdn(strings.ToLower(cfg.Domain)), log: cfg.Logger}
	s.view.Store(names.NewView(nil, nil))
	s.upstreams = cfg.Upstreams
	if len(s.upstreams) == 0 {
		path := cfg.ResolvConf
		if path == "" {
			path = "/etc/resolv.conf"
		}
		rc, err := dns.ClientConfigFromFile(path)
		if err != nil {
			s.log.Warn("no upstream resolvers: names outside the fabric will not resolve", "file", path, "err", err)
		} else {
			for _, srv := range rc.Servers {
				s.upstreams = append(s.upstreams, net.JoinHostPort(srv, rc.Port))
			}
		}
	}
	// Never forward to ourselves: a loop that ends only in timeouts.
	self := cfg.Listen.String()
	kept := s.upstreams[:0]
	for _, u := range s.upstreams {
		if u != self {
			kept = append(kept, u)
		}
	}
	s.upstreams = kept
	return s, nil
}

// SetView replaces the names the server answers from.
func (s *Server) SetView(v *names.View) { s.view.Store(v) }

// Run serves UDP and TCP until ctx ends. It returns an error when it cannot
// listen (the address is not on the host yet, another server has port 53).
func (s *Server) Run(ctx context.Context) error {
	addr := s.cfg.Listen.String()
	udp, err := listenUDP(s.cfg.Listen)
	if err != nil {
		return fmt.Errorf("fabricdns: listen udp %s: %w", addr, err)
	}
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		unix.Close(udp.fd)
		return fmt.Errorf("fabricdns: listen tcp %s: %w", addr, err)
	}
	udpDone := make(chan struct{})
	go func() {
		defer close(udpDone)
		s.serveUDP(udp)
	}()
	defer func() {
		udp.stop()
		<-udpDone
		udp.forwarding.Wait() // a reply sent on a closed descriptor could reach a reused one
		unix.Close(udp.fd)
	}()
	tcp := &dns.Server{Listener: ln, Handler: s}
	errc := make(chan error, 1)
	started := make(chan struct{})
	tcp.NotifyStartedFunc = func() { close(started) }
	go func() { errc <- tcp.ActivateAndServe() }()
	// Shutdown refuses a server that has not started (and leaves its
	// socket open): wait until it has, or failed.
	select {
	case <-started:
	case err := <-errc:
		ln.Close()
		return fmt.Errorf("fabricdns: serve %s: %w", addr, err)
	}
	s.log.Info("answering container names", "listen", addr, "domain", strings.TrimSuffix(s.zone, "."), "upstreams", s.upstreams)
	select {
	case <-ctx.Done():
		err = nil
	case err = <-errc:
	}
	tcp.Shutdown()
	return err
}

// ServeDNS implements dns.Handler (TCP).
func (s *Server) ServeDNS(w dns.ResponseWriter, req *dns.Msg) {
	var from netip.Addr
	if ap, err := netip.ParseAddrPort(w.RemoteAddr().String()); err == nil {
		from = ap.Addr().Unmap()
	}
	m, _ := s.local(req, from)
	if m == nil {
		m = s.forward(req, w.RemoteAddr().Network())
	}
	w.WriteMsg(m)
}

// local is the reply to req from from when this server is the authority
// for it (cacheable: the same view gives the same reply), or nil.
func (s *Server) local(req *dns.Msg, from netip.Addr) (m *dns.Msg, cacheable bool) {
	if len(req.Question) != 1 {
		m := new(dns.Msg)
		m.SetRcode(req, dns.RcodeFormatError)
		return m, false
	}
	q := req.Question[0]
	m, ok := s.answer(req, q, strings.ToLower(q.Name), from)
	if !ok {
		return nil, false
	}
	return m, true
}

// answer returns the reply for a name this server is the authority for.
// A query from a container on a fabric network (from, the query's source)
// is answered from that network's names only, as a bare name (what
// Docker's embedded DNS forwards) or under the domain; one from the bridge
// from the bridge's names, under the domain.
func (s *Server) answer(req *dns.Msg, q dns.Question, qname string, from netip.Addr) (*dns.Msg, bool) {
	m := new(dns.Msg)
	m.SetReply(req)
	m.Authoritative = true
	m.RecursionAvailable = true
	view := s.view.Load()
	network, onNetwork := view.NetworkOf(from)
	reply := func(r names.Record, found bool) (*dns.Msg, bool) {
		if !found {
			m.SetRcode(req, dns.RcodeNameError)
			m.Authoritative = true
			return m, true
		}
		if q.Qtype == dns.TypeA || q.Qtype == dns.TypeANY {
			m.Answer = append(m.Answer, &dns.A{
				Hdr: dns.RR_Header{Name: q.Name, Rrtype: dns.TypeA, Class: dns.ClassINET, Ttl: TTL},
				A:   r.Address.AsSlice(),
			})
		}
		if (q.Qtype == dns.TypeAAAA || q.Qtype == dns.TypeANY) && r.AddressV6.IsValid() {
			m.Answer = append(m.Answer, &dns.AAAA{
				Hdr:  dns.RR_Header{Name: q.Name, Rrtype: dns.TypeAAAA, Class: dns.ClassINET, Ttl: TTL},
				AAAA: r.AddressV6.AsSlice(),
			})
		}
		return m, true
	}
	if onNetwork {
		if r, ok := view.LookupIn(network, strings.TrimSuffix(qname, ".")); ok {
			return reply(r, true)
		}
	}
	switch {
	case qname == s.zone:
		return m, true // the domain itself: no data
	case strings.HasSuffix(qname, "."+s.zone):
		return reply(view.LookupIn(network, strings.TrimSuffix(qname, "."+s.zone)))
	case q.Qtype == dns.TypePTR && strings.HasSuffix(qname, ".in-addr.arpa."):
		addr, ok := reverseAddr(qname)
		if !ok || !s.cfg.Pool.Contains(addr) {
			return nil, false
		}
		r, ok := view.Reverse(addr)
		if !ok {
			m.SetRcode(req, dns.RcodeNameError)
			m.Authoritative = true
			return m, true
		}
		m.Answer = append(m.Answer, &dns.PTR{
			Hdr: dns.RR_Header{Name: q.Name, Rrtype: dns.TypePTR, Class: dns.ClassINET, Ttl: TTL},
			Ptr: dns.Fqdn(r.Name + "." + strings.TrimSuffix(s.zone, ".")),
		})
		return m, true
	}
	return nil, false
}

// reverseAddr parses d.c.b.a.in-addr.arpa.
func reverseAddr(qname string) (netip.Addr, bool) {
	parts := strings.Split(strings.TrimSuffix(qname, ".in-addr.arpa."), ".")
	if len(parts) != 4 {
		return netip.Addr{}, false
	}
	a, err := netip.ParseAddr(parts[3] + "." + parts[2] + "." + parts[1] + "." + parts[0])
	return a, err == nil && a.Is4()
}

// forward asks the upstreams in turn; SERVFAIL when none answers.
func (s *Server) forward(req *dns.Msg, network string) *dns.Msg {
	c := &dns.Client{Net: network, Timeout: 2 * time.Second}
	if network != "tcp" {
		c.Net = "udp"
	}
	for _, u := range s.upstreams {
		resp, _, err := c.Exchange(req, u)
		if err == nil && resp != nil {
			return resp
		}
		s.log.Debug("upstream resolver did not answer", "upstream", u, "name", req.Question[0].Name, "err", err)
	}
	m := new(dns.Msg)
	m.SetRcode(req, dns.RcodeServerFailure)
	return m
}
