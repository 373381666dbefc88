package qemulane

import "fmt"

// FabricImage is an image in which fabricd and the lab run as on the host:
// the kernel modules of the data planes and of the lab, and the programs
// fabricd, the lab and the tests run besides busybox (FabricTools), with
// bins (image path -> host path), more host programs (host path -> image
// path, "" for the same) and the init script.
func FabricImage(kernel string, bins map[string]string, init string, more map[string]string) (Image, error) {
	img := Image{Kernel: kernel, Modules: FabricModules, Binaries: bins, Init: init}
	for host, image := range FabricTools {
		if err := img.AddHostBinary(host, image); err != nil {
			return Image{}, fmt.Errorf("%w (the guest needs etcd-server, iptables, ipset, iproute2, iputils-ping and util-linux installed)", err)
		}
	}
	for host, image := range more {
		if err := img.AddHostBinary(host, image); err != nil {
			return Image{}, err
		}
	}
	if err := img.AddHostDir(xtablesDir); err != nil {
		return Image{}, fmt.Errorf("iptables extensions: %w", err)
	}
	img.Symlinks = map[string]string{}
	for _, tool := range []string{"iptables", "ip6tables"} {
		for _, name := range []string{tool, tool + "-save", tool + "-restore", tool + "-legacy", tool + "-legacy-save", tool + "-legacy-restore"} {
			img.Symlinks["/usr/sbin/"+name] = "xtables-legacy-multi"
		}
	}
	return img, nil
}

const xtablesDir = "/usr/lib/x86_64-linux-gnu/xtables"

// FabricModules: the data planes (ipip, vxlan, wireguard), the lab (veth,
// bridge, netem) and what fabricd's NAT and policy need from
// iptables-legacy, ip6tables and ipset. The VM has no modprobe that could
// load them on demand. crc32c_generic first: libcrc32c (under nf_conntrack) needs it
// through a softdep, which ResolveModules does not follow.
var FabricModules = []string{"ipip", "veth", "bridge", "vxlan", "wireguard", "crc32c_generic",
	"iptable_filter", "iptable_nat", "iptable_mangle", "xt_conntrack", "xt_comment", "xt_MASQUERADE", "xt_addrtype",
	"xt_tcpudp", "xt_nat", "xt_set", "ip_set_hash_net", "ip_set_hash_ip", "br_netfilter",
	"ip6table_filter", "ip6table_nat", "ip6t_REJECT",
	"ipt_REJECT", "xt_multiport", // policy's deny rules (no modprobe here: without them a policy is not written at all)
	"sch_netem",                                        // random loss on an underlay link (lab.Host.Loss)
	"nft_ct", "nft_flow_offload", "nf_flow_table_inet"} // flowoffload: a flowtable and the rule that fills it

// FabricTools are this machine's programs fabricd, the lab and the tests
// run in the VM, copied with their shared libraries (host path -> image
// path, "" for the same): Debian's etcd 3.4, iptables (legacy backend: no
// nft_compat needed), ipset, iproute2's ip and bridge (in /usr/local, ahead
// of busybox's on PATH: fabricd's NAT asks ip for JSON, and busybox's ip
// ignores "proto 93"), iputils' ping (-M do, which busybox's lacks) and
// util-linux's nsenter.
var FabricTools = map[string]string{
	"/usr/bin/etcd":                  "",
	"/usr/sbin/xtables-legacy-multi": "",
	"/usr/sbin/ipset":                "",
	"/usr/sbin/ip":                   "/usr/local/sbin/ip",
	"/usr/sbin/bridge":               "/usr/local/sbin/bridge",
	"/usr/bin/ping":                  "/usr/local/bin/ping",
	"/usr/bin/nsenter":               "/usr/local/bin/nsenter",
}
