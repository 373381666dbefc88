// Package version says which build of fabric is running. It is a package of
// its own so fabricctl can print it without linking the agent.
package version

import "runtime/debug"

// Version is set at build time with -ldflags "-X .../version.Version=...";
// a build without it reports Go's VCS stamp (commit, and "-dirty" for
// uncommitted changes) where there is one.
var Version = "dev"

// String is the version to report.
func String() string {
	if Version != "dev" {
		return Version
	}
	info, ok := debug.ReadBuildInfo()
	if !ok {
		return Version
	}
	rev, dirty := "", false
	for _, s := range info.Settings {
		switch s.Key {
		case "vcs.revision":
			rev = s.Value
		case "vcs.modified":
			dirty = s.Value == "true"
		}
	}
	if rev == "" {
		return Version
	}
	if len(rev) > 12 {
		rev = rev[:12]
	}
	if dirty {
		rev += "-dirty"
	}
	return "dev-" + rev
}
