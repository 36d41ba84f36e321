#!/usr/bin/env bash
# build-initramfs.sh GUEST_BIN OUT
# A busybox initramfs with the virtio-gpu modules of the guest kernel
# (unpacked by setup.sh) and the guest test program as /nc-guest. Its /init
# runs the scenarios named on the kernel command line (nc.scenarios=a,b,...)
# with NC_EXPECT_PROFILE set from nc.profile=compat|native (the transport
# profile this boot must come up with), and powers off.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
guest_bin=${1:?usage: build-initramfs.sh GUEST_BIN OUT}
out=${2:?usage: build-initramfs.sh GUEST_BIN OUT}
kdir="$here/work/kernel"
version=$(cat "$kdir/version")
busybox=$(command -v busybox)
[ -f "$kdir/vmlinuz" ] || { echo "build-initramfs: run setup.sh first" >&2; exit 1; }

root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
mkdir -p "$root"/{bin,dev,proc,sys,tmp} "$root/lib/modules/$version/kernel"
cp "$busybox" "$root/bin/busybox"
cp "$guest_bin" "$root/nc-guest"
# Uncompressed modules: busybox modprobe needs no xz support then.
for m in "$kdir/lib/modules/$version/kernel/"*; do
    case "$m" in
        *.xz) xz -dc "$m" > "$root/lib/modules/$version/kernel/$(basename "${m%.xz}")" ;;
        *.zst) zstd -dcq "$m" > "$root/lib/modules/$version/kernel/$(basename "${m%.zst}")" ;;
        *) cp "$m" "$root/lib/modules/$version/kernel/" ;;
    esac
done
touch "$root/lib/modules/$version/"{modules.order,modules.builtin,modules.builtin.modinfo}
/sbin/depmod -b "$root" "$version"

cat > "$root/init" <<'INIT'
#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
echo "NC-BOOTED $(uname -r)"
modprobe virtio-gpu || echo "NC-ERROR modprobe virtio-gpu failed"
i=0
while [ ! -e /dev/dri/renderD128 ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
[ -e /dev/dri/renderD128 ] || echo "NC-ERROR no render node"
dmesg | grep -a "\[drm\] features:" | sed 's/^/NC-DMESG /'
profile=$(sed -n 's/.*nc\.profile=\([^ ]*\).*/\1/p' /proc/cmdline)
if [ -n "$profile" ]; then
    export NC_EXPECT_PROFILE="$profile"
fi
echo "NC-PROFILE expected=${profile:-any}"
scenarios=$(sed -n 's/.*nc\.scenarios=\([^ ]*\).*/\1/p' /proc/cmdline)
for s in $(echo "$scenarios" | tr , ' '); do
    echo "NC-SCENARIO $s"
    timeout 300 /nc-guest "$s" || echo "NC-EXIT $s $?"
done
echo NC-DONE
poweroff -f
INIT
chmod +x "$root/init"
(cd "$root" && find . | cpio -o -H newc --quiet | gzip -1) > "$out"
echo "build-initramfs: $out ($(du -h "$out" | cut -f1))"
