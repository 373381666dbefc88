// Package flowoffload owns fabric's nftables table (inet "fabric"): a
// flowtable on the bridge and the tunnel devices, and one rule that hands
// each established connection between containers to it. The kernel then
// forwards that connection's later packets from the device they arrive on
// straight to the one they leave by (nf_flow_table), past conntrack and
// every iptables rule: the per-packet cost of fabric's own rules goes.
//
// It is the same set of packets FABRIC-ESTABLISHED accepts (pool source,
// pool destination, established), so policy still judges every new
// connection; a connection's entry goes with its conntrack entry. Kernels
// without nf_flow_table (Supported) keep the path through the rules.
package flowoffload

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"slices"
	"strings"
	"time"

	"github.com/google/nftables"
	"github.com/google/nftables/binaryutil"
	"github.com/google/nftables/expr"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// Names of what this package owns in the kernel.
const (
	TableName     = "fabric"
	FlowtableName = "containers"
	ChainName     = "forward"
)

var (
	table = &nftables.Table{Family: nftables.TableFamilyINet, Name: TableName}
	chain = &nftables.Chain{Name: ChainName, Table: table} // for reading its rules
)

// State is what the table offloads: connections inside each pool (IPv4,
// and IPv6 when valid) between the devices named (the bridge, each
// backend's tunnel). Devices that do not exist (yet) are left out.
type State struct {
	Pools   []netip.Prefix
	Devices []string
}

// desired is the table's content for the devices that exist.
type desired struct {
	devices []string       // sorted
	pools   []netip.Prefix // one rule each, masked
}

// plan is what the kernel should hold for st, given the devices that exist;
// no device, no table.
func plan(st State, exists func(string) bool) desired {
	var d desired
	for _, dev := range st.Devices {
		if exists(dev) && !slices.Contains(d.devices, dev) {
			d.devices = append(d.devices, dev)
		}
	}
	slices.Sort(d.devices)
	if len(d.devices) == 0 {
		return desired{}
	}
	for _, p := range st.Pools {
		if p.IsValid() {
			d.pools = append(d.pools, p.Masked())
		}
	}
	if len(d.pools) == 0 {
		return desired{}
	}
	return d
}

// ruleTag is a rule's user data, which is also how the rules are compared
// with the kernel's: a rule changed by hand loses it.
func ruleTag(pool netip.Prefix) []byte { return []byte(tagPrefix + pool.String()) }

const tagPrefix = "fabric: offload established "

// equal reports whether the kernel holds d (devices, and rules by their
// tags).
func (d desired) equal(devices []string, rules []*nftables.Rule) bool {
	slices.Sort(devices)
	return slices.Equal(d.devices, devices) &&
		slices.EqualFunc(d.pools, rules, func(p netip.Prefix, r *nftables.Rule) bool { return bytes.Equal(ruleTag(p), r.UserData) })
}

// Owner writes the table in one network namespace.
type Owner struct {
	nsPath string
	log    *slog.Logger
}

// New is the owner of the table in the namespace at nsPath ("" is this
// process's).
func New(nsPath string, log *slog.Logger) *Owner {
	return &Owner{nsPath: nsPath, log: log}
}

// ErrUnsupported wraps the kernel's answer when it has no flowtables.
var ErrUnsupported = errors.New("the kernel has no nftables flowtables (nf_flow_table)")

// conn is a netlink connection to nf_tables in o's namespace, and what
// closes it. It is opened at once (AsLasting): a Conn that dials per
// request would enter the namespace by a file descriptor closed by then.
func (o *Owner) conn() (*nftables.Conn, func(), error) {
	opts := []nftables.ConnOption{nftables.AsLasting()}
	if o.nsPath != "" {
		ns, err := netns.GetFromPath(o.nsPath)
		if err != nil {
			return nil, nil, fmt.Errorf("network namespace %s: %w", o.nsPath, err)
		}
		defer ns.Close()
		opts = append(opts, nftables.WithNetNSFd(int(ns)))
	}
	c, err := nftables.New(opts...)
	if err != nil {
		return nil, nil, fmt.Errorf("nf_tables netlink: %w", err)
	}
	return c, func() { c.CloseLasting() }, nil
}

