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

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/fabricnet/fabric/internal/etcdwatch"
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

func decode(key string, value []byte) (nat.PublishedPort, error) {
	var r record
	if err := json.Unmarshal(value, &r); err != nil {
		return nat.PublishedPort{}, fmt.Errorf("etcd key %s: not a published port: %v", key, err)
	}
	target, err := netip.ParseAddrPort(r.Target)
	if err != nil {
		return nat.PublishedPort{}, fmt.Errorf("etcd key %s: target %q: want address:port", key, r.Target)
	}
	p := nat.PublishedPort{Proto: r.Proto, HostPort: r.HostPort, Target: target, Hosts: r.Hosts}
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
func List(ctx context.Context, cli *clientv3.Client, prefix string) ([]nat.PublishedPort, []BadRecord, error) {
	resp, err := cli.Get(ctx, prefix+"/publish/", clientv3.WithPrefix())
	if err != nil {
		return nil, nil, fmt.Errorf("etcd %s/publish/: %w", prefix, err)
	}
	kvs := etcdwatch.KVs{}
	for _, kv := range resp.Kvs {
		kvs[string(kv.Key)] = kv.Value
	}
	pubs, bad := decodeAll(kvs)
	return pubs, bad, nil
}

// decodeAll decodes every stored published port, sorted by protocol and
// port, and names the keys whose values are malformed.
func decodeAll(kvs etcdwatch.KVs) ([]nat.PublishedPort, []BadRecord) {
	var out []nat.PublishedPort
	var bad []BadRecord
	for key, value := range kvs {
		p, err := decode(key, value)
		if err != nil {
			bad = append(bad, BadRecord{Key: key, Problem: err.Error()})
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
	sort.Slice(bad, func(i, j int) bool { return bad[i].Key < bad[j].Key })
	return out, bad
}

// Add stores p after checking it against the fabric (the pool and the
// networks' subnets) and the ports already
// published; the put succeeds only if the key is still absent, so two
// operators publishing the same port at once cannot both win.
func Add(ctx context.Context, cli *clientv3.Client, prefix string, fabric []netip.Prefix, p nat.PublishedPort) error {
	existing, _, err := List(ctx, cli, prefix)
	if err != nil {
		return err
	}
	if err := nat.ValidatePublish(p, fabric, existing, nil); err != nil {
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
// change; the newest set wins. Malformed values are logged by key once and
// skipped.
func Watch(ctx context.Context, cli *clientv3.Client, prefix string, log *slog.Logger) <-chan []nat.PublishedPort {
	logged := map[string]string{}
	return etcdwatch.Watch(ctx, cli, prefix+"/publish/", log, func(kvs etcdwatch.KVs) ([]nat.PublishedPort, bool) {
		pubs, bad := decodeAll(kvs)
		for _, b := range bad {
			if logged[b.Key] != b.Problem {
				log.Error("ignoring malformed published port", "key", b.Key, "problem", b.Problem)
			}
		}
		clear(logged)
		for _, b := range bad {
			logged[b.Key] = b.Problem
		}
		return pubs, true
	})
}
