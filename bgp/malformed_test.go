package bgp

import (
	"encoding/binary"
	"fmt"
	"io"
	"net"
	"net/netip"
	"testing"
	"time"

	"github.com/fabricnet/fabric/internal/testwait"
)

// TestMalformedNextHopKeepsSpeaker is the attack of GO-2026-4736
// (CVE-2026-30405): a configured peer sends an UPDATE whose NEXT_HOP has
// the wrong flags and a length under 4. GoBGP v4 before 4.4.0 panicked on
// it (osrg/gobgp#3305), which would end fabricd. The speaker must treat the
// update as a withdrawal and keep the session: a good update on it
// afterwards is learned, and the raw peer never dials again.
func TestMalformedNextHopKeepsSpeaker(t *testing.T) {
	t.Parallel()
	const block = 12
	host := startSpeaker(t, "host", fastConfig(testAddr(block, 1)))
	routerAddr := testAddr(block, 2)
	const routerASN = 65001
	mustSetPeers(t, host, Peer{Name: "router", Address: routerAddr, ASN: routerASN, Type: PeerExternal})

	router := dialRawPeer(t, routerAddr, netip.AddrPortFrom(host.addr, 179), routerASN)
	bad := netip.MustParsePrefix("10.250.1.0/24")
	good := netip.MustParsePrefix("10.250.2.0/24")
	nextHop := routerAddr.As4()
	asPath := []byte{0x40, 2, 6, 2, 1, 0, 0, routerASN >> 8, routerASN & 0xff}
	origin := []byte{0x40, 1, 1, 0}
	// NEXT_HOP without the transitive flag and with a zero length.
	router.send(t, 2, updateBody(append(append(append([]byte{}, origin...), asPath...), 0x00, 3, 0), bad))
	router.send(t, 2, updateBody(append(append(append([]byte{}, origin...), asPath...),
		0x40, 3, 4, nextHop[0], nextHop[1], nextHop[2], nextHop[3]), good))

	routes := host.waitRoutes(t, 10*time.Second, "the good route sent after the malformed update", hasRoute(good))
	if _, ok := findRoute(routes, bad); ok {
		t.Fatalf("the malformed update's prefix %s was installed: %+v", bad, routes)
	}
	waitEstablished(t, host, routerAddr, 5*time.Second)
}

// rawPeer is a hand-written BGP speaker: it says exactly the bytes a test
// gives it, which no real speaker will do for a malformed message.
type rawPeer struct{ conn net.Conn }

// dialRawPeer opens a session from local to remote as AS asn (4-octet AS
// and IPv4 unicast capabilities), and keeps it alive until the test ends.
// A speaker that has just been given the peer may still close the
// connection (its FSM not yet out of Idle, as on a loaded machine): the raw
// peer dials again until the speaker answers its OPEN.
func dialRawPeer(t *testing.T, local netip.Addr, remote netip.AddrPort, asn uint16) *rawPeer {
	t.Helper()
	deadline := time.Now().Add(testwait.Scale(15 * time.Second))
	var lastErr error
	for time.Now().Before(deadline) {
		conn, err := openRawSession(local, remote, asn)
		if err == nil {
			p := &rawPeer{conn: conn}
			t.Cleanup(func() { conn.Close() })
			go func() { // answer nothing, read everything
				_, _ = io.Copy(io.Discard, conn)
			}()
			go func() {
				for {
					time.Sleep(time.Second)
					if _, err := conn.Write(message(4, nil)); err != nil {
						return
					}
				}
			}()
			return p
		}
		lastErr = err
		time.Sleep(200 * time.Millisecond)
	}
	t.Fatalf("raw peer: no session from %s to %s (waited for the speaker's OPEN and KEEPALIVE): %v", local, remote, lastErr)
	return nil
}

// openRawSession dials, sends OPEN, reads the speaker's OPEN and KEEPALIVE
// and answers with a KEEPALIVE.
func openRawSession(local netip.Addr, remote netip.AddrPort, asn uint16) (net.Conn, error) {
	d := net.Dialer{LocalAddr: net.TCPAddrFromAddrPort(netip.AddrPortFrom(local, 0)), Timeout: 5 * time.Second}
	conn, err := d.Dial("tcp", remote.String())
	if err != nil {
		return nil, fmt.Errorf("dial: %w", err)
	}
	id := local.As4()
	open := []byte{4, byte(asn >> 8), byte(asn), 0, 9, id[0], id[1], id[2], id[3]}
	caps := []byte{
		1, 4, 0, 1, 0, 1, // multiprotocol: IPv4 unicast
		65, 4, 0, 0, byte(asn >> 8), byte(asn), // 4-octet AS
	}
	open = append(open, byte(len(caps)+2), 2, byte(len(caps)))
	open = append(open, caps...)
	if _, err := conn.Write(message(1, open)); err != nil {
		conn.Close()
		return nil, fmt.Errorf("send OPEN: %w", err)
	}
	if err := conn.SetReadDeadline(time.Now().Add(10 * time.Second)); err != nil {
		conn.Close()
		return nil, err
	}
	for _, want := range []byte{1, 4} {
		got, err := readType(conn)
		if err != nil {
			conn.Close()
			return nil, fmt.Errorf("waiting for message type %d: %w", want, err)
		}
		if got != want {
			conn.Close()
			return nil, fmt.Errorf("waiting for message type %d, got %d", want, got)
		}
	}
	_ = conn.SetReadDeadline(time.Time{})
	if _, err := conn.Write(message(4, nil)); err != nil {
		conn.Close()
		return nil, fmt.Errorf("send KEEPALIVE: %w", err)
	}
	return conn, nil
}

func (p *rawPeer) send(t *testing.T, msgType byte, body []byte) {
	t.Helper()
	if _, err := p.conn.Write(message(msgType, body)); err != nil {
		t.Fatalf("raw peer: send type %d: %v", msgType, err)
	}
}

// readType returns the type of the next message; a NOTIFICATION is an
// error carrying its body.
func readType(conn net.Conn) (byte, error) {
	header := make([]byte, 19)
	if _, err := io.ReadFull(conn, header); err != nil {
		return 0, err
	}
	body := make([]byte, int(binary.BigEndian.Uint16(header[16:18]))-19)
	if _, err := io.ReadFull(conn, body); err != nil {
		return 0, err
	}
	if header[18] == 3 {
		return 0, fmt.Errorf("NOTIFICATION %x", body)
	}
	return header[18], nil
}

func message(msgType byte, body []byte) []byte {
	m := make([]byte, 19, 19+len(body))
	for i := range 16 {
		m[i] = 0xff
	}
	binary.BigEndian.PutUint16(m[16:18], uint16(19+len(body)))
	m[18] = msgType
	return append(m, body...)
}

// updateBody is an UPDATE with no withdrawals, the given path attributes
// and one IPv4 prefix.
func updateBody(attrs []byte, prefix netip.Prefix) []byte {
	b := []byte{0, 0, byte(len(attrs) >> 8), byte(len(attrs))}
	b = append(b, attrs...)
	a := prefix.Addr().As4()
	b = append(b, byte(prefix.Bits()))
	return append(b, a[:(prefix.Bits()+7)/8]...)
}
