package qemulane

import (
	"fmt"
	"io"
	"path"
	"sort"
	"strings"
)

// cpio "newc" (SVR4, no CRC) is the format the kernel unpacks as an initramfs:
// a 110-byte ASCII header, the NUL-terminated name, padding to 4 bytes, the data,
// padding to 4 bytes, and a final entry named "TRAILER!!!".

const (
	modeDir     = 0o040000
	modeRegular = 0o100000
	modeSymlink = 0o120000
	modeCharDev = 0o020000
)

// cpioEntry is one file, directory, symlink or device node of the archive.
type cpioEntry struct {
	name     string // without leading slash
	mode     uint32 // type bits | permission bits
	data     []byte // file content or symlink target
	devMajor uint32 // for device nodes
	devMinor uint32
}

// cpioArchive collects entries and adds missing parent directories on write,
// so callers only name the files they care about.
type cpioArchive struct {
	entries map[string]cpioEntry
}

func newCpioArchive() *cpioArchive {
	return &cpioArchive{entries: map[string]cpioEntry{}}
}

func cleanArchivePath(p string) (string, error) {
	clean := strings.TrimPrefix(path.Clean("/"+p), "/")
	if clean == "" || clean == "." {
		return "", fmt.Errorf("invalid path %q in image", p)
	}
	return clean, nil
}

func (a *cpioArchive) add(e cpioEntry) error {
	name, err := cleanArchivePath(e.name)
	if err != nil {
		return err
	}
	e.name = name
	a.entries[name] = e
	return nil
}

func (a *cpioArchive) addFile(name string, perm uint32, data []byte) error {
	return a.add(cpioEntry{name: name, mode: modeRegular | perm, data: data})
}

func (a *cpioArchive) addDir(name string) error {
	return a.add(cpioEntry{name: name, mode: modeDir | 0o755})
}

func (a *cpioArchive) addSymlink(name, target string) error {
	return a.add(cpioEntry{name: name, mode: modeSymlink | 0o777, data: []byte(target)})
}

func (a *cpioArchive) addCharDev(name string, major, minor uint32) error {
	return a.add(cpioEntry{name: name, mode: modeCharDev | 0o600, devMajor: major, devMinor: minor})
}

// write emits parents before children (sorted order guarantees that once every
// parent directory exists as an entry) and ends with the trailer.
func (a *cpioArchive) write(w io.Writer) error {
	for name := range a.entries {
		for dir := path.Dir(name); dir != "." && dir != "/"; dir = path.Dir(dir) {
			if _, ok := a.entries[dir]; !ok {
				a.entries[dir] = cpioEntry{name: dir, mode: modeDir | 0o755}
			}
		}
	}
	names := make([]string, 0, len(a.entries))
	for name := range a.entries {
		names = append(names, name)
	}
	sort.Strings(names)

	cw := &cpioWriter{w: w}
	for i, name := range names {
		if err := cw.writeEntry(uint32(i+1), a.entries[name]); err != nil {
			return err
		}
	}
	if err := cw.writeEntry(0, cpioEntry{name: "TRAILER!!!"}); err != nil {
		return err
	}
	return cw.err
}

type cpioWriter struct {
	w       io.Writer
	written int64
	err     error
}

func (cw *cpioWriter) put(b []byte) {
	if cw.err != nil {
		return
	}
	n, err := cw.w.Write(b)
	cw.written += int64(n)
	cw.err = err
}

func (cw *cpioWriter) pad() {
	if rem := cw.written % 4; rem != 0 {
		cw.put(make([]byte, 4-rem))
	}
}

func (cw *cpioWriter) writeEntry(ino uint32, e cpioEntry) error {
	nlink := uint32(1)
	if e.mode&0o170000 == modeDir {
		nlink = 2
	}
	header := fmt.Sprintf("070701%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X",
		ino, e.mode, 0 /*uid*/, 0 /*gid*/, nlink, 0 /*mtime*/, len(e.data),
		0, 0 /*dev major, minor*/, e.devMajor, e.devMinor, len(e.name)+1, 0 /*check*/)
	cw.put([]byte(header))
	cw.put(append([]byte(e.name), 0))
	cw.pad()
	cw.put(e.data)
	cw.pad()
	return cw.err
}
