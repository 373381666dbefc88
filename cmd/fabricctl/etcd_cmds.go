package main

import (
	"context"
	"fmt"
	"maps"
	"net/netip"
	"os"
	"slices"
	"strings"
	"time"

	"github.com/spf13/cobra"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/fabricnet/fabric/config"
	"github.com/fabricnet/fabric/dockernet"
	"github.com/fabricnet/fabric/dockeropts"
	"github.com/fabricnet/fabric/ipam"
	"github.com/fabricnet/fabric/names"
	"github.com/fabricnet/fabric/registry"
)

func ipamCmd(g *globals) *cobra.Command {
	cmd := &cobra.Command{Use: "ipam", Short: "The container address pool and the hosts' subnet leases"}
	var poolCIDR, poolV6 string
	var subnetLen int
	initCmd := &cobra.Command{
		Use:   "init",
		Short: "Create the pool in etcd (fabricd --pool does the same on first start)",
		Args:  usageArgs(cobra.NoArgs),
		RunE: func(cmd *cobra.Command, _ []string) error {
			p, err := netip.ParsePrefix(poolCIDR)
			if err != nil {
				return fmt.Errorf("--pool %q: not a CIDR, want e.g. 10.244.0.0/16", poolCIDR)
			}
			want := &ipam.Pool{Network: p, SubnetLen: subnetLen}
			if poolV6 != "" {
				if want.NetworkV6, err = netip.ParsePrefix(poolV6); err != nil {
					return fmt.Errorf("--pool-v6 %q: not a CIDR, want e.g. fd00:10:244::/48", poolV6)
				}
			}
			if err := want.Validate(); err != nil {
				return err
			}
			return g.withEtcd(func(ctx context.Context, cli *clientv3.Client) error {
				got, err := ipam.EnsurePool(ctx, cli, g.host.EtcdPrefix, want)
				if err != nil {
					return err
				}
				fmt.Printf("pool %s, /%d per host\n", got.Network, got.SubnetLen)
				if got.NetworkV6.IsValid() {
					fmt.Printf("IPv6 pool %s, /%d per host\n", got.NetworkV6, ipam.SubnetLenV6)
				}
				return nil
			})
		},
	}
	initCmd.Flags().StringVar(&poolCIDR, "pool", "", "pool CIDR, e.g. 10.244.0.0/16")
	initCmd.Flags().IntVar(&subnetLen, "subnet-len", 24, "prefix length of each host's subnet")
	initCmd.Flags().StringVar(&poolV6, "pool-v6", "", "IPv6 pool CIDR, e.g. fd00:10:244::/48 (each host gets a /64)")
	initCmd.MarkFlagRequired("pool")

	show := &cobra.Command{
		Use:   "show",
		Short: "List the subnet leases: subnet, node, host address, expiry",
		Args:  usageArgs(cobra.NoArgs),
		RunE: func(cmd *cobra.Command, _ []string) error {
			return g.withEtcd(func(ctx context.Context, cli *clientv3.Client) error {
				pool, err := ipam.GetPool(ctx, cli, g.host.EtcdPrefix)
				if err != nil {
					return err
				}
				leases, bad, err := ipam.List(ctx, cli, g.host.EtcdPrefix)
				if err != nil {
					return err
				}
				if g.structured() {
					return g.print(map[string]any{"pool": pool, "leases": leases, "malformed": bad})
				}
				fmt.Printf("pool %s, /%d per host, %d leased\n", pool.Network, pool.SubnetLen, len(leases))
				var rows [][]string
				for _, l := range leases {
					rows = append(rows, []string{l.Subnet.String(), l.Node, l.HostAddr.String(), l.Expires.Format(time.RFC3339), time.Until(l.Expires).Round(time.Second).String()})
				}
				table("SUBNET\tNODE\tHOST ADDRESS\tEXPIRES\tIN", rows)
				for _, b := range bad {
					fmt.Fprintf(os.Stderr, "malformed lease %s: %s\n", b.Key, b.Problem)
				}
				return nil
			})
		},
	}
	release := &cobra.Command{
		Use:   "release NODE",
		Short: "Free the subnet, and the Docker network addresses, of a decommissioned host",
		Args:  usageArgs(cobra.ExactArgs(1)),
		RunE: func(cmd *cobra.Command, args []string) error {
			return g.withEtcd(func(ctx context.Context, cli *clientv3.Client) error {
				if err := ipam.ReleaseNode(ctx, cli, g.host.EtcdPrefix, args[0]); err != nil {
					return err
				}
				// They hang on the subnet's lease, revoked above; a grant
				// on an older lease of the host's goes here.
				if err := dockernet.NewStore(cli, g.host.EtcdPrefix).ReleaseNode(ctx, args[0]); err != nil {
					return err
				}
				fmt.Printf("released the subnet and the network addresses of %s\n", args[0])
				return nil
			})
		},
	}
	cmd.AddCommand(initCmd, show, release)
	return cmd
}

