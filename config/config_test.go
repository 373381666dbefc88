package config

import (
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/spf13/pflag"

	"github.com/fabricnet/fabric/internal/etcdtest"
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
		{[]string{"--encapsulation", "gre"}, `encapsulation: "gre": want auto, ipip, vxlan`},
		{[]string{"--pool", "10.244.1.0/16"}, "did you mean 10.244.0.0/16"},
		{[]string{"--pool", "10.244.0.0/16", "--subnet-len", "16"}, "subnetLen: 16 must be longer"},
		{[]string{"--pool", "10.244.0.0/16", "--pool-v6", "10.0.0.0/8"}, "poolV6: \"10.0.0.0/8\" is not an IPv6 CIDR"},
		{[]string{"--pool-v6", "fd00:10:244::/48"}, "poolV6: needs pool"},
		{[]string{"--pool", "10.244.0.0/16", "--pool-v6", "fd00:10:244::/60"}, "poolV6: IPv6 pool fd00:10:244::/60 has fewer /64 subnets than the IPv4 pool"},
		{[]string{"--etcd-endpoints", "10.0.0.1:2379"}, "etcdEndpoints"},
		{[]string{"--vxlan-port", "70000"}, "vxlanPort: 70000 outside 1-65535"},
		{[]string{"--bgp-hold-time", "6s", "--bgp-keepalive", "3s"}, "keepaliveInterval"},
		{[]string{"--subnet-ttl", "5s"}, "subnetTTL"},
		{[]string{"--metrics-address", "0.0.0.0"}, `metricsAddress: "0.0.0.0" is not IP:port`},
		{[]string{"--metrics-address", "localhost:9815"}, "metricsAddress"},
		{[]string{"--metrics-address", "127.0.0.1:0"}, "metricsAddress"},
		{[]string{"--etcd-timeout", "0s"}, "etcdTimeout: 0s: want 100ms to 5m"},
		{[]string{"--node-name", "host1\nhost2"}, `nodeName: "host1\nhost2" is not valid`},
		{[]string{"--bgp-hold-time", "100000h"}, "holdTime: 100000h0m0s: BGP needs 3s to 65535s"},
		{[]string{"--graceful-restart-time", "5000s"}, "gracefulRestartTime: 1h23m20s"},
		{[]string{"--graceful-restart-time", "1500ms"}, "gracefulRestartTime: 1.5s: want whole seconds"},
		{[]string{"--bfd-interval", "5ms"}, "bfdInterval: 5ms: want 0 (off) or whole milliseconds from 10ms to 10s"},
		{[]string{"--bfd-multiplier", "0"}, "bfdMultiplier: 0 outside 1-255"},
		{[]string{"--encryption", "ipsec"}, `encryption: "ipsec": want off, wireguard, wireguard-optional`},
		{[]string{"--encryption", "wireguard", "--encapsulation", "vxlan"}, "encryption: wireguard sends nothing in clear, but encapsulation vxlan does"},
		{[]string{"--encryption", "wireguard-optional", "--wireguard-port", "4789"}, "wireguardPort: 4789 is also the VXLAN or BGP port"},
		{[]string{"--wireguard-implementation", "boringtun"}, `wireguardImplementation: "boringtun": want auto, kernel or userspace`},
		{[]string{"--state-dir", "var/lib/fabric"}, `stateDir: "var/lib/fabric": want an absolute path`},
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

func TestMetricsAddress(t *testing.T) {
	for _, tc := range []struct {
		args, env []string
		want      string
	}{
		{nil, nil, "127.0.0.1:9815"}, // loopback only unless told otherwise
		{nil, []string{"FABRIC_METRICS_ADDRESS=10.0.0.11:9815"}, "10.0.0.11:9815"},
		{[]string{"--metrics-address", ":9900"}, []string{"FABRIC_METRICS_ADDRESS=10.0.0.11:9815"}, ":9900"},
		{[]string{"--metrics-address", ""}, nil, ""}, // off
	} {
		cfg, err := Load(append([]string{"--machine-id", "m"}, tc.args...), tc.env)
		if err != nil {
			t.Fatalf("%v %v: %v", tc.args, tc.env, err)
		}
		if cfg.MetricsAddress != tc.want {
			t.Errorf("%v %v: metricsAddress=%q, want %q", tc.args, tc.env, cfg.MetricsAddress, tc.want)
		}
	}
}

func TestEtcdTLSSettings(t *testing.T) {
	f := etcdtest.WriteTLSFiles(t)
	https := []string{"--etcd-endpoints", "https://10.0.0.5:2379"}
	cfg, err := Load(append([]string{"--machine-id", "m", "--etcd-ca-cert", f.CA, "--etcd-cert", f.Cert, "--etcd-key", f.Key}, https...), nil)
	if err != nil {
		t.Fatal(err)
	}
	if got := cfg.EtcdTLSFiles(); got.CA != f.CA || got.Cert != f.Cert || got.Key != f.Key {
		t.Errorf("flags not applied: %+v", got)
	}
	cfg, err = Load([]string{"--machine-id", "m"}, []string{
		"FABRIC_ETCD_ENDPOINTS=https://10.0.0.5:2379", "FABRIC_ETCD_CA_CERT=" + f.CA, "FABRIC_ETCD_CERT=" + f.Cert, "FABRIC_ETCD_KEY=" + f.Key,
	})
	if err != nil {
		t.Fatal(err)
	}
	if cfg.EtcdCACert != f.CA || cfg.EtcdCert != f.Cert || cfg.EtcdKey != f.Key {
		t.Errorf("environment not applied: %+v", cfg.EtcdTLSFiles())
	}
	file := filepath.Join(t.TempDir(), "fabricd.yaml")
	os.WriteFile(file, []byte("etcdEndpoints: [https://10.0.0.5:2379]\netcdCACert: "+f.CA+"\n"), 0o600)
	if cfg, err = Load([]string{"--config", file, "--machine-id", "m"}, nil); err != nil || cfg.EtcdCACert != f.CA {
		t.Errorf("etcdCACert from file: %v, %+v", err, cfg)
	}
	// https:// without a CA: the system roots.
	if _, err := Load(append([]string{"--machine-id", "m"}, https...), nil); err != nil {
		t.Errorf("https without CA must be allowed: %v", err)
	}
}

func TestEtcdTLSInvalid(t *testing.T) {
	f := etcdtest.WriteTLSFiles(t)
	dir := t.TempDir()
	missing := filepath.Join(dir, "missing.pem")
	garbage := filepath.Join(dir, "garbage.pem")
	os.WriteFile(garbage, []byte("junk\n"), 0o600)
	https := "https://10.0.0.5:2379"
	for _, tc := range []struct {
		args []string
		want []string
	}{
		{[]string{"--etcd-endpoints", https, "--etcd-cert", f.Cert}, []string{"etcdKey: missing: etcdCert " + f.Cert}},
		{[]string{"--etcd-endpoints", https, "--etcd-key", f.Key}, []string{"etcdCert: missing: etcdKey " + f.Key}},
		{[]string{"--etcd-ca-cert", f.CA}, []string{"etcdCACert: " + f.CA + " is set but no etcd endpoint uses https://"}},
		{[]string{"--etcd-endpoints", "http://a:2379,http://b:2379", "--etcd-cert", f.Cert, "--etcd-key", f.Key}, []string{"etcdCert: " + f.Cert + " is set but no etcd endpoint", "etcdKey: " + f.Key + " is set"}},
		{[]string{"--etcd-endpoints", https, "--etcd-ca-cert", missing}, []string{"etcdCACert: cannot read " + missing + ": no such file or directory"}},
		{[]string{"--etcd-endpoints", https, "--etcd-cert", f.Cert, "--etcd-key", missing}, []string{"etcdKey: cannot read " + missing}},
		{[]string{"--etcd-endpoints", https, "--etcd-ca-cert", garbage}, []string{"etcdCACert: ", garbage, "no PEM-encoded certificate"}},
		{[]string{"--etcd-endpoints", https, "--etcd-cert", garbage, "--etcd-key", f.Key}, []string{"etcdCert: ", garbage, "certificate input"}},
		{[]string{"--etcd-endpoints", https, "--etcd-cert", f.CA, "--etcd-key", f.Key}, []string{"etcdCert: ", f.CA, "does not match"}},
	} {
		_, err := Load(append([]string{"--machine-id", "m"}, tc.args...), nil)
		for _, w := range tc.want {
			if err == nil || !strings.Contains(err.Error(), w) {
				t.Errorf("%v: error %v, want it to mention %q", tc.args, err, w)
			}
		}
	}
	if os.Getuid() != 0 {
		unreadable := filepath.Join(dir, "unreadable.pem")
		os.WriteFile(unreadable, []byte("x"), 0o000)
		_, err := Load([]string{"--machine-id", "m", "--etcd-endpoints", https, "--etcd-ca-cert", unreadable}, nil)
		if err == nil || !strings.Contains(err.Error(), "etcdCACert: cannot read "+unreadable+": permission denied") {
			t.Errorf("unreadable CA: %v", err)
		}
	}
}

func TestFileDurationsWithUnits(t *testing.T) {
	file := filepath.Join(t.TempDir(), "fabricd.yaml")
	os.WriteFile(file, []byte("holdTime: 6s\nkeepaliveInterval: 2s\nsubnetTTL: 48h\nresync: 1m\ngracefulRestartTime: 30s\n"), 0o600)
	cfg, err := Load([]string{"--config", file, "--machine-id", "m"}, nil)
	if err != nil {
		t.Fatal(err)
	}
	if cfg.HoldTime != 6*time.Second || cfg.KeepaliveInterval != 2*time.Second || cfg.SubnetTTL != 48*time.Hour || cfg.Resync != time.Minute || cfg.GracefulRestartTime != 30*time.Second {
		t.Fatalf("durations from the file: hold %s keepalive %s subnetTTL %s resync %s", cfg.HoldTime, cfg.KeepaliveInterval, cfg.SubnetTTL, cfg.Resync)
	}
	os.WriteFile(file, []byte("holdTime: 9\n"), 0o600)
	if _, err := Load([]string{"--config", file, "--machine-id", "m"}, nil); err == nil || !strings.Contains(err.Error(), "unit") {
		t.Fatalf("a bare number must be refused (it would mean nanoseconds), got %v", err)
	}
}

func TestMD5PasswordLongerThanLinuxTakes(t *testing.T) {
	file := filepath.Join(t.TempDir(), "fabricd.yaml")
	long := strings.Repeat("k", 95)
	if err := os.WriteFile(file, []byte("peers:\n- name: tor\n  address: 10.0.0.1\n  asn: 65000\n  password: "+long+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	_, err := Load([]string{"--machine-id", "m", "--config", file}, nil)
	if err == nil || !strings.Contains(err.Error(), "peers[0] (tor).password: 95 bytes: Linux takes TCP MD5 keys of at most 80 bytes") {
		t.Errorf("95-byte MD5 password: %v", err)
	}
}

// Every setting has an environment variable, parsed as its flag is; the
// two that were silently ignored before are among them.
func TestEveryFlagHasAnEnvironmentVariable(t *testing.T) {
	cfg, err := Load([]string{"--machine-id", "m"}, []string{
		"FABRIC_MESH=false", "FABRIC_BGP_HOLD_TIME=6s", "FABRIC_BGP_KEEPALIVE=2s", "FABRIC_CROSS_SUBNET=true",
		"FABRIC_GRACEFUL_RESTART_TIME=30s", "FABRIC_CONTAINER_DNS=false", "FABRIC_ETCD_ENDPOINTS=http://10.0.0.5:2379,http://10.0.0.6:2379",
		"FABRIC_ASN=65001", "FABRIC_SUBNET_LEN=26",
	})
	if err != nil {
		t.Fatal(err)
	}
	if cfg.Mesh || cfg.HoldTime != 6*time.Second || cfg.KeepaliveInterval != 2*time.Second || !cfg.CrossSubnet ||
		cfg.GracefulRestartTime != 30*time.Second || cfg.ContainerDNS || len(cfg.EtcdEndpoints) != 2 || cfg.ASN != 65001 || cfg.SubnetLen != 26 {
		t.Errorf("environment not applied: %+v", cfg)
	}
	// Flags still win.
	cfg, err = Load([]string{"--machine-id", "m", "--mesh=true"}, []string{"FABRIC_MESH=false"})
	if err != nil || !cfg.Mesh {
		t.Errorf("--mesh=true under FABRIC_MESH=false: mesh=%v err=%v", cfg.Mesh, err)
	}
	// Every settings flag (not the --cleanup action) has one.
	c := Defaults()
	fs := newFlagSet(&c, new(string))
	n := 0
	fs.VisitAll(func(f *pflag.Flag) {
		if !actionFlags[f.Name] {
			n++
			if _, err := Load([]string{"--machine-id", "m"}, []string{EnvName(f.Name) + "=@@"}); err != nil && strings.Contains(err.Error(), "not a fabricd setting") {
				t.Errorf("%s: %v", EnvName(f.Name), err)
			}
		}
	})
	if n < 35 {
		t.Errorf("only %d settings flags", n)
	}
}

func TestUnknownEnvironmentRefused(t *testing.T) {
	_, err := Load([]string{"--machine-id", "m"}, []string{"FABRIC_HOLD_TIME=1s", "FABRIC_MESH=maybe", "FABRIC_CLEANUP=1", "HOME=/root"})
	if err == nil {
		t.Fatal("accepted")
	}
	for _, want := range []string{
		"environment FABRIC_HOLD_TIME: not a fabricd setting (did you mean FABRIC_BGP_HOLD_TIME?)",
		`environment FABRIC_MESH="maybe": invalid argument "maybe" for "--mesh" flag: must be true or false`,
		"environment FABRIC_CLEANUP: not a fabricd setting",
	} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q lacks %q", err, want)
		}
	}
	if strings.Contains(err.Error(), "HOME") {
		t.Errorf("a variable outside FABRIC_ named: %v", err)
	}
}

// A file's problems are named with their lines, all at once.
func TestFileErrorsHaveLineNumbers(t *testing.T) {
	file := filepath.Join(t.TempDir(), "fabricd.yaml")
	os.WriteFile(file, []byte(`etcdEndpoints: [http://10.0.0.5:2379]
asn: "65000"
holdtime: 9s
mesh: maybe
holdTime: 9
encapsulation: vxlan
encapsulation: ipip
peers:
  - name: tor1
`), 0o644)
	_, err := Load([]string{"--config", file, "--machine-id", "m"}, nil)
	if err == nil {
		t.Fatal("accepted")
	}
	for _, want := range []string{
		file + `:2: asn: want a whole number, without quotes, not string "65000"`,
		file + `:3: unknown setting "holdtime" (did you mean holdTime?)`,
		file + `:4: mesh: want true or false, not string "maybe"`,
		file + `:5: holdTime: want a duration with a unit, like "9s" or "24h", not 9`,
		file + `:7: encapsulation set twice (first at line 6)`,
	} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error lacks %q:\n%v", want, err)
		}
	}
}

