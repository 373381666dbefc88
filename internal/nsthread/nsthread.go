// Package nsthread runs Go code inside a network namespace (a named one,
// created by `ip netns add`, under /var/run/netns, or one held by a handle)
// on a thread of its own: for the labs, tests and benchmarks that open
// sockets in namespaces, and for wireguard-go's sockets, which must open
// in the namespace of their device.
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
	target, err := netns.GetFromName(ns)
	if err != nil {
		return fmt.Errorf("namespace %s: %w", ns, err)
	}
	defer target.Close()
	return In(target, fn)
}

// In is Do for the namespace target is a handle of. When the calling
// thread is in it already, fn runs on a fresh goroutine all the same.
func In(target netns.NsHandle, fn func() error) error {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		orig, err := netns.Get()
		if err != nil {
			errc <- err
			return
		}
		defer orig.Close()
		if orig.Equal(target) {
			runtime.UnlockOSThread()
			errc <- fn()
			return
		}
		if err := netns.Set(target); err != nil {
			errc <- fmt.Errorf("enter namespace %s: %w", target, err)
			return
		}
		fnErr := fn()
		if err := netns.Set(orig); err != nil {
			// The thread stays locked, so it dies with this goroutine
			// instead of running others in the wrong namespace.
			errc <- errors.Join(fnErr, fmt.Errorf("return from namespace %s: %w", target, err))
			return
		}
		runtime.UnlockOSThread()
		errc <- fnErr
	}()
	return <-errc
}
