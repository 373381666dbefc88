// Package nsthread runs Go code inside a named network namespace (one
// created by `ip netns add`, under /var/run/netns) on a thread of its own,
// for the labs, tests and benchmarks that open sockets in namespaces.
package nsthread

import (
	"errors"
	"fmt"
	"runtime"

	"github.com/vishvananda/netns"
)

// Do runs fn on a locked OS thread switched into named namespace
// ns and returns its error. Sockets fn opens belong to ns and stay there
// whichever thread uses them later, so only their creation needs the
// switch. It uses a fresh goroutine, so the caller's thread never changes
// namespace; a thread that cannot switch back is discarded, not reused.
func Do(ns string, fn func() error) error {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		orig, err := netns.Get()
		if err != nil {
			errc <- err
			return
		}
		defer orig.Close()
		target, err := netns.GetFromName(ns)
		if err != nil {
			errc <- fmt.Errorf("namespace %s: %w", ns, err)
			return
		}
		defer target.Close()
		if err := netns.Set(target); err != nil {
			errc <- fmt.Errorf("enter namespace %s: %w", ns, err)
			return
		}
		fnErr := fn()
		if err := netns.Set(orig); err != nil {
			// The thread stays locked, so it dies with this goroutine
			// instead of running others in the wrong namespace.
			errc <- errors.Join(fnErr, fmt.Errorf("return from namespace %s: %w", ns, err))
			return
		}
		runtime.UnlockOSThread()
		errc <- fnErr
	}()
	return <-errc
}
