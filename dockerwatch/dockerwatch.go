// Package dockerwatch follows the local dockerd through its Engine API on a
// unix socket and reports what fabric cares about: the running containers
// that have an address in this host's subnet (the containers on the fabric
// bridge) or on a fabric network, and the fabric networks dockerd has. It
// lists them, then re-lists on every container or network event; when
// dockerd goes away (a restart, an upgrade) it keeps the last list and
// reconnects. It also makes and removes networks for the network sync.
//
// The Engine API is plain HTTP with JSON; the few calls needed here do not
// justify linking Docker's client module.
package dockerwatch

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"net"
	"net/http"
	"net/netip"
	"net/url"
	"reflect"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/fabricnet/fabric/internal/latest"
)

// Container is one running container on the fabric bridge or on fabric
// networks.
type Container struct {
	ID   string     `json:"id"`
	Name string     `json:"name"`
	Addr netip.Addr `json:"address"` // on the fabric bridge; invalid when not there
	// AddrV6 is its IPv6 address on the fabric bridge (dockerd --ipv6),
	// invalid when it has none.
	AddrV6  netip.Addr        `json:"addressV6,omitzero"`
	Labels  map[string]string `json:"labels,omitempty"`
	Created time.Time         `json:"created"`
	// Networks are its endpoints on fabric networks, by network name.
	Networks []Attachment `json:"networks,omitempty"`
}

// Attachment is a container's endpoint on a fabric network.
type Attachment struct {
	Network    string     `json:"network"`
	NetworkID  string     `json:"networkID"`
	EndpointID string     `json:"endpointID"`
	Addr       netip.Addr `json:"address"`
	AddrV6     netip.Addr `json:"addressV6,omitzero"` // invalid: none
	// Aliases are the other names it answers to there: compose's service
	// name, --network-alias, the short container ID.
	Aliases []string `json:"aliases,omitempty"`
}

// Network is a network of the fabric driver on this dockerd.
type Network struct {
	ID      string       `json:"id"`
	Name    string       `json:"name"`
	Subnet  netip.Prefix `json:"subnet"`
	Gateway netip.Addr   `json:"gateway"`
	// SubnetV6 and GatewayV6 are its IPv6 ones (--ipv6), invalid without.
	SubnetV6  netip.Prefix `json:"subnetV6,omitzero"`
	GatewayV6 netip.Addr   `json:"gatewayV6,omitzero"`
	IPAM      string       `json:"ipam"` // its IPAM driver
	// Labels are its labels (compose marks its networks with them).
	Labels map[string]string `json:"labels,omitempty"`
}

// Snapshot is what Watch reports after each change.
type Snapshot struct {
	Containers []Container // sorted by name
	Networks   []Network   // sorted by name
}

// Equal reports whether two snapshots are the same.
func (s Snapshot) Equal(o Snapshot) bool { return reflect.DeepEqual(s, o) }

// Client talks to one dockerd.
type Client struct {
	socket string
	http   *http.Client

	// aliases of endpoints on fabric networks, by endpoint ID: the list of
	// containers leaves them out, so each endpoint is inspected once.
	aliasMu sync.Mutex
	aliases map[string][]string
}

// New returns a client for the Engine API on the unix socket path.
func New(socket string) *Client {
	tr := &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", socket)
		},
		DisableCompression: true,
	}
	return &Client{socket: socket, http: &http.Client{Transport: tr}, aliases: map[string][]string{}}
}

// apiContainer is the part of GET /containers/json fabric reads.
type apiContainer struct {
	ID              string            `json:"Id"`
	Names           []string          `json:"Names"`
	Labels          map[string]string `json:"Labels"`
	Created         int64             `json:"Created"`
	NetworkSettings struct {
		Networks map[string]struct {
			NetworkID  string   `json:"NetworkID"`
			EndpointID string   `json:"EndpointID"`
			IPAddress  string   `json:"IPAddress"`
			IPv6       string   `json:"GlobalIPv6Address"`
			Aliases    []string `json:"Aliases"`
		} `json:"Networks"`
	} `json:"NetworkSettings"`
}

