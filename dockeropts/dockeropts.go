// Package dockeropts renders the options dockerd needs to use this host's
// lease, like flannel's subnet.env and mk-docker-opts: an environment file, a
// daemon.json fragment and a systemd drop-in.
package dockeropts

import (
	"encoding/json"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
)

// Options are the facts dockerd needs.
type Options struct {
	Pool    netip.Prefix // the whole fabric pool
	Subnet  netip.Prefix // this host's lease
	Gateway netip.Addr   // first address of Subnet, the bridge address
	// SubnetV6 is this host's IPv6 subnet (invalid: IPv4 only): dockerd
	// gives containers addresses in it (--ipv6 --fixed-cidr-v6) and puts
	// its first address on the bridge as their IPv6 gateway.
	SubnetV6 netip.Prefix
	MTU      int
	Bridge   string
	// DNSDomain, when set, points containers at fabricd's DNS responder on
	// the gateway (--dns) with the fabric's domain to search (--dns-search),
	// so `ping web` finds web.<domain> on any host.
	DNSDomain string
}

// BIP is dockerd's --bip value: the gateway with the subnet's length.
func (o Options) BIP() string { return netip.PrefixFrom(o.Gateway, o.Subnet.Bits()).String() }

// Args are dockerd's command-line options. --ip-masq=false because fabricd
// masquerades only traffic that leaves the pool; dockerd's rule would rewrite
// container-to-container traffic across hosts.
//
// With a bridge other than docker0, dockerd is pointed at it with --bridge
// and takes the gateway address fabricd put on it (dockerd refuses --bip
// together with --bridge); otherwise it would build a second bridge docker0
// with the same subnet.
func (o Options) Args() []string {
	addr := "--bip=" + o.BIP()
	if o.customBridge() {
		addr = "--bridge=" + o.Bridge
	}
	args := []string{addr, fmt.Sprintf("--mtu=%d", o.MTU), "--ip-masq=false"}
	if o.SubnetV6.IsValid() {
		args = append(args, "--ipv6", "--fixed-cidr-v6="+o.SubnetV6.String())
	}
	if o.DNSDomain != "" {
		args = append(args, "--dns="+o.Gateway.String(), "--dns-search="+o.DNSDomain)
	}
	return args
}

func (o Options) customBridge() bool { return o.Bridge != "" && o.Bridge != "docker0" }

// Env renders the environment file (subnet.env style).
func (o Options) Env() string {
	var b strings.Builder
	fmt.Fprintf(&b, "FABRIC_NETWORK=%s\n", o.Pool)
	fmt.Fprintf(&b, "FABRIC_SUBNET=%s\n", o.Subnet)
	fmt.Fprintf(&b, "FABRIC_GATEWAY=%s\n", o.Gateway)
	if o.SubnetV6.IsValid() {
		fmt.Fprintf(&b, "FABRIC_SUBNET_V6=%s\n", o.SubnetV6)
	}
	fmt.Fprintf(&b, "FABRIC_MTU=%d\n", o.MTU)
	if o.Bridge != "" {
		fmt.Fprintf(&b, "FABRIC_BRIDGE=%s\n", o.Bridge)
	}
	if o.DNSDomain != "" {
		fmt.Fprintf(&b, "FABRIC_DNS_DOMAIN=%s\n", o.DNSDomain)
	}
	fmt.Fprintf(&b, "DOCKER_OPTS=\"%s\"\n", strings.Join(o.Args(), " "))
	return b.String()
}

// JSON renders a daemon.json fragment.
func (o Options) JSON() string {
	v := map[string]any{"bip": o.BIP(), "mtu": o.MTU, "ip-masq": false}
	if o.SubnetV6.IsValid() {
		v["ipv6"] = true
		v["fixed-cidr-v6"] = o.SubnetV6.String()
	}
	if o.DNSDomain != "" {
		v["dns"] = []string{o.Gateway.String()}
		v["dns-search"] = []string{o.DNSDomain}
	}
	if o.customBridge() {
		delete(v, "bip")
		v["bridge"] = o.Bridge
	}
	b, _ := json.MarshalIndent(v, "", "  ")
	return string(b) + "\n"
}

