package lab

import (
	"os"
	"strconv"
	"strings"
	"testing"

	"github.com/fabricnet/fabric/internal/testreq"
)

// TestNeighbourTableRaisedAndPutBack: a lab of many hosts raises the shared
// neighbour-table thresholds, and the last one to close puts the machine's
// values back.
func TestNeighbourTableRaisedAndPutBack(t *testing.T) {
	testreq.Lab(t, "changing the neighbour table")
	if os.Geteuid() != 0 {
		testreq.Missing(t, "needs root to change net.ipv4.neigh.default.gc_thresh*")
	}
	read := func() []int {
		var out []int
		for _, th := range neighThresholds {
			b, err := os.ReadFile(th.file)
			if err != nil {
				t.Fatal(err)
			}
			n, _ := strconv.Atoi(strings.TrimSpace(string(b)))
			out = append(out, n)
		}
		return out
	}
	before := read()
	r1, err := raiseNeighTable()
	if err != nil {
		t.Fatal(err)
	}
	r2, err := raiseNeighTable() // a second lab at the same time
	if err != nil {
		t.Fatal(err)
	}
	for i, v := range read() {
		if v < neighThresholds[i].want {
			t.Errorf("%s = %d while a big lab runs, want at least %d", neighThresholds[i].file, v, neighThresholds[i].want)
		}
	}
	if err := r1(); err != nil {
		t.Fatal(err)
	}
	if read()[2] < neighThresholds[2].want {
		t.Errorf("thresholds put back while another big lab still runs")
	}
	if err := r2(); err != nil {
		t.Fatal(err)
	}
	if after := read(); after[0] != before[0] || after[1] != before[1] || after[2] != before[2] {
		t.Errorf("thresholds after the last lab closed: %v, want the machine's %v", after, before)
	}
}
