// Package etcdwatch turns an etcd prefix into a stream of snapshots. Every
// watcher of fabric (node records, published ports, policy) is the same loop:
// list the prefix, watch from the revision after the listing, keep the whole
// prefix's content in memory, and hand a decoded snapshot to one reader after
// every change. A watch that fails (compaction, lost leader, etcd away) leads
// to a fresh listing, with one backoff for every failure.
package etcdwatch

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"maps"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/fabricnet/fabric/internal/latest"
)

// KVs is the content of the watched prefix: key -> value.
type KVs map[string][]byte

// Backoff bounds the wait before listing again after a failure.
const (
	minBackoff = 200 * time.Millisecond
	maxBackoff = 5 * time.Second
)

// Watch sends decode's result for the prefix's content after the first
// listing and after every change, until ctx ends; then the channel is closed.
// decode returns false to send nothing for this content (for instance while
// a stored value is malformed and the reader must keep the last good
// snapshot). A snapshot equal to the last one sent is not sent again. The
// newest snapshot wins: a slow reader misses intermediate ones, never the
// latest. decode runs on the watch goroutine only, so it may keep state
// (what it already logged).
func Watch[T any](ctx context.Context, cli *clientv3.Client, prefix string, log *slog.Logger, decode func(KVs) (T, bool)) <-chan T {
	if log == nil {
		log = slog.Default()
	}
	out := make(chan T, 1)
	go func() {
		defer close(out)
		w := &watcher[T]{cli: cli, prefix: prefix, log: log, decode: decode, out: out}
		backoff := minBackoff
		for ctx.Err() == nil {
			listed, err := w.follow(ctx)
			if ctx.Err() != nil {
				return
			}
			if listed {
				backoff = minBackoff
			}
			log.Warn("etcd watch interrupted; listing again", "prefix", prefix, "err", err, "in", backoff)
			select {
			case <-ctx.Done():
				return
			case <-time.After(backoff):
			}
			backoff = min(2*backoff, maxBackoff)
		}
	}()
	return out
}

type watcher[T any] struct {
	cli    *clientv3.Client
	prefix string
	log    *slog.Logger
	decode func(KVs) (T, bool)
	out    chan T

	sent []byte // JSON of the last snapshot sent: the reader may modify its copy
}

// follow lists the prefix, then applies watch events until the watch fails.
// listed reports whether the listing succeeded.
func (w *watcher[T]) follow(ctx context.Context) (listed bool, err error) {
	lctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	resp, err := w.cli.Get(lctx, w.prefix, clientv3.WithPrefix())
	cancel()
	if err != nil {
		return false, fmt.Errorf("list %s: %w", w.prefix, err)
	}
	kvs := KVs{}
	for _, kv := range resp.Kvs {
		kvs[string(kv.Key)] = kv.Value
	}
	w.send(kvs)
	wctx, cancelWatch := context.WithCancel(clientv3.WithRequireLeader(ctx))
	defer cancelWatch()
	events := w.cli.Watch(wctx, w.prefix, clientv3.WithPrefix(), clientv3.WithRev(resp.Header.Revision+1))
	for wr := range events {
		if err := wr.Err(); err != nil {
			return true, fmt.Errorf("watch %s: %w", w.prefix, err)
		}
		for _, ev := range wr.Events {
			if ev.Type == clientv3.EventTypeDelete {
				delete(kvs, string(ev.Kv.Key))
			} else {
				kvs[string(ev.Kv.Key)] = ev.Kv.Value
			}
		}
		if len(wr.Events) > 0 {
			w.send(kvs)
		}
	}
	return true, fmt.Errorf("watch %s closed", w.prefix)
}

func (w *watcher[T]) send(kvs KVs) {
	v, ok := w.decode(maps.Clone(kvs))
	if !ok {
		return
	}
	if fp, err := json.Marshal(v); err == nil {
		if w.sent != nil && bytes.Equal(fp, w.sent) {
			return
		}
		w.sent = fp
	}
	latest.Put(w.out, v) // only this goroutine sends
}

// EachValid decodes every value of a snapshot with decode and returns those
// that decode, in no particular order. A key that does not is skipped and
// logged once per key and problem (as "skipping invalid <what>"), so a
// stored typo neither hides the valid records nor floods the log; logged
// remembers what was said and must be kept by the caller between calls.
func EachValid[T any](kvs KVs, logged map[string]string, log *slog.Logger, what string, decode func(key string, value []byte) (T, error)) []T {
	out := make([]T, 0, len(kvs))
	for key, value := range kvs {
		v, err := decode(key, value)
		if err != nil {
			if logged[key] != err.Error() {
				logged[key] = err.Error()
				log.Warn("skipping invalid "+what, "key", key, "problem", err.Error())
			}
			continue
		}
		delete(logged, key)
		out = append(out, v)
	}
	for key := range logged {
		if _, ok := kvs[key]; !ok {
			delete(logged, key)
		}
	}
	return out
}
