// Package config loads fabricd's settings from defaults, an optional YAML
// file, FABRIC_* environment variables and flags (later wins), and validates
// them with errors that name the setting, the problem and what would be valid.
package config

import (
	"errors"
	"fmt"
	"io"
	"io/fs"
	"maps"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"
	"unicode"

	"github.com/spf13/pflag"
	"sigs.k8s.io/yaml"

	"github.com/fabricnet/fabric/backend/encaps"
	"github.com/fabricnet/fabric/internal/etcdclient"
	"github.com/fabricnet/fabric/ipam"
)

// ExternalPeer is a BGP peer that is not a fabric host: a top-of-rack router
// or a route reflector. External peers come only from the config file.
type ExternalPeer struct {
	Name     string `json:"name"`
	Address  string `json:"address"`
	ASN      uint32 `json:"asn"`
	Port     uint16 `json:"port,omitempty"`
	Password string `json:"password,omitempty"`
	Multihop uint8  `json:"multihop,omitempty"`
	// Type is "external" (default), "route-reflector" (it reflects for us)
	// or "rr-client" (we reflect for it).
	Type string `json:"type,omitempty"`
	// MaxPrefixes closes the session when the peer sends more routes: a
	// guard against a router leaking a full table into every host. 0 means
	// the default: DefaultMaxPrefixes for an external peer, no limit for a
	// route reflector or client (they carry every host's subnet).
	MaxPrefixes uint32 `json:"maxPrefixes,omitempty"`
	// ImportPrefixes, if set, are the only routes taken from this peer: a
	// route must be one of them or lie inside one; 0.0.0.0/0 stands for the
	// default route alone.
	ImportPrefixes []string `json:"importPrefixes,omitempty"`
	// BFD runs a BFD session with the router (its BFD must be on, single
	// hop): a failed one drops the router's routes at once.
	BFD bool `json:"bfd,omitempty"`

	// Parsed by Validate, so nothing downstream parses the strings again.
	Addr    netip.Addr     `json:"-"`
	Imports []netip.Prefix `json:"-"`
}

// DefaultMaxPrefixes is an external peer's route limit when none is set: a
// top-of-rack router sends a default route and a few aggregates.
const DefaultMaxPrefixes = 1000

// RouteLimit is the limit that applies to p (0 = none).
func (p ExternalPeer) RouteLimit() uint32 {
	switch {
	case p.MaxPrefixes > 0:
		return p.MaxPrefixes
	case p.Type == "" || p.Type == "external":
		return DefaultMaxPrefixes
	}
	return 0
}

// Config is everything fabricd needs to run on one host.
type Config struct {
	NodeName      string        `json:"nodeName"`
	MachineID     string        `json:"machineID"`
	MachineIDFile string        `json:"machineIDFile"`
	EtcdEndpoints []string      `json:"etcdEndpoints"`
	EtcdPrefix    string        `json:"etcdPrefix"`
	EtcdTimeout   time.Duration `json:"etcdTimeout"`
	// TLS to etcd: PEM files of the CA that signed etcd's certificate
	// (empty: the system roots) and of a client certificate and its key.
	EtcdCACert string `json:"etcdCACert"`
	EtcdCert   string `json:"etcdCert"`
	EtcdKey    string `json:"etcdKey"`

	UnderlayInterface string `json:"underlayInterface"`
	UnderlayAddress   string `json:"underlayAddress"`
	// UnderlayAddressV6 is the host's IPv6 address on the underlay, the
	// next hop of its IPv6 subnet ("" = the lowest global one there).
	UnderlayAddressV6 string `json:"underlayAddressV6"`

	Pool      string `json:"pool"`
	SubnetLen int    `json:"subnetLen"`
	// PoolV6 is the IPv6 pool to store with the pool ("" = none, or the
	// one already in etcd): each host's /64 pairs with its IPv4 subnet.
	PoolV6 string `json:"poolV6"`
	// PoolPrefix, PoolV6Prefix, UnderlayAddr and UnderlayAddrV6 are Pool,
	// PoolV6, UnderlayAddress and UnderlayAddressV6 as Validate parsed
	// them (invalid when not set).
	PoolPrefix     netip.Prefix  `json:"-"`
	PoolV6Prefix   netip.Prefix  `json:"-"`
	UnderlayAddr   netip.Addr    `json:"-"`
	UnderlayAddrV6 netip.Addr    `json:"-"`
	SubnetTTL      time.Duration `json:"subnetTTL"`
	NodeTTL        time.Duration `json:"nodeTTL"`

	ASN               uint32        `json:"asn"`
	BGPPort           int           `json:"bgpPort"`
	HoldTime          time.Duration `json:"holdTime"`
	KeepaliveInterval time.Duration `json:"keepaliveInterval"`
	// GracefulRestartTime is how long BGP peers keep this host's routes
	// while fabricd restarts (RFC 4724), and how long this host keeps its
	// peers' routes while they restart. 0 turns graceful restart off.
	GracefulRestartTime time.Duration `json:"gracefulRestartTime"`
	// BFDInterval is how often BFD packets go to each fabric host (and to
	// routers with bfd: true) once a session is up; a peer unheard for
	// BFDMultiplier intervals is taken for dead. 0 turns BFD off.
	BFDInterval   time.Duration `json:"bfdInterval"`
	BFDMultiplier int           `json:"bfdMultiplier"`
	// ProbeInterval is how often, in auto mode, each peer's path is probed
	// over IP protocol 4; after an unanswered probe they go 8 times as
	// often, and 8 misses in a row move the peer to VXLAN (about 0.5 to
	// 0.85 s at the default 400ms).
	ProbeInterval time.Duration `json:"probeInterval"`
	Mesh          bool          `json:"mesh"`
	// RouteReflector makes this host a route reflector of the fabric: it
	// says so in its node record, and every host that is not a reflector
	// then peers only with the reflectors instead of the full mesh.
	RouteReflector bool           `json:"routeReflector"`
	Peers          []ExternalPeer `json:"peers"`

	Encapsulation string `json:"encapsulation"`
	CrossSubnet   bool   `json:"crossSubnet"`
	VXLANVNI      int    `json:"vxlanVNI"`
	VXLANPort     int    `json:"vxlanPort"`
	RouteProtocol int    `json:"routeProtocol"`
	// FlowOffload hands established connections between containers to an
	// nftables flowtable where the kernel has one (nf_flow_table): their
	// packets then skip conntrack and every rule.
	FlowOffload bool `json:"flowOffload"`
	// Encryption is off, wireguard (nothing between hosts in clear) or
	// wireguard-optional (WireGuard to the peers that offer it: the step
	// while a fabric switches).
	Encryption              string `json:"encryption"`
	WireGuardPort           int    `json:"wireguardPort"`
	WireGuardImplementation string `json:"wireguardImplementation"`
	// StateDir keeps what must survive a reboot: the WireGuard private key.
	StateDir string `json:"stateDir"`

	Bridge         string `json:"bridge"`
	DockerOptsFile string `json:"dockerOptsFile"`
	// DockerSocket is the local dockerd's API; fabricd publishes the names
	// of the containers on the bridge from it.
	DockerSocket string `json:"dockerSocket"`
	// DockerPluginSocket is where fabricd serves Docker's network and IPAM
	// driver API (`docker network create -d fabric`); dockerd finds it in
	// /run/docker/plugins. "" turns Docker networks off.
	DockerPluginSocket string `json:"dockerPluginSocket"`
	// ContainerDNS serves <container>.<DNSDomain> on the bridge gateway
	// (port 53) and forwards every other name to the host's resolvers;
	// docker-opts then points containers at it.
	ContainerDNS bool   `json:"containerDNS"`
	DNSDomain    string `json:"dnsDomain"`

	RunDir    string        `json:"runDir"`
	Resync    time.Duration `json:"resync"`
	LogLevel  string        `json:"logLevel"`
	LogFormat string        `json:"logFormat"`

	// MetricsAddress is host:port of the Prometheus endpoint (/metrics);
	// "" turns it off. Loopback by default: it is an admin endpoint.
	MetricsAddress string `json:"metricsAddress"`

	// Cleanup is an action, not a setting: remove everything fabricd owns.
	Cleanup bool `json:"-"`
	// CheckConfig is an action too: validate every setting, touch nothing.
	CheckConfig bool   `json:"-"`
	ConfigFile  string `json:"-"`
}

