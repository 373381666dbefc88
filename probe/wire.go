package probe

import (
	"encoding/binary"
	"errors"
	"net/netip"

	"golang.org/x/sys/unix"
)

// A probe travels as the payload of an IP protocol 4 packet, exactly like an
// IPIP data packet: an inner IPv4 header followed by our message. The inner
// header is well formed so that a peer kernel with the ipip module
// decapsulates it without complaint, and undeliverable (source and destination
// 127.0.0.1, which the kernel drops as martian on any non-loopback device;
// TTL 1; a protocol reserved for experiments) so the decapsulated packet goes
// nowhere and no ICMP comes back for it.
//
//	inner IPv4 header (20 bytes)
//	magic    4  "fbP4"
//	version  1  wireVersion
//	type     1  msgRequest or msgReply
//	reserved 2  zero
//	sender   4  underlay IPv4 address of the sender
//	nonce    8  chosen by the requester, echoed in the reply
const (
	innerHeaderLen = 20
	messageLen     = 20
	packetLen      = innerHeaderLen + messageLen

	magic       = 0x66625034 // "fbP4"
	wireVersion = 1

	// innerProtocol is 253, "use for experimentation and testing" (RFC 3692).
	innerProtocol = 253
)

type msgType uint8

const (
	msgRequest msgType = 1
	msgReply   msgType = 2
)

func (t msgType) String() string {
	switch t {
	case msgRequest:
		return "request"
	case msgReply:
		return "reply"
	}
	return "unknown"
}

type message struct {
	typ    msgType
	sender netip.Addr
	nonce  uint64
}

var loopback = [4]byte{127, 0, 0, 1}

// marshal returns the IPIP payload carrying m.
func (m message) marshal() []byte {
	b := make([]byte, packetLen)
	b[0] = 0x45 // IPv4, 5 words of header
	binary.BigEndian.PutUint16(b[2:4], packetLen)
	binary.BigEndian.PutUint16(b[6:8], 0x4000) // don't fragment
	b[8] = 1                                   // TTL
	b[9] = innerProtocol
	copy(b[12:16], loopback[:])
	copy(b[16:20], loopback[:])
	binary.BigEndian.PutUint16(b[10:12], headerChecksum(b[:innerHeaderLen]))

	p := b[innerHeaderLen:]
	binary.BigEndian.PutUint32(p[0:4], magic)
	p[4] = wireVersion
	p[5] = byte(m.typ)
	s := m.sender.As4()
	copy(p[8:12], s[:])
	binary.BigEndian.PutUint64(p[12:20], m.nonce)
	return b
}

var errMalformed = errors.New("not a fabric probe")

// parseMessage reads an IPIP payload (the outer IPv4 header already removed).
// Anything that is not exactly a probe we would send is rejected.
func parseMessage(b []byte) (message, error) {
	if len(b) < packetLen {
		return message{}, errMalformed
	}
	h := b[:innerHeaderLen]
	if h[0] != 0x45 || h[9] != innerProtocol || int(binary.BigEndian.Uint16(h[2:4])) != packetLen {
		return message{}, errMalformed
	}
	p := b[innerHeaderLen:packetLen]
	if binary.BigEndian.Uint32(p[0:4]) != magic || p[4] != wireVersion {
		return message{}, errMalformed
	}
	m := message{
		typ:    msgType(p[5]),
		sender: netip.AddrFrom4([4]byte(p[8:12])),
		nonce:  binary.BigEndian.Uint64(p[12:20]),
	}
	if m.typ != msgRequest && m.typ != msgReply {
		return message{}, errMalformed
	}
	if !m.sender.IsGlobalUnicast() {
		return message{}, errMalformed
	}
	return m, nil
}

func headerChecksum(h []byte) uint16 {
	var sum uint32
	for i := 0; i+1 < len(h); i += 2 {
		sum += uint32(binary.BigEndian.Uint16(h[i : i+2]))
	}
	for sum > 0xffff {
		sum = sum>>16 + sum&0xffff
	}
	return ^uint16(sum)
}

// magicFilter is a classic BPF socket filter that lets through only packets
// carrying our magic where a probe has it. A raw protocol 4 socket gets a copy
// of every IPIP packet for its address, including the whole IPIP data plane;
// the filter drops those in the kernel before they are queued to us.
// The filter sees the packet from the outer IPv4 header on.
func magicFilter() []unix.SockFilter {
	return []unix.SockFilter{
		// X = length of the outer header (4 * IHL)
		{Code: unix.BPF_LDX | unix.BPF_B | unix.BPF_MSH, K: 0},
		// A = 32-bit word at X + inner header length (out of range: drop)
		{Code: unix.BPF_LD | unix.BPF_W | unix.BPF_IND, K: innerHeaderLen},
		{Code: unix.BPF_JMP | unix.BPF_JEQ | unix.BPF_K, Jt: 0, Jf: 1, K: magic},
		{Code: unix.BPF_RET | unix.BPF_K, K: 0xffff},
		{Code: unix.BPF_RET | unix.BPF_K, K: 0},
	}
}
