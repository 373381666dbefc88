package lab

import (
	"context"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"
)

// etcdMember is one real etcd process (Debian's /usr/bin/etcd) in its own
// namespace on subnet 0 at 192.168.100.(200+index).
type etcdMember struct {
	index int
	name  string
	host  *Host
	dir   string // cwd of the process: data dir and unix socket live here
	proc  *Process
}

// The socket file is "etcd.sock:2379" in the member's directory: etcd 3.4
// insists on host:port in unix URLs and uses them as a relative path.
const etcdSocketFile = "etcd.sock:2379"

func (l *Lab) addEtcdNamespace(ctx context.Context, i int) (*etcdMember, error) {
	h := &Host{
		Name:   fmt.Sprintf("etcd%d", i),
		Netns:  fmt.Sprintf("%s-etcd%d", l.prefix, i),
		Addr:   l.addrOn(0, byte(200+i)),
		Dev:    "eth0",
		Subnet: l.subnet(0),
		lab:    l,
	}
	m := &etcdMember{index: i, name: fmt.Sprintf("%s-etcd%d", l.prefix, i), host: h, dir: filepath.Join(l.runDir, h.Name)}
	if err := os.MkdirAll(m.dir, 0o700); err != nil {
		return nil, fmt.Errorf("lab: %w", err)
	}
	if err := l.addNamespace(ctx, h.Netns); err != nil {
		return nil, err
	}
	if err := l.attach(ctx, h.Netns, h.Dev, fmt.Sprintf("%s-e%d", l.prefix, i), 0, netip.PrefixFrom(h.Addr, h.Subnet.Bits())); err != nil {
		return nil, err
	}
	if err := l.routeToOtherSubnets(ctx, h.Netns, 0); err != nil {
		return nil, err
	}
	return m, nil
}

func (l *Lab) etcdArgs(m *etcdMember) []string {
	var cluster []string
	for _, o := range l.etcd {
		cluster = append(cluster, fmt.Sprintf("%s=http://%s", o.name, netip.AddrPortFrom(o.host.Addr, etcdPeerPort)))
	}
	client := fmt.Sprintf("http://%s", netip.AddrPortFrom(m.host.Addr, etcdClientPort))
	peer := fmt.Sprintf("http://%s", netip.AddrPortFrom(m.host.Addr, etcdPeerPort))
	var nice []string
	if l.spec.EtcdNice != 0 {
		nice = []string{"nice", "-n", strconv.Itoa(l.spec.EtcdNice)}
	}
	return append(nice,
		"etcd",
		"--name", m.name,
		"--data-dir", filepath.Join(m.dir, "data"),
		"--listen-client-urls", client+",unix://"+etcdSocketFile,
		"--advertise-client-urls", client,
		"--listen-peer-urls", peer,
		"--initial-advertise-peer-urls", peer,
		"--initial-cluster", strings.Join(cluster, ","),
		"--initial-cluster-token", l.prefix,
		// Ignored once the data dir exists, so restarts just rejoin.
		"--initial-cluster-state", "new",
		"--logger", "zap", "--log-outputs", "stderr",
	)
}

func (l *Lab) startEtcdMember(m *etcdMember) error {
	p, err := l.start(m.host.Netns, m.host.Name, m.dir, nil, l.etcdArgs(m))
	if err != nil {
		return err
	}
	m.proc = p
	return nil
}

func (l *Lab) startEtcd(ctx context.Context) error {
	for _, m := range l.etcd {
		if err := l.startEtcdMember(m); err != nil {
			return err
		}
	}
	for _, m := range l.etcd {
		if err := l.waitEtcdMember(ctx, m, 90*time.Second); err != nil {
			return err
		}
	}
	return nil
}

