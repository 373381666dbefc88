#!/usr/bin/env bash
# Builds the fabric .deb with dpkg-deb: fabricd and fabricctl, the systemd
# unit, the docker.service drop-in, a default /etc/fabric/fabricd.yaml and
# the docs. Usage: scripts/build-deb.sh OUTDIR   (prints the .deb's path)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: build-deb.sh OUTDIR}
mkdir -p "$out"
out=$(cd "$out" && pwd)
# A Debian version must start with a digit and grow with every build, so
# apt upgrades: the commit count comes first (dpkg compares it as a number),
# the commit only names the build ("0.1.0+g2dc16fb" sorted below
# "0.1.0+g0042200" however new it was).
count=$(git rev-list --count HEAD 2>/dev/null || echo 0)
commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
dirty=$(git diff --quiet HEAD 2>/dev/null || echo .dirty)
version="${FABRIC_DEB_VERSION:-0.1.0+${count}.g${commit}${dirty}}" # the variable: tests that upgrade
arch=$(go env GOARCH)
root=$(mktemp -d)
chmod 0755 "$root"
trap 'rm -rf "$root"' EXIT

install -d "$root/DEBIAN" "$root/usr/bin" "$root/lib/systemd/system/docker.service.d" \
  "$root/etc/fabric" "$root/usr/share/doc/fabric" "$root/usr/share/bash-completion/completions"
CGO_ENABLED=0 go build -ldflags "-X github.com/fabricnet/fabric/version.Version=$version" \
  -o "$root/usr/bin/" ./cmd/fabricd ./cmd/fabricctl
chmod 0755 "$root/usr/bin/fabricd" "$root/usr/bin/fabricctl"
install -m 0644 packaging/fabricd.service "$root/lib/systemd/system/fabricd.service"
install -m 0644 packaging/docker-fabric.conf "$root/lib/systemd/system/docker.service.d/fabric.conf"
# 0600: it may hold BGP MD5 passwords and etcd key paths.
install -m 0600 packaging/fabricd.yaml "$root/etc/fabric/fabricd.yaml"
"$root/usr/bin/fabricctl" completion bash > "$root/usr/share/bash-completion/completions/fabricctl"
chmod 0644 "$root/usr/share/bash-completion/completions/fabricctl"
# Manual pages: fabricctl's from its command tree (cobra), fabricd's from
# its --help (every setting, its default and meaning).
man="$root/usr/share/man/man8"
install -d "$man"
SOURCE_DATE_EPOCH=$(git log -1 --format=%ct 2>/dev/null || echo 0) "$root/usr/bin/fabricctl" man "$man"
{
  echo '.TH FABRICD 8 "" "fabric '"$version"'" "fabric"'
  echo '.SH NAME'
  echo 'fabricd \- routed container network agent: subnet lease, BGP, IPIP/VXLAN/WireGuard, docker0, NAT, policy'
  echo '.SH SYNOPSIS'
  echo '.B fabricd'
  echo '[\fB\-\-config\fR \fIFILE\fR] [\fIOPTIONS\fR]'
  echo '.SH OPTIONS'
  echo '.nf'
  # (the node name's default is the build machine's host name: not shown)
  "$root/usr/bin/fabricd" --help | sed '/--node-name/s/ (default "[^"]*")//; s/\\/\\\\/g; s/^\./\\\&./'
  echo '.fi'
  echo '.SH SEE ALSO'
  echo '.BR fabricctl (8),'
  echo '/usr/share/doc/fabric/operations.md'
} > "$man/fabricd.8"
gzip -9n "$man"/*.8
chmod 0644 "$man"/*.8.gz
for script in postinst prerm postrm; do
  install -m 0755 "packaging/$script" "$root/DEBIAN/$script"
done
install -D -m 0644 packaging/fabric-alerts.yaml "$root/usr/share/doc/fabric/examples/fabric-alerts.yaml"
# The binaries are static: they carry every Go module's code, so the
# package carries every module's licence and copyright lines.
go run ./tools/debcopyright "$root/usr/bin/fabricd" "$root/usr/bin/fabricctl" > "$root/usr/share/doc/fabric/copyright"
chmod 0644 "$root/usr/share/doc/fabric/copyright"
for doc in README.md docs/architecture.md docs/operations.md docs/security.md docs/troubleshooting.md; do
  install -m 0644 "$doc" "$root/usr/share/doc/fabric/$(basename "$doc")"
done
echo /etc/fabric/fabricd.yaml > "$root/DEBIAN/conffiles"
cat > "$root/DEBIAN/control" <<CONTROL
Package: fabric
Version: $version
Architecture: $arch
Maintainer: fabric developers <fabric@localhost>
Depends: iptables, ipset, iproute2, kmod
Recommends: docker.io
Section: net
Priority: optional
Description: routed container network for Docker hosts
 fabricd leases a subnet per host from etcd, advertises it with an embedded
 BGP speaker, routes containers over IPIP or VXLAN, and programs docker0,
 NAT, published ports and network policy. fabricctl is the operator's tool.
CONTROL
deb="$out/fabric_${version}_${arch}.deb"
dpkg-deb --root-owner-group --build "$root" "$deb" >/dev/null
echo "$deb"
