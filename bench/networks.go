package main

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os/exec"
	"strings"
	"time"

	"github.com/fabricnet/fabric/lab"
	"github.com/fabricnet/fabric/localapi"
)

// networksBench measures Docker networks on the fabric with real dockerd on
// three hosts: `docker network create` on one host until the network is on
// every host; `docker run` on one host until another host's container pings
// it by name; and container to container throughput on a fabric network
// against the same two hosts' containers on docker0 (over the fabric) and on
// Docker's own swarm overlay network between the same namespaces, side by
// side as the throughput part measures.
func networksBench(ctx context.Context, binDir string) error {
	if reason := lab.DockerMissing(); reason != "" {
		return errors.New(reason)
	}
	l, err := lab.New(ctx, lab.Spec{Hosts: 3, Logger: warnLog})
	if err != nil {
		return err
	}
	defer l.Close()
	hosts := l.Hosts()
	var ds []*lab.Dockerd
	var img string
	for _, h := range hosts {
		if _, err := h.Start("fabricd", fabricdArgs(l, binDir, h)...); err != nil {
			return err
		}
	}
	for _, h := range hosts {
		st, err := waitStatus(ctx, l, h)
		if err != nil {
			return err
		}
		d, err := h.StartDockerd(ctx, lab.DockerdOptions{PluginDir: h.DockerPluginDir(), ExtraArgs: []string{
			"--bip=" + st.Gateway + "/" + strings.Split(st.Subnet, "/")[1], fmt.Sprintf("--mtu=%d", st.MTU), "--ip-masq=false",
			"--dns=" + st.Gateway, "--dns-search=fabric"}})
		if err != nil {
			return err
		}
		if img, err = l.BusyboxImage(ctx, d, nil); err != nil {
			return err
		}
		ds = append(ds, d)
	}
	docker := func(d *lab.Dockerd, args ...string) (string, error) {
		c, cancel := context.WithTimeout(ctx, 60*time.Second)
		defer cancel()
		return d.Docker(c, args...)
	}

	fmt.Printf("\n## Docker networks: 3 hosts, real dockerd 20.10 (median of %d runs, min-max)\n\n", runs)
	fmt.Println("| what | seconds |")
	fmt.Println("|---|---|")
	run := 0
	create, err := samples(func() (float64, error) {
		run++
		name := fmt.Sprintf("bench%d", run)
		start := time.Now()
		if out, err := docker(ds[0], "network", "create", "-d", "fabric", "--ipam-driver", "fabric", "--subnet", fmt.Sprintf("172.16.%d.0/24", 100+run), name); err != nil {
			return 0, fmt.Errorf("%v: %s", err, out)
		}
		for _, d := range ds[1:] {
			for {
				out, _ := docker(d, "network", "ls", "-q", "--filter", "name=^"+name+"$")
				if out != "" {
					break
				}
				if time.Since(start) > time.Minute {
					return 0, fmt.Errorf("network %s not on %s after a minute", name, d.Host.Name)
				}
				time.Sleep(20 * time.Millisecond)
			}
		}
		took := time.Since(start).Seconds()
		_, err := docker(ds[0], "network", "rm", name)
		return took, err
	})
	if err != nil {
		return fmt.Errorf("network create: %w", err)
	}
	fmt.Printf("| `docker network create -d fabric` on host1 → on every host | %.2f (%.2f-%.2f) |\n", create.median, create.min, create.max)

	if out, err := docker(ds[0], "network", "create", "-d", "fabric", "--ipam-driver", "fabric", "--subnet", "172.16.1.0/24", "net1"); err != nil {
		return fmt.Errorf("%v: %s", err, out)
	}
	for _, d := range ds[1:] {
		for {
			if out, _ := docker(d, "network", "ls", "-q", "--filter", "name=^net1$"); out != "" {
				break
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
	if _, err := docker(ds[0], "run", "-d", "--name", "client", "--network", "net1", img, "sleep", "3600"); err != nil {
		return err
	}
	run = 0
	reach, err := samples(func() (float64, error) {
		run++
		name := fmt.Sprintf("web%d", run)
		start := time.Now()
		if out, err := docker(ds[1], "run", "-d", "--name", name, "--network", "net1", img, "sleep", "3600"); err != nil {
			return 0, fmt.Errorf("%v: %s", err, out)
		}
		for {
			if _, err := docker(ds[0], "exec", "client", "ping", "-c", "1", "-W", "1", name); err == nil {
				break
			}
			if time.Since(start) > time.Minute {
				return 0, fmt.Errorf("%s not reachable by name after a minute", name)
			}
		}
		return time.Since(start).Seconds(), nil
	})
	if err != nil {
		return fmt.Errorf("run to reachable: %w", err)
	}
	fmt.Printf("| `docker run --network net1` on host2 → host1's container pings it by name | %.2f (%.2f-%.2f) |\n", reach.median, reach.min, reach.max)

	return networksThroughput(ctx, l, ds, img, docker)
}

// waitStatus waits for fabricd on h to answer with its lease.
func waitStatus(ctx context.Context, l *lab.Lab, h *lab.Host) (localapi.Status, error) {
	c := localapi.NewClient(h.FabricdRunDir() + "/fabricd.sock")
	deadline := time.Now().Add(time.Minute)
	for {
		st, err := c.Status(ctx)
		if err == nil && st.Gateway != "" {
			return st, nil
		}
		if time.Now().After(deadline) {
			return st, fmt.Errorf("fabricd on %s not answering: %v", h.Name, err)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// netCtr is a docker container's network namespace, entered with nsenter to
// run the host's iperf3 there (the image has none).
type netCtr struct {
	pid  string
	addr netip.Addr
}

func (c netCtr) command(ctx context.Context, args ...string) *exec.Cmd {
	return exec.CommandContext(ctx, "nsenter", append([]string{"-t", c.pid, "-n"}, args...)...)
}

func (c netCtr) Run(ctx context.Context, name string, args ...string) (string, error) {
	out, err := c.command(ctx, append([]string{name}, args...)...).CombinedOutput()
	return string(out), err
}

// networksThroughput runs iperf3 between a container on host1 and one on
// host2 over a fabric network, docker0 and a swarm overlay network, side
// by side on one CPU, and prints each against docker0's.
func networksThroughput(ctx context.Context, l *lab.Lab, ds []*lab.Dockerd, img string, docker func(*lab.Dockerd, ...string) (string, error)) error {
	a, b := ds[0], ds[1]
	// Swarm between the same two namespaces. Its overlay's VXLAN port moves
	// to 4790: fabric's VXLAN device already holds 4789 there.
	if out, err := docker(a, "swarm", "init", "--advertise-addr", a.Host.Addr.String(), "--listen-addr", a.Host.Addr.String()+":2377", "--data-path-port", "4790"); err != nil {
		return fmt.Errorf("swarm init: %v: %s", err, out)
	}
	token, err := docker(a, "swarm", "join-token", "-q", "worker")
	if err != nil {
		return err
	}
	if out, err := docker(b, "swarm", "join", "--token", token, "--advertise-addr", b.Host.Addr.String(), a.Host.Addr.String()+":2377"); err != nil {
		return fmt.Errorf("swarm join: %v: %s", err, out)
	}
	if out, err := docker(a, "network", "create", "-d", "overlay", "--attachable", "--subnet", "172.30.0.0/24", "ov1"); err != nil {
		return fmt.Errorf("overlay network: %v: %s", err, out)
	}
	type pair struct {
		name     string
		ctrs     [2]netCtr
		fromPool bool
	}
	var pairs []*pair
	for _, nw := range []struct{ name, net string }{{"fabric network", "net1"}, {"docker0 (the bridge, over the fabric)", "bridge"}, {"Docker swarm overlay", "ov1"}} {
		p := &pair{name: nw.name}
		for i, d := range []*lab.Dockerd{a, b} {
			ctr := fmt.Sprintf("tp-%s-%d", nw.net, i)
			if out, err := docker(d, "run", "-d", "--name", ctr, "--network", nw.net, img, "sleep", "3600"); err != nil {
				return fmt.Errorf("docker run %s: %v: %s", ctr, err, out)
			}
			pid, err := docker(d, "inspect", "-f", "{{.State.Pid}}", ctr)
			if err != nil {
				return err
			}
			ip, err := docker(d, "inspect", "-f", "{{(index .NetworkSettings.Networks \""+nw.net+"\").IPAddress}}", ctr)
			if err != nil {
				return err
			}
			addr, err := netip.ParseAddr(ip)
			if err != nil {
				return fmt.Errorf("address of %s: %q", ctr, ip)
			}
			p.ctrs[i] = netCtr{pid: pid, addr: addr}
		}
		pairs = append(pairs, p)
	}
	// Wait until every pair reaches its peer (the overlay takes a moment).
	for _, p := range pairs {
		deadline := time.Now().Add(time.Minute)
		for {
			if _, err := p.ctrs[0].Run(ctx, "ping", "-c", "1", "-W", "1", p.ctrs[1].addr.String()); err == nil {
				break
			}
			if time.Now().After(deadline) {
				return fmt.Errorf("%s: %s does not reach %s", p.name, p.ctrs[0].addr, p.ctrs[1].addr)
			}
		}
	}

	fmt.Printf("\n## Container to container on two hosts: a fabric network, docker0 and Docker's swarm overlay, side by side\n\n")
	fmt.Printf("All three pairs run iperf3 at the same time, every process on CPU %s, 3 s after 1 s of warm-up, one stream: %d rounds, median (min-max); the ratio is taken per round against docker0.\n\n", throughputCPU, throughputRounds)
	results := make([][]float64, len(pairs))
	for range throughputRounds {
		got, err := sideBySideNs(ctx, pairs[0].ctrs, pairs[1].ctrs, pairs[2].ctrs)
		if err != nil {
			return err
		}
		for i := range pairs {
			results[i] = append(results[i], got[i])
		}
	}
	fmt.Println("| pair | Gbit/s | against docker0 |")
	fmt.Println("|---|---|---|")
	for i, p := range pairs {
		fmt.Printf("| %s | %s | %s |\n", p.name, gbits(summarize(results[i])), ratioStats(results[i], results[1]))
	}
	return nil
}

// sideBySideNs runs one iperf3 sample on every pair at once, as sideBySide
// does for the lab's containers.
func sideBySideNs(ctx context.Context, pairs ...[2]netCtr) ([]float64, error) {
	for _, p := range pairs {
		srv := p[1].command(ctx, "iperf3", "-s", "-1", "-A", throughputCPU, "-B", p[1].addr.String())
		if err := srv.Start(); err != nil {
			return nil, err
		}
		defer func() { srv.Process.Kill(); srv.Wait() }()
		if err := waitListening(ctx, p[1], 5201); err != nil {
			return nil, err
		}
	}
	clients := make([]iperfClient, len(pairs))
	for i, p := range pairs {
		clients[i] = iperfClient{from: p[0], to: p[1].addr}
	}
	return runClients(ctx, clients, 1)
}
