// Package etcdlease keeps the etcd lease behind a host's records (its node
// record, its container names) alive one renewal at a time.
package etcdlease

import (
	"context"
	"errors"
	"fmt"

	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"
)

// Keep renews lease id with one keep-alive, or grants a new lease of ttlSec
// seconds when there is none yet (id 0) or etcd no longer knows it (it
// expired while this host was away, or etcd lost it). renewed reports that
// id lives on; a caller whose lease was lost (id != 0 && !renewed) must
// write its keys again under the new one.
func Keep(ctx context.Context, cli *clientv3.Client, id clientv3.LeaseID, ttlSec int64) (lease clientv3.LeaseID, renewed bool, err error) {
	if id != 0 {
		_, err := cli.KeepAliveOnce(ctx, id)
		switch {
		case err == nil:
			return id, true, nil
		case !errors.Is(err, rpctypes.ErrLeaseNotFound):
			return id, false, fmt.Errorf("renew lease %x: %w", int64(id), err)
		}
	}
	resp, err := cli.Grant(ctx, ttlSec)
	if err != nil {
		return 0, false, fmt.Errorf("grant lease: %w", err)
	}
	return resp.ID, false, nil
}
