#!/usr/bin/env bash
# Installs the Debian packages the tests and the demo need, and nothing when
# they are already there. Usage: scripts/install-deps.sh test|demo|bench
set -euo pipefail
want=(iproute2 iputils-ping util-linux iptables ipset etcd-server etcd-client bird2 tcpdump iperf3 procps)
case "${1:-test}" in
  test) want+=(qemu-system-x86 linux-image-amd64 busybox-static xz-utils docker.io docker-compose frr debootstrap systemd-container) ;;
  demo) want+=(docker.io busybox-static) ;;
  bench) want+=(docker.io busybox-static dnsmasq-base nftables) ;;
esac
if [ "$(id -u)" != 0 ]; then
  echo "fabric's tests and demo build network namespaces: run them as root" >&2
  exit 1
fi
missing=()
for p in "${want[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# Debian starts etcd, docker and FRR as services when they are installed;
# the lab runs its own, one per host namespace.
if command -v systemctl >/dev/null; then
  for unit in etcd docker.socket docker containerd frr; do
    if systemctl is-active -q "$unit" 2>/dev/null; then systemctl stop "$unit" || true; fi
  done
fi
