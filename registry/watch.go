package registry

import (
	"context"
	"log/slog"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/fabricnet/fabric/internal/etcdwatch"
)

// Watch sends the full current node set, sorted by name, first and then
// after every change; the newest set wins. Invalid records are skipped and
// logged once per key and problem. The channel is closed when ctx is done.
func Watch(ctx context.Context, cli *clientv3.Client, prefix string, logger *slog.Logger) <-chan []Node {
	if logger == nil {
		logger = slog.Default()
	}
	prefix = normPrefix(prefix)
	logged := map[string]string{} // key -> problem already logged
	return etcdwatch.Watch(ctx, cli, nodesPrefix(prefix), logger, func(kvs etcdwatch.KVs) ([]Node, bool) {
		nodes := make([]Node, 0, len(kvs))
		for key, value := range kvs {
			n, err := decodeNode(prefix, key, value)
			if err != nil {
				if logged[key] != err.Error() {
					logged[key] = err.Error()
					logger.Warn("skipping invalid node record", "key", key, "problem", err.Error())
				}
				continue
			}
			delete(logged, key)
			nodes = append(nodes, n)
		}
		for key := range logged {
			if _, ok := kvs[key]; !ok {
				delete(logged, key)
			}
		}
		sortNodes(nodes)
		return nodes, true
	})
}
