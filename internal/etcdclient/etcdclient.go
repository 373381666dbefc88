// Package etcdclient builds the etcd client that fabricd and fabricctl share:
// the endpoints, an optional TLS setup from PEM files (CA, client
// certificate and key) and a dial timeout. Problems with the files are
// reported naming the file and what is wrong with it, before any dialling.
package etcdclient

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"net/url"
	"os"
	"strings"
	"time"

	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// TLSFiles names the PEM files for TLS to etcd. All are optional: CA empty
// means the system roots; Cert and Key go together and enable client
// certificate authentication.
type TLSFiles struct {
	CA   string // CA bundle that signed etcd's server certificate
	Cert string // client certificate
	Key  string // private key of the client certificate
}

// Enabled reports whether any TLS file is set.
func (f TLSFiles) Enabled() bool { return f.CA != "" || f.Cert != "" || f.Key != "" }

// TLSConfig loads the files into a client tls.Config, or returns nil when
// no file is set. Errors name the file and the problem.
func (f TLSFiles) TLSConfig() (*tls.Config, error) {
	if !f.Enabled() {
		return nil, nil
	}
	cfg := &tls.Config{MinVersion: tls.VersionTLS12}
	if f.CA != "" {
		pool, err := LoadCA(f.CA)
		if err != nil {
			return nil, err
		}
		cfg.RootCAs = pool
	}
	switch {
	case f.Cert == "" && f.Key == "":
	case f.Cert == "":
		return nil, fmt.Errorf("etcd client key %s is set without a client certificate", f.Key)
	case f.Key == "":
		return nil, fmt.Errorf("etcd client certificate %s is set without its key", f.Cert)
	default:
		pair, err := LoadKeyPair(f.Cert, f.Key)
		if err != nil {
			return nil, err
		}
		cfg.Certificates = []tls.Certificate{pair}
	}
	return cfg, nil
}

