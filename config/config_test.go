package config

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestPrecedenceFileEnvFlags(t *testing.T) {
	file := filepath.Join(t.TempDir(), "fabricd.yaml")
	os.WriteFile(file, []byte("nodeName: from-file\nvxlanPort: 8472\nasn: 65001\npeers:\n- name: tor\n  address: 192.168.100.1\n  asn: 65000\n"), 0o600)
	cfg, err := Load(
		[]string{"--config", file, "--machine-id", "m1", "--asn", "65002"},
		[]string{"FABRIC_NODE_NAME=from-env", "FABRIC_VXLAN_PORT=9000", "PATH=/bin"},
	)
	if err != nil {
		t.Fatal(err)
	}
	if cfg.NodeName != "from-env" {
		t.Errorf("env must override file: nodeName=%q", cfg.NodeName)
	}
	if cfg.VXLANPort != 9000 {
		t.Errorf("env must override file: vxlanPort=%d", cfg.VXLANPort)
	}
	if cfg.ASN != 65002 {
		t.Errorf("flag must override file: asn=%d", cfg.ASN)
	}
	if len(cfg.Peers) != 1 || cfg.Peers[0].ASN != 65000 {
		t.Errorf("peers from file lost: %+v", cfg.Peers)
	}
}

func TestInvalidSettingsNamed(t *testing.T) {
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"--encapsulation", "gre"}, `encapsulation: "gre": want ipip, vxlan or auto`},
		{[]string{"--pool", "10.244.1.0/16"}, "did you mean 10.244.0.0/16"},
		{[]string{"--pool", "10.244.0.0/16", "--subnet-len", "16"}, "subnetLen: 16 must be longer"},
		{[]string{"--etcd-endpoints", "10.0.0.1:2379"}, "etcdEndpoints"},
		{[]string{"--vxlan-port", "70000"}, "vxlanPort: 70000 outside 1-65535"},
		{[]string{"--bgp-hold-time", "6s", "--bgp-keepalive", "3s"}, "keepaliveInterval"},
		{[]string{"--subnet-ttl", "5s"}, "subnetTTL"},
	} {
		_, err := Load(append([]string{"--machine-id", "m"}, tc.args...), nil)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%v: error %v, want it to mention %q", tc.args, err, tc.want)
		}
	}
}

func TestUnknownFileKeyRefused(t *testing.T) {
	file := filepath.Join(t.TempDir(), "fabricd.yaml")
	os.WriteFile(file, []byte("vxlanPrt: 8472\n"), 0o600)
	_, err := Load([]string{"--config", file, "--machine-id", "m"}, nil)
	if err == nil || !strings.Contains(err.Error(), "vxlanPrt") {
		t.Fatalf("a misspelt key must be refused by name, got %v", err)
	}
}

func TestMissingMachineID(t *testing.T) {
	_, err := Load([]string{"--machine-id-file", "/nonexistent/machine-id"}, nil)
	if err == nil || !strings.Contains(err.Error(), "machineIDFile") {
		t.Fatalf("want a machineIDFile error, got %v", err)
	}
}
