// Package dockerplugin speaks Docker's v1 plugin protocol for a network
// driver and an IPAM driver: JSON over HTTP on a unix socket that dockerd
// finds under /run/docker/plugins (or through a spec file). It only
// translates between the wire and the Driver interface; what the answers
// are is the caller's business.
//
// The field names follow moby's libnetwork/drivers/remote/api and
// libnetwork/ipams/remote/api. The two APIs name their error field
// differently: "Err" for the network driver, "Error" for IPAM.
package dockerplugin

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

// ContentType is what dockerd sends and expects.
const ContentType = "application/vnd.docker.plugins.v1.2+json"

// Option keys dockerd puts in requests.
const (
	// OptionAddressType marks the gateway's RequestAddress.
	OptionAddressType = "RequestAddressType"
	// AddressTypeGateway is its value for the gateway.
	AddressTypeGateway = "com.docker.network.gateway"
	// OptionPortMap holds an endpoint's published ports in
	// ProgramExternalConnectivity and EndpointOperInfo.
	OptionPortMap = "com.docker.network.portmap"
	// OptionGeneric holds `docker network create -o` options.
	OptionGeneric = "com.docker.network.generic"
)

// IPAMData is one address pool of a network as the network driver gets it.
type IPAMData struct {
	AddressSpace string
	Pool         string            // CIDR
	Gateway      string            // CIDR: the gateway address with the pool's length
	AuxAddresses map[string]string `json:",omitempty"`
}

// CreateNetworkRequest is NetworkDriver.CreateNetwork.
type CreateNetworkRequest struct {
	NetworkID string
	Options   map[string]any
	IPv4Data  []IPAMData
	IPv6Data  []IPAMData
}

// EndpointInterface is an endpoint's addresses.
type EndpointInterface struct {
	Address     string `json:",omitempty"` // CIDR
	AddressIPv6 string `json:",omitempty"`
	MacAddress  string `json:",omitempty"`
}

// CreateEndpointRequest is NetworkDriver.CreateEndpoint.
type CreateEndpointRequest struct {
	NetworkID  string
	EndpointID string
	Interface  *EndpointInterface
	Options    map[string]any
}

// CreateEndpointResponse answers it; Interface only with what the driver
// chose (a MAC address), never what dockerd gave.
type CreateEndpointResponse struct {
	Interface *EndpointInterface `json:",omitempty"`
}

// JoinRequest is NetworkDriver.Join.
type JoinRequest struct {
	NetworkID  string
	EndpointID string
	SandboxKey string
	Options    map[string]any
}

// InterfaceName names the device dockerd moves into the container and the
// prefix of its name there ("eth" gives eth0, eth1, ...).
type InterfaceName struct {
	SrcName   string
	DstPrefix string
}

// StaticRoute is a route dockerd adds in the container.
type StaticRoute struct {
	Destination string
	RouteType   int // RouteNextHop or RouteConnected
	NextHop     string
}

// The kinds of StaticRoute.
const (
	RouteNextHop   = 0
	RouteConnected = 1
)

// JoinResponse answers Join.
type JoinResponse struct {
	InterfaceName         InterfaceName
	Gateway               string `json:",omitempty"`
	GatewayIPv6           string `json:",omitempty"`
	StaticRoutes          []StaticRoute
	DisableGatewayService bool
}

// PortBinding is one published port of an endpoint (`docker run -p`).
type PortBinding struct {
	Proto       int    // 6 tcp, 17 udp, 132 sctp
	IP          string // the container's address
	Port        uint16 // the container's port
	HostIP      string `json:",omitempty"`
	HostPort    uint16
	HostPortEnd uint16
}

// PoolRequest is IpamDriver.RequestPool.
type PoolRequest struct {
	AddressSpace string
	Pool         string // CIDR; empty: the driver picks
	SubPool      string
	Options      map[string]string
	V6           bool
}

// PoolResponse answers it.
type PoolResponse struct {
	PoolID string
	Pool   string // CIDR
	Data   map[string]string
}

// AddressRequest is IpamDriver.RequestAddress.
type AddressRequest struct {
	PoolID  string
	Address string // a wanted address (--ip, --gateway), or empty
	Options map[string]string
}

// Driver is what answers dockerd. Errors are shown to the user as they are,
// so they should say what is wrong and what to do.
type Driver interface {
	RequestPool(ctx context.Context, req PoolRequest) (PoolResponse, error)
	ReleasePool(ctx context.Context, poolID string) error
	// RequestAddress returns the address in CIDR form.
	RequestAddress(ctx context.Context, req AddressRequest) (string, error)
	ReleaseAddress(ctx context.Context, poolID, address string) error

	CreateNetwork(ctx context.Context, req CreateNetworkRequest) error
	DeleteNetwork(ctx context.Context, networkID string) error
	CreateEndpoint(ctx context.Context, req CreateEndpointRequest) (CreateEndpointResponse, error)
	DeleteEndpoint(ctx context.Context, networkID, endpointID string) error
	EndpointOperInfo(ctx context.Context, networkID, endpointID string) (map[string]any, error)
	Join(ctx context.Context, req JoinRequest) (JoinResponse, error)
	Leave(ctx context.Context, networkID, endpointID string) error
	ProgramExternalConnectivity(ctx context.Context, networkID, endpointID string, ports []PortBinding) error
	RevokeExternalConnectivity(ctx context.Context, networkID, endpointID string) error
}

