package probe

import (
	"net/netip"
	"testing"
)

func TestMessageRoundTrip(t *testing.T) {
	for _, m := range []message{
		{typ: msgRequest, sender: netip.MustParseAddr("192.0.2.7"), nonce: 1},
		{typ: msgReply, sender: netip.MustParseAddr("10.0.0.1"), nonce: ^uint64(0)},
	} {
		b := m.marshal()
		if len(b) != packetLen {
			t.Fatalf("marshal: %d bytes, want %d", len(b), packetLen)
		}
		if sum := headerChecksum(b[:innerHeaderLen]); sum != 0 {
			t.Errorf("inner header checksum does not verify: %#x", sum)
		}
		if b[8] != 1 || [4]byte(b[12:16]) != loopback || [4]byte(b[16:20]) != loopback {
			t.Errorf("inner packet is deliverable: ttl %d src %v dst %v", b[8], b[12:16], b[16:20])
		}
		got, err := parseMessage(b)
		if err != nil || got != m {
			t.Errorf("parse(marshal(%+v)) = %+v, %v", m, got, err)
		}
	}
}

func FuzzParseMessage(f *testing.F) {
	valid := message{typ: msgRequest, sender: netip.MustParseAddr("10.1.2.3"), nonce: 7}.marshal()
	f.Add(valid)
	f.Add(valid[:30])
	f.Add([]byte{})
	f.Add(make([]byte, 40))
	f.Fuzz(func(t *testing.T, b []byte) {
		m, err := parseMessage(b)
		if err != nil {
			return
		}
		// Whatever parses must survive a round trip.
		again, err := parseMessage(m.marshal())
		if err != nil || again != m {
			t.Fatalf("round trip of %+v: %+v, %v", m, again, err)
		}
	})
}
