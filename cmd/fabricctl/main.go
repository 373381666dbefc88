// fabricctl is the operator's tool for a fabric: peers, routes, leases,
// nodes and the options dockerd needs.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"os"
	"slices"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"
	"github.com/spf13/cobra/doc"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"
	"sigs.k8s.io/yaml"

	"github.com/fabricnet/fabric/config"
	"github.com/fabricnet/fabric/internal/etcdclient"
	"github.com/fabricnet/fabric/localapi"
	"github.com/fabricnet/fabric/version"
)

type globals struct {
	// host holds fabricd's settings that fabricctl shares: etcd and the
	// run directory (config.DefineClientFlags).
	host    config.Config
	json    bool          // --json, the same as -o json
	output  string        // -o: table, wide, json or yaml
	timeout time.Duration // --timeout: for one command's calls to etcd or fabricd
}

// structured reports whether listings print data (JSON or YAML) instead of
// a table.
func (g *globals) structured() bool { return g.json || g.output == "json" || g.output == "yaml" }

// wide reports whether tables show their extra columns.
func (g *globals) wide() bool { return g.output == "wide" }

// print writes v as JSON or YAML, as -o asks; the YAML of `policy list`
// is what `policy apply -f` takes back.
func (g *globals) print(v any) error {
	if g.output == "yaml" && !g.json {
		b, err := yaml.Marshal(v)
		if err != nil {
			return err
		}
		_, err = os.Stdout.Write(b)
		return err
	}
	return printJSON(v)
}

func main() {
	g := &globals{}
	root := &cobra.Command{
		Use:           "fabricctl",
		Short:         "Operate a fabric: peers, routes, subnet leases, nodes and docker options",
		SilenceUsage:  true,
		SilenceErrors: true,
	}
	// Defaults < fabricd's settings file (FABRIC_CONFIG, else
	// /etc/fabric/fabricd.yaml) < FABRIC_* environment < flags.
	g.host = config.Defaults()
	hostErr := errors.Join(readHostSettings(&g.host, os.Args[1:]), config.DefineClientFlags(root.PersistentFlags(), &g.host, os.Environ()),
		config.MisspeltEnv(os.Environ()))
	root.PersistentFlags().String("config", "", "fabricd's settings file to take etcd and run-dir settings from (default: FABRIC_CONFIG, else /etc/fabric/fabricd.yaml if present)")
	root.PersistentFlags().BoolVar(&g.json, "json", false, "print JSON for scripts (the same as -o json)")
	root.PersistentFlags().DurationVar(&g.timeout, "timeout", 5*time.Second, "how long a command waits for etcd or fabricd")
	root.PersistentFlags().StringVarP(&g.output, "output", "o", "table", "listings as table, wide (more columns where a listing has them: containers), json or yaml")
	root.PersistentPreRunE = func(cmd *cobra.Command, _ []string) error {
		switch cmd.Name() {
		case "version", "completion", "help", "bash", "zsh", "fish", "powershell", "man":
			return nil // need no settings: an unreadable fabricd.yaml must not stop them
		}
		if hostErr != nil {
			return usageError{hostErr}
		}
		if err := g.host.ValidateClient(); err != nil {
			return usageError{err}
		}
		switch g.output {
		case "table", "wide", "json", "yaml":
			return nil
		}
		return usageError{fmt.Errorf("-o %q: want table, wide, json or yaml", g.output)}
	}

	root.AddCommand(peersCmd(g), routesCmd(g), statusCmd(g), leaveCmd(g), rotateKeyCmd(g), ipamCmd(g), nodesCmd(g), containersCmd(g), networksCmd(g), dockerOptsCmd(g), publishCmd(g), policyCmd(g), &cobra.Command{
		Use: "version", Short: "Print the version",
		Run: func(*cobra.Command, []string) { fmt.Println("fabricctl", version.String()) },
	})
	root.AddCommand(&cobra.Command{
		Use: "man DIR", Short: "Write the manual pages (section 8) into DIR", Hidden: true, // for the .deb
		Args: usageArgs(cobra.ExactArgs(1)),
		RunE: func(_ *cobra.Command, args []string) error {
			return doc.GenManTree(root, &doc.GenManHeader{Title: "FABRICCTL", Section: "8", Source: "fabric " + version.String(), Manual: "fabric"}, args[0])
		},
	})
	root.Version = version.String()
	root.SetVersionTemplate("fabricctl {{.Version}}\n")
	root.SetFlagErrorFunc(func(_ *cobra.Command, err error) error { return usageError{err} })
	if err := root.Execute(); err != nil {
		fmt.Fprintln(os.Stderr, "fabricctl:", err)
		os.Exit(exitCode(err))
	}
}

