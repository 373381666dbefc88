package wireguard

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"

	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"
)

// LoadOrCreateKey reads this host's private key from path, or makes one and
// writes it there (0600, its directory 0700) on the first start. The key
// never leaves the host: only its public half goes into the node record. A
// key file others can read is refused rather than used.
func LoadOrCreateKey(path string) (wgtypes.Key, error) {
	raw, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		return CreateKey(path)
	}
	if err != nil {
		return wgtypes.Key{}, fmt.Errorf("wireguard key %s: %w", path, err)
	}
	st, err := os.Stat(path)
	if err != nil {
		return wgtypes.Key{}, fmt.Errorf("wireguard key %s: %w", path, err)
	}
	if st.Mode().Perm()&0o077 != 0 {
		return wgtypes.Key{}, fmt.Errorf("wireguard key %s: mode %04o lets others read the private key; chmod 600 it, or delete it to make a new one", path, st.Mode().Perm())
	}
	key, err := wgtypes.ParseKey(strings.TrimSpace(string(raw)))
	if err != nil {
		return wgtypes.Key{}, fmt.Errorf("wireguard key %s: not a base64 WireGuard key (%v); delete it to make a new one", path, err)
	}
	return key, nil
}

// CreateKey makes a new private key and writes it to path in place of any
// old one (atomically: a crash leaves the old key or the new one).
func CreateKey(path string) (wgtypes.Key, error) {
	key, err := wgtypes.GeneratePrivateKey()
	if err != nil {
		return wgtypes.Key{}, fmt.Errorf("wireguard: generate a private key: %w", err)
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return wgtypes.Key{}, fmt.Errorf("wireguard key: %w", err)
	}
	tmp, err := os.CreateTemp(filepath.Dir(path), ".wireguard-key-*")
	if err != nil {
		return wgtypes.Key{}, fmt.Errorf("wireguard key: %w", err)
	}
	defer os.Remove(tmp.Name())
	// CreateTemp makes the file 0600.
	if _, err := tmp.WriteString(key.String() + "\n"); err != nil {
		tmp.Close()
		return wgtypes.Key{}, fmt.Errorf("wireguard key: %w", err)
	}
	if err := tmp.Sync(); err != nil {
		tmp.Close()
		return wgtypes.Key{}, fmt.Errorf("wireguard key: %w", err)
	}
	if err := tmp.Close(); err != nil {
		return wgtypes.Key{}, fmt.Errorf("wireguard key: %w", err)
	}
	if err := os.Rename(tmp.Name(), path); err != nil {
		return wgtypes.Key{}, fmt.Errorf("wireguard key: %w", err)
	}
	return key, nil
}

// ParsePublicKey checks a public key from a node record: base64 of 32
// bytes, not all zero.
func ParsePublicKey(s string) (wgtypes.Key, error) {
	key, err := wgtypes.ParseKey(s)
	if err != nil {
		return wgtypes.Key{}, fmt.Errorf("%q is not a base64 WireGuard key", s)
	}
	if key == (wgtypes.Key{}) {
		return wgtypes.Key{}, errors.New("the all-zero key")
	}
	return key, nil
}
