// fabricd is the fabric agent that runs on every host.
package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"strings"
	"sync"
	"syscall"

	"github.com/coreos/go-systemd/v22/daemon"
	"github.com/spf13/pflag"

	"github.com/fabricnet/fabric/agent"
	"github.com/fabricnet/fabric/config"
	"github.com/fabricnet/fabric/version"
	"github.com/fabricnet/fabric/wireguard"
)

func main() {
	for _, a := range os.Args[1:] {
		if a == "--version" || a == "-version" {
			fmt.Println("fabricd", version.String())
			return
		}
		if a == "--settings-table" { // the table in docs/operations.md
			fmt.Print(config.SettingsTable())
			return
		}
	}
	cfg, err := config.Load(os.Args[1:], os.Environ())
	if errors.Is(err, pflag.ErrHelp) {
		fmt.Print(config.Usage())
		return
	}
	if err != nil {
		// One line per problem, not the whole flag list: --help has that.
		fmt.Fprintf(os.Stderr, "fabricd: %v\n(fabricd --help lists every setting)\n", err)
		os.Exit(2)
	}
	if cfg.CheckConfig {
		if err := checkFiles(cfg); err != nil {
			fmt.Fprintf(os.Stderr, "fabricd: %v\n", err)
			os.Exit(2)
		}
		fmt.Printf("configuration valid: node %s, etcd %s, encapsulation %s, encryption %s\n",
			cfg.NodeName, strings.Join(cfg.EtcdEndpoints, ","), cfg.Encapsulation, cfg.Encryption)
		return
	}
	log := newLogger(cfg)
	if cfg.Cleanup {
		if err := agent.Cleanup(cfg, log); err != nil {
			fmt.Fprintln(os.Stderr, "fabricd --cleanup:", err)
			os.Exit(1)
		}
		return
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	log.Info("fabricd starting", "version", version.String(), "node", cfg.NodeName, "etcd", cfg.EtcdEndpoints, "encapsulation", cfg.Encapsulation)
	// STOPPING=1 at the signal, whatever fabricd is doing, and surely
	// before it exits.
	var stopping sync.Once
	notifyStopping := func() { stopping.Do(func() { daemon.SdNotify(false, daemon.SdNotifyStopping) }) }
	go func() {
		<-ctx.Done()
		notifyStopping()
	}()
	err = agent.Run(ctx, cfg, log)
	if ctx.Err() != nil {
		notifyStopping()
	}
	if err != nil && ctx.Err() != nil && errors.Is(err, context.Canceled) {
		// SIGTERM while starting: a stop like any other, not a failure.
		log.Info("stopped while starting")
		return
	}
	if err != nil {
		log.Error("fabricd failed", "err", err)
		fmt.Fprintln(os.Stderr, "fabricd:", err)
		os.Exit(1)
	}
}

func newLogger(cfg *config.Config) *slog.Logger {
	var level slog.Level
	level.UnmarshalText([]byte(cfg.LogLevel))
	opts := &slog.HandlerOptions{Level: level}
	if cfg.LogFormat == "json" {
		return slog.New(slog.NewJSONHandler(os.Stderr, opts))
	}
	return slog.New(slog.NewTextHandler(os.Stderr, opts))
}

// checkFiles checks, for --check-config, the files the settings name that
// config.Load does not read: the WireGuard key, read as fabricd would (a
// missing one is made at start, so it is no error here).
func checkFiles(cfg *config.Config) error {
	if cfg.Encryption == "off" {
		return nil
	}
	if _, err := os.Stat(cfg.WireGuardKeyPath()); errors.Is(err, os.ErrNotExist) {
		return nil
	}
	_, err := wireguard.LoadOrCreateKey(cfg.WireGuardKeyPath())
	return err
}
