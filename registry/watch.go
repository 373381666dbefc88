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
		nodes := etcdwatch.EachValid(kvs, logged, logger, "node record", func(key string, value []byte) (Node, error) {
			return decodeNode(prefix, key, value)
		})
		sortNodes(nodes)
		return nodes, true
	})
}