// Defaults are the values used when nothing else sets a field.
func Defaults() Config {
	host, _ := os.Hostname()
	return Config{
		NodeName:          host,
		MachineIDFile:     "/etc/machine-id",
		EtcdEndpoints:     []string{"http://127.0.0.1:2379"},
		EtcdPrefix:        "/fabric/v1",
		EtcdTimeout:       5 * time.Second,
		SubnetLen:         24,
		SubnetTTL:         24 * time.Hour,
		NodeTTL:           10 * time.Second,
		ASN:               64512,
		BGPPort:           179,
		HoldTime:          9 * time.Second,
		KeepaliveInterval: 3 * time.Second,
		BFDInterval:       200 * time.Millisecond,
		BFDMultiplier:     3,
		ProbeInterval:     400 * time.Millisecond,
		// BIRD's and Calico's default: long enough for an upgrade that
		// pulls a package, short enough that a dead host's routes go.
		GracefulRestartTime:     120 * time.Second,
		Mesh:                    true,
		Encapsulation:           "auto",
		VXLANVNI:                4096,
		VXLANPort:               4789,
		RouteProtocol:           93,
		FlowOffload:             true,
		Encryption:              "off",
		WireGuardPort:           51820,
		WireGuardImplementation: "auto",
		StateDir:                "/var/lib/fabric",
		Bridge:                  "docker0",
		DockerOptsFile:          "/run/fabric/docker.env",
		DockerSocket:            "/var/run/docker.sock",
		DockerPluginSocket:      "/run/docker/plugins/fabric.sock",
		ContainerDNS:            true,
		DNSDomain:               "fabric",
		RunDir:                  "/run/fabric",
		Resync:                  30 * time.Second,
		LogLevel:                "info",
		LogFormat:               "text",
		MetricsAddress:          "127.0.0.1:9815",
	}
}

// SocketPath is where fabricd serves its local status API.
func (c *Config) SocketPath() string { return c.RunDir + "/fabricd.sock" }

// WireGuardKeyPath is this host's WireGuard private key.
func (c *Config) WireGuardKeyPath() string { return filepath.Join(c.StateDir, "wireguard.key") }

// ProbeStatePath keeps the IPIP path verdicts across restarts.
func (c *Config) ProbeStatePath() string { return c.RunDir + "/probe-verdicts.json" }

// GoBGPSocketPath is where the embedded GoBGP's gRPC API listens (root only).
func (c *Config) GoBGPSocketPath() string { return c.RunDir + "/gobgp.sock" }

