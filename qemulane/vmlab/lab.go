// Package vmlab builds small multi-host networks out of named network
// namespaces: an underlay of one or more L2 segments joined by a router
// namespace, "host" namespaces on those segments, and container namespaces
// behind a bridge in each host. It is used inside the qemulane VM, but only
// touches namespaces it creates, so it also runs on a development host.
//
// All link work goes through netlink handles bound to a namespace, so nothing
// is ever created in the caller's namespace.
package vmlab

import (
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/fabricnet/fabric/internal/nsthread"
)

// NetnsDir is where named namespaces are bind-mounted (as iproute2 does).
const NetnsDir = "/var/run/netns"

// Lab owns the named namespaces it creates; Close removes exactly those.
type Lab struct {
	prefix  string
	created []string // full names, in creation order
	handles map[string]*netlink.Handle
}

// New returns a lab whose namespaces are named prefix+name.
func New(prefix string) *Lab {
	return &Lab{prefix: prefix, handles: map[string]*netlink.Handle{}}
}

// NamespacesWithPrefix lists the named namespaces whose names start with
// prefix: what a run left behind, if anything.
func NamespacesWithPrefix(prefix string) []string {
	entries, _ := os.ReadDir(NetnsDir)
	var left []string
	for _, e := range entries {
		if strings.HasPrefix(e.Name(), prefix) {
			left = append(left, e.Name())
		}
	}
	return left
}

// FullName is the namespace name as seen in NetnsDir.
func (l *Lab) FullName(ns string) string { return l.prefix + ns }

// Path is the namespace's bind-mount path, usable with nsenter --net=.
func (l *Lab) Path(ns string) string { return filepath.Join(NetnsDir, l.FullName(ns)) }