// Exit codes, documented in docs/operations.md.
const (
	exitOK              = 0
	exitFailed          = 1 // the request failed (bad data, refused change, ...)
	exitUsage           = 2 // bad usage: unknown command or flag, wrong arguments
	exitEtcdUnreachable = 3
	exitNotRunning      = 4 // fabricd does not answer on its socket
)

// usageError marks a mistake in how fabricctl was called.
type usageError struct{ error }

func (e usageError) Unwrap() error { return e.error }

// usageArgs makes an argument-count check's error a usage error.
func usageArgs(check cobra.PositionalArgs) cobra.PositionalArgs {
	return func(cmd *cobra.Command, args []string) error {
		if err := check(cmd, args); err != nil {
			return usageError{err}
		}
		return nil
	}
}

// errEtcdUnreachable marks an error because etcd could not be reached.
var errEtcdUnreachable = errors.New("etcd unreachable")

func exitCode(err error) int {
	var usage usageError
	switch {
	case err == nil:
		return exitOK
	// cobra's own usage errors are plain errors: known by their text.
	case errors.As(err, &usage), strings.HasPrefix(err.Error(), "unknown command"), strings.HasPrefix(err.Error(), "required flag(s)"):
		return exitUsage
	case errors.Is(err, errEtcdUnreachable):
		return exitEtcdUnreachable
	case errors.Is(err, localapi.ErrNotRunning):
		return exitNotRunning
	}
	return exitFailed
}

// leaveCmd decommissions this host: unlike a stop (a restart, which peers
// ride out with graceful restart), it withdraws the host's subnet at once.
func leaveCmd(g *globals) *cobra.Command {
	return &cobra.Command{
		Use:   "leave",
		Short: "Take this host out of the fabric: withdraw its subnet from every peer now, delete its node record, stop fabricd",
		Long: "A plain stop of fabricd (SIGTERM, systemctl stop or restart, an upgrade) is a restart: peers keep this\n" +
			"host's routes for the graceful-restart time and nothing is withdrawn. `fabricctl leave` is the deliberate\n" +
			"decommission: every peer drops the route at once, and fabricd exits. The subnet stays leased to the host\n" +
			"(`fabricctl ipam release NODE` frees it) and kernel state stays until `fabricd --cleanup`.",
		Args: usageArgs(cobra.NoArgs),
		RunE: func(cmd *cobra.Command, _ []string) error {
			ctx, cancel := g.ctx()
			defer cancel()
			res, err := g.api().Leave(ctx)
			if err != nil {
				return err
			}
			if g.structured() {
				return g.print(res)
			}
			fmt.Printf("node %s, subnet %s: %s\n", res.Node, res.Subnet, res.Done)
			return nil
		},
	}
}