// Load builds the configuration from args (without the program name) and the
// environment. The config file is named by --config or FABRIC_CONFIG.
func Load(args []string, environ []string) (*Config, error) {
	cfg := Defaults()
	env := envMap(environ)

	configFile := env["FABRIC_CONFIG"]
	fs := newFlagSet(&cfg, &configFile)
	for _, a := range args {
		if a == "--" {
			break
		}
		if len(a) > 2 && a[0] == '-' && a[1] >= 'a' && a[1] <= 'z' { // -config, not -1
			return nil, fmt.Errorf("%s: fabricd's flags take two dashes (-%s)", a, a)
		}
	}
	// First pass only to find --config; flags are applied again after the
	// file and the environment so that they win.
	if err := fs.Parse(args); err != nil {
		return nil, err
	}
	if fs.NArg() > 0 {
		return nil, fmt.Errorf("unexpected argument %q: fabricd takes only flags", fs.Arg(0))
	}
	cfg = Defaults()
	if configFile != "" {
		if err := ReadFile(configFile, &cfg); err != nil {
			return nil, err
		}
	}
	if err := applyEnv(newFlagSet(&cfg, new(string)), env); err != nil {
		return nil, err
	}
	if err := newFlagSet(&cfg, new(string)).Parse(args); err != nil {
		return nil, err
	}
	cfg.ConfigFile = configFile
	if cfg.MachineID == "" && !cfg.Cleanup {
		id, err := os.ReadFile(cfg.MachineIDFile)
		if err != nil {
			return nil, fmt.Errorf("machineIDFile: cannot read %s (%v); set --machine-id or point --machine-id-file at a file with this machine's stable identity", cfg.MachineIDFile, err)
		}
		cfg.MachineID = strings.TrimSpace(string(id))
	}
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	return &cfg, nil
}

// ReadFile sets c from the YAML config file at path; problems are named
// with their lines.
func ReadFile(path string, c *Config) error {
	data, err := os.ReadFile(path)
	if err != nil {
		return fmt.Errorf("config file: %w", err)
	}
	if err := checkFile(path, data); err != nil {
		return err
	}
	if err := yaml.UnmarshalStrict(data, c); err != nil {
		return fmt.Errorf("config file %s: %w", path, err)
	}
	return nil
}

// clientSettings are the flags fabricctl shares with fabricd: where etcd
// is, how to reach it, and fabricd's run directory (its local API).
var clientSettings = []string{"etcd-endpoints", "etcd-prefix", "etcd-ca-cert", "etcd-cert", "etcd-key", "run-dir"}

// DefineClientFlags defines fabricd's client settings on fs, bound to c,
// with fabricd's names, help and environment variables, and sets each from
// its FABRIC_* variable in environ (flags parsed later win). Other FABRIC_*
// variables are fabricd's and are left alone.
func DefineClientFlags(fs *pflag.FlagSet, c *Config, environ []string) error {
	all := newFlagSet(c, new(string))
	env := envMap(environ)
	var errs []error
	for _, name := range clientSettings {
		fs.AddFlag(all.Lookup(name))
		errs = append(errs, setFromEnv(fs, name, env))
	}
	return errors.Join(errs...)
}

// Usage is the text of --help: every flag, its default and meaning.
func Usage() string {
	cfg := Defaults()
	return "Usage: fabricd [flags]\n\nEvery flag is also a FABRIC_* environment variable and a key of the\nconfig file (fabricd --settings-table).\n\n" + newFlagSet(&cfg, new(string)).FlagUsages()
}

// newFlagSet defines every flag on c (and --config on configFile), in the
// order of definition, printing nothing: the caller reports errors.
func newFlagSet(c *Config, configFile *string) *pflag.FlagSet {
	fs := pflag.NewFlagSet("fabricd", pflag.ContinueOnError)
	fs.SortFlags = false
	fs.SetOutput(io.Discard)
	fs.Usage = func() {}
	fs.StringVar(configFile, "config", *configFile, "YAML config file (env FABRIC_CONFIG)")
	defineFlags(fs, c)
	return fs
}

type listFlag struct{ dst *[]string }

func (l listFlag) String() string {
	if l.dst == nil {
		return ""
	}
	return strings.Join(*l.dst, ",")
}
func (l listFlag) Set(s string) error { *l.dst = splitList(s); return nil }
func (l listFlag) Type() string       { return "list" }

