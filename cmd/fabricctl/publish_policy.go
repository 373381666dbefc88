package main

import (
	"cmp"
	"context"
	"fmt"
	"io"
	"net/netip"
	"os"
	"strings"

	"github.com/spf13/cobra"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/fabricnet/fabric/dockernet"
	"github.com/fabricnet/fabric/ipam"
	"github.com/fabricnet/fabric/nat"
	"github.com/fabricnet/fabric/policy"
	"github.com/fabricnet/fabric/publish"
)

func publishCmd(g *globals) *cobra.Command {
	cmd := &cobra.Command{Use: "publish", Short: "Fabric-wide published ports: every host forwards the port to a container anywhere in the fabric"}
	var hosts string
	add := &cobra.Command{
		Use:   "add PORT[/tcp|/udp] TARGET:PORT",
		Short: "Publish a port, e.g. `fabricctl publish add 8080/tcp 10.244.3.2:80`",
		Args:  usageArgs(cobra.ExactArgs(2)),
		RunE: func(cmd *cobra.Command, args []string) error {
			proto, port, err := publish.ParseSpec(args[0])
			if err != nil {
				return err
			}
			target, err := netip.ParseAddrPort(args[1])
			if err != nil {
				return fmt.Errorf("target %q: want container-address:port, e.g. 10.244.3.2:80", args[1])
			}
			p := nat.PublishedPort{Proto: proto, HostPort: port, Target: target}
			if hosts != "" {
				p.Hosts = strings.Split(hosts, ",")
			}
			return g.withEtcd(func(ctx context.Context, cli *clientv3.Client) error {
				pool, err := ipam.GetPool(ctx, cli, g.host.EtcdPrefix)
				if err != nil {
					return err
				}
				nets, _, err := dockernet.NewStore(cli, g.host.EtcdPrefix).Read(ctx)
				if err != nil {
					return err
				}
				if err := publish.Add(ctx, cli, g.host.EtcdPrefix, append([]netip.Prefix{pool.Network}, nets.Subnets()...), p); err != nil {
					return err
				}
				fmt.Printf("published %s\n", p)
				return nil
			})
		},
	}
	add.Flags().StringVar(&hosts, "hosts", "", "comma-separated node names that forward the port (default: every host)")
	list := &cobra.Command{
		Use:   "list",
		Short: "List published ports",
		Args:  usageArgs(cobra.NoArgs),
		RunE: func(cmd *cobra.Command, _ []string) error {
			return g.withEtcd(func(ctx context.Context, cli *clientv3.Client) error {
				pubs, bad, err := publish.List(ctx, cli, g.host.EtcdPrefix)
				if err != nil {
					return err
				}
				if g.structured() {
					return g.print(pubs)
				}
				var rows [][]string
				for _, p := range pubs {
					h := "all"
					if len(p.Hosts) > 0 {
						h = strings.Join(p.Hosts, ",")
					}
					rows = append(rows, []string{fmt.Sprintf("%d/%s", p.HostPort, p.Proto), p.Target.String(), h})
				}
				table("PORT\tTARGET\tHOSTS", rows)
				for _, b := range bad {
					fmt.Fprintf(os.Stderr, "malformed published port %s: %s\n", b.Key, b.Problem)
				}
				return nil
			})
		},
	}
	del := &cobra.Command{
		Use:   "delete PORT[/tcp|/udp]",
		Short: "Stop publishing a port on every host",
		Args:  usageArgs(cobra.ExactArgs(1)),
		RunE: func(cmd *cobra.Command, args []string) error {
			proto, port, err := publish.ParseSpec(args[0])
			if err != nil {
				return err
			}
			return g.withEtcd(func(ctx context.Context, cli *clientv3.Client) error {
				if err := publish.Delete(ctx, cli, g.host.EtcdPrefix, proto, port); err != nil {
					return err
				}
				fmt.Printf("deleted %d/%s\n", port, proto)
				return nil
			})
		},
	}
	cmd.AddCommand(add, list, del)
	return cmd
}