// apiNetwork is the part of GET /networks fabric reads.
type apiNetwork struct {
	Name   string            `json:"Name"`
	ID     string            `json:"Id"`
	Driver string            `json:"Driver"`
	Labels map[string]string `json:"Labels"`
	IPAM   struct {
		Driver string `json:"Driver"`
		Config []struct {
			Subnet  string `json:"Subnet"`
			Gateway string `json:"Gateway"`
		} `json:"Config"`
	} `json:"IPAM"`
}

// Filter says what a snapshot keeps.
type Filter struct {
	Subnet netip.Prefix // this host's subnet: the containers on the fabric bridge
	Driver string       // the fabric network driver's name: its networks and their containers
}

// List returns the running containers on the bridge or on the driver's
// networks, and the driver's networks.
func (c *Client) List(ctx context.Context, f Filter) (Snapshot, error) {
	var containers []apiContainer
	if err := c.get(ctx, "/containers/json", "list containers", &containers); err != nil {
		return Snapshot{}, err
	}
	var networks []apiNetwork
	if f.Driver != "" {
		filters := url.QueryEscape(fmt.Sprintf(`{"driver":[%q]}`, f.Driver))
		if err := c.get(ctx, "/networks?filters="+filters, "list networks", &networks); err != nil {
			return Snapshot{}, err
		}
	}
	snap := fromAPI(containers, networks, f)
	if err := c.addAliases(ctx, &snap); err != nil {
		return Snapshot{}, err
	}
	return snap, nil
}

// addAliases fills in the aliases of the snapshot's endpoints on fabric
// networks (compose's service name, --network-alias): dockerd's list of
// containers leaves them out, its inspect of a container has them. An
// endpoint's aliases do not change, so each is asked for once.
func (c *Client) addAliases(ctx context.Context, snap *Snapshot) error {
	c.aliasMu.Lock()
	defer c.aliasMu.Unlock()
	seen := map[string]bool{}
	for i := range snap.Containers {
		ctr := &snap.Containers[i]
		for j := range ctr.Networks {
			a := &ctr.Networks[j]
			seen[a.EndpointID] = true
			aliases, known := c.aliases[a.EndpointID]
			if !known {
				var inspect struct {
					NetworkSettings struct {
						Networks map[string]struct {
							EndpointID string   `json:"EndpointID"`
							Aliases    []string `json:"Aliases"`
						} `json:"Networks"`
					} `json:"NetworkSettings"`
				}
				if err := c.get(ctx, "/containers/"+url.PathEscape(ctr.ID)+"/json", "inspect container "+ctr.Name, &inspect); err != nil {
					return err
				}
				for _, ep := range inspect.NetworkSettings.Networks {
					c.aliases[ep.EndpointID] = cleanAliases(ep.Aliases, ctr.Name)
				}
				aliases = c.aliases[a.EndpointID]
			}
			a.Aliases = aliases
		}
	}
	for id := range c.aliases {
		if !seen[id] {
			delete(c.aliases, id)
		}
	}
	return nil
}

// cleanAliases sorts aliases and drops the container's own name.
func cleanAliases(aliases []string, name string) []string {
	out := slices.DeleteFunc(slices.Clone(aliases), func(s string) bool { return s == name })
	slices.Sort(out)
	return slices.Compact(out)
}

func (c *Client) get(ctx context.Context, path, what string, out any) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://docker"+path, nil)
	if err != nil {
		return err
	}
	resp, err := c.http.Do(req)
	if err != nil {
		return fmt.Errorf("dockerd at %s: %w", c.socket, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		body, _ := io.ReadAll(io.LimitReader(resp.Body, 512))
		return fmt.Errorf("dockerd at %s: %s: %s: %s", c.socket, what, resp.Status, strings.TrimSpace(string(body)))
	}
	if err := json.NewDecoder(resp.Body).Decode(out); err != nil {
		return fmt.Errorf("dockerd at %s: %s: %w", c.socket, what, err)
	}
	return nil
}