func defineFlags(fs *pflag.FlagSet, c *Config) {
	fs.StringVar(&c.NodeName, "node-name", c.NodeName, "this host's name in the fabric (env FABRIC_NODE_NAME)")
	fs.StringVar(&c.MachineID, "machine-id", c.MachineID, "stable machine identity; default: contents of --machine-id-file")
	fs.StringVar(&c.MachineIDFile, "machine-id-file", c.MachineIDFile, "file holding the machine identity")
	fs.Var(listFlag{&c.EtcdEndpoints}, "etcd-endpoints", "comma-separated etcd client URLs (env FABRIC_ETCD_ENDPOINTS)")
	fs.StringVar(&c.EtcdPrefix, "etcd-prefix", c.EtcdPrefix, "etcd key prefix")
	fs.DurationVar(&c.EtcdTimeout, "etcd-timeout", c.EtcdTimeout, "timeout of one etcd request")
	fs.StringVar(&c.EtcdCACert, "etcd-ca-cert", c.EtcdCACert, "PEM file of the CA that signed etcd's certificate; default: the system roots (env FABRIC_ETCD_CA_CERT)")
	fs.StringVar(&c.EtcdCert, "etcd-cert", c.EtcdCert, "PEM file of the client certificate for etcd (env FABRIC_ETCD_CERT)")
	fs.StringVar(&c.EtcdKey, "etcd-key", c.EtcdKey, "PEM file of the client certificate's key (env FABRIC_ETCD_KEY)")
	fs.StringVar(&c.UnderlayInterface, "underlay-interface", c.UnderlayInterface, "interface facing the other hosts; default: the interface of the default route, else the only non-loopback one")
	fs.StringVar(&c.UnderlayAddress, "underlay-address", c.UnderlayAddress, "this host's underlay address, IPv4, or IPv6 on an IPv6-only underlay (VXLAN and WireGuard over IPv6; every host of the fabric then needs one); default: the first IPv4 address of the underlay interface, else its lowest global IPv6 address")
	fs.StringVar(&c.UnderlayAddressV6, "underlay-address-v6", c.UnderlayAddressV6, "in an IPv6 fabric, this host's underlay IPv6 address: the next hop of its IPv6 subnet for routers; default: the lowest global IPv6 address of the underlay interface, if any (else the IPv4 address, IPv4-mapped)")
	fs.StringVar(&c.Pool, "pool", c.Pool, "container address pool to create in etcd if none exists, e.g. 10.244.0.0/16")
	fs.IntVar(&c.SubnetLen, "subnet-len", c.SubnetLen, "prefix length of each host's subnet when creating the pool")
	fs.StringVar(&c.PoolV6, "pool-v6", c.PoolV6, "IPv6 pool to add to the pool in etcd, e.g. fd00:10:244::/48: each host gets the /64 paired with its IPv4 subnet (needs pool)")
	fs.DurationVar(&c.SubnetTTL, "subnet-ttl", c.SubnetTTL, "how long a dead host's subnet stays reserved")
	fs.DurationVar(&c.NodeTTL, "node-ttl", c.NodeTTL, "liveness lease of the node record")
	fs.Func("asn", "BGP AS number of this host (default 64512)", func(s string) error {
		v, err := strconv.ParseUint(s, 10, 32)
		if err != nil {
			return fmt.Errorf("not an AS number: %q", s)
		}
		c.ASN = uint32(v)
		return nil
	})
	fs.IntVar(&c.BGPPort, "bgp-port", c.BGPPort, "BGP listen and mesh port")
	fs.DurationVar(&c.HoldTime, "bgp-hold-time", c.HoldTime, "BGP hold time: a silent peer is declared dead after it")
	fs.DurationVar(&c.KeepaliveInterval, "bgp-keepalive", c.KeepaliveInterval, "BGP keepalive interval")
	fs.DurationVar(&c.GracefulRestartTime, "graceful-restart-time", c.GracefulRestartTime,
		"how long BGP peers keep this host's routes while fabricd restarts (0 = no graceful restart)")
	fs.DurationVar(&c.BFDInterval, "bfd-interval", c.BFDInterval, "BFD packet interval once a session is up (0 = no BFD)")
	fs.IntVar(&c.BFDMultiplier, "bfd-multiplier", c.BFDMultiplier, "BFD intervals a peer may miss before it is taken for dead")
	fs.DurationVar(&c.ProbeInterval, "probe-interval", c.ProbeInterval, "auto mode: how often each peer's path is probed over IP protocol 4 (8 times as often after a miss; 8 misses in a row: VXLAN)")
	fs.BoolVar(&c.Mesh, "mesh", c.Mesh, "peer with every fabric host (turn off when route reflectors are configured)")
	fs.BoolVar(&c.RouteReflector, "route-reflector", c.RouteReflector, "reflect routes for the fabric; hosts that are not reflectors then peer only with the reflectors")
	fs.StringVar(&c.Encapsulation, "encapsulation", c.Encapsulation, "ipip, vxlan or auto (env FABRIC_ENCAPSULATION)")
	fs.BoolVar(&c.CrossSubnet, "cross-subnet", c.CrossSubnet, "route unencapsulated to peers on this host's own L2 subnet")
	fs.BoolVar(&c.FlowOffload, "flow-offload", c.FlowOffload, "hand established connections between containers to an nftables flowtable where the kernel has one (nf_flow_table): their packets skip conntrack and every rule")
	fs.IntVar(&c.VXLANVNI, "vxlan-vni", c.VXLANVNI, "VXLAN network identifier")
	fs.IntVar(&c.VXLANPort, "vxlan-port", c.VXLANPort, "VXLAN UDP port")
	fs.StringVar(&c.Encryption, "encryption", c.Encryption, "encrypt traffic between hosts: off, wireguard (nothing in clear) or wireguard-optional (WireGuard to the hosts that offer it, clear to the rest; for switching)")
	fs.IntVar(&c.WireGuardPort, "wireguard-port", c.WireGuardPort, "WireGuard UDP port")
	fs.StringVar(&c.WireGuardImplementation, "wireguard-implementation", c.WireGuardImplementation, "auto (the kernel's WireGuard where it has one, else wireguard-go in fabricd), kernel or userspace")
	fs.StringVar(&c.StateDir, "state-dir", c.StateDir, "directory for state kept across reboots (the WireGuard private key)")
	fs.IntVar(&c.RouteProtocol, "route-protocol", c.RouteProtocol, "kernel route protocol number marking fabricd's routes")
	fs.StringVar(&c.Bridge, "bridge", c.Bridge, "container bridge fabricd creates or adopts")
	fs.StringVar(&c.DockerOptsFile, "docker-opts-file", c.DockerOptsFile, "environment file with the options dockerd needs")
	fs.StringVar(&c.DockerSocket, "docker-socket", c.DockerSocket, "the local dockerd's API socket, to publish container names (env FABRIC_DOCKER_SOCKET)")
	fs.StringVar(&c.DockerPluginSocket, "docker-plugin-socket", c.DockerPluginSocket, "where dockerd finds fabric's network driver (docker network create -d fabric); \"\" turns it off")
	fs.BoolVar(&c.ContainerDNS, "container-dns", c.ContainerDNS, "answer CONTAINER.DNS-DOMAIN for every container of the fabric on the bridge gateway, port 53")
	fs.StringVar(&c.DNSDomain, "dns-domain", c.DNSDomain, "domain of container names (env FABRIC_DNS_DOMAIN)")
	fs.StringVar(&c.RunDir, "run-dir", c.RunDir, "directory for the local API sockets")
	fs.DurationVar(&c.Resync, "resync", c.Resync, "interval of drift repair of kernel state")
	fs.StringVar(&c.LogLevel, "log-level", c.LogLevel, "debug, info, warn or error")
	fs.StringVar(&c.LogFormat, "log-format", c.LogFormat, "text or json")
	fs.StringVar(&c.MetricsAddress, "metrics-address", c.MetricsAddress, "host:port of the Prometheus /metrics endpoint; \"\" turns it off (env FABRIC_METRICS_ADDRESS)")
	fs.BoolVar(&c.Cleanup, "cleanup", false, "remove every route, link and rule fabricd owns on this host, then exit")
	fs.BoolVar(&c.CheckConfig, "check-config", false, "check every setting (file, environment, flags) and the files they name, change nothing, exit 0 if valid, 2 if not")
}