// Supported reports whether the kernel can run a flowtable, by creating
// one in a table of its own and removing it in the same transaction:
// nothing stays. It is ErrUnsupported when the kernel refuses the
// flowtable, and another error when nf_tables cannot be reached.
func (o *Owner) Supported() error {
	c, done, err := o.conn()
	if err != nil {
		return err
	}
	defer done()
	probe := &nftables.Table{Family: nftables.TableFamilyINet, Name: TableName + "-probe"}
	c.AddTable(probe)
	c.AddFlowtable(&nftables.Flowtable{Table: probe, Name: FlowtableName})
	c.DelTable(probe)
	if err := c.Flush(); err != nil {
		if errors.Is(err, unix.ENOENT) || errors.Is(err, unix.EOPNOTSUPP) {
			return fmt.Errorf("%w: %v", ErrUnsupported, err)
		}
		return fmt.Errorf("nf_tables: %w", err)
	}
	return nil
}

// Apply makes the kernel's table match st for the devices that exist now,
// replacing it whole in one transaction when it differs; it reports
// whether it wrote.
func (o *Owner) Apply(st State) (bool, error) {
	h, err := o.links()
	if err != nil {
		return false, fmt.Errorf("netlink: %w", err)
	}
	defer h.Close()
	want := plan(st, func(dev string) bool { _, err := h.LinkByName(dev); return err == nil })
	c, done, err := o.conn()
	if err != nil {
		return false, err
	}
	defer done()
	devices, rules, present, err := read(c)
	if err != nil {
		return false, err
	}
	if present && want.equal(devices, rules) || !present && len(want.devices) == 0 {
		return false, nil
	}
	if present {
		c.DelTable(table)
	}
	if len(want.devices) > 0 {
		write(c, want)
	}
	if err := c.Flush(); err != nil {
		return false, fmt.Errorf("nftables table inet %s (flowtable on %v): %w", TableName, want.devices, err)
	}
	return true, nil
}

// write queues the table, its flowtable and its rules on c.
func write(c *nftables.Conn, want desired) {
	c.AddTable(table)
	ft := c.AddFlowtable(&nftables.Flowtable{Table: table, Name: FlowtableName, Devices: want.devices,
		Hooknum: nftables.FlowtableHookIngress, Priority: nftables.FlowtablePriorityFilter})
	accept := nftables.ChainPolicyAccept
	ch := c.AddChain(&nftables.Chain{Name: ChainName, Table: table, Type: nftables.ChainTypeFilter,
		Hooknum: nftables.ChainHookForward, Priority: nftables.ChainPriorityFilter, Policy: &accept})
	for _, p := range want.pools {
		c.AddRule(&nftables.Rule{Table: table, Chain: ch, Exprs: offloadRule(p, ft.Name), UserData: ruleTag(p)})
	}
}

// offloadRule is "ip saddr POOL ip daddr POOL ct state established counter
// flow add @FT" (ip6 for an IPv6 pool). The counter counts the packets
// that still took the rules: a connection's packets until its flow entry
// exists, and any the flowtable hands back (too big for the path MTU).
func offloadRule(pool netip.Prefix, flowtable string) []expr.Any {
	proto, src, dst := byte(unix.NFPROTO_IPV4), uint32(12), uint32(16)
	if pool.Addr().Is6() {
		proto, src, dst = unix.NFPROTO_IPV6, 8, 24
	}
	n := uint32(pool.Addr().BitLen() / 8)
	mask := netipMask(pool)
	e := []expr.Any{
		&expr.Meta{Key: expr.MetaKeyNFPROTO, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{proto}},
	}
	for _, off := range []uint32{src, dst} {
		e = append(e,
			&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: off, Len: n},
			&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: n, Mask: mask, Xor: make([]byte, n)},
			&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: pool.Addr().AsSlice()})
	}
	return append(e,
		&expr.Ct{Register: 1, Key: expr.CtKeySTATE},
		&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 4,
			Mask: binaryutil.NativeEndian.PutUint32(expr.CtStateBitESTABLISHED), Xor: make([]byte, 4)},
		&expr.Cmp{Op: expr.CmpOpNeq, Register: 1, Data: make([]byte, 4)},
		&expr.Counter{},
		&expr.FlowOffload{Name: flowtable})
}

// netipMask is pool's netmask as bytes.
func netipMask(pool netip.Prefix) []byte {
	m := make([]byte, pool.Addr().BitLen()/8)
	for i := range pool.Bits() {
		m[i/8] |= 0x80 >> (i % 8)
	}
	return m
}

