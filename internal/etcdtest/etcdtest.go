// Package etcdtest starts real embedded etcd members for tests: one member
// or a small cluster on 127.0.0.1 with free ports and temporary data
// directories, all stopped when the test ends.
package etcdtest

import (
	"context"
	"crypto/tls"
	"fmt"
	"io"
	"net"
	"net/url"
	"strings"
	"sync"
	"testing"
	"time"

	"go.etcd.io/etcd/client/pkg/v3/transport"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.etcd.io/etcd/server/v3/embed"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
)

// startTimeout bounds how long a member (or the whole cluster) may take to
// become ready before the test fails.
const startTimeout = 30 * time.Second

// Cluster is a set of running embedded etcd members.
type Cluster struct {
	t       testing.TB
	logs    *testLogWriter
	mu      sync.Mutex
	members []*member
	// tls is set for a cluster from StartTLS: the server side of the client
	// URLs, and clientTLS what this package's own clients use.
	tls       *TLSFiles
	clientTLS *tls.Config
}

type member struct {
	name      string
	dir       string
	clientURL url.URL
	peerURL   url.URL
	initial   string // initial-cluster string, needed again on restart
	tls       *TLSFiles
	etcd      *embed.Etcd
}

// Start runs a single embedded etcd member and stops it in t.Cleanup.
func Start(t testing.TB) *Cluster {
	t.Helper()
	return StartCluster(t, 1)
}

// StartCluster runs n embedded etcd members forming one cluster and stops
// them all in t.Cleanup.
func StartCluster(t testing.TB, n int) *Cluster {
	t.Helper()
	if n < 1 {
		t.Fatalf("etcdtest: cluster size must be at least 1, got %d", n)
	}
	return startWithRetries(t, n, nil)
}

func startWithRetries(t testing.TB, n int, tlsFiles *TLSFiles) *Cluster {
	t.Helper()
	var lastErr error
	// Ports are picked by binding :0 and closing again, so another process
	// may grab one before etcd binds it; retry with fresh ports then.
	for attempt := 0; attempt < 5; attempt++ {
		c, err := startCluster(t, n, tlsFiles)
		if err == nil {
			t.Cleanup(func() {
				c.stopAll()
				c.logs.close()
			})
			return c
		}
		lastErr = err
	}
	t.Fatalf("etcdtest: start %d-member cluster: %v", n, lastErr)
	return nil
}

func startCluster(t testing.TB, n int, tlsFiles *TLSFiles) (*Cluster, error) {
	ports, err := freePorts(2 * n)
	if err != nil {
		return nil, err
	}
	c := &Cluster{t: t, logs: &testLogWriter{w: t.Output()}, tls: tlsFiles}
	clientScheme := "http"
	if tlsFiles != nil {
		clientScheme = "https"
		info := transport.TLSInfo{CertFile: tlsFiles.Cert, KeyFile: tlsFiles.Key, TrustedCAFile: tlsFiles.CA}
		if c.clientTLS, err = info.ClientConfig(); err != nil {
			return nil, fmt.Errorf("client TLS: %w", err)
		}
	}
	var initial []string
	for i := 0; i < n; i++ {
		m := &member{
			name:      fmt.Sprintf("m%d", i),
			dir:       t.TempDir(),
			clientURL: url.URL{Scheme: clientScheme, Host: fmt.Sprintf("127.0.0.1:%d", ports[2*i])},
			peerURL:   url.URL{Scheme: "http", Host: fmt.Sprintf("127.0.0.1:%d", ports[2*i+1])},
			tls:       tlsFiles,
		}
		c.members = append(c.members, m)
		initial = append(initial, m.name+"="+m.peerURL.String())
	}
	for _, m := range c.members {
		m.initial = strings.Join(initial, ",")
		e, err := embed.StartEtcd(m.config(embed.ClusterStateFlagNew, c.logs))
		if err != nil {
			c.stopAll()
			c.logs.close()
			return nil, fmt.Errorf("member %s: %w", m.name, err)
		}
		m.etcd = e
	}
	deadline := time.After(startTimeout)
	for _, m := range c.members {
		select {
		case <-m.etcd.Server.ReadyNotify():
		case err := <-m.etcd.Err():
			c.stopAll()
			c.logs.close()
			return nil, fmt.Errorf("member %s: %w", m.name, err)
		case <-deadline:
			c.stopAll()
			c.logs.close()
			return nil, fmt.Errorf("member %s not ready after %s", m.name, startTimeout)
		}
	}
	return c, nil
}

