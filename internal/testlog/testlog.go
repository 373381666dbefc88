// Package testlog holds what tests collect logs into.
package testlog

import (
	"bytes"
	"sync"
)

// Buffer collects log output written from several goroutines (a backend's
// workers, a watch) for a test to read at any time.
type Buffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *Buffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *Buffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}
