package main

import (
	"os"
	"os/exec"
	"strings"
	"testing"

	"github.com/fabricnet/fabric/internal/etcdtest"
)

// TestFabricctlOverTLS runs the built fabricctl binary against a real etcd
// that serves TLS and requires client certificates.
func TestFabricctlOverTLS(t *testing.T) {
	bin := fabricctlPath
	c, f := etcdtest.StartTLS(t)
	ep := c.Endpoint(0)
	run := func(env []string, args ...string) (string, error) {
		cmd := exec.Command(bin, args...)
		cmd.Env = append(os.Environ(), env...)
		out, err := cmd.CombinedOutput()
		return string(out), err
	}
	tlsFlags := []string{"--etcd-endpoints", ep, "--etcd-ca-cert", f.CA, "--etcd-cert", f.Cert, "--etcd-key", f.Key}

	out, err := run(nil, append(tlsFlags, "ipam", "init", "--pool", "10.244.0.0/16")...)
	if err != nil || !strings.Contains(out, "pool 10.244.0.0/16, /24 per host") {
		t.Fatalf("ipam init over TLS: %v\n%s", err, out)
	}
	// The same files from the environment.
	out, err = run([]string{"FABRIC_ETCD_ENDPOINTS=" + ep, "FABRIC_ETCD_CA_CERT=" + f.CA, "FABRIC_ETCD_CERT=" + f.Cert, "FABRIC_ETCD_KEY=" + f.Key}, "ipam", "show")
	if err != nil || !strings.Contains(out, "pool 10.244.0.0/16, /24 per host, 0 leased") {
		t.Fatalf("ipam show over TLS: %v\n%s", err, out)
	}

	for _, tc := range []struct {
		name string
		args []string
		want string
	}{
		{"wrong CA", []string{"--etcd-endpoints", ep, "--etcd-ca-cert", etcdtest.UnrelatedCA(t), "--etcd-cert", f.Cert, "--etcd-key", f.Key},
			"fabricctl: etcd unreachable: etcd " + ep + ": tls: failed to verify certificate: x509: certificate signed by unknown authority"},
		{"no client certificate", []string{"--etcd-endpoints", ep, "--etcd-ca-cert", f.CA},
			"fabricctl: etcd unreachable: etcd " + ep + ": remote error: tls: certificate required (the server requires a client certificate: set --etcd-cert and --etcd-key)"},
		{"missing key file", []string{"--etcd-endpoints", ep, "--etcd-ca-cert", f.CA, "--etcd-cert", f.Cert, "--etcd-key", "/nonexistent/key.pem"},
			"etcdKey: cannot read /nonexistent/key.pem: no such file or directory"}, // refused before dialling, as fabricd does

		{"TLS files with http", []string{"--etcd-endpoints", "http://127.0.0.1:1", "--etcd-ca-cert", f.CA},
			"is set but no etcd endpoint uses https://"},
	} {
		out, err := run(nil, append(tc.args, "ipam", "show")...)
		if err == nil || !strings.Contains(out, tc.want) {
			t.Errorf("%s: %v, output:\n%s\nwant it to contain %q", tc.name, err, out, tc.want)
		}
	}
}
