package registry

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"time"

	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/fabricnet/fabric/internal/etcdlease"
)

// DefaultTTL is the liveness lease of a node record: a host that stops
// renewing disappears from the registry this long after.
const DefaultTTL = 10 * time.Second

// Heartbeat keeps this host's record in etcd.
type Heartbeat struct {
	cli    *clientv3.Client
	prefix string
	ttlSec int64
	log    *slog.Logger
	kick   chan struct{}
	// conflicts receives the record another machine wrote under this
	// node's name (a clone), seen when renewing ours.
	conflicts chan Node

	mu   sync.Mutex
	self Node

	// opMu serialises etcd writes so Withdraw cannot race a re-put.
	opMu      sync.Mutex
	leaseID   clientv3.LeaseID
	putKey    string // key last written, to remove it after a rename
	withdrawn bool   // by Withdraw or HandOver: Run writes nothing more
}

// NewHeartbeat returns a Heartbeat writing under prefix with a liveness
// lease of ttl (DefaultTTL when zero, at least one second).
func NewHeartbeat(cli *clientv3.Client, prefix string, ttl time.Duration, logger *slog.Logger) *Heartbeat {
	if ttl <= 0 {
		ttl = DefaultTTL
	}
	if logger == nil {
		logger = slog.Default()
	}
	return &Heartbeat{
		cli:       cli,
		prefix:    normPrefix(prefix),
		ttlSec:    max(1, int64((ttl+time.Second-1)/time.Second)),
		log:       logger,
		kick:      make(chan struct{}, 1),
		conflicts: make(chan Node, 1),
	}
}

// Conflicts delivers a record that another machine wrote under this node's
// name while this heartbeat keeps it: two machines with one identity.
func (p *Heartbeat) Conflicts() <-chan Node { return p.conflicts }

// Run publishes self and keeps the record alive until ctx is done. When
// etcd is unreachable it retries; when the lease was lost (etcd restarted
// or the host was away longer than the TTL) it publishes again. It returns
// an error only for an invalid record. The record stays until its lease
// expires unless Withdraw is called.
func (p *Heartbeat) Run(ctx context.Context, self Node) error {
	if err := self.Validate(); err != nil {
		return fmt.Errorf("node record: %w", err)
	}
	p.mu.Lock()
	p.self = self
	p.mu.Unlock()

	interval := time.Duration(p.ttlSec) * time.Second / 3
	retry := min(interval, time.Second)
	timer := time.NewTimer(0)
	defer timer.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-timer.C:
		case <-p.kick:
		}
		next := interval
		if err := p.sync(ctx, interval); err != nil {
			if ctx.Err() != nil {
				return nil
			}
			p.log.Warn("cannot publish node record; retrying", "key", nodeKey(p.prefix, self.Name), "err", err, "retry in", retry)
			next = retry
		}
		timer.Stop()
		timer.Reset(next)
	}
}

// Update replaces the published record; Run writes it at once.
func (p *Heartbeat) Update(self Node) {
	if err := self.Validate(); err != nil {
		p.log.Error("ignoring invalid node record update", "err", err)
		return
	}
	p.mu.Lock()
	p.self = self
	p.mu.Unlock()
	select {
	case p.kick <- struct{}{}:
	default:
	}
}

// record is the record to publish, and its stored form.
func (p *Heartbeat) record() (Node, []byte, error) {
	p.mu.Lock()
	self := p.self
	p.mu.Unlock()
	value, err := json.Marshal(self)
	return self, value, err
}