func (m *member) config(state string, logs *testLogWriter) *embed.Config {
	cfg := embed.NewConfig()
	cfg.Name = m.name
	cfg.Dir = m.dir
	cfg.ListenClientUrls = []url.URL{m.clientURL}
	cfg.AdvertiseClientUrls = []url.URL{m.clientURL}
	cfg.ListenPeerUrls = []url.URL{m.peerURL}
	cfg.AdvertisePeerUrls = []url.URL{m.peerURL}
	cfg.InitialCluster = m.initial
	if m.tls != nil {
		// The server uses its own certificate and requires a client
		// certificate signed by the same CA.
		cfg.ClientTLSInfo = transport.TLSInfo{
			CertFile:       m.tls.serverCert,
			KeyFile:        m.tls.serverKey,
			TrustedCAFile:  m.tls.CA,
			ClientCertAuth: true,
		}
	}
	cfg.InitialClusterToken = "etcdtest"
	cfg.ClusterState = state
	cfg.Logger = "zap"
	cfg.LogLevel = "error"
	cfg.ZapLoggerBuilder = embed.NewZapLoggerBuilder(newTestLogger(logs))
	// Short ticks keep leader election (and re-election after StopMember) fast.
	cfg.TickMs = 20
	cfg.ElectionMs = 200
	cfg.UnsafeNoFsync = true
	cfg.StrictReconfigCheck = false
	return cfg
}

func freePorts(n int) ([]int, error) {
	var listeners []net.Listener
	defer func() {
		for _, l := range listeners {
			l.Close()
		}
	}()
	var ports []int
	for i := 0; i < n; i++ {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return nil, fmt.Errorf("find free port: %w", err)
		}
		listeners = append(listeners, l)
		ports = append(ports, l.Addr().(*net.TCPAddr).Port)
	}
	return ports, nil
}

// Endpoints returns the client URLs of all members, running or stopped.
func (c *Cluster) Endpoints() []string {
	var eps []string
	for _, m := range c.members {
		eps = append(eps, m.clientURL.String())
	}
	return eps
}

// Endpoint returns the client URL of member i.
func (c *Cluster) Endpoint(i int) string {
	return c.members[i].clientURL.String()
}

// Client returns a client connected to all members; it is closed in t.Cleanup.
func (c *Cluster) Client(t testing.TB) *clientv3.Client {
	t.Helper()
	return c.ClientFor(t, c.Endpoints()...)
}

// ClientFor returns a client for the given endpoints; closed in t.Cleanup.
func (c *Cluster) ClientFor(t testing.TB, endpoints ...string) *clientv3.Client {
	t.Helper()
	cli, err := clientv3.New(c.clientConfig(endpoints...))
	if err != nil {
		t.Fatalf("etcdtest: client for %v: %v", endpoints, err)
	}
	t.Cleanup(func() { cli.Close() })
	return cli
}

func (c *Cluster) clientConfig(endpoints ...string) clientv3.Config {
	return clientv3.Config{
		Endpoints:   endpoints,
		DialTimeout: 5 * time.Second,
		TLS:         c.clientTLS,
		Logger:      zap.NewNop(),
	}
}

// StopMember stops member i abruptly, like a crash: no leadership
// transfer. Its data stays, see RestartMember.
func (c *Cluster) StopMember(i int) {
	c.mu.Lock()
	m := c.members[i]
	e := m.etcd
	m.etcd = nil
	c.mu.Unlock()
	if e != nil {
		e.Server.HardStop()
		e.Close()
	}
}

