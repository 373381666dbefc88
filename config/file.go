package config

import (
	"encoding/json"
	"errors"
	"fmt"
	"reflect"
	"slices"
	"strings"

	yamlv3 "gopkg.in/yaml.v3"
)

// checkFile reports the config file's problems with their line numbers:
// keys that are no setting, with the nearest one (case matters: JSON
// decoding alone would take "holdtime" for holdTime in silence), keys set
// twice, and values of the wrong type. Load decodes the file only when it
// passes.
func checkFile(path string, data []byte) error {
	var doc yamlv3.Node
	if err := yamlv3.Unmarshal(data, &doc); err != nil {
		return fmt.Errorf("config file %s: %w", path, err)
	}
	if len(doc.Content) == 0 {
		return nil
	}
	top := doc.Content[0]
	if top.Kind != yamlv3.MappingNode {
		return fmt.Errorf("config file %s:%d: want settings as key: value lines", path, top.Line)
	}
	keys := fileKeys()
	seen := map[string]int{}
	var errs []error
	for i := 0; i+1 < len(top.Content); i += 2 {
		k, v := top.Content[i], top.Content[i+1]
		at := fmt.Sprintf("config file %s:%d", path, k.Line)
		if !slices.Contains(keys, k.Value) {
			msg := fmt.Sprintf("%s: unknown setting %q", at, k.Value)
			if near := nearest(k.Value, keys); near != "" {
				msg += fmt.Sprintf(" (did you mean %s?)", near)
			}
			errs = append(errs, errors.New(msg))
			continue
		}
		if first, dup := seen[k.Value]; dup {
			errs = append(errs, fmt.Errorf("%s: %s set twice (first at line %d)", at, k.Value, first))
			continue
		}
		seen[k.Value] = k.Line
		var x any
		if err := v.Decode(&x); err != nil {
			errs = append(errs, fmt.Errorf("%s: %s: %v", at, k.Value, err))
			continue
		}
		b, err := json.Marshal(map[string]any{k.Value: x})
		if err != nil {
			errs = append(errs, fmt.Errorf("%s: %s: %v", at, k.Value, err))
			continue
		}
		scratch := Defaults()
		if err := json.Unmarshal(b, &scratch); err != nil {
			errs = append(errs, fmt.Errorf("%s: %s: %s", at, k.Value, typeProblem(err, x)))
		}
	}
	return errors.Join(errs...)
}

// fileKeys are the settings a file may hold: Config's JSON names.
func fileKeys() []string {
	var keys []string
	t := reflect.TypeOf(Config{})
	for i := range t.NumField() {
		name, _, _ := strings.Cut(t.Field(i).Tag.Get("json"), ",")
		if name != "" && name != "-" {
			keys = append(keys, name)
		}
	}
	return keys
}

// typeProblem says what a value should have been, in the file's terms.
func typeProblem(err error, got any) string {
	var te *json.UnmarshalTypeError
	if !errors.As(err, &te) {
		return err.Error()
	}
	want := te.Type.String()
	switch te.Type.Kind() {
	case reflect.Int, reflect.Int8, reflect.Int16, reflect.Int32, reflect.Int64,
		reflect.Uint, reflect.Uint8, reflect.Uint16, reflect.Uint32, reflect.Uint64:
		want = "a whole number, without quotes"
	case reflect.Bool:
		want = "true or false"
	case reflect.String:
		want = "a string"
	case reflect.Slice:
		want = "a list"
	case reflect.Struct, reflect.Map:
		want = "a mapping"
	}
	return fmt.Sprintf("want %s, not %s %v", want, te.Value, formatValue(got))
}

func formatValue(v any) string {
	if s, ok := v.(string); ok {
		return fmt.Sprintf("%q", s)
	}
	return fmt.Sprint(v)
}
