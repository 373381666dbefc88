// Package localapi is fabricd's local status API: JSON over HTTP on a unix
// socket that only root can open. fabricctl reads peers, routes and the
// agent's status from it; nothing listens on a network address.
package localapi

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"time"
)

// Peer is one row of `fabricctl peers status`.
type Peer struct {
	Name     string    `json:"name"`
	Address  string    `json:"address"`
	ASN      uint32    `json:"asn"`
	Type     string    `json:"type"`
	State    string    `json:"state"`
	Since    time.Time `json:"since"`
	Received int       `json:"received"`
	Accepted int       `json:"accepted"`
	Encap    string    `json:"encapsulation"`
	// EncapReason says why this encapsulation was chosen (auto mode).
	EncapReason string `json:"encapsulationReason,omitempty"`
	// BFD is the BFD session's state ("" without one); BFDDetect how long
	// the peer may be silent before it counts as dead; BFDDiag why the
	// session last went down; BFDDowns how often it did.
	BFD       string        `json:"bfd,omitempty"`
	BFDDetect time.Duration `json:"bfdDetectionTime,omitempty"`
	BFDDiag   string        `json:"bfdLastDown,omitempty"`
	BFDDowns  int           `json:"bfdDowns,omitempty"`
	// WireGuardHandshake is when the last WireGuard handshake with the
	// peer completed (zero: none yet): encrypted traffic flows only after
	// one, so a firewall dropping the WireGuard port shows here.
	WireGuardHandshake time.Time `json:"wireguardHandshake,omitzero"`
}

// Route is one kernel route fabricd owns, with why it is there.
type Route struct {
	Prefix   string `json:"prefix"`
	Via      string `json:"via"`
	Dev      string `json:"dev"`
	Encap    string `json:"encapsulation"`
	Peer     string `json:"peer"`
	PeerType string `json:"peerType"`
}

// Status is the agent's own view of itself.
type Status struct {
	Node     string `json:"node"`
	Version  string `json:"version"`
	Subnet   string `json:"subnet"`
	SubnetV6 string `json:"subnetV6,omitempty"` // with an IPv6 pool
	// UnderlayV6 is the IPv6 next hop of SubnetV6: the host's IPv6
	// address on the underlay, "" when it has none (then its IPv4 one).
	UnderlayV6    string `json:"underlayV6,omitempty"`
	Gateway       string `json:"gateway"`
	Underlay      string `json:"underlay"`
	UnderlayDev   string `json:"underlayDevice"`
	ASN           uint32 `json:"asn"`
	Encapsulation string `json:"encapsulation"`
	// Encryption is off, or the WireGuard in use and what it costs.
	Encryption   string    `json:"encryption"`
	WireGuardKey string    `json:"wireguardKey,omitempty"` // this host's public key
	MTU          int       `json:"mtu"`
	Bridge       string    `json:"bridge"`
	Started      time.Time `json:"started"`
	EtcdHealthy  bool      `json:"etcdHealthy"`
}

// Provider is what fabricd exposes through the API.
type Provider interface {
	Peers(ctx context.Context) ([]Peer, error)
	Routes(ctx context.Context) ([]Route, error)
	Status(ctx context.Context) (Status, error)
	// Leave starts a decommission: the host withdraws its subnet and node
	// record at once and fabricd exits. It returns what will be done.
	Leave(ctx context.Context) (LeaveResult, error)
	// RotateKey replaces this host's WireGuard key pair and publishes the
	// new public key.
	RotateKey(ctx context.Context) (RotateKeyResult, error)
}

// RotateKeyResult says which key a rotation replaced, and when it started
// (every handshake with the new key comes after).
type RotateKeyResult struct {
	Node    string    `json:"node"`
	OldKey  string    `json:"oldKey"`
	NewKey  string    `json:"newKey"`
	Rotated time.Time `json:"rotated"`
}

// LeaveResult says what a decommission does.
type LeaveResult struct {
	Node   string `json:"node"`
	Subnet string `json:"subnet"`
	Done   string `json:"done"`
}

// CheckFree returns an error if a fabricd answers on the socket at path: two
// agents on one host would fight over every route and rule, and a live
// socket is not ours to take over.
func CheckFree(path string) error {
	c, err := net.DialTimeout("unix", path, time.Second)
	if err != nil {
		return nil
	}
	c.Close()
	return fmt.Errorf("another fabricd is running on this host: its local API answers on %s", path)
}