// RestartMember starts a stopped member i again on the same ports and data.
func (c *Cluster) RestartMember(i int) {
	c.t.Helper()
	c.mu.Lock()
	defer c.mu.Unlock()
	m := c.members[i]
	if m.etcd != nil {
		return
	}
	var e *embed.Etcd
	var err error
	// The old listeners may need a moment to be released.
	for attempt := 0; attempt < 50; attempt++ {
		e, err = embed.StartEtcd(m.config(embed.ClusterStateFlagExisting, c.logs))
		if err == nil {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	if err != nil {
		c.t.Fatalf("etcdtest: restart member %s: %v", m.name, err)
	}
	select {
	case <-e.Server.ReadyNotify():
	case err := <-e.Err():
		e.Close()
		c.t.Fatalf("etcdtest: restart member %s: %v", m.name, err)
	case <-time.After(startTimeout):
		e.Close()
		c.t.Fatalf("etcdtest: restarted member %s not ready after %s", m.name, startTimeout)
	}
	m.etcd = e
	c.waitServing(m)
}

// waitServing waits until member m answers a linearizable read, which needs
// working raft connections to and from the leader: only then can the
// cluster lose another member without losing quorum.
func (c *Cluster) waitServing(m *member) {
	c.t.Helper()
	cli, err := clientv3.New(c.clientConfig(m.clientURL.String()))
	if err != nil {
		c.t.Fatalf("etcdtest: client for member %s: %v", m.name, err)
	}
	defer cli.Close()
	deadline := time.Now().Add(startTimeout)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		_, err := cli.Get(ctx, "etcdtest-ready-probe")
		cancel()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			c.t.Fatalf("etcdtest: member %s does not serve reads %s after restart: %v", m.name, startTimeout, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// Compact compacts the key-value history up to the current revision, which
// makes watches that started earlier fail with ErrCompacted.
func (c *Cluster) Compact(t testing.TB) {
	t.Helper()
	cli := c.Client(t)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	resp, err := cli.Get(ctx, "etcdtest-compact-probe")
	if err != nil {
		t.Fatalf("etcdtest: read revision: %v", err)
	}
	if _, err := cli.Compact(ctx, resp.Header.Revision, clientv3.WithCompactPhysical()); err != nil {
		t.Fatalf("etcdtest: compact at %d: %v", resp.Header.Revision, err)
	}
}

// stopAll stops the members in parallel: each Close can take a second.
func (c *Cluster) stopAll() {
	var wg sync.WaitGroup
	for i := range c.members {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c.StopMember(i)
		}()
	}
	wg.Wait()
}

// newTestLogger logs etcd errors, without stack traces, into the test's
// output, so they show only when the test fails or runs with -v.
func newTestLogger(w *testLogWriter) *zap.Logger {
	enc := zap.NewDevelopmentEncoderConfig()
	enc.StacktraceKey = ""
	core := zapcore.NewCore(zapcore.NewConsoleEncoder(enc), zapcore.AddSync(w), zapcore.ErrorLevel)
	return zap.New(core)
}

// testLogWriter forwards to the test's output until the test ends; etcd
// goroutines that log after that are dropped instead of panicking.
type testLogWriter struct {
	mu     sync.Mutex
	w      io.Writer
	closed bool
}

func (l *testLogWriter) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.closed {
		return len(p), nil
	}
	return l.w.Write(append([]byte("etcd: "), p...))
}

func (l *testLogWriter) close() {
	l.mu.Lock()
	l.closed = true
	l.mu.Unlock()
}

// PutAsAgent puts key=value the way fabricd writes: each attempt gets one
// second and a failed one is tried again, up to ten times. A write in
// flight when the leader dies fails only after etcd's request timeout (5 s
// and more), which a client that waited for it would notice as an outage.
func PutAsAgent(ctx context.Context, t testing.TB, cli *clientv3.Client, key, value string) {
	t.Helper()
	var err error
	for attempt := 0; attempt < 10; attempt++ {
		putCtx, cancel := context.WithTimeout(ctx, time.Second)
		_, err = cli.Put(putCtx, key, value)
		cancel()
		if err == nil {
			return
		}
	}
	t.Fatalf("etcdtest: put %s failed ten times in a row, the last: %v", key, err)
}