// Handler serves the plugin protocol for d.
func Handler(d Driver, log *slog.Logger) http.Handler {
	if log == nil {
		log = slog.Default()
	}
	mux := http.NewServeMux()
	s := &server{d: d, log: log}
	s.handle(mux, "/Plugin.Activate", false, func(ctx context.Context, _ []byte) (any, error) {
		return map[string][]string{"Implements": {"NetworkDriver", "IpamDriver"}}, nil
	})

	// IPAM: errors in "Error".
	s.handle(mux, "/IpamDriver.GetCapabilities", true, func(ctx context.Context, _ []byte) (any, error) {
		return map[string]bool{"RequiresMACAddress": false, "RequiresRequestReplay": false}, nil
	})
	s.handle(mux, "/IpamDriver.GetDefaultAddressSpaces", true, func(ctx context.Context, _ []byte) (any, error) {
		return map[string]string{"LocalDefaultAddressSpace": AddressSpace, "GlobalDefaultAddressSpace": AddressSpace}, nil
	})
	s.handle(mux, "/IpamDriver.RequestPool", true, func(ctx context.Context, body []byte) (any, error) {
		var req PoolRequest
		if err := decode(body, &req); err != nil {
			return nil, err
		}
		return d.RequestPool(ctx, req)
	})
	s.handle(mux, "/IpamDriver.ReleasePool", true, func(ctx context.Context, body []byte) (any, error) {
		var req struct{ PoolID string }
		if err := decode(body, &req); err != nil {
			return nil, err
		}
		return struct{}{}, d.ReleasePool(ctx, req.PoolID)
	})
	s.handle(mux, "/IpamDriver.RequestAddress", true, func(ctx context.Context, body []byte) (any, error) {
		var req AddressRequest
		if err := decode(body, &req); err != nil {
			return nil, err
		}
		addr, err := d.RequestAddress(ctx, req)
		return map[string]any{"Address": addr, "Data": map[string]string{}}, err
	})
	s.handle(mux, "/IpamDriver.ReleaseAddress", true, func(ctx context.Context, body []byte) (any, error) {
		var req struct{ PoolID, Address string }
		if err := decode(body, &req); err != nil {
			return nil, err
		}
		return struct{}{}, d.ReleaseAddress(ctx, req.PoolID, req.Address)
	})

	// Network driver: errors in "Err".
	s.handle(mux, "/NetworkDriver.GetCapabilities", false, func(ctx context.Context, _ []byte) (any, error) {
		// Local: dockerd keeps the network to itself (a global scope needs
		// a cluster store, which Docker no longer has); fabricd makes it
		// exist on every host. Connectivity global: containers reach each
		// other across hosts.
		return map[string]string{"Scope": "local", "ConnectivityScope": "global"}, nil
	})
	s.handle(mux, "/NetworkDriver.CreateNetwork", false, func(ctx context.Context, body []byte) (any, error) {
		var req CreateNetworkRequest
		if err := decode(body, &req); err != nil {
			return nil, err
		}
		return struct{}{}, d.CreateNetwork(ctx, req)
	})
	s.handle(mux, "/NetworkDriver.DeleteNetwork", false, func(ctx context.Context, body []byte) (any, error) {
		var req struct{ NetworkID string }
		if err := decode(body, &req); err != nil {
			return nil, err
		}
		return struct{}{}, d.DeleteNetwork(ctx, req.NetworkID)
	})
	s.handle(mux, "/NetworkDriver.CreateEndpoint", false, func(ctx context.Context, body []byte) (any, error) {
		var req CreateEndpointRequest
		if err := decode(body, &req); err != nil {
			return nil, err
		}
		return d.CreateEndpoint(ctx, req)
	})
	s.handle(mux, "/NetworkDriver.DeleteEndpoint", false, func(ctx context.Context, body []byte) (any, error) {
		var req struct{ NetworkID, EndpointID string }
		if err := decode(body, &req); err != nil {
			return nil, err
		}
		return struct{}{}, d.DeleteEndpoint(ctx, req.NetworkID, req.EndpointID)
	})
	s.handle(mux, "/NetworkDriver.EndpointOperInfo", false, func(ctx context.Context, body []byte) (any, error) {
		var req struct{ NetworkID, EndpointID string }
		if err := decode(body, &req); err != nil {
			return nil, err
		}
		v, err := d.EndpointOperInfo(ctx, req.NetworkID, req.EndpointID)
		return map[string]any{"Value": v}, err
	})
	s.handle(mux, "/NetworkDriver.Join", false, func(ctx context.Context, body []byte) (any, error) {
		var req JoinRequest
		if err := decode(body, &req); err != nil {
			return nil, err
		}
		return d.Join(ctx, req)
	})
	s.handle(mux, "/NetworkDriver.Leave", false, func(ctx context.Context, body []byte) (any, error) {
		var req struct{ NetworkID, EndpointID string }
		if err := decode(body, &req); err != nil {
			return nil, err
		}
		return struct{}{}, d.Leave(ctx, req.NetworkID, req.EndpointID)
	})
	s.handle(mux, "/NetworkDriver.ProgramExternalConnectivity", false, func(ctx context.Context, body []byte) (any, error) {
		var req struct {
			NetworkID, EndpointID string
			Options               map[string]json.RawMessage
		}
		if err := decode(body, &req); err != nil {
			return nil, err
		}
		var ports []PortBinding
		if raw, ok := req.Options[OptionPortMap]; ok && string(raw) != "null" {
			if err := json.Unmarshal(raw, &ports); err != nil {
				return nil, fmt.Errorf("fabric: %s: %w", OptionPortMap, err)
			}
		}
		return struct{}{}, d.ProgramExternalConnectivity(ctx, req.NetworkID, req.EndpointID, ports)
	})
	s.handle(mux, "/NetworkDriver.RevokeExternalConnectivity", false, func(ctx context.Context, body []byte) (any, error) {
		var req struct{ NetworkID, EndpointID string }
		if err := decode(body, &req); err != nil {
			return nil, err
		}
		return struct{}{}, d.RevokeExternalConnectivity(ctx, req.NetworkID, req.EndpointID)
	})
	for _, path := range []string{"/NetworkDriver.DiscoverNew", "/NetworkDriver.DiscoverDelete"} {
		s.handle(mux, path, false, func(context.Context, []byte) (any, error) { return struct{}{}, nil })
	}
	for _, path := range []string{"/NetworkDriver.AllocateNetwork", "/NetworkDriver.FreeNetwork"} {
		s.handle(mux, path, false, func(context.Context, []byte) (any, error) {
			return nil, errors.New("fabric networks do not need swarm: create them with `docker network create -d fabric` on any host")
		})
	}
	return mux
}

