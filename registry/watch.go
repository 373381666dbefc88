package registry

import (
	"context"
	"log/slog"
	"reflect"
	"slices"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
)

// Watch sends the full current node set, sorted by name, first and then
// after every change. Bursts are coalesced but the latest state is always
// delivered. Watch errors (compaction, lost leader, etcd away) lead to a
// fresh listing. Invalid records are skipped and logged. The channel is
// closed when ctx is done.
func Watch(ctx context.Context, cli *clientv3.Client, prefix string, logger *slog.Logger) <-chan []Node {
	if logger == nil {
		logger = slog.Default()
	}
	out := make(chan []Node)
	latest := make(chan []Node, 1) // holds only the newest unsent state
	go deliver(ctx, latest, out)
	w := &watcher{cli: cli, prefix: normPrefix(prefix), log: logger, latest: latest, logged: map[string]string{}}
	go w.run(ctx)
	return out
}

// deliver forwards states to the consumer, replacing a waiting state by a
// newer one.
func deliver(ctx context.Context, latest <-chan []Node, out chan<- []Node) {
	defer close(out)
	for {
		var state []Node
		select {
		case <-ctx.Done():
			return
		case state = <-latest:
		}
		for sent := false; !sent; {
			select {
			case <-ctx.Done():
				return
			case out <- state:
				sent = true
			case state = <-latest:
			}
		}
	}
}

type watcher struct {
	cli    *clientv3.Client
	prefix string
	log    *slog.Logger
	latest chan []Node

	state    map[string]Node
	sent     []Node
	sentOnce bool
	logged   map[string]string // key -> problem already logged
}

func (w *watcher) run(ctx context.Context) {
	backoff := 200 * time.Millisecond
	for ctx.Err() == nil {
		rev, err := w.relist(ctx)
		if err != nil {
			w.log.Warn("cannot list node records; retrying", "err", err, "retry in", backoff)
			sleep(ctx, backoff)
			backoff = min(2*backoff, 5*time.Second)
			continue
		}
		backoff = 200 * time.Millisecond
		w.follow(ctx, rev)
		sleep(ctx, 100*time.Millisecond) // no hot loop if watches keep failing
	}
}

func (w *watcher) relist(ctx context.Context) (int64, error) {
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	resp, err := w.cli.Get(ctx, nodesPrefix(w.prefix), clientv3.WithPrefix())
	if err != nil {
		return 0, err
	}
	w.state = map[string]Node{}
	for _, kv := range resp.Kvs {
		w.apply(string(kv.Key), kv.Value)
	}
	w.publish()
	return resp.Header.Revision, nil
}

// follow applies watch events after rev until the watch fails.
func (w *watcher) follow(ctx context.Context, rev int64) {
	wctx, cancel := context.WithCancel(clientv3.WithRequireLeader(ctx))
	defer cancel()
	events := w.cli.Watch(wctx, nodesPrefix(w.prefix), clientv3.WithPrefix(), clientv3.WithRev(rev+1))
	for resp := range events {
		if err := resp.Err(); err != nil {
			if ctx.Err() == nil {
				w.log.Warn("node watch failed; listing again", "err", err)
			}
			return
		}
		for _, ev := range resp.Events {
			key := string(ev.Kv.Key)
			if ev.Type == clientv3.EventTypeDelete {
				delete(w.state, key)
				delete(w.logged, key)
				continue
			}
			w.apply(key, ev.Kv.Value)
		}
		w.publish()
	}
	if ctx.Err() == nil {
		w.log.Warn("node watch ended; listing again")
	}
}

func (w *watcher) apply(key string, value []byte) {
	n, err := decodeNode(w.prefix, key, value)
	if err != nil {
		delete(w.state, key)
		if w.logged[key] != err.Error() {
			w.logged[key] = err.Error()
			w.log.Warn("skipping invalid node record", "key", key, "problem", err.Error())
		}
		return
	}
	delete(w.logged, key)
	w.state[key] = n
}

// publish hands the current state to deliver if it differs from the last.
func (w *watcher) publish() {
	nodes := make([]Node, 0, len(w.state))
	for _, n := range w.state {
		nodes = append(nodes, n)
	}
	sortNodes(nodes)
	if w.sentOnce && reflect.DeepEqual(nodes, w.sent) {
		return
	}
	w.sent, w.sentOnce = nodes, true
	select { // drop an unsent older state; only this goroutine writes
	case <-w.latest:
	default:
	}
	w.latest <- slices.Clone(nodes) // the consumer may modify its copy
}

func sleep(ctx context.Context, d time.Duration) {
	select {
	case <-ctx.Done():
	case <-time.After(d):
	}
}