func envMap(environ []string) map[string]string {
	m := map[string]string{}
	for _, kv := range environ {
		if k, v, ok := strings.Cut(kv, "="); ok && strings.HasPrefix(k, "FABRIC_") {
			m[k] = v
		}
	}
	return m
}

// EnvName is the environment variable of a setting's flag: FABRIC_ and the
// flag's name in capitals with '_' for '-' (--bgp-hold-time is
// FABRIC_BGP_HOLD_TIME).
func EnvName(flagName string) string {
	return "FABRIC_" + strings.ToUpper(strings.ReplaceAll(flagName, "-", "_"))
}

// actionFlags are flags that do something rather than set something: never
// taken from the environment.
var actionFlags = map[string]bool{"cleanup": true, "check-config": true, "config": true}

// applyEnv sets every flag of fs whose environment variable is in env,
// parsed as the flag parses it, and refuses FABRIC_* variables that are no
// setting (a typo would otherwise be ignored in silence), naming the nearest.
func applyEnv(fs *pflag.FlagSet, env map[string]string) error {
	known := map[string]bool{"FABRIC_CONFIG": true}
	var errs []error
	fs.VisitAll(func(f *pflag.Flag) {
		if actionFlags[f.Name] {
			return
		}
		known[EnvName(f.Name)] = true
		errs = append(errs, setFromEnv(fs, f.Name, env))
	})
	for _, name := range slices.Sorted(maps.Keys(env)) {
		if known[name] {
			continue
		}
		msg := fmt.Sprintf("environment %s: not a fabricd setting", name)
		if near := nearest(name, slices.Collect(maps.Keys(known))); near != "" {
			msg += fmt.Sprintf(" (did you mean %s?)", near)
		}
		errs = append(errs, errors.New(msg))
	}
	return errors.Join(errs...)
}

// setFromEnv sets flag name of fs from its FABRIC_* variable in env, if
// there is one, parsed as the flag parses it.
func setFromEnv(fs *pflag.FlagSet, name string, env map[string]string) error {
	v, ok := env[EnvName(name)]
	if !ok {
		return nil
	}
	if err := fs.Set(name, v); err != nil {
		return fmt.Errorf("environment %s=%q: %v", EnvName(name), v, err)
	}
	return nil
}

// nearest returns the candidate closest to name by edit distance, if it is
// close enough to be a likely typo or a missing word.
func nearest(name string, candidates []string) string {
	best, bestDist := "", len(name)/3+2
	slices.Sort(candidates)
	for _, c := range candidates {
		if d := editDistance(name, c); d < bestDist {
			best, bestDist = c, d
		}
	}
	return best
}

func editDistance(a, b string) int {
	prev := make([]int, len(b)+1)
	for j := range prev {
		prev[j] = j
	}
	for i := 1; i <= len(a); i++ {
		cur := make([]int, len(b)+1)
		cur[0] = i
		for j := 1; j <= len(b); j++ {
			cost := 1
			if a[i-1] == b[j-1] {
				cost = 0
			}
			cur[j] = min(prev[j]+1, cur[j-1]+1, prev[j-1]+cost)
		}
		prev = cur
	}
	return prev[len(b)]
}

func splitList(s string) []string {
	var out []string
	for _, p := range strings.Split(s, ",") {
		if p = strings.TrimSpace(p); p != "" {
			out = append(out, p)
		}
	}
	return out
}