// sync renews the lease and makes sure the stored record is the current one.
func (p *Heartbeat) sync(ctx context.Context, timeout time.Duration) error {
	ctx, cancel := context.WithTimeout(ctx, max(timeout, time.Second))
	defer cancel()
	self, value, err := p.record()
	if err != nil {
		return err
	}
	key := nodeKey(p.prefix, self.Name)

	p.opMu.Lock()
	defer p.opMu.Unlock()
	if p.withdrawn {
		return nil
	}
	var conflict *Node
	lease, renewed, err := etcdlease.Keep(ctx, p.cli, p.leaseID, p.ttlSec)
	if err != nil {
		return fmt.Errorf("node record %s: %w", key, err)
	}
	if p.leaseID != 0 && !renewed {
		p.log.Warn("node record lease expired; publishing again", "key", key)
	}
	p.leaseID = lease
	if renewed {
		resp, err := p.cli.Get(ctx, key)
		if err != nil {
			return fmt.Errorf("check %s: %w", key, err)
		}
		if len(resp.Kvs) == 1 && clientv3.LeaseID(resp.Kvs[0].Lease) == p.leaseID && string(resp.Kvs[0].Value) == string(value) {
			return nil
		}
		// Our record, written under another lease with another address:
		// another machine publishes this node name (a clone).
		// It is told once our record is back in place: then the clone, at
		// its next renewal, finds ours and stops too.
		var other Node
		if len(resp.Kvs) == 1 && clientv3.LeaseID(resp.Kvs[0].Lease) != p.leaseID &&
			json.Unmarshal(resp.Kvs[0].Value, &other) == nil && other.Address != self.Address {
			conflict = &other
		}
	}
	if p.putKey != "" && p.putKey != key {
		// Renamed: remove the old record if it is still ours.
		if _, err := p.cli.Txn(ctx).
			If(clientv3.Compare(clientv3.LeaseValue(p.putKey), "=", p.leaseID)).
			Then(clientv3.OpDelete(p.putKey)).Commit(); err != nil {
			return fmt.Errorf("remove old record %s: %w", p.putKey, err)
		}
	}
	if _, err := p.cli.Put(ctx, key, string(value), clientv3.WithLease(p.leaseID)); err != nil {
		return fmt.Errorf("put %s: %w", key, err)
	}
	p.putKey = key
	p.log.Info("published node record", "key", key, "subnet", self.Subnet, "address", self.Address)
	if conflict != nil {
		select {
		case p.conflicts <- *conflict:
		default:
		}
	}
	return nil
}

// HandOver keeps the record for ttl after this process ends, for a restart:
// it is written again under a lease of its own with that TTL, and Run
// writes nothing afterwards. The next fabricd publishes it under its own
// lease as usual; if none comes, it expires after ttl. Without it the
// record outlived the process by the liveness TTL only, and a restart
// slower than that (a loaded machine) made peers take the host for dead
// and drop its routes although graceful restart was to keep them.
func (p *Heartbeat) HandOver(ctx context.Context, ttl time.Duration) error {
	p.opMu.Lock()
	defer p.opMu.Unlock()
	if p.withdrawn || p.putKey == "" {
		return nil
	}
	p.withdrawn = true
	_, value, err := p.record()
	if err != nil {
		return err
	}
	lease, err := p.cli.Grant(ctx, max(1, int64(ttl/time.Second)))
	if err != nil {
		return fmt.Errorf("node record %s: lease for the restart: %w", p.putKey, err)
	}
	if _, err := p.cli.Put(ctx, p.putKey, string(value), clientv3.WithLease(lease.ID)); err != nil {
		return fmt.Errorf("node record %s: kept for the restart: %w", p.putKey, err)
	}
	p.log.Info("node record kept for the restart", "key", p.putKey, "for", ttl)
	return nil
}

// Withdraw removes the record and revokes its lease, for a graceful stop;
// Run writes nothing afterwards.
func (p *Heartbeat) Withdraw(ctx context.Context) error {
	p.opMu.Lock()
	defer p.opMu.Unlock()
	p.withdrawn = true
	if p.leaseID == 0 {
		return nil
	}
	// putKey is empty when the first put's reply was lost (Run stopped
	// while it was in flight): the record may still be in etcd under our
	// lease, and revoking the lease removes it.
	if p.putKey != "" {
		if _, err := p.cli.Txn(ctx).
			If(clientv3.Compare(clientv3.LeaseValue(p.putKey), "=", p.leaseID)).
			Then(clientv3.OpDelete(p.putKey)).Commit(); err != nil {
			return fmt.Errorf("delete node record %s: %w", p.putKey, err)
		}
	}
	if _, err := p.cli.Revoke(ctx, p.leaseID); err != nil && !errors.Is(err, rpctypes.ErrLeaseNotFound) {
		return fmt.Errorf("revoke lease %x of the node record: %w", int64(p.leaseID), err)
	}
	p.log.Info("withdrew node record", "key", p.putKey, "lease", fmt.Sprintf("%x", int64(p.leaseID)))
	p.leaseID, p.putKey = 0, ""
	return nil
}
