package etcdtest

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"
)

// TLSFiles are the PEM files a client of a TLS cluster needs: the CA that
// signed the server certificate, and a client certificate with its key.
type TLSFiles struct {
	CA   string
	Cert string
	Key  string

	serverCert, serverKey string
}

// StartTLS runs a single embedded etcd member whose client URL is https
// and requires a client certificate. A throwaway CA, a server certificate
// for 127.0.0.1 and a client certificate are written to a temporary
// directory; the member is stopped in t.Cleanup.
func StartTLS(t testing.TB) (*Cluster, TLSFiles) {
	t.Helper()
	files := WriteTLSFiles(t)
	return startWithRetries(t, 1, &files), files
}

// UnrelatedCA writes a CA certificate that signed nothing of a StartTLS
// cluster and returns its path, to test a client with the wrong CA.
func UnrelatedCA(t testing.TB) string {
	t.Helper()
	dir := t.TempDir()
	ca := newCA(t, "etcdtest unrelated CA")
	path := filepath.Join(dir, "other-ca.pem")
	writePEM(t, path, "CERTIFICATE", ca.der)
	return path
}

type certAuthority struct {
	cert *x509.Certificate
	key  *ecdsa.PrivateKey
	der  []byte
}

// WriteTLSFiles writes a throwaway CA, a server certificate for 127.0.0.1
// and a client certificate (ECDSA P-256, valid for a day) to a temporary
// directory, without starting etcd: for tests of settings that name files.
func WriteTLSFiles(t testing.TB) TLSFiles {
	t.Helper()
	dir := t.TempDir()
	ca := newCA(t, "etcdtest CA")
	f := TLSFiles{
		CA:         filepath.Join(dir, "ca.pem"),
		Cert:       filepath.Join(dir, "client.pem"),
		Key:        filepath.Join(dir, "client-key.pem"),
		serverCert: filepath.Join(dir, "server.pem"),
		serverKey:  filepath.Join(dir, "server-key.pem"),
	}
	writePEM(t, f.CA, "CERTIFICATE", ca.der)
	ca.issue(t, &x509.Certificate{
		Subject:     pkix.Name{CommonName: "etcdtest server"},
		DNSNames:    []string{"localhost"},
		IPAddresses: []net.IP{net.IPv4(127, 0, 0, 1)},
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
	}, f.serverCert, f.serverKey)
	ca.issue(t, &x509.Certificate{
		Subject:     pkix.Name{CommonName: "fabric"},
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	}, f.Cert, f.Key)
	return f
}

func newCA(t testing.TB, name string) *certAuthority {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatalf("etcdtest: CA key: %v", err)
	}
	tmpl := &x509.Certificate{
		SerialNumber:          serial(t),
		Subject:               pkix.Name{CommonName: name},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(24 * time.Hour),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature,
		BasicConstraintsValid: true,
		IsCA:                  true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatalf("etcdtest: CA certificate: %v", err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatalf("etcdtest: parse CA certificate: %v", err)
	}
	return &certAuthority{cert: cert, key: key, der: der}
}

// issue signs tmpl (subject, names and usages set by the caller) with a new
// key and writes certificate and key to certFile and keyFile.
func (ca *certAuthority) issue(t testing.TB, tmpl *x509.Certificate, certFile, keyFile string) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatalf("etcdtest: key: %v", err)
	}
	tmpl.SerialNumber = serial(t)
	tmpl.NotBefore = time.Now().Add(-time.Hour)
	tmpl.NotAfter = time.Now().Add(24 * time.Hour)
	tmpl.KeyUsage = x509.KeyUsageDigitalSignature
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.cert, &key.PublicKey, ca.key)
	if err != nil {
		t.Fatalf("etcdtest: certificate %s: %v", tmpl.Subject.CommonName, err)
	}
	keyDER, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		t.Fatalf("etcdtest: marshal key: %v", err)
	}
	writePEM(t, certFile, "CERTIFICATE", der)
	writePEM(t, keyFile, "PRIVATE KEY", keyDER)
}

func serial(t testing.TB) *big.Int {
	n, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 62))
	if err != nil {
		t.Fatalf("etcdtest: serial: %v", err)
	}
	return n
}

func writePEM(t testing.TB, path, typ string, der []byte) {
	t.Helper()
	if err := os.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der}), 0o600); err != nil {
		t.Fatalf("etcdtest: write %s: %v", path, err)
	}
}
