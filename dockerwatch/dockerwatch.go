// Package dockerwatch follows the local dockerd through its Engine API on a
// unix socket and reports the running containers that have an address in
// this host's subnet: the containers on the fabric bridge. It lists them,
// then re-lists on every container or network event; when dockerd goes away
// (a restart, an upgrade) it keeps the last list and reconnects.
//
// The Engine API is plain HTTP with JSON; the few calls needed here do not
// justify linking Docker's client module.
package dockerwatch

import (
	"bufio"
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
	"slices"
	"strings"
	"time"

	"github.com/fabricnet/fabric/internal/latest"
)

// Container is one running container on the fabric bridge.
type Container struct {
	ID      string            `json:"id"`
	Name    string            `json:"name"`
	Addr    netip.Addr        `json:"address"`
	Labels  map[string]string `json:"labels,omitempty"`
	Created time.Time         `json:"created"`
}

func (c Container) equal(o Container) bool {
	return c.ID == o.ID && c.Name == o.Name && c.Addr == o.Addr && c.Created.Equal(o.Created) && maps.Equal(c.Labels, o.Labels)
}

// Equal reports whether two lists (sorted by name, as Watch sends them) are
// the same.
func Equal(a, b []Container) bool { return slices.EqualFunc(a, b, Container.equal) }

// Client talks to one dockerd.
type Client struct {
	socket string
	http   *http.Client
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
	return &Client{socket: socket, http: &http.Client{Transport: tr}}
}

// apiContainer is the part of GET /containers/json fabric reads.
type apiContainer struct {
	ID              string            `json:"Id"`
	Names           []string          `json:"Names"`
	Labels          map[string]string `json:"Labels"`
	Created         int64             `json:"Created"`
	NetworkSettings struct {
		Networks map[string]struct {
			IPAddress string `json:"IPAddress"`
		} `json:"Networks"`
	} `json:"NetworkSettings"`
}

// List returns the running containers with an address in subnet, sorted by
// name. A container with no name or no address there is left out.
func (c *Client) List(ctx context.Context, subnet netip.Prefix) ([]Container, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://docker/containers/json", nil)
	if err != nil {
		return nil, err
	}
	resp, err := c.http.Do(req)
	if err != nil {
		return nil, fmt.Errorf("dockerd at %s: %w", c.socket, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		body, _ := io.ReadAll(io.LimitReader(resp.Body, 512))
		return nil, fmt.Errorf("dockerd at %s: list containers: %s: %s", c.socket, resp.Status, strings.TrimSpace(string(body)))
	}
	var list []apiContainer
	if err := json.NewDecoder(resp.Body).Decode(&list); err != nil {
		return nil, fmt.Errorf("dockerd at %s: list containers: %w", c.socket, err)
	}
	return fromAPI(list, subnet), nil
}

func fromAPI(list []apiContainer, subnet netip.Prefix) []Container {
	var out []Container
	for _, ac := range list {
		if len(ac.Names) == 0 {
			continue
		}
		name := strings.TrimPrefix(ac.Names[0], "/")
		// Networks in name order: the same container always gets the same
		// address when it has two in the subnet.
		var addr netip.Addr
		for _, n := range slices.Sorted(maps.Keys(ac.NetworkSettings.Networks)) {
			a, err := netip.ParseAddr(ac.NetworkSettings.Networks[n].IPAddress)
			if err == nil && subnet.Contains(a) {
				addr = a
				break
			}
		}
		if name == "" || !addr.IsValid() {
			continue
		}
		out = append(out, Container{ID: ac.ID, Name: name, Addr: addr, Labels: ac.Labels, Created: time.Unix(ac.Created, 0).UTC()})
	}
	slices.SortFunc(out, func(a, b Container) int { return strings.Compare(a.Name, b.Name) })
	return out
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

// Watch sends the list of containers on the fabric bridge (address in
// subnet) at start and after every change, the newest list winning. While
// dockerd is away nothing is sent: the last list stands until dockerd
// answers again. The channel is closed when ctx is done.
func Watch(ctx context.Context, socket string, subnet netip.Prefix, logger *slog.Logger) <-chan []Container {
	if logger == nil {
		logger = slog.Default()
	}
	out := make(chan []Container, 1)
	c := New(socket)
	go func() {
		defer close(out)
		var last []Container
		sent := false
		backoff := minBackoff
		loggedAway := false
		for ctx.Err() == nil {
			err := c.follow(ctx, subnet, func(list []Container) {
				backoff = minBackoff
				if loggedAway {
					logger.Info("dockerd answers again", "socket", socket)
					loggedAway = false
				}
				if sent && Equal(list, last) {
					return
				}
				last, sent = list, true
				latest.Put(out, list)
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
func (c *Client) follow(ctx context.Context, subnet netip.Prefix, emit func([]Container)) error {
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
		list, err := c.List(lctx, subnet)
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