func policyCmd(g *globals) *cobra.Command {
	cmd := &cobra.Command{Use: "policy", Short: "Network policy enforced by every host for its own containers"}
	var file string
	var merge bool
	apply := &cobra.Command{
		Use:   "apply -f FILE",
		Short: "Make the stored rules those of a YAML or JSON file (rules not in it are deleted; --merge keeps them); an invalid file is refused whole and changes nothing",
		Args:  usageArgs(cobra.NoArgs),
		RunE: func(cmd *cobra.Command, _ []string) error {
			var data []byte
			var err error
			if file == "-" {
				data, err = io.ReadAll(os.Stdin)
			} else {
				data, err = os.ReadFile(file)
			}
			if err != nil {
				return err
			}
			doc, err := policy.ParseDocument(file, data)
			if err != nil {
				return err
			}
			return g.withEtcd(func(ctx context.Context, cli *clientv3.Client) error {
				var removed []string
				if merge {
					err = policy.PutDocument(ctx, cli, g.host.EtcdPrefix, doc)
				} else {
					removed, err = policy.ReplaceDocument(ctx, cli, g.host.EtcdPrefix, doc)
				}
				if err != nil {
					return err
				}
				names := make([]string, len(doc.Rules))
				for i, r := range doc.Rules {
					names[i] = r.Name
				}
				if len(names) > 0 {
					fmt.Printf("applied %d rule(s): %s", len(names), strings.Join(names, ", "))
				} else {
					fmt.Print("applied no rules")
				}
				if doc.DefaultAction != "" {
					fmt.Printf("; default action %s", doc.DefaultAction)
				}
				if len(removed) > 0 {
					fmt.Printf("; removed %d rule(s) not in the file: %s", len(removed), strings.Join(removed, ", "))
				}
				fmt.Println()
				return nil
			})
		},
	}
	apply.Flags().StringVarP(&file, "file", "f", "", "policy file (YAML or JSON), - for standard input")
	apply.MarkFlagRequired("file")
	apply.Flags().BoolVar(&merge, "merge", false, "add and replace the file's rules, keep the stored rules the file does not name")
	list := &cobra.Command{
		Use:   "list",
		Short: "List the rules in evaluation order and the default action",
		Args:  usageArgs(cobra.NoArgs),
		RunE: func(cmd *cobra.Command, _ []string) error {
			return g.withEtcd(func(ctx context.Context, cli *clientv3.Client) error {
				p, err := policy.Get(ctx, cli, g.host.EtcdPrefix)
				if err != nil {
					return err
				}
				if g.structured() {
					return g.print(p)
				}
				fmt.Printf("default action: %s\n", p.DefaultAction)
				var rows [][]string
				for _, r := range p.Rules {
					ports := make([]string, len(r.Ports))
					for i, pr := range r.Ports {
						ports[i] = pr.String()
					}
					rows = append(rows, []string{fmt.Sprint(r.Order), r.Name, r.Action, selectors(r.From), selectors(r.To), cmp.Or(r.Protocol, "any"), cmp.Or(strings.Join(ports, ","), "any")})
				}
				table("ORDER\tNAME\tACTION\tFROM\tTO\tPROTOCOL\tPORTS", rows)
				return nil
			})
		},
	}
	del := &cobra.Command{
		Use:   "delete NAME",
		Short: "Delete one rule",
		Args:  usageArgs(cobra.ExactArgs(1)),
		RunE: func(cmd *cobra.Command, args []string) error {
			return g.withEtcd(func(ctx context.Context, cli *clientv3.Client) error {
				if err := policy.Delete(ctx, cli, g.host.EtcdPrefix, args[0]); err != nil {
					return err
				}
				fmt.Printf("deleted rule %s\n", args[0])
				return nil
			})
		},
	}
	cmd.AddCommand(apply, list, del)
	return cmd
}

func selectors(s []policy.Selector) string {
	if len(s) == 0 {
		return "any"
	}
	out := make([]string, len(s))
	for i, x := range s {
		out[i] = x.String()
	}
	return strings.Join(out, ",")
}