// Systemd renders a drop-in for docker.service that reads the env file.
func (o Options) Systemd(envFile string) string {
	return fmt.Sprintf(`# /etc/systemd/system/docker.service.d/fabric.conf, written by fabricctl docker-opts
[Unit]
# After, not Requires: restarting fabricd must not restart dockerd and its
# containers; the kernel state fabricd keeps serves them meanwhile.
After=fabricd.service
Wants=fabricd.service

[Service]
# "-": dockerd still starts (with Docker's defaults) if fabricd could not
# write the file; fabricd.service is Type=notify, so normally the file is
# there before dockerd starts.
EnvironmentFile=-%s
ExecStart=
ExecStart=%s -H fd:// --containerd=/run/containerd/containerd.sock $DOCKER_OPTS
`, envFile, dockerdPath())
}

// dockerdPath finds dockerd: Debian's docker.io installs /usr/sbin/dockerd,
// docker-ce /usr/bin/dockerd.
func dockerdPath() string {
	for _, p := range []string{"/usr/bin/dockerd", "/usr/sbin/dockerd"} {
		if _, err := os.Stat(p); err == nil {
			return p
		}
	}
	return "/usr/bin/dockerd"
}

// ParseEnv reads an env file written by WriteEnv back into Options.
func ParseEnv(data string) (Options, error) {
	var o Options
	vals := map[string]string{}
	for _, line := range strings.Split(data, "\n") {
		if k, v, ok := strings.Cut(line, "="); ok {
			vals[k] = strings.Trim(v, `"`)
		}
	}
	var err error
	if o.Pool, err = netip.ParsePrefix(vals["FABRIC_NETWORK"]); err != nil {
		return o, fmt.Errorf("FABRIC_NETWORK: %w", err)
	}
	if o.Subnet, err = netip.ParsePrefix(vals["FABRIC_SUBNET"]); err != nil {
		return o, fmt.Errorf("FABRIC_SUBNET: %w", err)
	}
	if o.Gateway, err = netip.ParseAddr(vals["FABRIC_GATEWAY"]); err != nil {
		return o, fmt.Errorf("FABRIC_GATEWAY: %w", err)
	}
	if v := vals["FABRIC_SUBNET_V6"]; v != "" {
		if o.SubnetV6, err = netip.ParsePrefix(v); err != nil {
			return o, fmt.Errorf("FABRIC_SUBNET_V6: %w", err)
		}
	}
	o.Bridge = vals["FABRIC_BRIDGE"]
	o.DNSDomain = vals["FABRIC_DNS_DOMAIN"]
	if _, err := fmt.Sscan(vals["FABRIC_MTU"], &o.MTU); err != nil {
		return o, fmt.Errorf("FABRIC_MTU: %w", err)
	}
	return o, nil
}

// WriteEnv replaces path atomically (write to a temporary file, rename), so a
// reader never sees half a file, and does nothing when the content is equal.
func WriteEnv(path string, o Options) (changed bool, err error) {
	content := o.Env()
	if old, err := os.ReadFile(path); err == nil && string(old) == content {
		return false, nil
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return false, err
	}
	tmp, err := os.CreateTemp(filepath.Dir(path), ".docker.env-*")
	if err != nil {
		return false, err
	}
	defer os.Remove(tmp.Name())
	if _, err := tmp.WriteString(content); err != nil {
		tmp.Close()
		return false, err
	}
	if err := tmp.Chmod(0o644); err != nil {
		tmp.Close()
		return false, err
	}
	if err := tmp.Close(); err != nil {
		return false, err
	}
	return true, os.Rename(tmp.Name(), path)
}
