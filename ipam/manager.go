package ipam

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"net/netip"
	"sync"
	"time"

	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"
)

// DefaultTTL is how long a dead host's subnet stays reserved.
const DefaultTTL = 24 * time.Hour

var (
	// ErrNodeConflict: the node name holds a subnet for another machine.
	ErrNodeConflict = errors.New("node name in use by another machine")
	// ErrPoolExhausted: every subnet of the pool is taken.
	ErrPoolExhausted = errors.New("pool exhausted")
	// ErrSubnetLost: the lease expired and another host took the subnet.
	ErrSubnetLost = errors.New("subnet lost")
)

// Options configure a Manager.
type Options struct {
	Client    *clientv3.Client
	Prefix    string // etcd key prefix, DefaultPrefix when empty
	Node      string // host name, unique in the fabric
	MachineID string // tells a restart of this host from another host with the same name
	HostAddr  netip.Addr
	TTL       time.Duration // etcd lease TTL of the subnet key, DefaultTTL when zero
	Pool      *Pool         // create the pool if absent; a different stored pool is an error
	Logger    *slog.Logger
}

// Manager holds this host's subnet lease.
type Manager struct {
	cli       *clientv3.Client
	prefix    string
	node      string
	machineID string
	hostAddr  netip.Addr
	ttlSec    int64
	wantPool  *Pool
	log       *slog.Logger

	mu      sync.Mutex
	current Lease
	held    bool
}

// New validates the options and returns a Manager; it does not touch etcd.
func New(opts Options) (*Manager, error) {
	if opts.Client == nil {
		return nil, errors.New("ipam: no etcd client")
	}
	if opts.Node == "" {
		return nil, errors.New("ipam: node name is empty")
	}
	if opts.MachineID == "" {
		return nil, fmt.Errorf("ipam: machine id of node %q is empty", opts.Node)
	}
	ttl := opts.TTL
	if ttl == 0 {
		ttl = DefaultTTL
	}
	if ttl < time.Second {
		return nil, fmt.Errorf("ipam: subnet lease TTL %s is too short, want at least 1s", ttl)
	}
	if opts.Pool != nil {
		if err := opts.Pool.Validate(); err != nil {
			return nil, fmt.Errorf("ipam: configured pool: %w", err)
		}
	}
	log := opts.Logger
	if log == nil {
		log = slog.Default()
	}
	return &Manager{
		cli:       opts.Client,
		prefix:    normPrefix(opts.Prefix),
		node:      opts.Node,
		machineID: opts.MachineID,
		hostAddr:  opts.HostAddr,
		ttlSec:    int64((ttl + time.Second - 1) / time.Second),
		wantPool:  opts.Pool,
		log:       log,
	}, nil
}

// Lease returns the subnet lease currently held, if any.
func (m *Manager) Lease() (Lease, bool) {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.current, m.held
}

func (m *Manager) setLease(l Lease) {
	m.mu.Lock()
	m.current, m.held = l, true
	m.mu.Unlock()
}

// Acquire returns this host's subnet: the one it already holds (same node
// name and machine id, e.g. after a restart) or a free one of the pool.
func (m *Manager) Acquire(ctx context.Context) (Lease, error) {
	pool, err := EnsurePool(ctx, m.cli, m.prefix, m.wantPool)
	if err != nil {
		return Lease{}, err
	}
	var preferred netip.Prefix
	if l, ok := m.Lease(); ok {
		preferred = l.Subnet
	}
	return m.acquire(ctx, pool, preferred)
}