// rotateKeyCmd replaces this host's WireGuard key pair and waits until
// every peer that encrypts has handshaken with the new key.
func rotateKeyCmd(g *globals) *cobra.Command {
	return &cobra.Command{
		Use:   "rotate-key",
		Short: "Give this host a new WireGuard key pair; peers follow from its node record without losing traffic",
		Long: "fabricd makes a new key pair, writes the private key to its state directory (0600, replacing the old\n" +
			"one), puts it on the WireGuard device and publishes the public key in the node record. Peers install\n" +
			"it and handshake at once; meanwhile the device still decrypts their current sessions and holds what it\n" +
			"sends. fabricctl then waits (up to --timeout) until every peer that encrypts has handshaken with the\n" +
			"new key, and says how long each took.",
		Args: usageArgs(cobra.NoArgs),
		RunE: func(cmd *cobra.Command, _ []string) error {
			ctx, cancel := g.ctx()
			defer cancel()
			api := g.api()
			res, err := api.RotateKey(ctx)
			if err != nil {
				return err
			}
			followed, waiting := map[string]time.Duration{}, map[string]bool{}
			for {
				peers, err := api.Peers(ctx)
				if err != nil {
					return fmt.Errorf("the key is rotated (%s), but reading the peers failed: %w", res.NewKey, err)
				}
				clear(waiting)
				for _, p := range peers {
					switch {
					case p.Encap != "wireguard":
					case p.WireGuardHandshake.After(res.Rotated):
						if _, ok := followed[p.Name]; !ok {
							followed[p.Name] = p.WireGuardHandshake.Sub(res.Rotated)
						}
					default:
						waiting[p.Name] = true
					}
				}
				if len(waiting) == 0 {
					break
				}
				select {
				case <-ctx.Done():
					return fmt.Errorf("the key is rotated (%s), but after %s no handshake with the new key from %s: see `fabricctl peers status` there (does it run fabricd, does UDP reach it?)",
						res.NewKey, g.timeout, strings.Join(slices.Sorted(maps.Keys(waiting)), ", "))
				case <-time.After(50 * time.Millisecond):
				}
			}
			if g.structured() {
				return g.print(struct {
					localapi.RotateKeyResult
					Followed map[string]time.Duration `json:"peersFollowed"`
				}{res, followed})
			}
			fmt.Printf("node %s: new WireGuard public key %s (was %s)\n", res.Node, res.NewKey, res.OldKey)
			for _, name := range slices.Sorted(maps.Keys(followed)) {
				fmt.Printf("  %s handshook with the new key after %s\n", name, followed[name].Round(time.Millisecond))
			}
			return nil
		},
	}
}

func (g *globals) api() *localapi.Client { return localapi.NewClient(g.host.SocketPath()) }

func (g *globals) etcd() (*clientv3.Client, error) {
	return etcdclient.New(g.host.EtcdEndpoints, g.host.EtcdTLSFiles(), g.timeout, zap.NewNop())
}

// withEtcd runs f with an etcd client and the --timeout deadline. When f fails
// because etcd could not be reached, the error says why (refused
// connection, TLS handshake, client certificate) instead of a bare
// "context deadline exceeded".
func (g *globals) withEtcd(f func(ctx context.Context, cli *clientv3.Client) error) error {
	cli, err := g.etcd()
	if err != nil {
		return err
	}
	defer cli.Close()
	ctx, cancel := g.ctx()
	defer cancel()
	err = f(ctx, cli)
	if err != nil && unreachable(ctx, err) {
		dctx, dcancel := g.ctx()
		defer dcancel()
		if derr := etcdclient.Diagnose(dctx, g.host.EtcdEndpoints, g.host.EtcdTLSFiles()); derr != nil {
			return fmt.Errorf("%w: %w", errEtcdUnreachable, derr)
		}
	}
	return err
}

// unreachable reports whether err looks like etcd not answering at all.
func unreachable(ctx context.Context, err error) bool {
	return ctx.Err() != nil || etcdclient.Unavailable(err)
}

func (g *globals) ctx() (context.Context, context.CancelFunc) {
	return context.WithTimeout(context.Background(), g.timeout)
}

