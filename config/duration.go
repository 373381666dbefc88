package config

import (
	"bytes"
	"encoding/json"
	"fmt"
	"time"
)

// duration reads "9s", "24h" or "1m30s" from the config file. A bare number
// is refused: JSON would read it as nanoseconds, so `holdTime: 9` would
// silently mean 9 ns.
type duration struct{ d *time.Duration }

func (d duration) UnmarshalJSON(b []byte) error {
	var s string
	if err := json.Unmarshal(b, &s); err != nil {
		return fmt.Errorf("want a duration with a unit, like \"9s\" or \"24h\", not %s", b)
	}
	v, err := time.ParseDuration(s)
	if err != nil {
		return fmt.Errorf("%q is not a duration: want e.g. \"9s\", \"10m\" or \"24h\"", s)
	}
	*d.d = v
	return nil
}

// UnmarshalJSON reads the config file (YAML is turned into JSON first). The
// duration settings are read as strings with units; unknown keys are refused
// by name, as with the rest of the file.
func (c *Config) UnmarshalJSON(b []byte) error {
	type plain Config // no methods: avoids recursing into this one
	aux := struct {
		*plain
		EtcdTimeout       duration `json:"etcdTimeout"`
		SubnetTTL         duration `json:"subnetTTL"`
		NodeTTL           duration `json:"nodeTTL"`
		HoldTime          duration `json:"holdTime"`
		KeepaliveInterval duration `json:"keepaliveInterval"`
		GracefulRestart   duration `json:"gracefulRestartTime"`
		BFDInterval       duration `json:"bfdInterval"`
		ProbeInterval     duration `json:"probeInterval"`
		Resync            duration `json:"resync"`
	}{
		plain:             (*plain)(c),
		EtcdTimeout:       duration{&c.EtcdTimeout},
		SubnetTTL:         duration{&c.SubnetTTL},
		NodeTTL:           duration{&c.NodeTTL},
		HoldTime:          duration{&c.HoldTime},
		KeepaliveInterval: duration{&c.KeepaliveInterval},
		GracefulRestart:   duration{&c.GracefulRestartTime},
		BFDInterval:       duration{&c.BFDInterval},
		ProbeInterval:     duration{&c.ProbeInterval},
		Resync:            duration{&c.Resync},
	}
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	return dec.Decode(&aux)
}