func (m *Manager) acquire(ctx context.Context, pool Pool, preferred netip.Prefix) (Lease, error) {
	var granted clientv3.LeaseID
	success := false
	defer func() {
		if granted != 0 && !success {
			m.revokeQuietly(granted)
		}
	}()
	for {
		entries, _, err := readEntries(ctx, m.cli, m.prefix)
		if err != nil {
			return Lease{}, err
		}
		if own, ok := m.findOwn(entries); ok {
			if own.lease.MachineID != m.machineID {
				return Lease{}, fmt.Errorf("%w: node %q already holds subnet %s (etcd key %s) for machine id %q, this host's machine id is %q; "+
					"if that host was decommissioned, free the subnet with `fabricctl ipam release %s`, otherwise give this host another name",
					ErrNodeConflict, m.node, own.subnet, own.key, own.lease.MachineID, m.machineID, m.node)
			}
			l, ok, err := m.takeOwn(ctx, own)
			if err != nil || ok {
				success = ok
				return l, err
			}
			continue // the key changed under us; read again
		}

		taken := map[netip.Prefix]bool{}
		for _, e := range entries {
			if e.problem != "" {
				m.log.Warn("malformed subnet lease; skipped, never overwritten", "key", e.key, "problem", e.problem)
			}
			if e.subnet.IsValid() && pool.Contains(e.subnet) {
				taken[e.subnet] = true
			}
		}
		subnet, ok := pickFree(pool, taken, preferred)
		if !ok {
			return Lease{}, fmt.Errorf("%w: pool %s has %d of %d subnets taken; free the subnet of a decommissioned host with `fabricctl ipam release NODE`",
				ErrPoolExhausted, pool, len(taken), pool.Size())
		}
		if granted == 0 {
			if granted, err = m.grant(ctx); err != nil {
				return Lease{}, err
			}
		}
		l := Lease{Subnet: subnet, Node: m.node, MachineID: m.machineID, HostAddr: m.hostAddr, LeaseID: granted}
		key := subnetKey(m.prefix, subnet)
		resp, err := m.cli.Txn(ctx).
			If(clientv3.Compare(clientv3.CreateRevision(key), "=", 0)).
			Then(clientv3.OpPut(key, encodeLease(l), clientv3.WithLease(granted))).
			Commit()
		if err != nil {
			return Lease{}, fmt.Errorf("take subnet %s (etcd key %s): %w", subnet, key, err)
		}
		if resp.Succeeded {
			l.Expires = time.Now().Add(time.Duration(m.ttlSec) * time.Second)
			m.setLease(l)
			success = true
			m.log.Info("took subnet", "subnet", subnet, "key", key, "ttl", time.Duration(m.ttlSec)*time.Second)
			return l, nil
		}
		// Another host took it first: read again and pick another.
	}
}

func (m *Manager) findOwn(entries []entry) (entry, bool) {
	for _, e := range entries {
		if e.problem == "" && e.lease.Node == m.node {
			return e, true
		}
	}
	return entry{}, false
}

// takeOwn takes this host's existing subnet key again: on the etcd lease it
// is attached to while that lease lives (a restart: the host's network
// blocks and addresses hang on it too, and must stay), else on a fresh one.
// ok is false when the key changed meanwhile.
func (m *Manager) takeOwn(ctx context.Context, own entry) (Lease, bool, error) {
	id := own.etcdLease
	if id == 0 {
		id = -1
	} else if _, err := m.cli.KeepAliveOnce(ctx, id); err != nil {
		id = -1 // ended (or never existed): a fresh one
	}
	if id == -1 {
		var err error
		if id, err = m.grant(ctx); err != nil {
			return Lease{}, false, err
		}
	}
	l := Lease{Subnet: own.subnet, Node: m.node, MachineID: m.machineID, HostAddr: m.hostAddr, LeaseID: id}
	resp, err := m.cli.Txn(ctx).
		If(clientv3.Compare(clientv3.ModRevision(own.key), "=", own.modRevision)).
		Then(clientv3.OpPut(own.key, encodeLease(l), clientv3.WithLease(id))).
		Commit()
	if err != nil || !resp.Succeeded {
		m.revokeQuietly(id)
		if err != nil {
			return Lease{}, false, fmt.Errorf("renew own subnet %s (etcd key %s): %w", own.subnet, own.key, err)
		}
		return Lease{}, false, nil
	}
	if own.etcdLease != 0 && own.etcdLease != id {
		// The old lease only carried this key, which now hangs on the new one.
		m.revokeQuietly(own.etcdLease)
	}
	l.Expires = time.Now().Add(time.Duration(m.ttlSec) * time.Second)
	m.setLease(l)
	m.log.Info("kept own subnet", "subnet", own.subnet, "key", own.key)
	return l, true, nil
}

