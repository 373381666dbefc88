package main

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"strings"

	yamlv3 "gopkg.in/yaml.v3"
)

// defaultConfigFile is fabricd's settings file as the .deb installs it.
const defaultConfigFile = "/etc/fabric/fabricd.yaml"

// hostSettings are the parts of fabricd's settings file fabricctl uses, so
// that on a fabric host `fabricctl` talks to the same etcd as fabricd
// without repeating --etcd-endpoints and the TLS flags.
type hostSettings struct {
	EtcdEndpoints []string `yaml:"etcdEndpoints"`
	EtcdPrefix    string   `yaml:"etcdPrefix"`
	EtcdCACert    string   `yaml:"etcdCACert"`
	EtcdCert      string   `yaml:"etcdCert"`
	EtcdKey       string   `yaml:"etcdKey"`
	RunDir        string   `yaml:"runDir"`
}

// readHostSettings reads FABRIC_CONFIG, else /etc/fabric/fabricd.yaml. A
// missing default file is no error (fabricctl on an operator's laptop); a
// file that does not parse is, naming it.
func readHostSettings() (hostSettings, error) {
	var s hostSettings
	path := os.Getenv("FABRIC_CONFIG")
	explicit := path != ""
	if !explicit {
		path = defaultConfigFile
	}
	data, err := os.ReadFile(path)
	if err != nil {
		if !explicit && errors.Is(err, fs.ErrNotExist) {
			return s, nil
		}
		return s, fmt.Errorf("settings file %s: %w", path, err)
	}
	// Other keys are fabricd's alone: not checked here.
	if err := yamlv3.Unmarshal(data, &s); err != nil {
		return s, fmt.Errorf("settings file %s: %w", path, err)
	}
	return s, nil
}

func joinList(l []string) string { return strings.Join(l, ",") }
