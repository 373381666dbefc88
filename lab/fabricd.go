package lab

import (
	"net/netip"
	"path/filepath"
	"strings"
)

// FabricdRunDir is where fabricd on h keeps its sockets and state in a lab.
func (h *Host) FabricdRunDir() string { return filepath.Join(h.lab.logDir, h.Name+"-run") }

// FabricdArgs is the command line of fabricd (the binary in binDir) on h,
// wired to the lab: its node name and machine identity, the lab's etcd and
// pool, its own run directory and docker options file, its dockerd's
// sockets (the API and the plugin directory that dockerd alone sees) and
// its underlay device. more is appended.
func (l *Lab) FabricdArgs(binDir string, h *Host, more ...string) []string {
	run := h.FabricdRunDir()
	args := []string{filepath.Join(binDir, "fabricd"),
		"--node-name", h.Name,
		"--machine-id", l.prefix + "-" + h.Name,
		"--etcd-endpoints", strings.Join(l.EtcdEndpoints(), ","),
		"--pool", Pool.String(),
		"--run-dir", run,
		"--state-dir", run + "/state",
		"--docker-opts-file", run + "/docker.env",
		"--docker-socket", h.DockerSocket(),
		"--docker-plugin-socket", filepath.Join(h.DockerPluginDir(), "fabric.sock"),
		"--underlay-interface", h.Dev,
	}
	return append(args, more...)
}

// Pool is the pool of every lab's fabricd.
var Pool = netip.MustParsePrefix("10.244.0.0/16")