// AddressSpace is the one address space fabric's IPAM driver has.
const AddressSpace = "fabric"

type server struct {
	d   Driver
	log *slog.Logger
}

// maxBody bounds a request: dockerd's are a few hundred bytes.
const maxBody = 1 << 20

func (s *server) handle(mux *http.ServeMux, path string, ipam bool, f func(context.Context, []byte) (any, error)) {
	errField := "Err"
	if ipam {
		errField = "Error"
	}
	mux.HandleFunc("POST "+path, func(w http.ResponseWriter, r *http.Request) {
		body, err := io.ReadAll(io.LimitReader(r.Body, maxBody))
		var resp any
		if err == nil {
			resp, err = f(r.Context(), body)
		}
		w.Header().Set("Content-Type", ContentType)
		if err != nil {
			s.log.Warn("docker plugin call refused", "call", path[1:], "err", err)
			json.NewEncoder(w).Encode(map[string]string{errField: err.Error()})
			return
		}
		s.log.Debug("docker plugin call", "call", path[1:], "request", string(body))
		json.NewEncoder(w).Encode(resp)
	})
}

func decode(body []byte, v any) error {
	if len(body) == 0 {
		return nil
	}
	if err := json.Unmarshal(body, v); err != nil {
		return fmt.Errorf("fabric: malformed request: %w", err)
	}
	return nil
}

// Serve answers dockerd on a unix socket at path (mode 0600: only root's
// dockerd talks to it) until ctx ends, then removes the socket. A socket
// left by an earlier run is replaced; a live one is refused.
func Serve(ctx context.Context, path string, d Driver, log *slog.Logger) error {
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return fmt.Errorf("docker plugin socket: %w", err)
	}
	if conn, err := net.DialTimeout("unix", path, time.Second); err == nil {
		conn.Close()
		return fmt.Errorf("docker plugin socket %s is served by another process", path)
	}
	os.Remove(path)
	ln, err := net.Listen("unix", path)
	if err != nil {
		return fmt.Errorf("docker plugin socket: %w", err)
	}
	if err := os.Chmod(path, 0o600); err != nil {
		ln.Close()
		return fmt.Errorf("docker plugin socket: %w", err)
	}
	srv := &http.Server{Handler: Handler(d, log), ReadHeaderTimeout: 10 * time.Second}
	go func() {
		<-ctx.Done()
		srv.Close()
	}()
	err = srv.Serve(ln)
	os.Remove(path)
	if ctx.Err() != nil {
		return nil
	}
	return err
}
