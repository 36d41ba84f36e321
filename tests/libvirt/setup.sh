#!/usr/bin/env bash
# Installs libvirt's QEMU driver (libvirtd, virsh) from bookworm-backports,
# idempotently. tests/qemu/setup.sh (run first) has added bookworm-backports
# to the apt sources and installed QEMU 10.0.
set -euo pipefail
sudo_() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
if [ -x /usr/sbin/libvirtd ] && command -v virsh >/dev/null; then
    echo "setup: $(/usr/sbin/libvirtd --version)"
    exit 0
fi
grep -rqs "bookworm-backports" /etc/apt/sources.list /etc/apt/sources.list.d/ \
    || "$(dirname "$0")/../qemu/setup.sh"
echo "setup: installing libvirt from bookworm-backports"
sudo_ env DEBIAN_FRONTEND=noninteractive apt-get install -y -q -t bookworm-backports \
    --no-install-recommends libvirt-daemon-driver-qemu libvirt-daemon libvirt-clients
echo "setup: $(/usr/sbin/libvirtd --version)"
