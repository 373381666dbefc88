package probe

import (
	"fmt"
	"time"
)

// verdict is one peer's answer to "does IP protocol 4 pass between us?",
// as a pure state machine: the Prober feeds it answers and misses and owns
// the sockets, timers and logs. A new peer is not working until its first
// answer; FailAfter misses in a row make a working peer blocked; a peer
// that was blocked needs RecoverAfter answers in a row to work again
// (hysteresis: a flaky path does not flap).
type verdict struct {
	works      bool
	wasBlocked bool   // declared blocked once: getting back needs recoverAfter answers
	reason     string // why, for `fabricctl peers status`
	since      time.Time
	misses     int // consecutive unanswered probes
	successes  int // consecutive answered probes
	lastRTT    time.Duration
}

type thresholds struct{ failAfter, recoverAfter int }

// blockChange says what a miss did to the verdict.
type blockChange int

const (
	unchanged    blockChange = iota
	nowBlocked               // a working path is blocked now
	stillBlocked             // a new peer's path is blocked from the start (said once)
)

// answer records an answer after rtt and reports whether the path works now
// where it did not.
func (v *verdict) answer(rtt time.Duration, now time.Time, th thresholds) bool {
	v.misses = 0
	v.successes++
	v.lastRTT = rtt
	need := 1
	if v.wasBlocked {
		need = th.recoverAfter
	}
	if !v.works && v.successes < need {
		v.reason = fmt.Sprintf("IP protocol 4 answered again in %s (%d of %d answers needed to switch back)", millis(rtt), v.successes, need)
		return false
	}
	v.reason = fmt.Sprintf("IP protocol 4 answered in %s", millis(rtt))
	if v.works {
		return false
	}
	v.works, v.since = true, now
	return true
}

// miss records an unanswered probe, with what is known of why (an ICMP
// error, a send error), and says what it changed.
func (v *verdict) miss(why string, now time.Time, th thresholds) blockChange {
	v.misses++
	v.successes = 0
	unanswered := fmt.Sprintf("%d %s over IP protocol 4 unanswered", v.misses, plural(v.misses, "probe", "probes"))
	if why != "" {
		unanswered += " (" + why + ")"
	}
	if v.misses < th.failAfter {
		if v.works {
			v.reason = fmt.Sprintf("IP protocol 4 answered in %s, then %s", millis(v.lastRTT), unanswered)
		} else if v.wasBlocked {
			v.reason = unanswered
		}
		return unchanged
	}
	v.reason = unanswered
	switch {
	case v.works:
		v.works, v.wasBlocked, v.since = false, true, now
		return nowBlocked
	case !v.wasBlocked:
		v.wasBlocked = true
		return stillBlocked
	}
	return unchanged
}
