package bgp

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"os"
	"path/filepath"
	"time"
)

// apiSocket puts GoBGP's gRPC API on a unix socket with mode 0600 and no
// window in which anyone else could connect: GoBGP creates the socket inside
// a private 0700 directory next to the final path; once it exists we chmod it
// and rename it into place (a socket keeps working after a rename).
type apiSocket struct {
	path      string
	tempDir   string
	tempPath  string
	published bool
}

// maxUnixSocketPath is sun_path's size on Linux minus the trailing NUL.
const maxUnixSocketPath = 107

func prepareAPISocket(path string) (*apiSocket, error) {
	path, err := filepath.Abs(path)
	if err != nil {
		return nil, fmt.Errorf("bgp: api socket %q: %w", path, err)
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return nil, fmt.Errorf("bgp: api socket directory: %w", err)
	}
	if err := removeStaleSocket(path); err != nil {
		return nil, err
	}
	tempDir, err := os.MkdirTemp(filepath.Dir(path), ".bgp-api-")
	if err != nil {
		return nil, fmt.Errorf("bgp: api socket: %w", err)
	}
	tempPath := filepath.Join(tempDir, "s")
	if len(tempPath) > maxUnixSocketPath {
		os.Remove(tempDir)
		return nil, fmt.Errorf("bgp: api socket path %q too long for a unix socket (keep it under %d bytes)", path, maxUnixSocketPath-len(tempPath)+len(path))
	}
	return &apiSocket{path: path, tempDir: tempDir, tempPath: tempPath}, nil
}

// removeStaleSocket removes a socket left by a previous run, but refuses to
// touch a live one or anything that is not a socket.
func removeStaleSocket(path string) error {
	info, err := os.Lstat(path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("bgp: api socket %s: %w", path, err)
	}
	if info.Mode().Type() != fs.ModeSocket {
		return fmt.Errorf("bgp: api socket %s: path exists and is not a socket", path)
	}
	if conn, err := net.DialTimeout("unix", path, time.Second); err == nil {
		conn.Close()
		return fmt.Errorf("bgp: api socket %s is in use by another process", path)
	}
	if err := os.Remove(path); err != nil {
		return fmt.Errorf("bgp: remove stale api socket: %w", err)
	}
	return nil
}

// publish waits for GoBGP's gRPC server to listen on the socket, then moves
// it into place with mode 0600. The file appears at bind(), before listen():
// a client that found it then was refused (seen in CI), so publish waits
// for a connection to succeed.
func (a *apiSocket) publish(ctx context.Context) error {
	deadline := time.Now().Add(5 * time.Second)
	for {
		info, err := os.Lstat(a.tempPath)
		if err == nil && info.Mode().Type() == fs.ModeSocket {
			if conn, err := net.Dial("unix", a.tempPath); err == nil {
				conn.Close()
				break
			}
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("bgp: gRPC API did not come up on %s (see gobgp logs)", a.path)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(5 * time.Millisecond):
		}
	}
	if err := os.Chmod(a.tempPath, 0o600); err != nil {
		return fmt.Errorf("bgp: chmod api socket: %w", err)
	}
	if err := os.Rename(a.tempPath, a.path); err != nil {
		return fmt.Errorf("bgp: move api socket into place: %w", err)
	}
	a.published = true
	os.Remove(a.tempDir)
	return nil
}

func (a *apiSocket) cleanup() {
	if a.published {
		os.Remove(a.path)
		return
	}
	os.RemoveAll(a.tempDir)
}
