package config

import (
	"fmt"
	"reflect"
	"regexp"
	"strings"

	"github.com/spf13/pflag"
)

var envNote = regexp.MustCompile(` ?\(env FABRIC_[A-Z_]+(; [^)]*)?\)`)

// SettingsTable renders every setting as a Markdown table: the file key,
// the flag, the environment variable, the default and the flag's help. It
// is generated from the flags and Config itself, so it cannot drift;
// docs/operations.md holds a copy that a test compares.
func SettingsTable() string {
	c := Defaults()
	c.NodeName = "" // the build machine's hostname is no default to document
	fs := newFlagSet(&c, new(string))
	keys := fieldKeys(&c, fs)
	var b strings.Builder
	b.WriteString("| file key | flag | environment | default | meaning |\n|---|---|---|---|---|\n")
	fs.VisitAll(func(f *pflag.Flag) {
		if actionFlags[f.Name] {
			return
		}
		key := keys[f.Name]
		def := f.DefValue
		switch {
		case f.Name == "node-name":
			def = "the host name"
		case f.Name == "asn":
			def = fmt.Sprint(c.ASN)
		case def == "":
			def = "none"
		}
		// The environment has its own column.
		usage := envNote.ReplaceAllString(f.Usage, "")
		usage = strings.ReplaceAll(usage, "|", `\|`)
		fmt.Fprintf(&b, "| `%s` | `--%s` | `%s` | `%s` | %s |\n", key, f.Name, EnvName(f.Name), def, usage)
	})
	return b.String()
}

// fieldKeys maps each flag of fs (defined on c) to the file key of the
// Config field it sets, found by the field's address.
func fieldKeys(c *Config, fs *pflag.FlagSet) map[string]string {
	byAddr := map[uintptr]string{}
	v := reflect.ValueOf(c).Elem()
	for i := range v.NumField() {
		name, _, _ := strings.Cut(v.Type().Field(i).Tag.Get("json"), ",")
		if name != "" && name != "-" {
			byAddr[v.Field(i).Addr().Pointer()] = name
		}
	}
	out := map[string]string{"asn": "asn"} // a flag.Func: no pointer to follow
	fs.VisitAll(func(f *pflag.Flag) {
		var p uintptr
		switch val := f.Value.(type) {
		case listFlag:
			p = reflect.ValueOf(val.dst).Pointer()
		default:
			rv := reflect.ValueOf(f.Value)
			if rv.Kind() == reflect.Pointer {
				p = rv.Pointer()
			}
		}
		if key, ok := byAddr[p]; ok {
			out[f.Name] = key
		}
	})
	return out
}
