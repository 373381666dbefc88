package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/fabricnet/fabric/internal/testreq"
	"github.com/fabricnet/fabric/lab"
)

// nameSettle bounds waits for what must happen (a name appearing or going);
// the times measured are logged.
const nameSettle = 20 * time.Second

// startDockerds runs a real dockerd on each host with the options fabricd
// wrote, and imports the busybox image (with tcpprobe) into each.
func (f *fabric) startDockerds(hosts []*lab.Host) ([]*dockerHost, string) {
	f.t.Helper()
	var img string
	dhs := make([]*dockerHost, len(hosts))
	for i, h := range hosts {
		dhs[i] = f.startDockerd(h)
		ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
		var err error
		img, err = f.lab.BusyboxImage(ctx, dhs[i].d, map[string]string{"/bin/tcpprobe": filepath.Join(binDir, "tcpprobe")})
		cancel()
		if err != nil {
			f.t.Fatal(err)
		}
	}
	return dhs, img
}

// startDockerd runs a real dockerd on h with exactly the options fabricd
// wrote (read back through fabricctl docker-opts).
func (f *fabric) startDockerd(h *lab.Host) *dockerHost {
	f.t.Helper()
	st, err := f.status(h)
	if err != nil {
		f.t.Fatal(err)
	}
	opts, err := f.dockerOpts(h)
	if err != nil {
		f.t.Fatalf("docker-opts on %s: %v", h.Name, err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 40*time.Second)
	defer cancel()
	// With its own plugin directory: the host's fabricd serves Docker
	// networks there.
	d, err := h.StartDockerd(ctx, lab.DockerdOptions{ExtraArgs: opts, PluginDir: h.DockerPluginDir()})
	if err != nil {
		f.t.Fatal(err)
	}
	return &dockerHost{host: h, d: d, opts: opts, gw: netip.MustParseAddr(st.Gateway)}
}

// run starts a detached container and returns its address; flags go to
// docker run (labels, say).
func (dh *dockerHost) run(t *testing.T, name string, flags []string, img string, cmd ...string) netip.Addr {
	t.Helper()
	args := append(append(append([]string{"run", "-d", "--name", name}, flags...), img), cmd...)
	if _, err := dh.docker(args...); err != nil {
		t.Fatalf("docker run %s on %s: %v", name, dh.host.Name, err)
	}
	ip, err := dh.docker("inspect", "-f", "{{.NetworkSettings.IPAddress}}", name)
	if err != nil {
		t.Fatal(err)
	}
	return netip.MustParseAddr(ip)
}

// resolve asks the DNS server a container is configured with (dockerd's
// --dns: the host's gateway) for name, with busybox's nslookup.
func (dh *dockerHost) resolve(ctr, name string) (netip.Addr, error) {
	out, err := dh.docker("exec", ctr, "nslookup", name)
	if err != nil {
		return netip.Addr{}, fmt.Errorf("nslookup %s in %s on %s: %v", name, ctr, dh.host.Name, err)
	}
	// The answer follows the "Name:" line; the server's own address comes
	// before it.
	_, answer, ok := strings.Cut(out, "Name:")
	if !ok {
		return netip.Addr{}, fmt.Errorf("nslookup %s: no answer in %q", name, out)
	}
	for _, f := range strings.Fields(answer) {
		if a, err := netip.ParseAddr(f); err == nil && a.Is4() {
			return a, nil
		}
	}
	return netip.Addr{}, fmt.Errorf("nslookup %s: no IPv4 address in %q", name, out)
}

// TestContainerNames: containers on different hosts find each other by
// name, as on Docker's overlay: dockerd is pointed at fabricd's DNS on the
// gateway by the options fabricd wrote; a removed container stops
// resolving on every host; a dead host's names go with its node TTL; names
// come back after a dockerd restart.
func TestContainerNames(t *testing.T) {
	t.Parallel()
	if reason := lab.DockerMissing(); reason != "" {
		testreq.Missing(t, "%s", reason)
	}
	f := newFabric(t, lab.Spec{Hosts: 3})
	hosts := f.startMesh()
	dhs, img := f.startDockerds(hosts)
	h1, h2, h3 := dhs[0], dhs[1], dhs[2]
	for _, dh := range dhs {
		if opts := strings.Join(dh.opts, " "); !strings.Contains(opts, "--dns="+dh.gw.String()) || !strings.Contains(opts, "--dns-search=fabric") {
			t.Fatalf("%s: DOCKER_OPTS %q do not point containers at the gateway's DNS", dh.host.Name, opts)
		}
	}

	webIP := h2.run(t, "web", nil, img, "tcpprobe", "serve", "0.0.0.0:8000", "100000")
	apiIP := h2.run(t, "api", nil, img, "sleep", "3600")
	h1.run(t, "client1", nil, img, "sleep", "3600")
	h3.run(t, "client3", nil, img, "sleep", "3600")

	t.Run("a name on another host resolves and answers", func(t *testing.T) {
		took := f.sub(t).eventually(nameSettle, "web.fabric from host1", func() error {
			got, err := h1.resolve("client1", "web.fabric")
			if err == nil && got != webIP {
				return fmt.Errorf("web.fabric is %s, want %s", got, webIP)
			}
			return err
		})
		t.Logf("web.fabric resolvable on host1 %.2fs after the checks began", took.Seconds())
		// The short name works through the search domain dockerd set.
		out, err := h1.docker("exec", "client1", "ping", "-c", "1", "-W", "2", "web")
		if err != nil || !strings.Contains(out, webIP.String()) {
			t.Errorf("ping web from host1: %v\n%s", err, out)
		}
		// And a connection by name reaches the container.
		out, err = h1.docker("exec", "client1", "tcpprobe", "dial", "web.fabric:8000")
		if err != nil || !strings.Contains(out, "seen-from ") {
			t.Errorf("tcpprobe dial web.fabric:8000 from host1: %v %s", err, out)
		}
		// The reverse name too, on another host (which may see the record
		// a moment later).
		f.sub(t).eventually(nameSettle, "reverse lookup on host3", func() error {
			out, err := h3.docker("exec", "client3", "nslookup", webIP.String())
			if err != nil || !strings.Contains(out, "web.fabric") {
				return fmt.Errorf("reverse lookup of %s on host3: %v\n%s", webIP, err, out)
			}
			return nil
		})
		// Names outside the fabric are not answered as ours.
		if _, err := h1.resolve("client1", "nothing.fabric"); err == nil {
			t.Error("nothing.fabric resolved")
		}
	})

	t.Run("fabricctl containers lists every host's containers", func(t *testing.T) {
		want := map[string]string{"web": "host2 " + webIP.String(), "api": "host2 " + apiIP.String()}
		// Each host publishes on its own; wait for all four records.
		f.sub(t).eventually(nameSettle, "every container listed", func() error {
			out, err := f.fabricctl(hosts[2], "--json", "containers")
			if err != nil {
				return err
			}
			var entries []struct {
				Name    string     `json:"name"`
				Address netip.Addr `json:"address"`
				Node    string     `json:"node"`
			}
			if err := json.Unmarshal([]byte(out), &entries); err != nil {
				return fmt.Errorf("%v:\n%s", err, out)
			}
			got := map[string]string{}
			for _, e := range entries {
				got[e.Name] = e.Node + " " + e.Address.String()
			}
			for name, w := range want {
				if got[name] != w {
					return fmt.Errorf("%s: %q, want %q in %s", name, got[name], w, out)
				}
			}
			if !strings.HasPrefix(got["client1"], "host1 ") || !strings.HasPrefix(got["client3"], "host3 ") {
				return fmt.Errorf("clients missing: %v", got)
			}
			return nil
		})
		table, err := f.fabricctl(hosts[0], "containers")
		if err != nil || !strings.Contains(table, "NAME") || !strings.Contains(table, webIP.String()) {
			t.Errorf("fabricctl containers: %v\n%s", err, table)
		}
	})

	t.Run("policy selects containers by label", func(t *testing.T) {
		f := f.sub(t)
		backend := h2.run(t, "backend", []string{"--label", "role=backend"}, img, "tcpprobe", "serve", "0.0.0.0:8000", "100000")
		h1.run(t, "frontend1", []string{"--label", "role=frontend"}, img, "sleep", "3600")
		path := filepath.Join(t.TempDir(), "labels.yaml")
		if err := os.WriteFile(path, []byte(labelPolicy), 0o644); err != nil {
			t.Fatal(err)
		}
		if out, err := f.fabricctl(hosts[0], "policy", "apply", "-f", path); err != nil {
			t.Fatalf("policy apply: %v %s", err, out)
		}
		defer func() {
			for _, rule := range []string{"frontends-to-backends", "backends-closed"} {
				if out, err := f.fabricctl(hosts[0], "policy", "delete", rule); err != nil {
					t.Errorf("policy delete %s: %v %s", rule, err, out)
				}
			}
		}()
		target := netip.AddrPortFrom(backend, 8000).String()
		dial := func(dh *dockerHost, ctr string) error {
			out, err := dh.docker("exec", ctr, "tcpprobe", "dial", target)
			if err != nil {
				return fmt.Errorf("%s on %s -> backend: %v %s", ctr, dh.host.Name, err, out)
			}
			return nil
		}
		refused := func(dh *dockerHost, ctr string) error {
			err := dial(dh, ctr)
			switch {
			case err == nil:
				return fmt.Errorf("%s on %s reached the backend", ctr, dh.host.Name)
			case !strings.Contains(err.Error(), "refused"):
				return fmt.Errorf("want refused by the policy (a reset), got %v", err)
			}
			return nil
		}
		f.eventually(nameSettle, "a container without the label refused", func() error { return refused(h3, "client3") })
		f.eventually(nameSettle, "the labelled frontend connects", func() error { return dial(h1, "frontend1") })
		if err := refused(h1, "client1"); err != nil {
			t.Error(err)
		}
		// A frontend started now is let in as soon as its record arrives.
		h3.run(t, "frontend3", []string{"--label", "role=frontend"}, img, "sleep", "3600")
		started := time.Now()
		took := f.eventually(nameSettle, "a new frontend on host3 connects", func() error { return dial(h3, "frontend3") })
		t.Logf("a new role=frontend container on host3 allowed %.2fs after docker run returned (%.2fs of checks)", time.Since(started).Seconds(), took.Seconds())
		if err := refused(h3, "client3"); err != nil {
			t.Error(err)
		}
	})

	t.Run("a record pointing outside its node's lease is not answered", func(t *testing.T) {
		cli, err := f.lab.EtcdClient()
		if err != nil {
			t.Fatal(err)
		}
		defer cli.Close()
		// Each write has its own 10 s: the subtest's resolves take what a
		// loaded machine makes them take, and must not eat the writes' time.
		etcdDo := func(what string, op func(ctx context.Context) error) {
			ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
			defer cancel()
			if err := op(ctx); err != nil {
				t.Fatalf("%s: %v", what, err)
			}
		}
		put := func(node, name string, addr netip.Addr) {
			key := "/fabric/v1/containers/" + node + "/" + name
			value := fmt.Sprintf(`{"name":%q,"node":%q,"address":%q,"id":"forged","created":"2000-01-01T00:00:00Z"}`, name, node, addr)
			etcdDo("put "+key, func(ctx context.Context) error { _, err := cli.Put(ctx, key, value); return err })
		}
		// What any holder of the fabric's etcd credentials can write: host3
		// claiming host2's container, a host address and an outside one.
		// host3's fabricd removes records under its name that it did not
		// write, so a persistent attacker writes them again and again.
		inside := f.subnet(hosts[2]).Addr().Next().Next().Next().Next().Next().Next().Next().Next().Next()
		forge := func() {
			put("host3", "bank", apiIP)
			put("host3", "gateway", hosts[0].Addr)
			put("host3", "login", netip.MustParseAddr("203.0.113.9"))
			// Inside host3's own lease: answered, so the check is about
			// the address, not about who wrote it.
			put("host3", "manual", inside)
			time.Sleep(300 * time.Millisecond)
		}
		f.sub(t).eventually(nameSettle, "manual.fabric answered", func() error {
			forge()
			got, err := h1.resolve("client1", "manual.fabric")
			if err == nil && got != inside {
				return fmt.Errorf("manual.fabric is %s, want %s", got, inside)
			}
			return err
		})
		for range 5 {
			forge()
			for _, name := range []string{"bank", "gateway", "login"} {
				if got, err := h1.resolve("client1", name+".fabric"); err == nil {
					t.Errorf("%s.fabric, written for host3 outside its lease, resolves to %s", name, got)
				}
			}
		}
		for _, name := range []string{"bank", "gateway", "login", "manual"} {
			key := "/fabric/v1/containers/host3/" + name
			etcdDo("delete "+key, func(ctx context.Context) error { _, err := cli.Delete(ctx, key); return err })
		}
	})

	t.Run("a removed container stops resolving on every host", func(t *testing.T) {
		if _, err := h2.docker("rm", "-f", "web"); err != nil {
			t.Fatal(err)
		}
		removed := time.Now()
		for _, c := range []struct {
			dh  *dockerHost
			ctr string
		}{{h1, "client1"}, {h3, "client3"}} {
			f.sub(t).eventually(nameSettle, "web.fabric gone on "+c.dh.host.Name, func() error {
				if a, err := c.dh.resolve(c.ctr, "web.fabric"); err == nil {
					return fmt.Errorf("still resolves to %s", a)
				}
				return nil
			})
			t.Logf("web.fabric gone on %s %.2fs after docker rm -f", c.dh.host.Name, time.Since(removed).Seconds())
		}
	})

	t.Run("a dead host's names go with its node record", func(t *testing.T) {
		if _, err := h1.resolve("client1", "api.fabric"); err != nil {
			t.Fatalf("api.fabric before the kill: %v", err)
		}
		f.agents["host2"].proc.Kill()
		killed := time.Now()
		f.sub(t).eventually(nameSettle+10*time.Second, "api.fabric gone on host1", func() error {
			if a, err := h1.resolve("client1", "api.fabric"); err == nil {
				return fmt.Errorf("still resolves to %s", a)
			}
			return nil
		})
		gone := time.Since(killed)
		t.Logf("host2's names gone %.1fs after its fabricd was killed (node TTL 10s)", gone.Seconds())
		if gone < 3*time.Second {
			t.Errorf("api.fabric went %s after the kill: before its lease could end, so something withdrew it", gone)
		}
	})

	t.Run("names come back after a dockerd restart", func(t *testing.T) {
		if err := h3.d.Stop(); err != nil {
			t.Fatal(err)
		}
		f.sub(t).eventually(nameSettle, "client3 gone with host3's dockerd", func() error {
			if _, err := h1.resolve("client1", "client3.fabric"); err == nil {
				return fmt.Errorf("still resolves")
			}
			return nil
		})
		again := f.startDockerd(hosts[2])
		ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
		img3, err := f.lab.BusyboxImage(ctx, again.d, nil)
		cancel()
		if err != nil {
			t.Fatal(err)
		}
		ip := again.run(t, "client3", nil, img3, "sleep", "3600")
		took := f.sub(t).eventually(nameSettle, "client3 back", func() error {
			got, err := h1.resolve("client1", "client3.fabric")
			if err == nil && got != ip {
				return fmt.Errorf("client3.fabric is %s, want %s", got, ip)
			}
			return err
		})
		t.Logf("client3 resolvable again %.2fs after docker run on the restarted dockerd", took.Seconds())
	})
}

const labelPolicy = `defaultAction: allow
rules:
  - name: frontends-to-backends
    order: 10
    action: allow
    from: [{label: role=frontend}]
    to: [{label: role=backend}]
    protocol: tcp
    ports: [8000]
  - name: backends-closed
    order: 20
    action: deny
    to: [{label: role=backend}]
    protocol: tcp
    ports: [8000]
`
