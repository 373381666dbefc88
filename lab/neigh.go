package lab

import (
	"fmt"
	"os"
	"strconv"
	"strings"
	"sync"
)

// The kernel's neighbour table is shared by every network namespace, with
// gc_thresh3 = 1024 entries by default; a lab of many hosts overflows it
// ("neighbor table overflow", underlay pings fail with ENOBUFS). A lab of
// more than neighHosts hosts raises the thresholds for its run; the last
// such lab to close puts the machine's values back. On real hosts each
// kernel has its own table.
const neighHosts = 20

var neighThresholds = []struct {
	file string
	want int
}{
	{"/proc/sys/net/ipv4/neigh/default/gc_thresh1", 8192},
	{"/proc/sys/net/ipv4/neigh/default/gc_thresh2", 16384},
	{"/proc/sys/net/ipv4/neigh/default/gc_thresh3", 32768},
}

var neigh struct {
	sync.Mutex
	users int
	saved map[string]string
}

// raiseNeighTable raises the thresholds (never lowers them) and returns the
// function that releases this lab's claim.
func raiseNeighTable() (release func() error, err error) {
	neigh.Lock()
	defer neigh.Unlock()
	if neigh.users == 0 {
		neigh.saved = map[string]string{}
		for _, t := range neighThresholds {
			old, err := os.ReadFile(t.file)
			if err != nil {
				return nil, fmt.Errorf("lab: neighbour table: %w", err)
			}
			v := strings.TrimSpace(string(old))
			if n, _ := strconv.Atoi(v); n >= t.want {
				continue
			}
			if err := os.WriteFile(t.file, []byte(strconv.Itoa(t.want)), 0o644); err != nil {
				return nil, fmt.Errorf("lab: raise %s for a lab of many hosts: %w", t.file, err)
			}
			neigh.saved[t.file] = v
		}
	}
	neigh.users++
	var once sync.Once
	return func() error {
		var err error
		once.Do(func() { err = releaseNeighTable() })
		return err
	}, nil
}

func releaseNeighTable() error {
	neigh.Lock()
	defer neigh.Unlock()
	neigh.users--
	if neigh.users > 0 {
		return nil
	}
	// Lowered in reverse, so gc_thresh1 <= gc_thresh2 <= gc_thresh3 holds
	// on the way down as on the way up.
	for i := len(neighThresholds) - 1; i >= 0; i-- {
		t := neighThresholds[i]
		if v, ok := neigh.saved[t.file]; ok {
			if err := os.WriteFile(t.file, []byte(v), 0o644); err != nil {
				return fmt.Errorf("lab: put back %s: %w", t.file, err)
			}
		}
	}
	neigh.saved = nil
	return nil
}
