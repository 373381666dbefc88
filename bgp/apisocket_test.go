package bgp

import (
	"bufio"
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	api "github.com/osrg/gobgp/v4/api"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
)

// TestAPISocket: the GoBGP API is served on the unix socket only, mode
// 0600, and speaks the real GoBGP gRPC API.
func TestAPISocket(t *testing.T) {
	t.Parallel()
	const block = 8
	sockPath := filepath.Join(t.TempDir(), "run", "gobgp.sock")
	cfg := fastConfig(testAddr(block, 1))
	cfg.APISocket = sockPath
	a := startSpeaker(t, "host-a", cfg)
	b := startSpeaker(t, "host-b", fastConfig(testAddr(block, 2)))
	mustSetPeers(t, a, b.peer(PeerMesh))
	mustSetPeers(t, b, a.peer(PeerMesh))

	info, err := os.Lstat(sockPath)
	if err != nil {
		t.Fatal(err)
	}
	if info.Mode().Type() != os.ModeSocket || info.Mode().Perm() != 0o600 {
		t.Fatalf("api socket mode = %v, want a socket with 0600", info.Mode())
	}
	if entries, _ := os.ReadDir(filepath.Dir(sockPath)); len(entries) != 1 {
		t.Fatalf("leftovers next to the socket: %v", entries)
	}

	conn, err := grpc.NewClient("unix://"+sockPath, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	client := api.NewGoBgpServiceClient(conn)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	stream, err := client.ListPeer(ctx, &api.ListPeerRequest{})
	if err != nil {
		t.Fatal(err)
	}
	var neighbors []string
	for {
		resp, err := stream.Recv()
		if err != nil {
			break
		}
		neighbors = append(neighbors, resp.Peer.Conf.NeighborAddress)
	}
	if len(neighbors) != 1 || neighbors[0] != b.addr.String() {
		t.Fatalf("ListPeer over the api socket = %v, want [%s]", neighbors, b.addr)
	}

	ports, err := ownTCPListenPorts()
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range ports {
		if p == 50051 {
			t.Fatal("this process listens on TCP port 50051 (GoBGP's default gRPC port)")
		}
		if p != 179 {
			t.Errorf("unexpected TCP listener on port %d", p)
		}
	}

	a.Stop()
	if _, err := os.Lstat(sockPath); !os.IsNotExist(err) {
		t.Fatalf("api socket still present after Stop: %v", err)
	}
}

// TestAPISocketRefusesLiveSocket: a second speaker must not steal a socket
// another speaker is serving.
func TestAPISocketRefusesLiveSocket(t *testing.T) {
	t.Parallel()
	const block = 10 // every test its own block: parallel speakers on one address collide
	sockPath := filepath.Join(t.TempDir(), "gobgp.sock")
	cfg := fastConfig(testAddr(block, 1))
	cfg.APISocket = sockPath
	startSpeaker(t, "host-a", cfg)
	cfg2 := fastConfig(testAddr(block, 2))
	cfg2.APISocket = sockPath
	if _, err := Start(context.Background(), cfg2); err == nil || !strings.Contains(err.Error(), "in use") {
		t.Fatalf("second speaker on a live api socket: err = %v", err)
	}
	if _, err := os.Lstat(sockPath); err != nil {
		t.Fatalf("the live socket was disturbed: %v", err)
	}
}

// ownTCPListenPorts lists the TCP ports this process listens on, from
// /proc: sockets in LISTEN state whose inode is one of our descriptors.
func ownTCPListenPorts() ([]int, error) {
	fds, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		return nil, err
	}
	inodes := map[string]bool{}
	for _, fd := range fds {
		target, err := os.Readlink(filepath.Join("/proc/self/fd", fd.Name()))
		if err == nil && strings.HasPrefix(target, "socket:[") {
			inodes[strings.TrimSuffix(strings.TrimPrefix(target, "socket:["), "]")] = true
		}
	}
	var ports []int
	for _, table := range []string{"/proc/self/net/tcp", "/proc/self/net/tcp6"} {
		f, err := os.Open(table)
		if err != nil {
			return nil, err
		}
		sc := bufio.NewScanner(f)
		sc.Scan() // header
		for sc.Scan() {
			fields := strings.Fields(sc.Text())
			if len(fields) < 10 || fields[3] != "0A" || !inodes[fields[9]] { // 0A = LISTEN
				continue
			}
			local := fields[1]
			port, err := strconv.ParseUint(local[strings.LastIndex(local, ":")+1:], 16, 16)
			if err != nil {
				f.Close()
				return nil, fmt.Errorf("parse %s: %w", table, err)
			}
			ports = append(ports, int(port))
		}
		f.Close()
	}
	return ports, nil
}
