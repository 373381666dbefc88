package qemulane

import (
	"context"
	"testing"
	"time"
)

func TestZZTmpTunl0(t *testing.T) {
	kernel, _, _ := FindKernel()
	img := Image{Kernel: kernel, Modules: []string{"ipip"}, Init: `
IP=/usr/local/sbin/ip
$IP netns add x 2>&1; echo "netns rc=$?"
echo "--- probe like ipip.Supported (no local/remote)"; $IP -n x link add fabprobe1 type ipip 2>&1; echo "rc=$?"
echo "--- with local 127.0.0.2"; $IP -n x link add fabprobe2 type ipip local 127.0.0.2 2>&1; echo "rc=$?"
echo "--- init ns, no params"; $IP link add fabprobe3 type ipip 2>&1; echo "rc=$?"
$IP -n x -d link show 2>&1 | grep -A1 ipip
echo "QEMULANE-RESULT: PASS"
`}
	if err := img.AddHostBinary("/usr/sbin/ip", "/usr/local/sbin/ip"); err != nil {
		t.Fatal(err)
	}
	initrd, err := Build(t.TempDir(), img)
	if err != nil {
		t.Fatal(err)
	}
	res, err := Run(context.Background(), kernel, initrd, RunOptions{Timeout: 90 * time.Second})
	for _, l := range res.Lines("") { t.Log(l) }
	if err != nil {
		t.Fatal(err)
	}
}
