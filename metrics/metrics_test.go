package metrics

import (
	"context"
	"errors"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

func scrape(t *testing.T, url string) (int, string, string) {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return resp.StatusCode, resp.Header.Get("Content-Type"), string(body)
}

// failing is a collector whose source is unreachable.
type failing struct{ desc *prometheus.Desc }

func (f failing) Describe(ch chan<- *prometheus.Desc) { ch <- f.desc }
func (f failing) Collect(ch chan<- prometheus.Metric) {
	ch <- prometheus.NewInvalidMetric(f.desc, io.ErrUnexpectedEOF)
}

func TestHandlerServesRegistry(t *testing.T) {
	reg := NewRegistry()
	c := prometheus.NewCounter(prometheus.CounterOpts{Name: "fabric_test_total", Help: "A test counter."})
	c.Add(3)
	g := prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "fabric_test_up", Help: "A test gauge."}, []string{"peer"})
	g.WithLabelValues("host2").Set(1)
	reg.MustRegister(c, g, failing{prometheus.NewDesc("fabric_test_broken", "Always fails.", nil, nil)})
	srv := httptest.NewServer(Handler(reg, nil, nil))
	defer srv.Close()

	code, ctype, body := scrape(t, srv.URL+Path)
	if code != http.StatusOK {
		t.Fatalf("GET %s: status %d, body:\n%s", Path, code, body)
	}
	if !strings.HasPrefix(ctype, "text/plain") {
		t.Errorf("content type %q, want the text exposition format", ctype)
	}
	for _, want := range []string{
		"# HELP fabric_test_total A test counter.",
		"# TYPE fabric_test_total counter",
		"fabric_test_total 3\n",
		`fabric_test_up{peer="host2"} 1` + "\n",
		"go_goroutines ",    // Go collector
		"process_open_fds ", // process collector
		"process_start_time_seconds ",
	} {
		if !strings.Contains(body, want) {
			t.Errorf("scrape lacks %q; body:\n%s", want, body)
		}
	}
	if strings.Contains(body, "fabric_test_broken") {
		t.Errorf("a failing collector must be left out, not served")
	}

	// Only /metrics is served.
	if code, _, _ := scrape(t, srv.URL+"/debug/pprof/"); code != http.StatusNotFound {
		t.Errorf("GET /debug/pprof/: status %d, want 404", code)
	}
}

func TestOwnRegistry(t *testing.T) {
	reg := NewRegistry()
	c := prometheus.NewCounter(prometheus.CounterOpts{Name: "fabric_only_here_total", Help: "x"})
	reg.MustRegister(c)
	// Not in the process-wide default registry.
	if err := prometheus.DefaultRegisterer.Register(c); err != nil {
		t.Fatalf("the counter is already in the default registry: %v", err)
	}
	prometheus.DefaultRegisterer.Unregister(c)
}

func TestServeStopsWithContext(t *testing.T) {
	if err := Serve(context.Background(), "", NewRegistry(), nil, nil); err != nil {
		t.Fatalf("empty address must turn the endpoint off, got %v", err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- serve(ctx, ln, Handler(NewRegistry(), nil, nil)) }()
	if code, _, _ := scrape(t, "http://"+ln.Addr().String()+Path); code != http.StatusOK {
		t.Fatalf("status %d", code)
	}
	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("serve after cancel: %v", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("serve did not stop with its context")
	}
	if _, err := net.DialTimeout("tcp", ln.Addr().String(), time.Second); err == nil {
		t.Error("still listening after the context ended")
	}
}

func TestServeListenError(t *testing.T) {
	err := Serve(context.Background(), "256.0.0.1:9815", NewRegistry(), nil, nil)
	if err == nil || !strings.Contains(err.Error(), "256.0.0.1:9815") {
		t.Fatalf("want a listen error naming the address, got %v", err)
	}
}

type readiness struct{ err error }

func (r *readiness) Ready() error { return r.err }

func TestHealthAndReadiness(t *testing.T) {
	r := &readiness{err: errors.New("no subnet lease yet")}
	srv := httptest.NewServer(Handler(NewRegistry(), r, nil))
	defer srv.Close()
	get := func(path string) (int, string) {
		resp, err := http.Get(srv.URL + path)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		body, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(body)
	}
	if code, _ := get("/healthz"); code != http.StatusOK {
		t.Errorf("/healthz: %d", code)
	}
	if code, body := get("/readyz"); code != http.StatusServiceUnavailable || !strings.Contains(body, "no subnet lease yet") {
		t.Errorf("/readyz while not ready: %d %q", code, body)
	}
	r.err = nil
	if code, _ := get("/readyz"); code != http.StatusOK {
		t.Errorf("/readyz when ready: %d", code)
	}
}