func nodesCmd(g *globals) *cobra.Command {
	return &cobra.Command{
		Use:   "nodes",
		Short: "Hosts in the fabric's node registry",
		Args:  usageArgs(cobra.NoArgs),
		RunE: func(cmd *cobra.Command, _ []string) error {
			return g.withEtcd(func(ctx context.Context, cli *clientv3.Client) error {
				nodes, bad, err := registry.List(ctx, cli, g.host.EtcdPrefix)
				if err != nil {
					return err
				}
				if g.structured() {
					return g.print(nodes)
				}
				var rows [][]string
				for _, n := range nodes {
					subnets, address := n.Subnet.String(), n.Address.String()
					if n.SubnetV6.IsValid() {
						subnets += "," + n.SubnetV6.String()
					}
					if n.AddressV6.IsValid() {
						address += "," + n.AddressV6.String()
					}
					rows = append(rows, []string{n.Name, address, fmt.Sprint(n.ASN), subnets, strings.Join(n.Encaps, ","), n.VTEPMAC, n.Version})
				}
				table("NODE\tADDRESS\tASN\tSUBNETS\tENCAPSULATIONS\tVTEP MAC\tVERSION", rows)
				for _, b := range bad {
					fmt.Fprintf(os.Stderr, "malformed node record %s: %s\n", b.Key, b.Problem)
				}
				return nil
			})
		},
	}
}

func dockerOptsCmd(g *globals) *cobra.Command {
	var format, file string
	cmd := &cobra.Command{
		Use:   "docker-opts",
		Short: "The options dockerd needs on this host (--bip, --mtu, --ip-masq=false)",
		Args:  usageArgs(cobra.NoArgs),
		RunE: func(cmd *cobra.Command, _ []string) error {
			if !cmd.Flags().Changed("file") {
				file = g.host.DockerOptsFile // fabricd.yaml's dockerOptsFile, if it sets one
			}
			data, err := os.ReadFile(file)
			if err != nil {
				return fmt.Errorf("%s: %w (fabricd writes it once it holds a lease; is fabricd running?)", file, err)
			}
			o, err := dockeropts.ParseEnv(string(data))
			if err != nil {
				return fmt.Errorf("%s: %w", file, err)
			}
			switch format {
			case "env":
				fmt.Print(o.Env())
			case "json":
				fmt.Print(o.JSON())
			case "systemd":
				fmt.Print(o.Systemd(file))
			default:
				return fmt.Errorf("--format %q: want env, json or systemd", format)
			}
			return nil
		},
	}
	cmd.Flags().StringVar(&format, "format", "env", "env, json or systemd")
	cmd.Flags().StringVar(&file, "file", config.Defaults().DockerOptsFile, "the options file fabricd writes (default: dockerOptsFile of fabricd.yaml)")
	return cmd
}

func containersCmd(g *globals) *cobra.Command {
	return &cobra.Command{
		Use:   "containers",
		Short: "Containers of the fabric by name: address, host, labels; a name on two hosts shows which one DNS answers with",
		Args:  usageArgs(cobra.NoArgs),
		RunE: func(cmd *cobra.Command, _ []string) error {
			return g.withEtcd(func(ctx context.Context, cli *clientv3.Client) error {
				records, problems, err := names.List(ctx, cli, g.host.EtcdPrefix)
				if err != nil {
					return err
				}
				leases, _, err := ipam.List(ctx, cli, g.host.EtcdPrefix)
				if err != nil {
					return err
				}
				held := map[string][]netip.Prefix{}
				for _, l := range leases {
					held[l.Node] = append(held[l.Node], l.Subnet)
				}
				nets, _, err := dockernet.NewStore(cli, g.host.EtcdPrefix).Read(ctx)
				if err != nil {
					return err
				}
				kept, refused := names.Trusted(records, held, nets.Owns)
				if pool, err := ipam.GetPool(ctx, cli, g.host.EtcdPrefix); err == nil {
					// An IPv6 address DNS would not give is not shown.
					kept, _ = names.TrustIPv6(kept, pool.SubnetsV6(held), nets.Owns)
				}
				entries := names.NewView(kept, nil).Entries()
				for _, r := range refused {
					entries = append(entries, names.Entry{Record: r.Record, Refused: r.Reason})
				}
				if g.structured() {
					return g.print(entries)
				}
				var rows [][]string
				for _, e := range entries {
					var labels []string
					for _, k := range slices.Sorted(maps.Keys(e.Labels)) {
						labels = append(labels, k+"="+e.Labels[k])
					}
					answer := "yes"
					switch {
					case e.Refused != "":
						answer = "no: " + e.Refused
					case e.ShadowedBy != "":
						answer = "no: " + e.ShadowedBy + "'s is older"
					}
					network := e.Network
					if network == "" {
						network = "(bridge)"
					}
					addrs := e.Address.String()
					if e.AddressV6.IsValid() {
						addrs += "," + e.AddressV6.String()
					}
					row := []string{e.Name, network, addrs, e.Node, answer, strings.Join(labels, ",")}
					if g.wide() {
						row = append(row, e.ID, e.Created.Format(time.RFC3339))
					}
					rows = append(rows, row)
				}
				header := "NAME\tNETWORK\tADDRESS\tNODE\tANSWERS\tLABELS"
				if g.wide() {
					header += "\tID\tCREATED"
				}
				table(header, rows)
				for _, p := range problems {
					fmt.Fprintf(os.Stderr, "malformed container record %v\n", p)
				}
				return nil
			})
		},
	}
}

