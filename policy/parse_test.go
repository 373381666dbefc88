package policy

import (
	"encoding/json"
	"reflect"
	"strings"
	"testing"
)

const goodYAML = `# web tier policy
defaultAction: deny
rules:
  - name: web
    order: 10
    action: allow
    from:
      - node: host-b
      - cidr: 10.244.1.0/24
    to:
      - address: 10.244.2.2
    protocol: tcp
    ports: [80, "8000-8100"]
  - name: ping
    action: allow
    protocol: icmp
`

func TestParseYAML(t *testing.T) {
	doc, err := ParseDocument("policy.yaml", []byte(goodYAML))
	if err != nil {
		t.Fatal(err)
	}
	want := Document{
		DefaultAction: "deny",
		Rules: []Rule{
			{Name: "web", Order: 10, Action: "allow",
				From:     []Selector{{Node: "host-b"}, {CIDR: "10.244.1.0/24"}},
				To:       []Selector{{Address: "10.244.2.2"}},
				Protocol: "tcp", Ports: []PortRange{{80, 80}, {8000, 8100}}},
			{Name: "ping", Action: "allow", Protocol: "icmp"},
		},
	}
	if !reflect.DeepEqual(doc, want) {
		t.Fatalf("got %+v\nwant %+v", doc, want)
	}
}

func TestParseJSONWithTabs(t *testing.T) {
	data := "[\n\t{\n\t\t\"name\": \"db\",\n\t\t\"action\": \"deny\",\n\t\t\"protocol\": \"udp\",\n\t\t\"ports\": [53]\n\t},\n\t{\"name\": \"x\", \"action\": \"allow\", \"bogus\": 1}\n]\n"
	_, err := ParseFile("policy.json", []byte(data))
	if err == nil || !strings.Contains(err.Error(), `policy.json:8: rule "x": unknown field "bogus"`) {
		t.Fatalf("want unknown field error on line 8, got %v", err)
	}
	good := strings.Replace(data, `, "bogus": 1`, "", 1)
	rules, err := ParseFile("policy.json", []byte(good))
	if err != nil {
		t.Fatal(err)
	}
	if len(rules) != 2 || rules[0].Ports[0] != (PortRange{53, 53}) || rules[0].Protocol != "udp" {
		t.Fatalf("got %+v", rules)
	}
}

func TestParseErrorsNameLine(t *testing.T) {
	cases := []struct {
		name, file, want string
	}{
		{"bad action", `
- name: web
  action: allow
- name: api
  protocol: tcp
  action: block
`, `policy.yaml:6: rule "api": action "block": want allow or deny`},
		{"unknown field", `
- name: web
  action: allow
  protcol: tcp
`, `policy.yaml:4: rule "web": unknown field "protcol"`},
		{"bad cidr", `
- name: web
  action: deny
  from:
    - cidr: 10.244.1.0/24
    - cidr: 10.244.300.0/24
`, `policy.yaml:6: rule "web": from[1]: cidr "10.244.300.0/24": want an IPv4 or IPv6 prefix`},
		{"host bits", `
- name: web
  action: deny
  to: [{cidr: 10.244.1.5/24}]
`, `policy.yaml:4: rule "web": to[0]: cidr "10.244.1.5/24" has host bits set: did you mean 10.244.1.0/24?`},
		{"port on icmp", `
- name: ping
  action: deny
  protocol: icmp
  ports: [80]
`, `policy.yaml:5: rule "ping": ports need protocol tcp or udp, not icmp`},
		{"port without protocol", `
- name: any
  action: deny
  ports: [80]
`, `policy.yaml:4: rule "any": ports need protocol tcp or udp, not any`},
		{"duplicate names", `
- name: web
  action: allow
- name: db
  action: allow
- name: web
  action: deny
`, `policy.yaml:6: rule "web": duplicate name (first at line 2)`},
		{"two selector fields", `
- name: web
  action: allow
  from:
    - cidr: 10.0.0.0/8
      node: host-b
`, `policy.yaml:5: rule "web": from[0]: selector needs exactly one of cidr, node, address, container, label, network (has 2)`},
		{"bad port", `
- name: web
  action: allow
  protocol: tcp
  ports: [80, 70000]
`, `policy.yaml:5: rule "web": port "70000": want a port number 1-65535`},
		{"missing name", `
- action: allow
`, `policy.yaml:2: rule #1: name missing`},
		{"bad default", `
defaultAction: nope
rules: []
`, `policy.yaml:2: defaultAction: action "nope": want allow or deny`},
		{"unknown top-level field", `
rule:
  - name: x
`, `policy.yaml:2: unknown field "rule"`},
		{"yaml syntax", `
- name: web
  action: [allow
`, `policy.yaml:`},
		{"field twice", `
- name: web
  action: allow
  action: deny
`, `policy.yaml:4: rule "web": field "action" set twice (first at line 3)`},
		{"label without a value", `
- name: web
  action: allow
  from:
    - label: role
`, `policy.yaml:5: rule "web": from[0]: label "role": want key=value, like role=frontend`},
		{"order not a number", `
- name: web
  action: allow
  order: first
`, `policy.yaml:4: rule "web": order "first": want a whole number`},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			rules, err := ParseFile("policy.yaml", []byte(c.file))
			if err == nil {
				t.Fatalf("accepted, want error %q", c.want)
			}
			if rules != nil {
				t.Fatalf("refused file still returned rules: %+v", rules)
			}
			if !strings.Contains(err.Error(), c.want) {
				t.Fatalf("got  %v\nwant %s", err, c.want)
			}
		})
	}
}

func TestRuleJSONRoundTrip(t *testing.T) {
	r := Rule{Name: "web", Order: 3, Action: "deny", From: []Selector{{Node: "b"}},
		Protocol: "tcp", Ports: []PortRange{{80, 80}, {1000, 2000}}}
	b, err := json.Marshal(r)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(b), `"ports":[80,"1000-2000"]`) {
		t.Fatalf("ports not written as the file form: %s", b)
	}
	var back Rule
	if err := json.Unmarshal(b, &back); err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(r, back) {
		t.Fatalf("round trip: got %+v want %+v", back, r)
	}
}

// Every bad rule of a file is reported at once, each with its line.
func TestParseReportsEveryBadRule(t *testing.T) {
	_, err := ParseDocument("policy.yaml", []byte(`
- name: web
  action: block
- name: ok
  action: allow
- name: api
  protcol: tcp
  action: allow
- name: ok
  action: deny
`))
	for _, want := range []string{`policy.yaml:3: rule "web": action "block"`, `policy.yaml:7: rule "api": unknown field "protcol"`, `policy.yaml:9: rule "ok": duplicate name (first at line 4)`} {
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("error %v lacks %q", err, want)
		}
	}
}

func TestParseContainerSelectors(t *testing.T) {
	rules, err := ParseFile("policy.yaml", []byte(`
- name: frontends-to-backends
  action: allow
  from: [{label: role=frontend}, {container: gateway}]
  to: [{label: role=backend}]
  protocol: tcp
  ports: [80]
`))
	if err != nil {
		t.Fatal(err)
	}
	if got := rules[0]; got.From[0].Label != "role=frontend" || got.From[1].Container != "gateway" || got.To[0].Label != "role=backend" {
		t.Fatalf("parsed %+v", got)
	}
}
