// Package echo asks whether a host's kernel answers ICMP echo. No process
// on that host has to run for it: fabricd asks it of a peer whose BFD went
// silent, to tell a dead host (no answer) from a fabricd that is restarting
// on a live one (the kernel answers, and forwards).
package echo

import (
	"context"
	"fmt"
	"math/rand/v2"
	"net"
	"net/netip"
	"time"

	"golang.org/x/net/icmp"
	"golang.org/x/net/ipv4"
)

// Answers sends ICMP echo requests from local to peer, one every gap, and
// reports whether any reply came within wait.
func Answers(ctx context.Context, local, peer netip.Addr, gap, wait time.Duration) (bool, error) {
	c, err := icmp.ListenPacket("ip4:icmp", local.String())
	if err != nil {
		return false, fmt.Errorf("echo: %w", err)
	}
	defer c.Close()
	ctx, cancel := context.WithTimeout(ctx, wait)
	defer cancel()
	deadline, _ := ctx.Deadline()
	id := rand.IntN(1 << 16)
	send := func(seq int) error {
		m := icmp.Message{Type: ipv4.ICMPTypeEcho, Body: &icmp.Echo{ID: id, Seq: seq, Data: []byte("fabric liveness")}}
		b, err := m.Marshal(nil)
		if err != nil {
			return err
		}
		_, err = c.WriteTo(b, &net.IPAddr{IP: peer.AsSlice()})
		return err
	}
	replies := make(chan struct{}, 1)
	go func() {
		buf := make([]byte, 1500)
		for {
			if err := c.SetReadDeadline(deadline); err != nil {
				return
			}
			n, from, err := c.ReadFrom(buf)
			if err != nil {
				return
			}
			src, ok := from.(*net.IPAddr)
			if !ok {
				continue
			}
			if a, ok := netip.AddrFromSlice(src.IP); !ok || a.Unmap() != peer {
				continue
			}
			m, err := icmp.ParseMessage(1, buf[:n])
			if err != nil || m.Type != ipv4.ICMPTypeEchoReply {
				continue
			}
			if e, ok := m.Body.(*icmp.Echo); ok && e.ID == id {
				replies <- struct{}{}
				return
			}
		}
	}()
	t := time.NewTicker(gap)
	defer t.Stop()
	for seq := 1; ; seq++ {
		if err := send(seq); err != nil {
			return false, fmt.Errorf("echo to %s: %w", peer, err)
		}
		select {
		case <-replies:
			return true, nil
		case <-ctx.Done():
			return false, nil
		case <-t.C:
		}
	}
}