// docs/operations.md carries the settings table generated from the code.
func TestSettingsTableInDocs(t *testing.T) {
	table := SettingsTable()
	if strings.Count(table, "\n") < 37 || strings.Contains(table, "| `` |") {
		t.Fatalf("table incomplete (a flag without its file key?):\n%s", table)
	}
	doc, err := os.ReadFile("../docs/operations.md")
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(doc), table) {
		t.Errorf("docs/operations.md lacks the current settings table; regenerate it with `fabricd --settings-table`:\n%s", table)
	}
}

// TestBFDPeerNeedsBFD: a router with bfd: true needs BFD on, and one hop.
func TestBFDPeerNeedsBFD(t *testing.T) {
	for _, tc := range []struct {
		file, want string
	}{
		{"bfdInterval: 0s\npeers:\n- name: tor\n  address: 10.0.0.1\n  asn: 65000\n  bfd: true\n", "peers[0] (tor).bfd: true, but bfdInterval is 0"},
		{"peers:\n- name: tor\n  address: 10.0.0.1\n  asn: 65000\n  multihop: 3\n  bfd: true\n", "single hop"},
	} {
		file := filepath.Join(t.TempDir(), "fabricd.yaml")
		os.WriteFile(file, []byte(tc.file), 0o600)
		_, err := Load([]string{"--config", file, "--machine-id", "m"}, nil)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%q: error %v, want it to mention %q", tc.file, err, tc.want)
		}
	}
}

