package etcdclient_test

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/fabricnet/fabric/internal/etcdclient"
	"github.com/fabricnet/fabric/internal/etcdtest"
	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
)

func files(f etcdtest.TLSFiles) etcdclient.TLSFiles {
	return etcdclient.TLSFiles{CA: f.CA, Cert: f.Cert, Key: f.Key}
}

func TestTLSPutGet(t *testing.T) {
	c, f := etcdtest.StartTLS(t)
	cli, err := etcdclient.New(c.Endpoints(), files(f), 5*time.Second, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer cli.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if _, err := cli.Put(ctx, "k", "v"); err != nil {
		t.Fatalf("put over TLS: %v", err)
	}
	resp, err := cli.Get(ctx, "k")
	if err != nil || len(resp.Kvs) != 1 || string(resp.Kvs[0].Value) != "v" {
		t.Fatalf("get over TLS: %v %v", resp, err)
	}
	if err := etcdclient.Diagnose(ctx, c.Endpoints(), files(f)); err != nil {
		t.Fatalf("diagnose of a working endpoint: %v", err)
	}
}

// TestTLSRefused checks that a client without a client certificate, or
// with the wrong CA, fails, and that Diagnose says why.
func TestTLSRefused(t *testing.T) {
	c, f := etcdtest.StartTLS(t)
	other := etcdtest.WriteTLSFiles(t)
	for _, tc := range []struct {
		name  string
		files etcdclient.TLSFiles
		want  string
	}{
		{"no client certificate", etcdclient.TLSFiles{CA: f.CA}, "certificate required (the server requires a client certificate: set --etcd-cert and --etcd-key)"},
		{"wrong CA", etcdclient.TLSFiles{CA: etcdtest.UnrelatedCA(t), Cert: f.Cert, Key: f.Key}, "x509: certificate signed by unknown authority"},
		{"client certificate of another CA", etcdclient.TLSFiles{CA: f.CA, Cert: other.Cert, Key: other.Key}, "etcd refused the client certificate " + other.Cert + ": remote error: tls: unknown certificate authority"},
		{"no TLS files", etcdclient.TLSFiles{}, "x509: certificate signed by unknown authority"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cli, err := etcdclient.New(c.Endpoints(), tc.files, time.Second, nil)
			if err != nil {
				t.Fatal(err)
			}
			defer cli.Close()
			ctx, cancel := context.WithTimeout(context.Background(), time.Second)
			defer cancel()
			if _, err := cli.Put(ctx, "k", "v"); err == nil {
				t.Fatal("put succeeded")
			}
			ctx, cancel = context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			err = etcdclient.Diagnose(ctx, c.Endpoints(), tc.files)
			want := "etcd " + c.Endpoint(0) + ": "
			if err == nil || !strings.HasPrefix(err.Error(), want) || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("diagnose: %v, want %q...%q", err, want, tc.want)
			}
		})
	}
}

func TestBadFilesNamed(t *testing.T) {
	dir := t.TempDir()
	garbage := filepath.Join(dir, "garbage.pem")
	os.WriteFile(garbage, []byte("not a certificate\n"), 0o600)
	_, f := etcdtest.StartTLS(t) // only for valid files
	other := etcdtest.UnrelatedCA(t)
	missing := filepath.Join(dir, "missing.pem")
	eps := []string{"https://127.0.0.1:2379"}
	for _, tc := range []struct {
		name  string
		files etcdclient.TLSFiles
		eps   []string
		want  []string
	}{
		{"missing CA", etcdclient.TLSFiles{CA: missing}, eps, []string{"etcd CA certificate", missing, "no such file"}},
		{"garbage CA", etcdclient.TLSFiles{CA: garbage}, eps, []string{garbage, "no PEM-encoded certificate"}},
		{"garbage cert", etcdclient.TLSFiles{Cert: garbage, Key: f.Key}, eps, []string{garbage, "certificate input"}},
		{"key of another cert", etcdclient.TLSFiles{Cert: other, Key: f.Key}, eps, []string{other, f.Key}},
		{"cert without key", etcdclient.TLSFiles{Cert: f.Cert}, eps, []string{f.Cert, "without its key"}},
		{"key without cert", etcdclient.TLSFiles{Key: f.Key}, eps, []string{f.Key, "without a client certificate"}},
		{"TLS with http only", files(f), []string{"http://127.0.0.1:2379"}, []string{"no endpoint uses https://"}},
	} {
		_, err := etcdclient.New(tc.eps, tc.files, time.Second, nil)
		if err == nil {
			t.Errorf("%s: no error", tc.name)
			continue
		}
		for _, w := range tc.want {
			if !strings.Contains(err.Error(), w) {
				t.Errorf("%s: error %q does not mention %q", tc.name, err, w)
			}
		}
	}
}

// The agent retries what Unavailable accepts and gives up on the rest: a
// leader change must be retried, a refusal must not loop for ever.
func TestUnavailable(t *testing.T) {
	cases := []struct {
		err  error
		want bool
	}{
		{rpctypes.ErrTimeoutDueToLeaderFail, true},
		{fmt.Errorf("acquire: %w", rpctypes.ErrTimeoutDueToLeaderFail), true},
		{rpctypes.ErrNoLeader, true},
		{rpctypes.ErrLeaderChanged, true},
		{rpctypes.ErrTimeout, true},
		{fmt.Errorf("read leases: %w", context.DeadlineExceeded), true},
		{rpctypes.ErrPermissionDenied, false},
		{rpctypes.ErrCompacted, false},
		{errors.New("subnet 10.0.0.0/24 already held"), false},
		{nil, false},
	}
	for _, c := range cases {
		if got := etcdclient.Unavailable(c.err); got != c.want {
			t.Errorf("Unavailable(%v) = %v, want %v", c.err, got, c.want)
		}
	}
	// And what a client really gets from a member that is down.
	cluster := etcdtest.Start(t)
	cli := cluster.Client(t)
	cluster.StopMember(0)
	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	_, err := cli.Put(ctx, "k", "v")
	if !etcdclient.Unavailable(err) {
		t.Errorf("put to a stopped member: %v, not recognised as unavailable", err)
	}
}