// Serve answers on the unix socket at path until ctx is done. The socket is
// created with mode 0600 so only root can read the fabric's state.
func Serve(ctx context.Context, path string, p Provider, log *slog.Logger) error {
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return err
	}
	if err := CheckFree(path); err != nil {
		return err
	}
	// A socket left by a killed agent would make Listen fail.
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	ln, err := net.Listen("unix", path)
	if err != nil {
		return fmt.Errorf("local API socket %s: %w", path, err)
	}
	// Connecting needs write permission on the socket: root only.
	if err := os.Chmod(path, 0o600); err != nil {
		ln.Close()
		return fmt.Errorf("local API socket %s: %w", path, err)
	}
	mux := http.NewServeMux()
	handle := func(route string, f func(ctx context.Context) (any, error)) {
		mux.HandleFunc(route, func(w http.ResponseWriter, r *http.Request) {
			v, err := f(r.Context())
			w.Header().Set("Content-Type", "application/json")
			if err != nil {
				w.WriteHeader(http.StatusInternalServerError)
				json.NewEncoder(w).Encode(map[string]string{"error": err.Error()})
				return
			}
			json.NewEncoder(w).Encode(v)
		})
	}
	handle("GET /v1/peers", func(ctx context.Context) (any, error) { return p.Peers(ctx) })
	handle("GET /v1/routes", func(ctx context.Context) (any, error) { return p.Routes(ctx) })
	handle("GET /v1/status", func(ctx context.Context) (any, error) { return p.Status(ctx) })
	handle("POST /v1/leave", func(ctx context.Context) (any, error) { return p.Leave(ctx) })
	handle("POST /v1/rotate-key", func(ctx context.Context) (any, error) { return p.RotateKey(ctx) })
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}
	go func() {
		<-ctx.Done()
		shutdownCtx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		srv.Shutdown(shutdownCtx)
	}()
	log.Info("local API listening", "socket", path)
	err = srv.Serve(ln)
	os.Remove(path)
	if errors.Is(err, http.ErrServerClosed) {
		return nil
	}
	return err
}

// ErrNotRunning means no fabricd answers on the socket.
var ErrNotRunning = errors.New("fabricd is not running")

// Client reads the local API.
type Client struct {
	Socket string
	http   *http.Client
}

// NewClient returns a client for the socket at path.
func NewClient(path string) *Client {
	return &Client{Socket: path, http: &http.Client{
		Timeout: 10 * time.Second,
		Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", path)
		}},
	}}
}

func (c *Client) get(ctx context.Context, route string, out any) error {
	return c.do(ctx, http.MethodGet, route, out)
}

// Leave asks fabricd to leave the fabric (see Provider.Leave).
func (c *Client) Leave(ctx context.Context) (LeaveResult, error) {
	var v LeaveResult
	err := c.do(ctx, http.MethodPost, "/v1/leave", &v)
	return v, err
}

// RotateKey asks fabricd for a new WireGuard key pair (see Provider.RotateKey).
func (c *Client) RotateKey(ctx context.Context) (RotateKeyResult, error) {
	var v RotateKeyResult
	err := c.do(ctx, http.MethodPost, "/v1/rotate-key", &v)
	return v, err
}

func (c *Client) do(ctx context.Context, method, route string, out any) error {
	req, err := http.NewRequestWithContext(ctx, method, "http://fabricd"+route, nil)
	if err != nil {
		return err
	}
	resp, err := c.http.Do(req)
	if err != nil {
		return fmt.Errorf("%w (no answer on %s: %v); start it, or point --run-dir at its run directory", ErrNotRunning, c.Socket, errors.Unwrap(err))
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != http.StatusOK {
		var e struct{ Error string }
		json.Unmarshal(body, &e)
		return fmt.Errorf("fabricd: %s", e.Error)
	}
	return json.Unmarshal(body, out)
}

// Peers returns the BGP peers with their session state and encapsulation.
func (c *Client) Peers(ctx context.Context) ([]Peer, error) {
	var v []Peer
	return v, c.get(ctx, "/v1/peers", &v)
}

// Routes returns the kernel routes fabricd owns.
func (c *Client) Routes(ctx context.Context) ([]Route, error) {
	var v []Route
	return v, c.get(ctx, "/v1/routes", &v)
}

// Status returns the agent's own state.
func (c *Client) Status(ctx context.Context) (Status, error) {
	var v Status
	return v, c.get(ctx, "/v1/status", &v)
}
