// Package publish stores fabric-wide published ports in etcd under
// <prefix>/publish/<proto>-<port> and watches them. Every host forwards a
// published port to its target container wherever it runs (package nat).
package publish

import (
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"net/netip"
	"sort"
	"strconv"
	"strings"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/fabricnet/fabric/nat"
)

// record is the stored form of one published port.
type record struct {
	Proto    string   `json:"proto"`
	HostPort uint16   `json:"hostPort"`
	Target   string   `json:"target"`
	Hosts    []string `json:"hosts,omitempty"`
}

// Key is where a published port lives.
func Key(prefix, proto string, port uint16) string {
	return fmt.Sprintf("%s/publish/%s-%d", prefix, proto, port)
}

func decode(key string, value []byte) (nat.Publish, error) {
	var r record
	if err := json.Unmarshal(value, &r); err != nil {
		return nat.Publish{}, fmt.Errorf("etcd key %s: not a published port: %v", key, err)
	}
	target, err := netip.ParseAddrPort(r.Target)
	if err != nil {
		return nat.Publish{}, fmt.Errorf("etcd key %s: target %q: want address:port", key, r.Target)
	}
	p := nat.Publish{Proto: r.Proto, HostPort: r.HostPort, Target: target, Hosts: r.Hosts}
	if want := Key("", p.Proto, p.HostPort); !strings.HasSuffix(key, want) {
		return p, fmt.Errorf("etcd key %s: holds %s/%d, which belongs under %s", key, p.Proto, p.HostPort, want)
	}
	return p, nil
}

// BadRecord is a stored value that could not be read.
type BadRecord struct {
	Key     string `json:"key"`
	Problem string `json:"problem"`
}

// List returns every published port, sorted by protocol and port, and the
// keys whose values are malformed.
func List(ctx context.Context, cli *clientv3.Client, prefix string) ([]nat.Publish, []BadRecord, error) {
	out, bad, _, err := list(ctx, cli, prefix)
	return out, bad, err
}

func list(ctx context.Context, cli *clientv3.Client, prefix string) ([]nat.Publish, []BadRecord, int64, error) {
	resp, err := cli.Get(ctx, prefix+"/publish/", clientv3.WithPrefix())
	if err != nil {
		return nil, nil, 0, fmt.Errorf("etcd %s/publish/: %w", prefix, err)
	}
	var out []nat.Publish
	var bad []BadRecord
	for _, kv := range resp.Kvs {
		p, err := decode(string(kv.Key), kv.Value)
		if err != nil {
			bad = append(bad, BadRecord{Key: string(kv.Key), Problem: err.Error()})
			continue
		}
		out = append(out, p)
	}
	sort.Slice(out, func(i, j int) bool {
		if out[i].Proto != out[j].Proto {
			return out[i].Proto < out[j].Proto
		}
		return out[i].HostPort < out[j].HostPort
	})
	return out, bad, resp.Header.Revision, nil
}

// Add stores p after checking it against the pool and the ports already
// published; the put succeeds only if the key is still absent, so two
// operators publishing the same port at once cannot both win.
func Add(ctx context.Context, cli *clientv3.Client, prefix string, pool netip.Prefix, p nat.Publish) error {
	existing, _, err := List(ctx, cli, prefix)
	if err != nil {
		return err
	}
	if err := nat.ValidatePublish(p, pool, existing); err != nil {
		return err
	}
	data, _ := json.Marshal(record{Proto: p.Proto, HostPort: p.HostPort, Target: p.Target.String(), Hosts: p.Hosts})
	key := Key(prefix, p.Proto, p.HostPort)
	resp, err := cli.Txn(ctx).If(clientv3.Compare(clientv3.CreateRevision(key), "=", 0)).Then(clientv3.OpPut(key, string(data))).Commit()
	if err != nil {
		return fmt.Errorf("etcd %s: %w", key, err)
	}
	if !resp.Succeeded {
		return fmt.Errorf("%s/%d is already published (etcd key %s); delete it first", p.Proto, p.HostPort, key)
	}
	return nil
}

// Delete removes the published port proto/port.
func Delete(ctx context.Context, cli *clientv3.Client, prefix, proto string, port uint16) error {
	key := Key(prefix, proto, port)
	resp, err := cli.Delete(ctx, key)
	if err != nil {
		return fmt.Errorf("etcd %s: %w", key, err)
	}
	if resp.Deleted == 0 {
		return fmt.Errorf("%s/%d is not published", proto, port)
	}
	return nil
}

// ParseSpec reads "tcp:8080" or "8080/tcp" style port specs used by fabricctl.
func ParseSpec(s string) (proto string, port uint16, err error) {
	proto = "tcp"
	num := s
	if a, b, ok := strings.Cut(s, "/"); ok {
		num, proto = a, b
	} else if a, b, ok := strings.Cut(s, ":"); ok {
		proto, num = a, b
	}
	n, err := strconv.ParseUint(num, 10, 16)
	if err != nil || n == 0 {
		return "", 0, fmt.Errorf("port %q: want 1-65535, e.g. 8080/tcp", s)
	}
	if proto != "tcp" && proto != "udp" {
		return "", 0, fmt.Errorf("port %q: protocol %q: want tcp or udp", s, proto)
	}
	return proto, uint16(n), nil
}

// Watch sends the full set of published ports at once and after every
// change. Malformed values are logged by key and skipped.
func Watch(ctx context.Context, cli *clientv3.Client, prefix string, log *slog.Logger) <-chan []nat.Publish {
	out := make(chan []nat.Publish, 1)
	send := func(v []nat.Publish) {
		select {
		case <-out:
		default:
		}
		out <- v
	}
	go func() {
		defer close(out)
		for ctx.Err() == nil {
			pubs, bad, rev, err := list(ctx, cli, prefix)
			if err != nil {
				log.Warn("list published ports; retrying", "err", err)
				select {
				case <-ctx.Done():
					return
				case <-time.After(2 * time.Second):
				}
				continue
			}
			for _, b := range bad {
				log.Error("ignoring malformed published port", "key", b.Key, "problem", b.Problem)
			}
			send(pubs)
			// Watch from the revision after the list; any event triggers a
			// full re-list, so start, change and compaction share one path.
			wctx, cancel := context.WithCancel(clientv3.WithRequireLeader(ctx))
			wch := cli.Watch(wctx, prefix+"/publish/", clientv3.WithPrefix(), clientv3.WithRev(rev+1))
			for wr := range wch {
				if wr.Err() != nil || len(wr.Events) > 0 {
					break
				}
			}
			cancel()
		}
	}()
	return out
}