// Validate checks every setting and reports all problems at once.
func (c *Config) Validate() error {
	var errs []error
	bad := func(setting, format string, a ...any) {
		errs = append(errs, fmt.Errorf("%s: %s", setting, fmt.Sprintf(format, a...)))
	}
	if c.Cleanup {
		if c.RouteProtocol < 5 || c.RouteProtocol > 255 {
			bad("routeProtocol", "%d is outside 5-255", c.RouteProtocol)
		}
		return errors.Join(errs...)
	}
	if c.NodeName == "" || len(c.NodeName) > 63 || strings.ContainsFunc(c.NodeName, func(r rune) bool {
		return r == '/' || unicode.IsSpace(r) || !unicode.IsPrint(r)
	}) {
		bad("nodeName", "%q is not valid: want 1-63 printable characters without '/', spaces or line breaks", c.NodeName)
	}
	if c.MachineID == "" {
		bad("machineID", "empty; set --machine-id or --machine-id-file")
	}
	c.validateEtcd(bad)
	if !strings.HasPrefix(c.EtcdPrefix, "/") || strings.HasSuffix(c.EtcdPrefix, "/") {
		bad("etcdPrefix", "%q must start with '/' and not end with '/', e.g. /fabric/v1", c.EtcdPrefix)
	}
	if c.UnderlayAddress != "" {
		if a, err := netip.ParseAddr(c.UnderlayAddress); err != nil || a.Is4In6() || !a.IsGlobalUnicast() || a.Zone() != "" {
			bad("underlayAddress", "%q is not an IPv4 or global IPv6 address", c.UnderlayAddress)
		} else {
			c.UnderlayAddr = a
		}
	}
	if c.UnderlayAddressV6 != "" {
		if a, err := netip.ParseAddr(c.UnderlayAddressV6); err != nil || !a.Is6() || a.Is4In6() || !a.IsGlobalUnicast() || a.Zone() != "" {
			bad("underlayAddressV6", "%q is not a global IPv6 address", c.UnderlayAddressV6)
		} else {
			c.UnderlayAddrV6 = a
		}
	}
	if c.UnderlayAddr.Is6() && c.UnderlayAddrV6 != c.UnderlayAddr && c.UnderlayAddressV6 != "" {
		bad("underlayAddressV6", "%q differs from underlayAddress %s: an IPv6 underlay address is the next hop of both families", c.UnderlayAddressV6, c.UnderlayAddress)
	}
	if c.Pool != "" {
		p, err := netip.ParsePrefix(c.Pool)
		switch {
		case err != nil || !p.Addr().Is4():
			bad("pool", "%q is not an IPv4 CIDR, want e.g. 10.244.0.0/16", c.Pool)
		case p.Masked() != p:
			bad("pool", "%q has host bits set; did you mean %s?", c.Pool, p.Masked())
		case c.SubnetLen <= p.Bits() || c.SubnetLen > 30:
			bad("subnetLen", "%d must be longer than the pool's /%d and at most 30", c.SubnetLen, p.Bits())
		default:
			c.PoolPrefix = p
		}
	}
	if c.PoolV6 != "" {
		p, err := netip.ParsePrefix(c.PoolV6)
		switch {
		case err != nil || !p.Addr().Is6() || p.Addr().Is4In6():
			bad("poolV6", "%q is not an IPv6 CIDR, want e.g. fd00:10:244::/48", c.PoolV6)
		case c.Pool == "":
			bad("poolV6", "needs pool: the IPv6 pool is stored with the IPv4 one, and each host's /64 pairs with its IPv4 subnet")
		case c.PoolPrefix.IsValid():
			pool := ipam.Pool{Network: c.PoolPrefix, SubnetLen: c.SubnetLen, NetworkV6: p}
			if err := pool.Validate(); err != nil {
				bad("poolV6", "%v", err)
			} else {
				c.PoolV6Prefix = p
			}
		}
	}
	if c.SubnetTTL < time.Minute {
		bad("subnetTTL", "%s is too short: a host would lose its subnet during a short outage; want at least 1m (default 24h)", c.SubnetTTL)
	}
	if c.NodeTTL < 2*time.Second || c.NodeTTL > 5*time.Minute {
		bad("nodeTTL", "%s outside 2s-5m", c.NodeTTL)
	}
	if c.ASN == 0 {
		bad("asn", "0 is not a valid AS number")
	}
	if c.BGPPort < 1 || c.BGPPort > 65535 {
		bad("bgpPort", "%d outside 1-65535", c.BGPPort)
	}
	if c.HoldTime != 0 && (c.HoldTime < 3*time.Second || c.HoldTime > 65535*time.Second) {
		bad("holdTime", "%s: BGP needs 3s to 65535s (18h12m15s)", c.HoldTime)
	}
	if c.EtcdTimeout < 100*time.Millisecond || c.EtcdTimeout > 5*time.Minute {
		bad("etcdTimeout", "%s: want 100ms to 5m (default 5s); 0 would wait for ever", c.EtcdTimeout)
	}
	if c.GracefulRestartTime < 0 || c.GracefulRestartTime > 4095*time.Second || c.GracefulRestartTime%time.Second != 0 {
		bad("gracefulRestartTime", "%s: want whole seconds from 0 (off) to 4095s, the most BGP can carry", c.GracefulRestartTime)
	}
	if c.BFDInterval != 0 && (c.BFDInterval < 10*time.Millisecond || c.BFDInterval > 10*time.Second || c.BFDInterval%time.Millisecond != 0) {
		bad("bfdInterval", "%s: want 0 (off) or whole milliseconds from 10ms to 10s", c.BFDInterval)
	}
	if c.ProbeInterval < 80*time.Millisecond || c.ProbeInterval > time.Minute {
		bad("probeInterval", "%s: want 80ms to 1m (default 400ms)", c.ProbeInterval)
	}
	if c.BFDMultiplier < 1 || c.BFDMultiplier > 255 {
		bad("bfdMultiplier", "%d outside 1-255", c.BFDMultiplier)
	}
	if c.KeepaliveInterval <= 0 || c.KeepaliveInterval*3 > c.HoldTime {
		bad("keepaliveInterval", "%s must be positive and at most a third of holdTime %s", c.KeepaliveInterval, c.HoldTime)
	}
	for i := range c.Peers {
		p := &c.Peers[i]
		where := fmt.Sprintf("peers[%d]", i)
		if p.Name != "" {
			where += " (" + p.Name + ")"
		}
		if a, err := netip.ParseAddr(p.Address); err != nil || a.Is4In6() || !a.IsGlobalUnicast() || a.Zone() != "" {
			bad(where+".address", "%q is not an IPv4 or global IPv6 address (IPv6 on an IPv6-only underlay)", p.Address)
		} else {
			p.Addr = a
		}
		if p.ASN == 0 {
			bad(where+".asn", "missing")
		}
		p.Imports = nil
		for _, ip := range p.ImportPrefixes {
			if pr, err := netip.ParsePrefix(ip); err != nil || !pr.Addr().Is4() || pr.Masked() != pr {
				bad(where+".importPrefixes", "%q is not an IPv4 network like 10.250.0.0/16", ip)
			} else {
				p.Imports = append(p.Imports, pr)
			}
		}
		// Linux keeps TCP MD5 keys of at most TCP_MD5SIG_MAXKEYLEN bytes.
		if len(p.Password) > 80 {
			bad(where+".password", "%d bytes: Linux takes TCP MD5 keys of at most 80 bytes", len(p.Password))
		}
		if p.BFD && c.BFDInterval == 0 {
			bad(where+".bfd", "true, but bfdInterval is 0 (BFD off)")
		}
		if p.BFD && p.Multihop > 1 {
			bad(where+".bfd", "fabric's BFD is single hop (RFC 5881); this peer is %d hops away", p.Multihop)
		}
		switch p.Type {
		case "", "external", "route-reflector", "rr-client":
		default:
			bad(where+".type", "%q: want external, route-reflector or rr-client", p.Type)
		}
	}
	if !slices.Contains(encaps.Modes(), c.Encapsulation) {
		bad("encapsulation", "%q: want %s", c.Encapsulation, strings.Join(encaps.Modes(), ", "))
	}
	if c.VXLANVNI < 1 || c.VXLANVNI > 1<<24-1 {
		bad("vxlanVNI", "%d outside 1-16777215", c.VXLANVNI)
	}
	if c.VXLANPort < 1 || c.VXLANPort > 65535 {
		bad("vxlanPort", "%d outside 1-65535", c.VXLANPort)
	}
	if !slices.Contains(encaps.EncryptionModes(), c.Encryption) {
		bad("encryption", "%q: want %s", c.Encryption, strings.Join(encaps.EncryptionModes(), ", "))
	} else if c.Encryption == encaps.EncryptionRequired && c.Encapsulation != encaps.Auto {
		bad("encryption", "wireguard sends nothing in clear, but encapsulation %s does: leave encapsulation at auto, or use wireguard-optional while switching", c.Encapsulation)
	}
	if c.WireGuardPort < 1 || c.WireGuardPort > 65535 {
		bad("wireguardPort", "%d outside 1-65535", c.WireGuardPort)
	} else if c.Encryption != encaps.EncryptionOff && (c.WireGuardPort == c.VXLANPort || c.WireGuardPort == c.BGPPort) {
		bad("wireguardPort", "%d is also the VXLAN or BGP port", c.WireGuardPort)
	}
	switch c.WireGuardImplementation {
	case "auto", "kernel", "userspace":
	default:
		bad("wireguardImplementation", "%q: want auto, kernel or userspace", c.WireGuardImplementation)
	}
	if !filepath.IsAbs(c.StateDir) {
		bad("stateDir", "%q: want an absolute path", c.StateDir)
	}
	if c.RouteProtocol < 5 || c.RouteProtocol > 255 {
		bad("routeProtocol", "%d outside 5-255 (0-4 belong to the kernel)", c.RouteProtocol)
	}
	if c.Bridge == "" || len(c.Bridge) > 15 {
		bad("bridge", "%q: want an interface name of 1-15 characters", c.Bridge)
	}
	if c.DockerSocket == "" {
		bad("dockerSocket", "empty: want the path of dockerd's API socket")
	}
	if err := checkDomain(c.DNSDomain); err != nil {
		bad("dnsDomain", "%q: %v", c.DNSDomain, err)
	}
	if c.Resync < time.Second {
		bad("resync", "%s is below 1s", c.Resync)
	}
	switch c.LogLevel {
	case "debug", "info", "warn", "error":
	default:
		bad("logLevel", "%q: want debug, info, warn or error", c.LogLevel)
	}
	switch c.LogFormat {
	case "text", "json":
	default:
		bad("logFormat", "%q: want text or json", c.LogFormat)
	}
	if c.MetricsAddress != "" {
		var port uint64
		var err error
		if p, ok := strings.CutPrefix(c.MetricsAddress, ":"); ok {
			port, err = strconv.ParseUint(p, 10, 16)
		} else {
			var ap netip.AddrPort
			ap, err = netip.ParseAddrPort(c.MetricsAddress)
			port = uint64(ap.Port())
		}
		if err != nil || port == 0 {
			bad("metricsAddress", "%q is not IP:port: want e.g. 127.0.0.1:9815 (loopback, the default), the underlay address with a port, or :9815 (every address); \"\" turns metrics off", c.MetricsAddress)
		}
	}
	if len(errs) > 0 {
		return fmt.Errorf("invalid configuration:\n  %w", joinIndented(errs))
	}
	return nil
}