// TestEveryDurationReadsWithUnits: each duration setting takes "250ms" in
// the file, as the settings table says (a setting left out of duration.go
// would want nanoseconds).
func TestEveryDurationReadsWithUnits(t *testing.T) {
	typ := reflect.TypeFor[Config]()
	for i := range typ.NumField() {
		f := typ.Field(i)
		key, _, _ := strings.Cut(f.Tag.Get("json"), ",")
		if f.Type != reflect.TypeFor[time.Duration]() || key == "" || key == "-" {
			continue
		}
		file := filepath.Join(t.TempDir(), "fabricd.yaml")
		os.WriteFile(file, []byte(key+": 250ms\n"), 0o600)
		_, err := Load([]string{"--config", file, "--machine-id", "m"}, nil)
		if err != nil && strings.Contains(err.Error(), "whole number") {
			t.Errorf("%s: 250ms refused: %v", key, err)
		}
	}
}

// fabricctl refuses a misspelt setting in the environment (it would talk to
// another etcd than meant) but leaves other FABRIC_* variables alone.
func TestMisspeltEnv(t *testing.T) {
	err := MisspeltEnv([]string{"FABRIC_ETCD_ENDPOINT=http://10.0.0.1:2379", "FABRIC_BIN=/x", "FABRIC_REQUIRE_ALL=1",
		"FABRIC_TIME_SCALE=2", "FABRIC_ETCD_ENDPOINTS=http://10.0.0.2:2379", "FABRIC_CONFIG=/etc/fabric/fabricd.yaml", "HOME=/root"})
	if err == nil || err.Error() != "environment FABRIC_ETCD_ENDPOINT: not a setting (did you mean FABRIC_ETCD_ENDPOINTS?)" {
		t.Errorf("got %v", err)
	}
}

// fabricctl's settings are checked as fabricd checks them, by name.
func TestValidateClient(t *testing.T) {
	c := Defaults()
	c.EtcdEndpoints = []string{"127.0.0.1:1"}
	if err := c.ValidateClient(); err == nil || !strings.Contains(err.Error(), `etcdEndpoints: "127.0.0.1:1" is not a URL`) {
		t.Errorf("got %v", err)
	}
	c.EtcdEndpoints = []string{"http://127.0.0.1:2379"}
	if err := c.ValidateClient(); err != nil {
		t.Errorf("good endpoint refused: %v", err)
	}
}