func printJSON(v any) error {
	enc := json.NewEncoder(os.Stdout)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

func table(header string, rows [][]string) {
	w := tabwriter.NewWriter(os.Stdout, 0, 0, 2, ' ', 0)
	fmt.Fprintln(w, header)
	for _, r := range rows {
		fmt.Fprintln(w, strings.Join(r, "\t"))
	}
	w.Flush()
}

func since(t time.Time) string {
	if t.IsZero() {
		return "-"
	}
	return time.Since(t).Round(time.Second).String()
}

func peersCmd(g *globals) *cobra.Command {
	peers := &cobra.Command{Use: "peers", Short: "BGP peers of this host"}
	peers.AddCommand(&cobra.Command{
		Use:   "status",
		Short: "One row per BGP peer: address, type, state, since, prefixes, encapsulation, BFD",
		Args:  usageArgs(cobra.NoArgs),
		RunE: func(cmd *cobra.Command, _ []string) error {
			ctx, cancel := g.ctx()
			defer cancel()
			ps, err := g.api().Peers(ctx)
			if err != nil {
				return err
			}
			if g.structured() {
				return g.print(ps)
			}
			var rows [][]string
			for _, p := range ps {
				rows = append(rows, []string{p.Name, p.Address, fmt.Sprint(p.ASN), p.Type, p.State, since(p.Since), fmt.Sprint(p.Received), fmt.Sprint(p.Accepted), encapColumn(p), bfdColumn(p)})
			}
			table("PEER\tADDRESS\tASN\tTYPE\tSTATE\tSINCE\tRECEIVED\tACCEPTED\tENCAPSULATION\tBFD", rows)
			return nil
		},
	})
	return peers
}

// encapColumn is the peer's encapsulation (with WireGuard, how long ago the
// last handshake was), or for a fabric host that none reaches (with
// encryption on: one that cannot encrypt) "none: " and why.
func encapColumn(p localapi.Peer) string {
	switch {
	case p.Encap == "" && p.EncapReason != "":
		return "none: " + p.EncapReason
	case p.Encap == "wireguard" && p.WireGuardHandshake.IsZero():
		return "wireguard (no handshake yet)"
	case p.Encap == "wireguard":
		return "wireguard (handshake " + since(p.WireGuardHandshake) + " ago)"
	}
	return p.Encap
}

// bfdColumn is "up, detect 600ms", "down (detection time expired; 2 downs)"
// or "-" without a session.
func bfdColumn(p localapi.Peer) string {
	if p.BFD == "" {
		return "-"
	}
	out := p.BFD
	if p.BFD == "up" && p.BFDDetect > 0 {
		out += ", detect " + p.BFDDetect.String()
	}
	var notes []string
	if p.BFD != "up" && p.BFDDiag != "" {
		notes = append(notes, p.BFDDiag)
	}
	if p.BFDDowns > 0 {
		notes = append(notes, fmt.Sprintf("%d downs", p.BFDDowns))
	}
	if len(notes) > 0 {
		out += " (" + strings.Join(notes, "; ") + ")"
	}
	return out
}

func routesCmd(g *globals) *cobra.Command {
	return &cobra.Command{
		Use:   "routes",
		Short: "Kernel routes fabricd owns on this host, and why (peer, encapsulation)",
		Args:  usageArgs(cobra.NoArgs),
		RunE: func(cmd *cobra.Command, _ []string) error {
			ctx, cancel := g.ctx()
			defer cancel()
			rs, err := g.api().Routes(ctx)
			if err != nil {
				return err
			}
			if g.structured() {
				return g.print(rs)
			}
			var rows [][]string
			for _, r := range rs {
				rows = append(rows, []string{r.Prefix, r.Via, r.Dev, r.Encap, r.Peer, r.PeerType})
			}
			table("PREFIX\tVIA\tDEVICE\tENCAPSULATION\tPEER\tLEARNED FROM", rows)
			return nil
		},
	}
}

func statusCmd(g *globals) *cobra.Command {
	return &cobra.Command{
		Use:   "status",
		Short: "This host's fabricd: node, subnet, underlay, MTU",
		Args:  usageArgs(cobra.NoArgs),
		RunE: func(cmd *cobra.Command, _ []string) error {
			ctx, cancel := g.ctx()
			defer cancel()
			s, err := g.api().Status(ctx)
			if err != nil {
				return err
			}
			if g.structured() {
				return g.print(s)
			}
			w := tabwriter.NewWriter(os.Stdout, 0, 0, 2, ' ', 0)
			fmt.Fprintf(w, "node\t%s\nversion\t%s\nsubnet\t%s (gateway %s)\nunderlay\t%s on %s\nasn\t%d\nencapsulation\t%s\nencryption\t%s\nmtu\t%d\nbridge\t%s\nup\t%s\netcd\t%v\n",
				s.Node, s.Version, s.Subnet, s.Gateway, s.Underlay, s.UnderlayDev, s.ASN, s.Encapsulation, s.Encryption, s.MTU, s.Bridge, since(s.Started), map[bool]string{true: "reachable", false: "UNREACHABLE"}[s.EtcdHealthy])
			if s.SubnetV6 != "" {
				// What routers get as the /64's next hop.
				nextHop := s.UnderlayV6
				if nextHop == "" {
					nextHop = s.Underlay + ", IPv4-mapped: no IPv6 address on the underlay, usable by fabric hosts only"
				}
				fmt.Fprintf(w, "subnet IPv6\t%s (next hop %s)\n", s.SubnetV6, nextHop)
			}
			return w.Flush()
		},
	}
}
