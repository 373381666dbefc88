// Package metrics holds fabricd's Prometheus registry and serves it over
// HTTP at /metrics. What is measured lives with the code that does the work
// (see agent/metrics.go); this package only registers and serves.
package metrics

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// Path is where the metrics are served.
const Path = "/metrics"

// NewRegistry returns a registry of its own (not the process-wide default)
// with the Go runtime and process collectors already in it.
func NewRegistry() *prometheus.Registry {
	reg := prometheus.NewRegistry()
	reg.MustRegister(
		collectors.NewGoCollector(),
		collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}),
	)
	return reg
}

// Health answers the probes of a supervisor or an orchestrator.
type Health interface {
	// Ready returns nil once the host carries fabric traffic, else why not.
	Ready() error
}

// Handler serves reg at Path, and /healthz (the process answers) and
// /readyz (health.Ready) beside it. A collector that fails is logged and
// left out of that scrape; the other metrics are still served.
func Handler(reg *prometheus.Registry, health Health, log *slog.Logger) http.Handler {
	if log == nil {
		log = slog.Default()
	}
	mux := http.NewServeMux()
	mux.Handle(Path, promhttp.HandlerFor(reg, promhttp.HandlerOpts{
		ErrorLog:            errorLog{log},
		ErrorHandling:       promhttp.ContinueOnError,
		MaxRequestsInFlight: 4,
		Timeout:             30 * time.Second,
	}))
	mux.HandleFunc("/healthz", func(w http.ResponseWriter, _ *http.Request) { fmt.Fprintln(w, "ok") })
	mux.HandleFunc("/readyz", func(w http.ResponseWriter, _ *http.Request) {
		if health != nil {
			if err := health.Ready(); err != nil {
				http.Error(w, "not ready: "+err.Error(), http.StatusServiceUnavailable)
				return
			}
		}
		fmt.Fprintln(w, "ready")
	})
	return mux
}

// Serve listens on addr (host:port) and serves reg until ctx is done. An
// empty addr turns the endpoint off: Serve returns nil at once.
func Serve(ctx context.Context, addr string, reg *prometheus.Registry, health Health, log *slog.Logger) error {
	if addr == "" {
		return nil
	}
	if log == nil {
		log = slog.Default()
	}
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return fmt.Errorf("metrics: listen on %s: %w", addr, err)
	}
	log.Info("serving metrics", "url", "http://"+ln.Addr().String()+Path)
	return serve(ctx, ln, Handler(reg, health, log))
}

func serve(ctx context.Context, ln net.Listener, h http.Handler) error {
	srv := &http.Server{Handler: h, ReadHeaderTimeout: 10 * time.Second}
	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(ln) }()
	select {
	case err := <-errc:
		return err
	case <-ctx.Done():
		c, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		srv.Shutdown(c)
		if err := <-errc; !errors.Is(err, http.ErrServerClosed) {
			return err
		}
		return nil
	}
}

// errorLog hands promhttp's errors to slog.
type errorLog struct{ log *slog.Logger }

func (e errorLog) Println(v ...any) { e.log.Warn("metrics", "err", fmt.Sprint(v...)) }