// LoadCA reads a PEM bundle of CA certificates.
func LoadCA(file string) (*x509.CertPool, error) {
	pem, err := os.ReadFile(file)
	if err != nil {
		return nil, fmt.Errorf("etcd CA certificate: %w", err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(pem) {
		return nil, fmt.Errorf("etcd CA certificate %s: no PEM-encoded certificate found", file)
	}
	return pool, nil
}

// LoadKeyPair reads a client certificate and its key, and refuses a
// certificate that is expired or not yet valid.
func LoadKeyPair(certFile, keyFile string) (tls.Certificate, error) {
	certPEM, err := os.ReadFile(certFile)
	if err != nil {
		return tls.Certificate{}, fmt.Errorf("etcd client certificate: %w", err)
	}
	keyPEM, err := os.ReadFile(keyFile)
	if err != nil {
		return tls.Certificate{}, fmt.Errorf("etcd client key: %w", err)
	}
	pair, err := tls.X509KeyPair(certPEM, keyPEM)
	if err != nil {
		// The messages of crypto/tls say which input is wrong ("certificate
		// input", "key input", "private key does not match public key") but
		// not which file; add both.
		return tls.Certificate{}, fmt.Errorf("etcd client certificate %s with key %s: %w", certFile, keyFile, err)
	}
	leaf, err := x509.ParseCertificate(pair.Certificate[0])
	if err != nil {
		return tls.Certificate{}, fmt.Errorf("etcd client certificate %s: %w", certFile, err)
	}
	if now := time.Now(); now.After(leaf.NotAfter) {
		return tls.Certificate{}, fmt.Errorf("etcd client certificate %s expired at %s", certFile, leaf.NotAfter.UTC().Format(time.RFC3339))
	} else if now.Before(leaf.NotBefore) {
		return tls.Certificate{}, fmt.Errorf("etcd client certificate %s is not valid before %s (check the clock)", certFile, leaf.NotBefore.UTC().Format(time.RFC3339))
	}
	return pair, nil
}

// Config returns the clientv3 configuration for endpoints with TLS from
// files. A TLS setup with only http:// endpoints is refused: the client
// would silently talk plain text.
func Config(endpoints []string, files TLSFiles, dialTimeout time.Duration, logger *zap.Logger) (clientv3.Config, error) {
	if len(endpoints) == 0 {
		return clientv3.Config{}, errors.New("no etcd endpoints")
	}
	tlsCfg, err := files.TLSConfig()
	if err != nil {
		return clientv3.Config{}, err
	}
	if tlsCfg != nil && !AnyTLSEndpoint(endpoints) {
		return clientv3.Config{}, fmt.Errorf("etcd TLS files are set but no endpoint uses https:// (%s)", strings.Join(endpoints, ","))
	}
	if logger == nil {
		logger = zap.NewNop()
	}
	return clientv3.Config{
		Endpoints:   endpoints,
		DialTimeout: dialTimeout,
		TLS:         tlsCfg,
		Logger:      logger,
	}, nil
}

// New returns a client for endpoints, see Config. Like clientv3.New it
// does not wait for a connection; see Check.
func New(endpoints []string, files TLSFiles, dialTimeout time.Duration, logger *zap.Logger) (*clientv3.Client, error) {
	cfg, err := Config(endpoints, files, dialTimeout, logger)
	if err != nil {
		return nil, err
	}
	cli, err := clientv3.New(cfg)
	if err != nil {
		return nil, fmt.Errorf("etcd %s: %w", strings.Join(endpoints, ","), err)
	}
	return cli, nil
}

// AnyTLSEndpoint reports whether one of endpoints uses TLS (https:// or
// unixs://).
func AnyTLSEndpoint(endpoints []string) bool {
	for _, e := range endpoints {
		if strings.HasPrefix(e, "https://") || strings.HasPrefix(e, "unixs://") {
			return true
		}
	}
	return false
}

// Diagnose explains why endpoints cannot be used, after a request failed
// with a bare "context deadline exceeded": the client library retries
// connection errors until the deadline and drops their reason. It dials
// each endpoint itself, with the same TLS setup, and returns nil if one of
// them accepts the connection (the problem then lies elsewhere), else an
// error naming every endpoint and its problem, such as "etcd
// https://10.0.0.5:2379: tls: failed to verify certificate: x509:
// certificate signed by unknown authority".
func Diagnose(ctx context.Context, endpoints []string, files TLSFiles) error {
	tlsCfg, err := files.TLSConfig()
	if err != nil {
		return err
	}
	var errs []string
	for _, ep := range endpoints {
		err := probe(ctx, ep, tlsCfg, files.Cert)
		if err == nil {
			return nil
		}
		errs = append(errs, fmt.Sprintf("etcd %s: %v", ep, err))
	}
	return errors.New(strings.Join(errs, "; "))
}

// probe connects to one endpoint like the client would and, for TLS,
// completes the handshake and waits briefly for the server's verdict on
// the client certificate: with TLS 1.3 a refused certificate shows only as
// an alert after the client's side of the handshake is done.
func probe(ctx context.Context, ep string, tlsCfg *tls.Config, certFile string) error {
	u, err := url.Parse(ep)
	if err != nil {
		return err
	}
	network, addr, secure := "tcp", u.Host, false
	switch u.Scheme {
	case "http":
	case "https":
		secure = true
	case "unix":
		network, addr = "unix", u.Host+u.Path
	case "unixs":
		network, addr, secure = "unix", u.Host+u.Path, true
	default:
		return fmt.Errorf("unknown scheme %q", u.Scheme)
	}
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	var d net.Dialer
	conn, err := d.DialContext(ctx, network, addr)
	if err != nil {
		return err
	}
	defer conn.Close()
	if !secure {
		return nil
	}
	cfg := &tls.Config{MinVersion: tls.VersionTLS12}
	if tlsCfg != nil {
		cfg = tlsCfg.Clone()
	}
	if host, _, err := net.SplitHostPort(addr); err == nil && network == "tcp" {
		cfg.ServerName = host
	}
	tc := tls.Client(conn, cfg)
	if err := tc.HandshakeContext(ctx); err != nil {
		if len(cfg.Certificates) == 0 && isCertRequired(err) {
			return fmt.Errorf("%w (the server requires a client certificate: set --etcd-cert and --etcd-key)", err)
		}
		return err
	}
	tc.SetReadDeadline(time.Now().Add(time.Second))
	var b [1]byte
	if _, err := tc.Read(b[:]); err != nil {
		var ne net.Error
		if errors.As(err, &ne) && ne.Timeout() {
			return nil // no alert: the server took the certificate
		}
		if len(cfg.Certificates) == 0 && isCertRequired(err) {
			return fmt.Errorf("%w (the server requires a client certificate: set --etcd-cert and --etcd-key)", err)
		}
		if len(cfg.Certificates) > 0 && strings.Contains(err.Error(), "remote error") {
			return fmt.Errorf("etcd refused the client certificate %s: %w", certFile, err)
		}
		return fmt.Errorf("server closed the connection after the TLS handshake: %w", err)
	}
	return nil
}

func isCertRequired(err error) bool {
	s := err.Error()
	return strings.Contains(s, "certificate required") || strings.Contains(s, "bad certificate")
}

// Unavailable reports whether err means etcd did not answer in time or had
// no leader to answer with, which passes, as opposed to a refusal (bad
// certificate, permission, a failed transaction) that waiting does not
// change. etcd's own "request timed out, possibly due to previous leader
// failure" arrives as an etcd error with gRPC code Unavailable, not as a
// context deadline.
func Unavailable(err error) bool {
	if err == nil {
		return false
	}
	if errors.Is(err, context.DeadlineExceeded) {
		return true
	}
	var etcdErr rpctypes.EtcdError
	if errors.As(err, &etcdErr) {
		return transientCode(etcdErr.Code())
	}
	return transientCode(status.Code(err))
}

func transientCode(c codes.Code) bool {
	return c == codes.Unavailable || c == codes.DeadlineExceeded
}
