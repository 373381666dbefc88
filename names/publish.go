package names

import (
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"sync"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/fabricnet/fabric/internal/etcdlease"
)

// Publisher keeps one host's container records in etcd equal to the
// containers on its bridge, under a lease it renews: when the host dies the
// lease expires and its names go with it.
type Publisher struct {
	cli    *clientv3.Client
	prefix string
	node   string
	ttlSec int64
	log    *slog.Logger

	want  map[string][]byte // key -> value; Run's goroutine only
	known bool              // want holds a list from dockerd

	// mu serialises etcd writes so Withdraw cannot race a re-put.
	mu        sync.Mutex
	leaseID   clientv3.LeaseID
	withdrawn bool
}

// NewPublisher returns a publisher for node's records with a lease of ttl
// (at least a second).
func NewPublisher(cli *clientv3.Client, prefix, node string, ttl time.Duration, logger *slog.Logger) *Publisher {
	if logger == nil {
		logger = slog.Default()
	}
	return &Publisher{cli: cli, prefix: normPrefix(prefix), node: node,
		ttlSec: max(1, int64((ttl+time.Second-1)/time.Second)), log: logger}
}

// Run publishes every list received on lists until ctx ends, renewing the
// lease in between and retrying while etcd is away. Before the first list
// arrives nothing is written or removed: a restarted fabricd whose dockerd
// is slow to answer keeps the names its predecessor published (they live
// until that lease ends).
func (p *Publisher) Run(ctx context.Context, lists <-chan []Record) error {
	interval := time.Duration(p.ttlSec) * time.Second / 3
	retry := min(interval, time.Second)
	timer := time.NewTimer(interval)
	defer timer.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case rs, ok := <-lists:
			if !ok {
				lists = nil
				continue
			}
			want := make(map[string][]byte, len(rs))
			for _, r := range rs {
				r.Node = p.node
				if err := r.Validate(); err != nil {
					p.log.Warn("not publishing container", "name", r.Name, "problem", err.Error())
					continue
				}
				value, _ := json.Marshal(r)
				want[Key(p.prefix, r)] = value
			}
			p.want, p.known = want, true
		case <-timer.C:
		}
		next := interval
		if p.known {
			if err := p.sync(ctx, interval); err != nil {
				if ctx.Err() != nil {
					return nil
				}
				p.log.Warn("cannot publish container records; retrying", "node", p.node, "err", err, "retry in", retry)
				next = retry
			}
		}
		timer.Stop()
		timer.Reset(next)
	}
}

// sync renews the lease and makes etcd's records of this node equal want.
func (p *Publisher) sync(ctx context.Context, timeout time.Duration) error {
	ctx, cancel := context.WithTimeout(ctx, max(timeout, time.Second))
	defer cancel()
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.withdrawn {
		return nil
	}
	lease, renewed, err := etcdlease.Keep(ctx, p.cli, p.leaseID, p.ttlSec)
	if err != nil {
		return fmt.Errorf("container records: %w", err)
	}
	if p.leaseID != 0 && !renewed {
		p.log.Warn("container records' lease expired; publishing again", "node", p.node)
	}
	p.leaseID = lease
	resp, err := p.cli.Get(ctx, nodePrefix(p.prefix, p.node), clientv3.WithPrefix())
	if err != nil {
		return fmt.Errorf("read container records: %w", err)
	}
	var ops []clientv3.Op
	have := map[string]bool{}
	for _, kv := range resp.Kvs {
		key := string(kv.Key)
		have[key] = true
		value, wanted := p.want[key]
		switch {
		case !wanted:
			ops = append(ops, clientv3.OpDelete(key))
		case string(kv.Value) != string(value) || clientv3.LeaseID(kv.Lease) != p.leaseID:
			ops = append(ops, clientv3.OpPut(key, string(value), clientv3.WithLease(p.leaseID)))
		}
	}
	for key, value := range p.want {
		if !have[key] {
			ops = append(ops, clientv3.OpPut(key, string(value), clientv3.WithLease(p.leaseID)))
		}
	}
	// etcd's default limit is 128 operations per transaction.
	for len(ops) > 0 {
		n := min(len(ops), 100)
		if _, err := p.cli.Txn(ctx).Then(ops[:n]...).Commit(); err != nil {
			return fmt.Errorf("write container records: %w", err)
		}
		ops = ops[n:]
	}
	return nil
}

// Withdraw deletes this node's records, for a host leaving the fabric; Run
// writes nothing afterwards.
func (p *Publisher) Withdraw(ctx context.Context) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.withdrawn = true
	if _, err := p.cli.Delete(ctx, nodePrefix(p.prefix, p.node), clientv3.WithPrefix()); err != nil {
		return fmt.Errorf("delete container records of %s: %w", p.node, err)
	}
	if p.leaseID != 0 {
		p.cli.Revoke(ctx, p.leaseID)
	}
	return nil
}
