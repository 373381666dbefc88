package main

import (
	"errors"
	"io/fs"
	"os"

	"github.com/fabricnet/fabric/config"
)

// defaultConfigFile is fabricd's settings file as the .deb installs it.
const defaultConfigFile = "/etc/fabric/fabricd.yaml"

// readHostSettings reads fabricd's settings file into c, so that on a
// fabric host fabricctl talks to the same etcd as fabricd without repeating
// --etcd-endpoints and the TLS flags: FABRIC_CONFIG, else
// /etc/fabric/fabricd.yaml. A missing default file is no error (fabricctl
// on an operator's laptop); a file fabricd would refuse is, with its lines.
func readHostSettings(c *config.Config) error {
	path := os.Getenv("FABRIC_CONFIG")
	if path == "" {
		path = defaultConfigFile
		if _, err := os.Stat(path); errors.Is(err, fs.ErrNotExist) {
			return nil
		}
	}
	return config.ReadFile(path, c)
}