func fromAPI(list []apiContainer, networks []apiNetwork, f Filter) Snapshot {
	var snap Snapshot
	fabric := map[string]bool{}
	for _, an := range networks {
		if an.Driver != f.Driver {
			continue
		}
		n := Network{ID: an.ID, Name: an.Name, IPAM: an.IPAM.Driver, Labels: an.Labels}
		for _, c := range an.IPAM.Config {
			subnet, _ := netip.ParsePrefix(c.Subnet)
			gateway, _ := netip.ParseAddr(strings.Split(c.Gateway, "/")[0])
			switch {
			case subnet.Addr().Is4() && !n.Subnet.IsValid():
				n.Subnet, n.Gateway = subnet, gateway
			case subnet.Addr().Is6() && !n.SubnetV6.IsValid():
				n.SubnetV6, n.GatewayV6 = subnet, gateway
			}
		}
		fabric[an.ID] = true
		snap.Networks = append(snap.Networks, n)
	}
	slices.SortFunc(snap.Networks, func(a, b Network) int { return strings.Compare(a.Name, b.Name) })
	for _, ac := range list {
		if len(ac.Names) == 0 {
			continue
		}
		name := strings.TrimPrefix(ac.Names[0], "/")
		if name == "" {
			continue
		}
		c := Container{ID: ac.ID, Name: name, Labels: ac.Labels, Created: time.Unix(ac.Created, 0).UTC()}
		// Networks in name order: the same container always gets the same
		// bridge address when it has two in the subnet.
		for _, n := range slices.Sorted(maps.Keys(ac.NetworkSettings.Networks)) {
			ep := ac.NetworkSettings.Networks[n]
			a, err := netip.ParseAddr(ep.IPAddress)
			if err != nil {
				continue
			}
			switch {
			case fabric[ep.NetworkID]:
				v6, _ := netip.ParseAddr(ep.IPv6)
				c.Networks = append(c.Networks, Attachment{Network: n, NetworkID: ep.NetworkID, EndpointID: ep.EndpointID, Addr: a, AddrV6: v6, Aliases: cleanAliases(ep.Aliases, name)})
			case f.Subnet.IsValid() && f.Subnet.Contains(a) && !c.Addr.IsValid():
				c.Addr = a
				c.AddrV6, _ = netip.ParseAddr(ep.IPv6)
			}
		}
		if c.Addr.IsValid() || len(c.Networks) > 0 {
			snap.Containers = append(snap.Containers, c)
		}
	}
	slices.SortFunc(snap.Containers, func(a, b Container) int { return strings.Compare(a.Name, b.Name) })
	return snap
}

// CreateNetwork makes network n of driver on this dockerd, with n's IPAM
// driver, subnets, gateways and labels (the network sync: a fabric network
// made on another host).
func (c *Client) CreateNetwork(ctx context.Context, driver string, n Network) error {
	config := []map[string]string{{"Subnet": n.Subnet.String(), "Gateway": n.Gateway.String()}}
	if n.SubnetV6.IsValid() {
		config = append(config, map[string]string{"Subnet": n.SubnetV6.String(), "Gateway": n.GatewayV6.String()})
	}
	body, _ := json.Marshal(map[string]any{
		"Name": n.Name, "Driver": driver, "CheckDuplicate": true, "Labels": n.Labels, "EnableIPv6": n.SubnetV6.IsValid(),
		"IPAM": map[string]any{"Driver": n.IPAM, "Config": config},
	})
	return c.send(ctx, http.MethodPost, "/networks/create", body, "create network "+n.Name)
}

// DeleteNetwork removes a network from this dockerd; dockerd refuses while
// containers are attached.
func (c *Client) DeleteNetwork(ctx context.Context, id string) error {
	return c.send(ctx, http.MethodDelete, "/networks/"+url.PathEscape(id), nil, "remove network "+id)
}

// NetworkName returns the name of network id, or "" if dockerd has no such
// network (yet).
func (c *Client) NetworkName(ctx context.Context, id string) (string, error) {
	var n apiNetwork
	err := c.get(ctx, "/networks/"+url.PathEscape(id), "inspect network", &n)
	if err != nil && strings.Contains(err.Error(), "404") {
		return "", nil
	}
	return n.Name, err
}