// EtcdTLSFiles returns the TLS files for the etcd client.
// ValidateClient checks the settings fabricctl shares with fabricd (the
// etcd endpoints and TLS files), so that a bad value is refused at once, by
// name, instead of after a connection timeout.
func (c *Config) ValidateClient() error {
	var errs []error
	c.validateEtcd(func(setting, format string, a ...any) {
		errs = append(errs, fmt.Errorf("%s: %s", setting, fmt.Sprintf(format, a...)))
	})
	if len(errs) > 0 {
		return fmt.Errorf("invalid settings:\n  %w", joinIndented(errs))
	}
	return nil
}

// validateEtcd checks the etcd endpoints and TLS files.
func (c *Config) validateEtcd(bad func(setting, format string, a ...any)) {
	if len(c.EtcdEndpoints) == 0 {
		bad("etcdEndpoints", "empty; want e.g. http://10.0.0.5:2379")
	}
	for _, e := range c.EtcdEndpoints {
		if !strings.HasPrefix(e, "http://") && !strings.HasPrefix(e, "https://") && !strings.HasPrefix(e, "unix://") {
			bad("etcdEndpoints", "%q is not a URL: want http://host:port, https://host:port or unix:///path", e)
		}
	}
	c.validateEtcdTLS(bad)
}