// AddNamespace creates a named namespace with loopback up.
func (l *Lab) AddNamespace(ns string) error {
	full := l.FullName(ns)
	if err := os.MkdirAll(NetnsDir, 0o755); err != nil {
		return err
	}
	err := onLockedThread(func() error {
		orig, err := netns.Get()
		if err != nil {
			return err
		}
		defer orig.Close()
		created, err := netns.NewNamed(full) // also switches this thread into it
		if err != nil {
			if serr := netns.Set(orig); serr != nil {
				return errThreadTainted{serr}
			}
			return err
		}
		created.Close()
		if err := netns.Set(orig); err != nil {
			return errThreadTainted{err}
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("create namespace %s: %w", full, err)
	}
	l.created = append(l.created, full)
	h, err := l.Handle(ns)
	if err != nil {
		return err
	}
	lo, err := h.LinkByName("lo")
	if err != nil {
		return fmt.Errorf("%s: lo: %w", full, err)
	}
	return h.LinkSetUp(lo)
}

// Handle returns a netlink handle operating inside ns.
func (l *Lab) Handle(ns string) (*netlink.Handle, error) {
	if h, ok := l.handles[ns]; ok {
		return h, nil
	}
	target, err := netns.GetFromPath(l.Path(ns))
	if err != nil {
		return nil, fmt.Errorf("open namespace %s: %w", l.FullName(ns), err)
	}
	defer target.Close()
	// Route family only: the stock kernel lacks xfrm_user until it is loaded.
	h, err := netlink.NewHandleAt(target, unix.NETLINK_ROUTE)
	if err != nil {
		return nil, fmt.Errorf("netlink handle in %s: %w", l.FullName(ns), err)
	}
	l.handles[ns] = h
	return h, nil
}

// Close deletes every namespace the lab created; their links go with them.
func (l *Lab) Close() error {
	for _, h := range l.handles {
		h.Close()
	}
	l.handles = map[string]*netlink.Handle{}
	var errs []error
	for i := len(l.created) - 1; i >= 0; i-- {
		if err := netns.DeleteNamed(l.created[i]); err != nil {
			errs = append(errs, fmt.Errorf("delete namespace %s: %w", l.created[i], err))
		}
	}
	l.created = nil
	return errors.Join(errs...)
}

// errThreadTainted marks a thread whose namespace could not be restored; the
// thread stays locked so the Go runtime discards it with the goroutine.
type errThreadTainted struct{ err error }

func (e errThreadTainted) Error() string { return "restore thread namespace: " + e.err.Error() }

// onLockedThread runs fn on a fresh goroutine locked to its OS thread, so
// namespace switches never leak into the caller's thread.
func onLockedThread(fn func() error) error {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		err := fn()
		var tainted errThreadTainted
		if !errors.As(err, &tainted) {
			runtime.UnlockOSThread()
		}
		errc <- err
	}()
	return <-errc
}

// Do runs fn on a thread inside ns. Sockets fn creates stay in ns after it
// returns; processes it starts inherit ns.
func (l *Lab) Do(ns string, fn func() error) error {
	return nsthread.Do(l.FullName(ns), fn)
}

// Exec runs a command inside ns and returns its combined output.
func (l *Lab) Exec(ns string, name string, args ...string) ([]byte, error) {
	var out []byte
	err := l.Do(ns, func() error {
		var err error
		out, err = exec.Command(name, args...).CombinedOutput()
		return err
	})
	if err != nil {
		return out, fmt.Errorf("%s: %s %s: %w: %s", l.FullName(ns), name, strings.Join(args, " "),
			err, strings.TrimSpace(string(out)))
	}
	return out, nil
}

// Start starts cmd inside ns; the process keeps running there after Start
// returns (the child inherits the namespace of the thread that forks it).
func (l *Lab) Start(ns string, cmd *exec.Cmd) error {
	err := l.Do(ns, cmd.Start)
	if err != nil {
		return fmt.Errorf("%s: start %s: %w", l.FullName(ns), strings.Join(cmd.Args, " "), err)
	}
	return nil
}

// Sysctl writes a /proc/sys key (dotted or slashed) inside ns; net.* keys are
// per namespace.
func (l *Lab) Sysctl(ns, key, value string) error {
	p := filepath.Join("/proc/sys", strings.ReplaceAll(key, ".", "/"))
	return l.Do(ns, func() error {
		if err := os.WriteFile(p, []byte(value), 0o644); err != nil {
			return fmt.Errorf("%s: sysctl %s=%s: %w", l.FullName(ns), key, value, err)
		}
		return nil
	})
}

// AddVeth creates a veth pair with one end in each namespace, both up.
func (l *Lab) AddVeth(nsA, nameA, nsB, nameB string, mtu int) error {
	ha, err := l.Handle(nsA)
	if err != nil {
		return err
	}
	hb, err := l.Handle(nsB)
	if err != nil {
		return err
	}
	peerNS, err := netns.GetFromPath(l.Path(nsB))
	if err != nil {
		return err
	}
	defer peerNS.Close()
	veth := &netlink.Veth{
		LinkAttrs:     netlink.LinkAttrs{Name: nameA, MTU: mtu},
		PeerName:      nameB,
		PeerNamespace: netlink.NsFd(peerNS),
	}
	if err := ha.LinkAdd(veth); err != nil {
		return fmt.Errorf("veth %s/%s <-> %s/%s: %w", l.FullName(nsA), nameA, l.FullName(nsB), nameB, err)
	}
	if err := l.setUp(ha, nsA, nameA); err != nil {
		return err
	}
	if mtu > 0 {
		if peer, err := hb.LinkByName(nameB); err == nil {
			if err := hb.LinkSetMTU(peer, mtu); err != nil {
				return fmt.Errorf("%s/%s mtu: %w", l.FullName(nsB), nameB, err)
			}
		}
	}
	return l.setUp(hb, nsB, nameB)
}

// AddBridge creates a bridge, up.
func (l *Lab) AddBridge(ns, name string) error {
	h, err := l.Handle(ns)
	if err != nil {
		return err
	}
	if err := h.LinkAdd(&netlink.Bridge{LinkAttrs: netlink.LinkAttrs{Name: name}}); err != nil {
		return fmt.Errorf("%s: bridge %s: %w", l.FullName(ns), name, err)
	}
	return l.setUp(h, ns, name)
}

// SetMaster attaches link to bridge.
func (l *Lab) SetMaster(ns, link, bridge string) error {
	h, err := l.Handle(ns)
	if err != nil {
		return err
	}
	port, err := h.LinkByName(link)
	if err != nil {
		return fmt.Errorf("%s: %s: %w", l.FullName(ns), link, err)
	}
	br, err := h.LinkByName(bridge)
	if err != nil {
		return fmt.Errorf("%s: %s: %w", l.FullName(ns), bridge, err)
	}
	if err := h.LinkSetMaster(port, br); err != nil {
		return fmt.Errorf("%s: attach %s to %s: %w", l.FullName(ns), link, bridge, err)
	}
	return nil
}

// AddAddr assigns cidr (e.g. "10.244.1.1/24") to link.
func (l *Lab) AddAddr(ns, link, cidr string) error {
	h, err := l.Handle(ns)
	if err != nil {
		return err
	}
	lk, err := h.LinkByName(link)
	if err != nil {
		return fmt.Errorf("%s: %s: %w", l.FullName(ns), link, err)
	}
	addr, err := netlink.ParseAddr(cidr)
	if err != nil {
		return err
	}
	if err := h.AddrAdd(lk, addr); err != nil {
		return fmt.Errorf("%s: address %s on %s: %w", l.FullName(ns), cidr, link, err)
	}
	return nil
}

// AddDefaultRoute adds "default via gw".
func (l *Lab) AddDefaultRoute(ns string, gw net.IP) error {
	h, err := l.Handle(ns)
	if err != nil {
		return err
	}
	_, any4, _ := net.ParseCIDR("0.0.0.0/0")
	if err := h.RouteAdd(&netlink.Route{Dst: any4, Gw: gw}); err != nil {
		return fmt.Errorf("%s: default via %s: %w", l.FullName(ns), gw, err)
	}
	return nil
}

// LinkIndex returns the index of link in ns.
func (l *Lab) LinkIndex(ns, link string) (int, error) {
	h, err := l.Handle(ns)
	if err != nil {
		return 0, err
	}
	lk, err := h.LinkByName(link)
	if err != nil {
		return 0, fmt.Errorf("%s: %s: %w", l.FullName(ns), link, err)
	}
	return lk.Attrs().Index, nil
}

// LinkStats returns the kernel's counters for link.
func (l *Lab) LinkStats(ns, link string) (*netlink.LinkStatistics, error) {
	h, err := l.Handle(ns)
	if err != nil {
		return nil, err
	}
	lk, err := h.LinkByName(link)
	if err != nil {
		return nil, fmt.Errorf("%s: %s: %w", l.FullName(ns), link, err)
	}
	if lk.Attrs().Statistics == nil {
		return nil, fmt.Errorf("%s: %s: no statistics", l.FullName(ns), link)
	}
	return lk.Attrs().Statistics, nil
}

func (l *Lab) setUp(h *netlink.Handle, ns, name string) error {
	lk, err := h.LinkByName(name)
	if err != nil {
		return fmt.Errorf("%s: %s: %w", l.FullName(ns), name, err)
	}
	if err := h.LinkSetUp(lk); err != nil {
		return fmt.Errorf("%s: set %s up: %w", l.FullName(ns), name, err)
	}
	return nil
}