func (c *Client) send(ctx context.Context, method, path string, body []byte, what string) error {
	req, err := http.NewRequestWithContext(ctx, method, "http://docker"+path, bytes.NewReader(body))
	if err != nil {
		return err
	}
	req.Header.Set("Content-Type", "application/json")
	resp, err := c.http.Do(req)
	if err != nil {
		return fmt.Errorf("dockerd at %s: %w", c.socket, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode/100 != 2 {
		msg, _ := io.ReadAll(io.LimitReader(resp.Body, 1024))
		var e struct{ Message string }
		if json.Unmarshal(msg, &e) == nil && e.Message != "" {
			msg = []byte(e.Message)
		}
		return fmt.Errorf("dockerd at %s: %s: %s: %s", c.socket, what, resp.Status, strings.TrimSpace(string(msg)))
	}
	return nil
}

// events follows GET /events for containers and networks and sends on
// changed after each event; it returns when the stream ends or ctx is done.
// ready is closed once dockerd has answered the request.
func (c *Client) events(ctx context.Context, changed chan<- struct{}, ready chan<- struct{}) error {
	filters := url.QueryEscape(`{"type":["container","network"]}`)
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://docker/events?filters="+filters, nil)
	if err != nil {
		return err
	}
	resp, err := c.http.Do(req)
	if err != nil {
		return fmt.Errorf("dockerd at %s: %w", c.socket, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("dockerd at %s: events: %s", c.socket, resp.Status)
	}
	close(ready)
	dec := json.NewDecoder(bufio.NewReader(resp.Body))
	for {
		var ev struct{ Type, Action string }
		if err := dec.Decode(&ev); err != nil {
			if ctx.Err() != nil {
				return nil
			}
			return fmt.Errorf("dockerd at %s: event stream: %w", c.socket, err)
		}
		select {
		case changed <- struct{}{}:
		default:
		}
	}
}

const (
	minBackoff = 500 * time.Millisecond
	maxBackoff = 5 * time.Second
)

// Watch sends the snapshot (containers on the fabric bridge, given by f's
// subnet, and on f's driver's networks, and those networks) at start and
// after every change, the newest winning. While dockerd is away nothing is
// sent: the last snapshot stands until dockerd answers again. The channel
// is closed when ctx is done.
func Watch(ctx context.Context, socket string, f Filter, logger *slog.Logger) <-chan Snapshot {
	if logger == nil {
		logger = slog.Default()
	}
	out := make(chan Snapshot, 1)
	c := New(socket)
	go func() {
		defer close(out)
		var last Snapshot
		sent := false
		backoff := minBackoff
		loggedAway := false
		for ctx.Err() == nil {
			err := c.follow(ctx, f, func(snap Snapshot) {
				backoff = minBackoff
				if loggedAway {
					logger.Info("dockerd answers again", "socket", socket)
					loggedAway = false
				}
				if sent && snap.Equal(last) {
					return
				}
				last, sent = snap, true
				latest.Put(out, snap)
			})
			if ctx.Err() != nil {
				return
			}
			if !loggedAway {
				logger.Warn("cannot follow dockerd; container records stay as they are until it answers", "socket", socket, "err", err)
				loggedAway = true
			}
			select {
			case <-ctx.Done():
				return
			case <-time.After(backoff):
			}
			backoff = min(2*backoff, maxBackoff)
		}
	}()
	return out
}

// follow subscribes to events, lists once the subscription stands (so no
// change between the list and the stream is lost), then lists again after
// each burst of events. It returns when the stream breaks.
func (c *Client) follow(ctx context.Context, f Filter, emit func(Snapshot)) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	changed := make(chan struct{}, 1)
	ready := make(chan struct{})
	streamErr := make(chan error, 1)
	go func() { streamErr <- c.events(ctx, changed, ready) }()
	select {
	case <-ready:
	case err := <-streamErr:
		return err
	case <-ctx.Done():
		return nil
	}
	relist := func() error {
		lctx, lcancel := context.WithTimeout(ctx, 10*time.Second)
		defer lcancel()
		list, err := c.List(lctx, f)
		if err != nil {
			return err
		}
		emit(list)
		return nil
	}
	if err := relist(); err != nil {
		return err
	}
	for {
		select {
		case <-ctx.Done():
			return nil
		case err := <-streamErr:
			if err == nil {
				err = errors.New("event stream ended")
			}
			return err
		case <-changed:
			if err := relist(); err != nil {
				return err
			}
		}
	}
}
