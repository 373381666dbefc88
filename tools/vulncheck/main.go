// vulncheck runs govulncheck on the module against the Go vulnerability
// database taken from the Go module proxy (golang.org/x/vulndb at a pinned
// version: vuln.go.dev is not reachable from every build machine, the module
// proxy is), and fails on every vulnerability the code reaches unless it is
// accepted below with a reason. `make test` runs it (`make vulncheck`).
//
// Usage: go run ./tools/vulncheck -govulncheck VERSION -vulndb VERSION [packages]
package main

import (
	"bytes"
	"cmp"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"maps"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
)

// accepted are vulnerabilities the code reaches that cannot be fixed by an
// upgrade, with why fabric lives with them. Each one is printed on every run;
// an entry that no longer matches anything fails the run so that the list
// stays true.
var accepted = map[string]string{
	"GO-2026-4736": "fixed in GoBGP v4.4.0 (commit 583080a7, osrg/gobgp#3326; fabric uses v4.8.0), " +
		"but the database records no fixed v4 version yet (github/advisory-database#9201). " +
		"bgp.TestMalformedNextHopKeepsSpeaker sends the reported UPDATE and checks the session " +
		"survives it (docs/security.md).",
}

func main() {
	govulncheck := flag.String("govulncheck", "", "golang.org/x/vuln version (govulncheck)")
	vulndb := flag.String("vulndb", "", "golang.org/x/vulndb version (the database)")
	flag.Parse()
	if *govulncheck == "" || *vulndb == "" {
		fmt.Fprintln(os.Stderr, "vulncheck: -govulncheck and -vulndb are required")
		os.Exit(2)
	}
	pkgs := flag.Args()
	if len(pkgs) == 0 {
		pkgs = []string{"./..."}
	}
	if err := run(*govulncheck, *vulndb, pkgs); err != nil {
		fmt.Fprintln(os.Stderr, "vulncheck:", err)
		os.Exit(1)
	}
}

func run(govulncheckVersion, vulndbVersion string, pkgs []string) error {
	db, err := database(vulndbVersion)
	if err != nil {
		return err
	}
	args := append([]string{"run", "golang.org/x/vuln/cmd/govulncheck@" + govulncheckVersion,
		"-db", "file://" + db, "-format", "json"}, pkgs...)
	cmd := exec.Command("go", args...)
	var out bytes.Buffer
	cmd.Stdout = &out
	cmd.Stderr = os.Stderr
	// govulncheck's JSON mode exits 0 with findings; a non-zero exit is a
	// failure to scan.
	if err := cmd.Run(); err != nil {
		return fmt.Errorf("govulncheck: %w", err)
	}
	reached, unreached, summaries, err := parse(&out)
	if err != nil {
		return err
	}
	goVersion, _ := exec.Command("go", "env", "GOVERSION").Output()
	fmt.Printf("govulncheck %s, database golang.org/x/vulndb@%s, %s\n", govulncheckVersion, vulndbVersion, strings.TrimSpace(string(goVersion)))
	// Not reached, so no failure; but an upgrade that fixes it is worth
	// taking while it is easy.
	for _, id := range slices.Sorted(maps.Keys(unreached)) {
		if _, ok := reached[id]; ok {
			continue
		}
		if f := unreached[id]; f.FixedVersion != "" {
			fmt.Printf("not reached, fixed in %s: %s in %s@%s: %s\n", f.FixedVersion, id, f.module(), f.version(), summaries[id])
		}
	}
	var failed []string
	for _, id := range slices.Sorted(maps.Keys(reached)) {
		f := reached[id]
		if why, ok := accepted[id]; ok {
			fmt.Printf("accepted %s (%s): %s\n", id, summaries[id], why)
			continue
		}
		fixed := cmp.Or(f.FixedVersion, "no fixed version")
		failed = append(failed, fmt.Sprintf("%s in %s@%s, called from %s (fixed: %s): %s",
			id, f.module(), f.version(), f.caller(), fixed, summaries[id]))
	}
	for _, id := range slices.Sorted(maps.Keys(accepted)) {
		if _, ok := reached[id]; !ok {
			failed = append(failed, fmt.Sprintf("%s is accepted in tools/vulncheck but no longer reached: remove it", id))
		}
	}
	if len(failed) > 0 {
		return errors.New("the code reaches vulnerabilities:\n  " + strings.Join(failed, "\n  "))
	}
	fmt.Printf("no vulnerability reached but the %d accepted\n", len(reached))
	return nil
}

// database is the directory of OSV entries in the vulndb module, which
// govulncheck reads as a database when given a flat directory.
func database(version string) (string, error) {
	out, err := exec.Command("go", "mod", "download", "-json", "golang.org/x/vulndb@"+version).Output()
	if err != nil {
		return "", fmt.Errorf("downloading golang.org/x/vulndb@%s: %w", version, err)
	}
	var m struct{ Dir, Error string }
	if err := json.Unmarshal(out, &m); err != nil || m.Dir == "" {
		return "", fmt.Errorf("downloading golang.org/x/vulndb@%s: %s", version, cmp.Or(m.Error, string(out)))
	}
	return filepath.Join(m.Dir, "data", "osv"), nil
}

type frame struct {
	Module   string `json:"module"`
	Version  string `json:"version"`
	Package  string `json:"package"`
	Function string `json:"function"`
	Receiver string `json:"receiver"`
	Position *struct {
		Filename string `json:"filename"`
		Line     int    `json:"line"`
	} `json:"position"`
}

type finding struct {
	OSV          string  `json:"osv"`
	FixedVersion string  `json:"fixed_version"`
	Trace        []frame `json:"trace"`
}

func (f finding) module() string  { return f.Trace[0].Module }
func (f finding) version() string { return f.Trace[0].Version }

// caller is the frame in this module that reaches the vulnerable symbol.
func (f finding) caller() string {
	last := f.Trace[len(f.Trace)-1]
	if last.Position != nil {
		return fmt.Sprintf("%s:%d", last.Position.Filename, last.Position.Line)
	}
	return last.Package + "." + last.Function
}

// parse reads govulncheck's JSON stream and returns the findings at symbol
// level (the code calls the vulnerable function), the others (a vulnerable
// module or package the code does not call into) and the summaries of the
// entries.
func parse(r io.Reader) (reached, unreached map[string]finding, summaries map[string]string, err error) {
	reached, unreached, summaries = map[string]finding{}, map[string]finding{}, map[string]string{}
	dec := json.NewDecoder(r)
	for {
		var msg struct {
			OSV *struct {
				ID      string `json:"id"`
				Summary string `json:"summary"`
			} `json:"osv"`
			Finding *finding `json:"finding"`
		}
		if err := dec.Decode(&msg); err == io.EOF {
			return reached, unreached, summaries, nil
		} else if err != nil {
			return nil, nil, nil, fmt.Errorf("reading govulncheck's output: %w", err)
		}
		if msg.OSV != nil {
			summaries[msg.OSV.ID] = msg.OSV.Summary
		}
		switch f := msg.Finding; {
		case f == nil || len(f.Trace) == 0:
		case f.Trace[0].Function != "":
			if _, seen := reached[f.OSV]; !seen {
				reached[f.OSV] = *f
			}
		default:
			unreached[f.OSV] = *f
		}
	}
}