// waitEtcdMember waits until member m answers a linearizable read (which
// needs a leader and quorum) on its unix socket.
func (l *Lab) waitEtcdMember(ctx context.Context, m *etcdMember, timeout time.Duration) error {
	start := time.Now()
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	cli, err := clientFor(m.clientEndpoint())
	if err != nil {
		return fmt.Errorf("lab: etcd client for %s: %w", m.name, err)
	}
	defer cli.Close()
	var lastErr error
	for {
		if m.proc.Exited() {
			return fmt.Errorf("lab: etcd member %s exited during startup (%v); log %s:\n%s", m.name, m.proc.waitErr, m.proc.LogPath(), tailFile(m.proc.LogPath(), 20))
		}
		attempt, cancelAttempt := context.WithTimeout(ctx, time.Second)
		_, err := cli.Get(attempt, "lab-health")
		cancelAttempt()
		if err == nil {
			return nil
		}
		lastErr = err
		select {
		case <-ctx.Done():
			return fmt.Errorf("lab: etcd member %s not healthy after %s: %v; log %s:\n%s", m.name, time.Since(start).Round(time.Millisecond), lastErr, m.proc.LogPath(), tailFile(m.proc.LogPath(), 20))
		case <-time.After(100 * time.Millisecond):
		}
	}
}

func clientFor(endpoints ...string) (*clientv3.Client, error) {
	return clientv3.New(clientv3.Config{
		Endpoints:   endpoints,
		DialTimeout: 5 * time.Second,
		Logger:      zap.NewNop(),
	})
}

func (m *etcdMember) clientEndpoint() string {
	return "unix://" + filepath.Join(m.dir, etcdSocketFile)
}

// EtcdEndpoints returns the etcd client URLs as the hosts see them, e.g.
// http://192.168.100.200:2379.
func (l *Lab) EtcdEndpoints() []string {
	var eps []string
	for _, m := range l.etcd {
		eps = append(eps, fmt.Sprintf("http://%s", netip.AddrPortFrom(m.host.Addr, etcdClientPort)))
	}
	return eps
}

// EtcdClientEndpoints returns endpoints the process in the root namespace can
// use with go.etcd.io/etcd/client/v3: unix sockets, because the root
// namespace has no route into the lab.
func (l *Lab) EtcdClientEndpoints() []string {
	var eps []string
	for _, m := range l.etcd {
		eps = append(eps, m.clientEndpoint())
	}
	return eps
}

// EtcdClient returns a client connected through EtcdClientEndpoints. The
// caller closes it.
func (l *Lab) EtcdClient() (*clientv3.Client, error) {
	return clientFor(l.EtcdClientEndpoints()...)
}

// EtcdMember returns the namespace of etcd member i (e.g. to run commands or
// check reachability); nil if out of range.
func (l *Lab) EtcdMember(i int) *Host {
	if i < 0 || i >= len(l.etcd) {
		return nil
	}
	return l.etcd[i].host
}

// StopEtcdMember stops etcd member i (SIGTERM, then SIGKILL after 10 s).
func (l *Lab) StopEtcdMember(i int) error {
	m, err := l.etcdMemberAt(i)
	if err != nil {
		return err
	}
	if m.proc == nil || m.proc.Exited() {
		return nil
	}
	return m.proc.Stop()
}

// StartEtcdMember restarts a stopped etcd member i with its old data and
// waits until it serves reads again (needs a quorum).
func (l *Lab) StartEtcdMember(i int) error {
	m, err := l.etcdMemberAt(i)
	if err != nil {
		return err
	}
	if m.proc != nil && !m.proc.Exited() {
		return fmt.Errorf("lab: etcd member %d is running", i)
	}
	if err := l.startEtcdMember(m); err != nil {
		return err
	}
	return l.waitEtcdMember(context.Background(), m, 90*time.Second)
}

func (l *Lab) etcdMemberAt(i int) (*etcdMember, error) {
	if i < 0 || i >= len(l.etcd) {
		return nil, fmt.Errorf("lab: no etcd member %d (lab has %d)", i, len(l.etcd))
	}
	return l.etcd[i], nil
}

// tailFile returns the last n lines of a file, for error messages.
func tailFile(path string, n int) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return "(" + err.Error() + ")"
	}
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}
