package main

import (
	"errors"
	"io/fs"
	"os"
	"strings"

	"github.com/fabricnet/fabric/config"
)

// defaultConfigFile is fabricd's settings file as the .deb installs it.
const defaultConfigFile = "/etc/fabric/fabricd.yaml"

// readHostSettings reads fabricd's settings file into c, so that on a
// fabric host fabricctl talks to the same etcd as fabricd without repeating
// --etcd-endpoints and the TLS flags: FABRIC_CONFIG, else
// /etc/fabric/fabricd.yaml (--config before either). A missing default file is no error (fabricctl
// on an operator's laptop); a file fabricd would refuse is, with its lines.
func readHostSettings(c *config.Config, args []string) error {
	path := configFlag(args)
	if path == "" {
		path = os.Getenv("FABRIC_CONFIG")
	}
	if path == "" {
		path = defaultConfigFile
		if _, err := os.Stat(path); errors.Is(err, fs.ErrNotExist) {
			return nil
		}
	}
	return config.ReadFile(path, c)
}

// configFlag is the value of --config in args: the file is read before the
// flags are parsed, so that the flags win over it.
func configFlag(args []string) string {
	for i, a := range args {
		if a == "--" {
			break
		}
		if v, ok := strings.CutPrefix(a, "--config="); ok {
			return v
		}
		if a == "--config" && i+1 < len(args) {
			return args[i+1]
		}
	}
	return ""
}
