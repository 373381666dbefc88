// Package bfd is Bidirectional Forwarding Detection (RFC 5880, single hop
// RFC 5881) for fabricd's BGP peers: asynchronous mode, no authentication,
// no echo or demand mode. A session that stops hearing its peer goes down
// within Multiplier × interval; a peer that stops on purpose says so with
// AdminDown first (RFC 5882 §3.2), which is not a failure.
//
// session.go is the state machine, pure and table-tested; server.go puts it
// on UDP port 3784.
package bfd

import (
	"encoding/binary"
	"errors"
	"fmt"
	"time"
)

// State is a session state (RFC 5880 §4.1).
type State uint8

const (
	AdminDown State = iota
	Down
	Init
	Up
)

func (s State) String() string {
	switch s {
	case AdminDown:
		return "admin-down"
	case Down:
		return "down"
	case Init:
		return "init"
	case Up:
		return "up"
	}
	return fmt.Sprintf("state-%d", uint8(s))
}

// Diag says why a session last left Up (RFC 5880 §4.1).
type Diag uint8

const (
	DiagNone               Diag = 0
	DiagDetectionExpired   Diag = 1
	DiagNeighborSignaled   Diag = 3
	DiagAdministrativeDown Diag = 7
)

func (d Diag) String() string {
	switch d {
	case DiagNone:
		return "none"
	case DiagDetectionExpired:
		return "detection time expired"
	case DiagNeighborSignaled:
		return "neighbor signaled session down"
	case DiagAdministrativeDown:
		return "administratively down"
	}
	return fmt.Sprintf("diag-%d", uint8(d))
}

// Packet is a BFD Control packet. GoBGP's codec (pkg/packet/bfd) drops the
// Authentication, Demand and Multipoint bits, which a receiver must check
// (§6.8.6), so fabric has its own for these 24 bytes.
type Packet struct {
	Diag                Diag
	State               State
	Poll, Final         bool
	ControlIndependent  bool // C: BFD does not share fate with the control plane
	Auth, Demand, Multi bool
	DetectMult          uint8
	MyDiscr, YourDiscr  uint32
	DesiredMinTx        time.Duration
	RequiredMinRx       time.Duration
	RequiredMinEchoRx   time.Duration
}

const (
	version    = 1
	packetSize = 24
)

// Marshal encodes p (version 1, no authentication section).
func (p Packet) Marshal() []byte { return p.AppendTo(nil) }

// AppendTo appends p's encoding to b.
func (p Packet) AppendTo(b []byte) []byte {
	n := len(b)
	b = append(b, make([]byte, packetSize)...)
	p.put(b[n:])
	return b
}

func (p Packet) put(b []byte) {
	b[0] = version<<5 | byte(p.Diag)&0x1f
	b[1] = byte(p.State)<<6 | bit(p.Poll)<<5 | bit(p.Final)<<4 | bit(p.ControlIndependent)<<3 |
		bit(p.Auth)<<2 | bit(p.Demand)<<1 | bit(p.Multi)
	b[2] = p.DetectMult
	b[3] = packetSize
	binary.BigEndian.PutUint32(b[4:], p.MyDiscr)
	binary.BigEndian.PutUint32(b[8:], p.YourDiscr)
	binary.BigEndian.PutUint32(b[12:], micros(p.DesiredMinTx))
	binary.BigEndian.PutUint32(b[16:], micros(p.RequiredMinRx))
	binary.BigEndian.PutUint32(b[20:], micros(p.RequiredMinEchoRx))
}

// Parse decodes and checks a received packet as §6.8.6 asks before any
// session is looked at: version 1, a consistent length, a nonzero
// multiplier and My Discriminator, no Multipoint bit, and no Your
// Discriminator only while the sender is Down or AdminDown.
func Parse(b []byte) (Packet, error) {
	if len(b) < packetSize {
		return Packet{}, errors.New("shorter than a BFD control packet")
	}
	if v := b[0] >> 5; v != version {
		return Packet{}, fmt.Errorf("version %d", v)
	}
	length := int(b[3])
	if length < packetSize || length > len(b) {
		return Packet{}, fmt.Errorf("length field %d for %d bytes", length, len(b))
	}
	p := Packet{
		Diag:               Diag(b[0] & 0x1f),
		State:              State(b[1] >> 6),
		Poll:               b[1]&0x20 != 0,
		Final:              b[1]&0x10 != 0,
		ControlIndependent: b[1]&0x08 != 0,
		Auth:               b[1]&0x04 != 0,
		Demand:             b[1]&0x02 != 0,
		Multi:              b[1]&0x01 != 0,
		DetectMult:         b[2],
		MyDiscr:            binary.BigEndian.Uint32(b[4:]),
		YourDiscr:          binary.BigEndian.Uint32(b[8:]),
		DesiredMinTx:       time.Duration(binary.BigEndian.Uint32(b[12:])) * time.Microsecond,
		RequiredMinRx:      time.Duration(binary.BigEndian.Uint32(b[16:])) * time.Microsecond,
		RequiredMinEchoRx:  time.Duration(binary.BigEndian.Uint32(b[20:])) * time.Microsecond,
	}
	switch {
	case p.DetectMult == 0:
		return Packet{}, errors.New("detect multiplier 0")
	case p.Multi:
		return Packet{}, errors.New("multipoint bit set")
	case p.MyDiscr == 0:
		return Packet{}, errors.New("my discriminator 0")
	case p.YourDiscr == 0 && p.State != Down && p.State != AdminDown:
		return Packet{}, fmt.Errorf("your discriminator 0 in state %s", p.State)
	case p.Auth:
		// fabric configures no authentication; §6.8.6 says discard.
		return Packet{}, errors.New("authentication present, none configured")
	}
	return p, nil
}

func bit(b bool) byte {
	if b {
		return 1
	}
	return 0
}

func micros(d time.Duration) uint32 {
	return uint32(min(d/time.Microsecond, 1<<32-1))
}