// networkRow is one fabric network as `fabricctl networks` shows it.
type networkRow struct {
	Name       string              `json:"name"`
	Subnet     string              `json:"subnet"`
	Gateway    string              `json:"gateway"`
	SubnetV6   string              `json:"subnetV6,omitempty"`
	GatewayV6  string              `json:"gatewayV6,omitempty"`
	CreatedOn  string              `json:"createdOn"`
	Created    time.Time           `json:"created"`
	Blocks     map[string][]string `json:"blocks"`              // host -> its blocks (IPv4, and IPv6 with it)
	Containers map[string]int      `json:"containers"`          // host -> containers with an address
	Addresses  map[string][]string `json:"addresses,omitempty"` // host -> addresses given (wide, json, yaml)
}

func networksCmd(g *globals) *cobra.Command {
	return &cobra.Command{
		Use:   "networks",
		Short: "Docker networks on the fabric: subnet, gateway, each host's blocks and containers",
		Args:  usageArgs(cobra.NoArgs),
		RunE: func(cmd *cobra.Command, _ []string) error {
			return g.withEtcd(func(ctx context.Context, cli *clientv3.Client) error {
				s, _, err := dockernet.NewStore(cli, g.host.EtcdPrefix).Read(ctx)
				if err != nil {
					return err
				}
				var rows []networkRow
				for _, name := range slices.Sorted(maps.Keys(s.Networks)) {
					n := s.Networks[name]
					r := networkRow{Name: name, Subnet: n.Subnet.String(), Gateway: n.Gateway.String(), CreatedOn: n.CreatedOn, Created: n.Created,
						Blocks: map[string][]string{}, Containers: map[string]int{}, Addresses: map[string][]string{}}
					if n.SubnetV6.IsValid() {
						r.SubnetV6, r.GatewayV6 = n.SubnetV6.String(), n.GatewayV6.String()
					}
					for _, b := range s.Blocks[name] {
						for _, p := range n.BlockPrefixes(b) {
							r.Blocks[b.Node] = append(r.Blocks[b.Node], p.String())
						}
					}
					for _, a := range slices.SortedFunc(maps.Keys(s.Grants[name]), netip.Addr.Compare) {
						gr := s.Grants[name][a]
						if a.Is4() {
							r.Containers[gr.Node]++ // a container on an IPv6 network has two
						}
						r.Addresses[gr.Node] = append(r.Addresses[gr.Node], a.String())
					}
					rows = append(rows, r)
				}
				for key, problem := range s.Problems {
					fmt.Fprintf(os.Stderr, "malformed network record %s: %s\n", key, problem)
				}
				if g.structured() {
					return g.print(rows)
				}
				perHost := func(m map[string][]string) string {
					var parts []string
					for _, h := range slices.Sorted(maps.Keys(m)) {
						parts = append(parts, h+": "+strings.Join(m[h], " "))
					}
					return strings.Join(parts, ", ")
				}
				var table_ [][]string
				for _, r := range rows {
					var counts []string
					for _, h := range slices.Sorted(maps.Keys(r.Containers)) {
						counts = append(counts, fmt.Sprintf("%s: %d", h, r.Containers[h]))
					}
					subnet, gateway := r.Subnet, r.Gateway
					if r.SubnetV6 != "" {
						subnet, gateway = subnet+" "+r.SubnetV6, gateway+" "+r.GatewayV6
					}
					row := []string{r.Name, subnet, gateway, perHost(r.Blocks), strings.Join(counts, ", ")}
					if g.wide() {
						row = append(row, perHost(r.Addresses), r.CreatedOn, r.Created.Format(time.RFC3339))
					}
					table_ = append(table_, row)
				}
				header := "NAME\tSUBNET\tGATEWAY\tBLOCKS\tCONTAINERS"
				if g.wide() {
					header += "\tADDRESSES\tCREATED ON\tCREATED"
				}
				table(header, table_)
				return nil
			})
		},
	}
}
