package probe

import (
	"strings"
	"testing"
	"time"
)

// TestVerdict: the per-peer verdict without sockets. Events are "a" (an
// answer) and "m" (a probe unanswered); after each, the test checks whether
// IPIP works and what the event changed.
func TestVerdict(t *testing.T) {
	th := thresholds{failAfter: 3, recoverAfter: 2}
	t0 := time.Date(2026, 12, 6, 12, 0, 0, 0, time.UTC)
	for _, c := range []struct {
		name   string
		start  verdict
		events string
		works  string // after each event: 1 works, 0 not
		change string // after each event: + now works, - now blocked, b blocked from the start, . nothing
		reason string // in the last reason
	}{
		{name: "a new peer works at its first answer", events: "a", works: "1", change: "+", reason: "answered in 5.00 ms"},
		{name: "a new peer that never answers is blocked once, and said once", events: "mmmm", works: "0000", change: "..b.", reason: "4 probes over IP protocol 4 unanswered (the router said no)"},
		{name: "a working path survives fewer misses than failAfter", start: verdict{works: true, lastRTT: time.Millisecond}, events: "mma", works: "111", change: "...", reason: "answered in 5.00 ms"},
		{name: "failAfter misses in a row block a working path", start: verdict{works: true, lastRTT: time.Millisecond}, events: "mmm", works: "110", change: "..-"},
		{name: "an answer between misses starts the count again", start: verdict{works: true}, events: "mmamm", works: "11111", change: "....."},
		{name: "a blocked path needs recoverAfter answers in a row (no flapping)", start: verdict{wasBlocked: true}, events: "amaa", works: "0001", change: "...+", reason: "answered in 5.00 ms"},
		{name: "while recovering the reason counts the answers", start: verdict{wasBlocked: true}, events: "a", works: "0", change: ".", reason: "1 of 2 answers needed"},
		{name: "a path that recovered and breaks again is blocked again", start: verdict{wasBlocked: true}, events: "aammm", works: "01110", change: ".+..-"},
	} {
		t.Run(c.name, func(t *testing.T) {
			v := c.start
			var works, change strings.Builder
			now := t0
			for _, e := range c.events {
				now = now.Add(2 * time.Second)
				mark := "."
				switch e {
				case 'a':
					if v.answer(5*time.Millisecond, now, th) {
						mark = "+"
					}
				case 'm':
					switch v.miss("the router said no", now, th) {
					case nowBlocked:
						mark = "-"
					case stillBlocked:
						mark = "b"
					}
				}
				change.WriteString(mark)
				if v.works {
					works.WriteString("1")
				} else {
					works.WriteString("0")
				}
			}
			if works.String() != c.works || change.String() != c.change {
				t.Errorf("works %s changes %s, want %s %s", works.String(), change.String(), c.works, c.change)
			}
			if c.reason != "" && !strings.Contains(v.reason, c.reason) {
				t.Errorf("reason %q, want it to say %q", v.reason, c.reason)
			}
			if strings.ContainsAny(c.change, "+-") && !v.since.After(t0) {
				t.Errorf("since %v not set by the change", v.since)
			}
		})
	}
}
