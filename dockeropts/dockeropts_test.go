package dockeropts

import (
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func opts(bridge string) Options {
	return Options{
		Pool:    netip.MustParsePrefix("10.244.0.0/16"),
		Subnet:  netip.MustParsePrefix("10.244.7.0/24"),
		Gateway: netip.MustParseAddr("10.244.7.1"),
		MTU:     1450,
		Bridge:  bridge,
	}
}

func TestEnvRoundTripAndAtomicWrite(t *testing.T) {
	path := filepath.Join(t.TempDir(), "docker.env")
	changed, err := WriteEnv(path, opts("docker0"))
	if err != nil || !changed {
		t.Fatalf("first write: changed=%v err=%v", changed, err)
	}
	data, _ := os.ReadFile(path)
	if !strings.Contains(string(data), `DOCKER_OPTS="--bip=10.244.7.1/24 --mtu=1450 --ip-masq=false"`) {
		t.Fatalf("env file:\n%s", data)
	}
	if changed, _ := WriteEnv(path, opts("docker0")); changed {
		t.Error("an unchanged lease rewrote the file")
	}
	back, err := ParseEnv(string(data))
	if err != nil || back != opts("docker0") {
		t.Fatalf("parse back: %+v %v", back, err)
	}
	leftovers, _ := filepath.Glob(filepath.Join(filepath.Dir(path), ".docker.env-*"))
	if len(leftovers) != 0 {
		t.Errorf("temporary files left: %v", leftovers)
	}
}

func TestCustomBridgeUsesBridgeNotBip(t *testing.T) {
	args := strings.Join(opts("fabric0").Args(), " ")
	if !strings.Contains(args, "--bridge=fabric0") || strings.Contains(args, "--bip") {
		t.Fatalf("a custom bridge must be passed with --bridge and without --bip (dockerd refuses both): %s", args)
	}
	if j := opts("fabric0").JSON(); !strings.Contains(j, `"bridge": "fabric0"`) || strings.Contains(j, "bip") {
		t.Fatalf("daemon.json: %s", j)
	}
}

func TestSystemdDropInDoesNotTieDockerToFabricd(t *testing.T) {
	unit := opts("docker0").Systemd("/run/fabric/docker.env")
	if strings.Contains(unit, "Requires=") {
		t.Fatalf("Requires= would restart dockerd and its containers with fabricd:\n%s", unit)
	}
	if !strings.Contains(unit, "EnvironmentFile=-/run/fabric/docker.env") || !strings.Contains(unit, "$DOCKER_OPTS") {
		t.Fatalf("drop-in does not use the options file:\n%s", unit)
	}
}

// With container DNS, containers are pointed at the gateway and search the
// fabric's domain; the file reads back the same.
func TestContainerDNSOptions(t *testing.T) {
	o := opts("docker0")
	o.DNSDomain = "fabric"
	env := o.Env()
	if !strings.Contains(env, `DOCKER_OPTS="--bip=10.244.7.1/24 --mtu=1450 --ip-masq=false --dns=10.244.7.1 --dns-search=fabric"`) {
		t.Errorf("env file:\n%s", env)
	}
	if back, err := ParseEnv(env); err != nil || back != o {
		t.Errorf("parse back: %+v %v", back, err)
	}
	if j := o.JSON(); !strings.Contains(j, `"dns": [`) || !strings.Contains(j, `"10.244.7.1"`) || !strings.Contains(j, `"dns-search": [`) {
		t.Errorf("daemon.json:\n%s", j)
	}
}

// With an IPv6 pool dockerd gets the host's /64 (--ipv6 --fixed-cidr-v6),
// in all three forms, and the env file reads back the same.
func TestIPv6Options(t *testing.T) {
	o := opts("docker0")
	o.SubnetV6 = netip.MustParsePrefix("fd00:10:244:7::/64")
	if args := strings.Join(o.Args(), " "); !strings.Contains(args, "--ipv6 --fixed-cidr-v6=fd00:10:244:7::/64") {
		t.Errorf("args %q", args)
	}
	if j := o.JSON(); !strings.Contains(j, `"fixed-cidr-v6": "fd00:10:244:7::/64"`) || !strings.Contains(j, `"ipv6": true`) {
		t.Errorf("daemon.json:\n%s", j)
	}
	back, err := ParseEnv(o.Env())
	if err != nil || back != o {
		t.Errorf("parse back: %+v %v", back, err)
	}
	if strings.Contains(opts("docker0").Env(), "v6") {
		t.Error("an IPv4-only host's options mention IPv6")
	}
}