// MisspeltEnv reports FABRIC_* variables in environ that are no setting but
// close to one (FABRIC_ETCD_ENDPOINT for FABRIC_ETCD_ENDPOINTS), for
// fabricctl: ignored, they would send it to another etcd than the operator
// meant. Variables far from every setting (a test harness's) are left alone;
// fabricd refuses every unknown one.
func MisspeltEnv(environ []string) error {
	var known []string
	newFlagSet(new(Config), new(string)).VisitAll(func(f *pflag.Flag) {
		if !actionFlags[f.Name] {
			known = append(known, EnvName(f.Name))
		}
	})
	known = append(known, "FABRIC_CONFIG")
	var errs []error
	env := envMap(environ)
	for _, name := range slices.Sorted(maps.Keys(env)) {
		if slices.Contains(known, name) {
			continue
		}
		// A letter missing or swapped, one edit in eight letters: not
		// another short name (FABRIC_BIN is two edits from FABRIC_ASN).
		if near := nearest(name, known); near != "" && editDistance(name, near) <= max(1, len(near)/8) {
			errs = append(errs, fmt.Errorf("environment %s: not a setting (did you mean %s?)", name, near))
		}
	}
	return errors.Join(errs...)
}

func (c *Config) EtcdTLSFiles() etcdclient.TLSFiles {
	return etcdclient.TLSFiles{CA: c.EtcdCACert, Cert: c.EtcdCert, Key: c.EtcdKey}
}

// validateEtcdTLS checks the etcd TLS files: they must be readable PEM,
// certificate and key go together, and at least one endpoint must use
// https:// (an https:// endpoint without a CA uses the system roots).
func (c *Config) validateEtcdTLS(bad func(setting, format string, a ...any)) {
	files := []struct{ setting, path string }{
		{"etcdCACert", c.EtcdCACert}, {"etcdCert", c.EtcdCert}, {"etcdKey", c.EtcdKey},
	}
	readable := true
	for _, f := range files {
		if f.path == "" {
			continue
		}
		if !etcdclient.AnyTLSEndpoint(c.EtcdEndpoints) {
			bad(f.setting, "%s is set but no etcd endpoint uses https://; use https:// endpoints (%s) or drop the setting", f.path, strings.Join(c.EtcdEndpoints, ","))
		}
		fh, err := os.Open(f.path)
		if err == nil {
			fh.Close()
		} else {
			readable = false
			var pe *fs.PathError
			if errors.As(err, &pe) {
				err = pe.Err
			}
			bad(f.setting, "cannot read %s: %v", f.path, err)
		}
	}
	switch {
	case c.EtcdCert != "" && c.EtcdKey == "":
		bad("etcdKey", "missing: etcdCert %s needs its key", c.EtcdCert)
		readable = false
	case c.EtcdKey != "" && c.EtcdCert == "":
		bad("etcdCert", "missing: etcdKey %s needs its certificate", c.EtcdKey)
		readable = false
	}
	if !readable {
		return
	}
	if c.EtcdCACert != "" {
		if _, err := etcdclient.LoadCA(c.EtcdCACert); err != nil {
			bad("etcdCACert", "%v", err)
		}
	}
	if c.EtcdCert != "" {
		if _, err := etcdclient.LoadKeyPair(c.EtcdCert, c.EtcdKey); err != nil {
			bad("etcdCert", "%v", err)
		}
	}
}

func joinIndented(errs []error) error {
	parts := make([]string, len(errs))
	for i, e := range errs {
		parts[i] = e.Error()
	}
	return errors.New(strings.Join(parts, "\n  "))
}

// checkDomain accepts a DNS domain of letters, digits and hyphens in labels
// of 1-63 characters, without the trailing dot.
func checkDomain(d string) error {
	if d == "" || len(d) > 200 {
		return fmt.Errorf("want a domain of 1-200 characters")
	}
	for _, label := range strings.Split(d, ".") {
		if label == "" || len(label) > 63 || label[0] == '-' || label[len(label)-1] == '-' {
			return fmt.Errorf("label %q: want 1-63 characters, not starting or ending with '-'", label)
		}
		for _, r := range label {
			if !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '-') {
				return fmt.Errorf("label %q holds %q: want letters, digits and '-'", label, r)
			}
		}
	}
	return nil
}
