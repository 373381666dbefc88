// Package latest hands values from one producer to one reader where only
// the newest matters (snapshots, full sets): the reader never blocks the
// producer and never reads a stale value after a newer one was sent.
package latest

// Put leaves v as the one value waiting in ch, which has capacity 1,
// replacing a value the reader has not taken yet. Only one goroutine may
// send on ch; then Put never blocks.
func Put[T any](ch chan T, v T) {
	select {
	case <-ch:
	default:
	}
	ch <- v
}