// pickFree returns preferred if it is free, else a random free subnet;
// random starting points keep concurrent agents from racing for one subnet.
func pickFree(pool Pool, taken map[netip.Prefix]bool, preferred netip.Prefix) (netip.Prefix, bool) {
	if preferred.IsValid() && pool.Contains(preferred) && !taken[preferred] {
		return preferred, true
	}
	size := pool.Size()
	if len(taken) >= size {
		return netip.Prefix{}, false
	}
	start := rand.IntN(size)
	for i := 0; i < size; i++ {
		s := pool.Subnet((start + i) % size)
		if !taken[s] {
			return s, true
		}
	}
	return netip.Prefix{}, false
}

func (m *Manager) grant(ctx context.Context) (clientv3.LeaseID, error) {
	resp, err := m.cli.Grant(ctx, m.ttlSec)
	if err != nil {
		return 0, fmt.Errorf("grant etcd lease (TTL %ds) for the subnet of %s: %w", m.ttlSec, m.node, err)
	}
	return resp.ID, nil
}

func (m *Manager) revokeQuietly(id clientv3.LeaseID) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	_, _ = m.cli.Revoke(ctx, id)
}

// KeepAlive renews the subnet lease until ctx is done. While etcd is
// unreachable the host keeps its subnet and retries. If the lease expired
// meanwhile it takes the same subnet again when still free; if another host
// took it, KeepAlive returns an error wrapping ErrSubnetLost. A Manager that
// has not acquired yet acquires first (getting the host's existing subnet).
func (m *Manager) KeepAlive(ctx context.Context) error {
	interval := min(time.Duration(m.ttlSec)*time.Second/3, time.Minute)
	retry := min(interval, 2*time.Second)
	wait := time.Duration(0)
	if _, ok := m.Lease(); ok {
		wait = interval
	}
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(wait):
		}
		err := m.renewOnce(ctx, min(interval, 5*time.Second))
		switch {
		case err == nil:
			wait = interval
		case ctx.Err() != nil:
			return nil
		case errors.Is(err, ErrSubnetLost), errors.Is(err, ErrNodeConflict), errors.Is(err, ErrPoolExhausted):
			m.log.Error("subnet lease", "err", err)
			return err
		default:
			m.log.Warn("cannot renew subnet lease; keeping the subnet and retrying", "err", err, "retry in", retry)
			wait = retry
		}
	}
}

func (m *Manager) renewOnce(ctx context.Context, timeout time.Duration) error {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	cur, held := m.Lease()
	if !held {
		_, err := m.Acquire(ctx)
		return err
	}
	key := subnetKey(m.prefix, cur.Subnet)
	_, err := m.cli.KeepAliveOnce(ctx, cur.LeaseID)
	if err == nil {
		// The lease lives; make sure our key still hangs on it (an operator
		// may have released it, or etcd lost data).
		resp, err := m.cli.Get(ctx, key)
		if err != nil {
			return fmt.Errorf("check subnet key %s: %w", key, err)
		}
		if len(resp.Kvs) == 1 && clientv3.LeaseID(resp.Kvs[0].Lease) == cur.LeaseID {
			cur.Expires = time.Now().Add(time.Duration(m.ttlSec) * time.Second)
			m.setLease(cur)
			return nil
		}
		m.log.Warn("subnet key no longer on this host's lease; taking the subnet again", "key", key, "subnet", cur.Subnet)
	} else if errors.Is(err, rpctypes.ErrLeaseNotFound) {
		m.log.Warn("subnet lease expired (etcd was unreachable for longer than the TTL?); taking the same subnet again",
			"subnet", cur.Subnet, "key", key)
	} else {
		return fmt.Errorf("renew etcd lease %x of subnet %s: %w", int64(cur.LeaseID), cur.Subnet, err)
	}
	return m.reclaim(ctx, cur)
}