// read is the kernel's table: the flowtable's devices, the chain's rules,
// and whether the table exists.
func read(c *nftables.Conn) (devices []string, rules []*nftables.Rule, present bool, err error) {
	if _, err := c.ListTableOfFamily(TableName, nftables.TableFamilyINet); err != nil {
		if errors.Is(err, unix.ENOENT) {
			return nil, nil, false, nil
		}
		return nil, nil, false, fmt.Errorf("list table inet %s: %w", TableName, err)
	}
	fts, err := c.ListFlowtables(table)
	if err != nil {
		return nil, nil, true, fmt.Errorf("list flowtables of inet %s: %w", TableName, err)
	}
	for _, ft := range fts {
		if ft.Name == FlowtableName {
			devices = ft.Devices
		}
	}
	rs, err := c.GetRules(table, chain)
	if err != nil && !errors.Is(err, unix.ENOENT) {
		return nil, nil, true, fmt.Errorf("list chain %s of inet %s: %w", ChainName, TableName, err)
	}
	return devices, rs, true, nil
}

// Counters are the table as the kernel has it, for status and tests.
type Counters struct {
	Devices []string
	// SlowPath is, per pool, the packets of established connections that
	// still took the rules (see offloadRule).
	SlowPath map[netip.Prefix]uint64
}

// Read is what the table in the namespace at nsPath holds; ok is false
// when there is no table.
func Read(nsPath string) (cs Counters, ok bool, err error) {
	c, done, err := New(nsPath, nil).conn()
	if err != nil {
		return cs, false, err
	}
	defer done()
	devices, rs, present, err := read(c)
	if err != nil || !present {
		return cs, false, err
	}
	cs.Devices, cs.SlowPath = devices, map[netip.Prefix]uint64{}
	for _, r := range rs {
		pool, err := netip.ParsePrefix(strings.TrimPrefix(string(r.UserData), tagPrefix))
		if err != nil {
			continue // not ours
		}
		for _, e := range r.Exprs {
			if ctr, ok := e.(*expr.Counter); ok {
				cs.SlowPath[pool] = ctr.Packets
			}
		}
	}
	return cs, true, nil
}

// links is a netlink handle in o's namespace.
func (o *Owner) links() (*netlink.Handle, error) {
	if o.nsPath == "" {
		return netlink.NewHandle(unix.NETLINK_ROUTE)
	}
	ns, err := netns.GetFromPath(o.nsPath)
	if err != nil {
		return nil, fmt.Errorf("network namespace %s: %w", o.nsPath, err)
	}
	defer ns.Close()
	return netlink.NewHandleAt(ns, unix.NETLINK_ROUTE)
}

// Run keeps the table matching st until ctx ends: at once, when a link
// appears or goes (a tunnel device made later, the bridge re-made: a
// flowtable loses a device that goes and never takes it back), and every
// repair interval (a table changed by hand). On a kernel without
// flowtables it logs that once and returns.
func (o *Owner) Run(ctx context.Context, st State, repair time.Duration) {
	if err := o.Supported(); err != nil {
		o.log.Info("flow offload off: established connections between containers take the rules", "why", err)
		return
	}
	updates := make(chan netlink.LinkUpdate, 64)
	done := make(chan struct{})
	defer close(done)
	opts := netlink.LinkSubscribeOptions{ErrorCallback: func(err error) { o.log.Debug("link updates", "err", err) }}
	if o.nsPath != "" {
		if ns, err := netns.GetFromPath(o.nsPath); err == nil {
			defer ns.Close()
			opts.Namespace = &ns
		}
	}
	if err := netlink.LinkSubscribeWithOptions(updates, done, opts); err != nil {
		o.log.Warn("flow offload: no link updates; devices made later are added at the repair interval", "err", err)
		updates = nil
	}
	tick := time.NewTicker(repair)
	defer tick.Stop()
	failed := false
	for {
		switch wrote, err := o.Apply(st); {
		case err != nil:
			if !failed {
				o.log.Error("flow offload", "err", err)
			}
			failed = true
		case wrote:
			o.log.Info("flow offload: established connections between containers bypass the rules", "devices", st.Devices)
			failed = false
		}
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		case u, ok := <-updates:
			if !ok {
				updates = nil
				continue
			}
			if !slices.Contains(st.Devices, u.Attrs().Name) {
				continue
			}
		}
	}
}

// Cleanup removes the table from the namespace at nsPath, if there.
func Cleanup(nsPath string) error {
	c, done, err := New(nsPath, nil).conn()
	if err != nil {
		return err
	}
	defer done()
	if _, err := c.ListTableOfFamily(TableName, nftables.TableFamilyINet); err != nil {
		if errors.Is(err, unix.ENOENT) || errors.Is(err, unix.EPROTONOSUPPORT) || errors.Is(err, unix.EOPNOTSUPP) {
			return nil // not there, or a kernel without nf_tables
		}
		return err
	}
	c.DelTable(table)
	return c.Flush()
}