// reclaim takes back the subnet cur after its lease was lost.
func (m *Manager) reclaim(ctx context.Context, cur Lease) error {
	key := subnetKey(m.prefix, cur.Subnet)
	id, err := m.grant(ctx)
	if err != nil {
		return err
	}
	l := cur
	l.LeaseID = id
	resp, err := m.cli.Txn(ctx).
		If(clientv3.Compare(clientv3.CreateRevision(key), "=", 0)).
		Then(clientv3.OpPut(key, encodeLease(l), clientv3.WithLease(id))).
		Else(clientv3.OpGet(key)).
		Commit()
	if err != nil {
		m.revokeQuietly(id)
		return fmt.Errorf("take subnet %s again (etcd key %s): %w", cur.Subnet, key, err)
	}
	if resp.Succeeded {
		l.Expires = time.Now().Add(time.Duration(m.ttlSec) * time.Second)
		m.setLease(l)
		m.log.Info("took the same subnet again", "subnet", cur.Subnet, "key", key)
		return nil
	}
	m.revokeQuietly(id)
	kv := resp.Responses[0].GetResponseRange().Kvs[0]
	e := decodeEntry(m.prefix, key, kv.Value, kv.ModRevision, clientv3.LeaseID(kv.Lease))
	if e.problem == "" && e.lease.Node == m.node && e.lease.MachineID == m.machineID {
		if _, ok, err := m.takeOwn(ctx, e); err != nil || ok {
			return err
		}
		return fmt.Errorf("subnet key %s changed while being renewed; retrying", key)
	}
	owner := "an unreadable value: " + e.problem
	if e.problem == "" {
		owner = fmt.Sprintf("node %q (machine id %q)", e.lease.Node, e.lease.MachineID)
	}
	return fmt.Errorf("%w: the lease of subnet %s expired and etcd key %s now belongs to %s; restart fabricd to take a new subnet",
		ErrSubnetLost, cur.Subnet, key, owner)
}

// Release gives this host's subnet back to the pool: for decommissioning a
// host, not for a normal stop (a restarted agent keeps its subnet).
func (m *Manager) Release(ctx context.Context) error {
	entries, _, err := readEntries(ctx, m.cli, m.prefix)
	if err != nil {
		return err
	}
	own, ok := m.findOwn(entries)
	if !ok {
		return fmt.Errorf("node %q holds no subnet under %s", m.node, subnetsPrefix(m.prefix))
	}
	if own.lease.MachineID != m.machineID {
		return fmt.Errorf("%w: subnet %s (etcd key %s) of node %q belongs to machine id %q, not this host (%q); use `fabricctl ipam release %s` to free it",
			ErrNodeConflict, own.subnet, own.key, m.node, own.lease.MachineID, m.machineID, m.node)
	}
	resp, err := m.cli.Txn(ctx).
		If(clientv3.Compare(clientv3.ModRevision(own.key), "=", own.modRevision)).
		Then(clientv3.OpDelete(own.key)).
		Commit()
	if err != nil {
		return fmt.Errorf("delete subnet key %s: %w", own.key, err)
	}
	if !resp.Succeeded {
		return fmt.Errorf("subnet key %s changed while being released; try again", own.key)
	}
	if own.etcdLease != 0 {
		if _, err := m.cli.Revoke(ctx, own.etcdLease); err != nil && !errors.Is(err, rpctypes.ErrLeaseNotFound) {
			m.log.Warn("revoke subnet lease", "lease", fmt.Sprintf("%x", int64(own.etcdLease)), "err", err)
		}
	}
	m.mu.Lock()
	m.current, m.held = Lease{}, false
	m.mu.Unlock()
	m.log.Info("released subnet", "subnet", own.subnet, "key", own.key)
	return nil
}
