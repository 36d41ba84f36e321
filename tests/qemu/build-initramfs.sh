#!/usr/bin/env bash
# build-initramfs.sh GUEST_BIN OUT
# A busybox initramfs with the virtio-gpu modules of the guest kernel
# (unpacked by setup.sh) and the guest test program as /nc-guest. Its /init
# runs the scenarios named on the kernel command line (nc.scenarios=a,b,...)
# with NC_EXPECT_PROFILE set from nc.profile=compat|native (the transport
# profile this boot must come up with) and NC_EXPECT_RESOLVER (kernel with
# the rebuilt virtio-gpu, user with Debian's), and powers off.
# virtio-gpu is the module setup.sh rebuilt with our patch series
# (work/kernel/rebuilt, with its uAPI test program as /svm-test), or
# Debian's own with NC_STOCK_VIRTIO_GPU=1. NC_VIRTIO_GPU_KO and
# NC_SVM_TEST name other builds of the two (guest/kernel/tests/boot.sh).
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
rebuilt=${NC_VIRTIO_GPU_KO:-$kdir/rebuilt/virtio-gpu.ko}
svm_test=${NC_SVM_TEST:-$kdir/rebuilt/svm-test}
if [ "${NC_STOCK_VIRTIO_GPU:-0}" != 1 ]; then
    [ -f "$rebuilt" ] || { echo "build-initramfs: no rebuilt virtio-gpu.ko: run setup.sh (or NC_STOCK_VIRTIO_GPU=1)" >&2; exit 1; }
    cp "$rebuilt" "$root/lib/modules/$version/kernel/virtio-gpu.ko"
    cp "$svm_test" "$root/svm-test"
    echo rebuilt > "$root/nc-module"
else
    echo debian > "$root/nc-module"
fi
echo "build-initramfs: virtio-gpu.ko $(cat "$root/nc-module") $(sha256sum "$root/lib/modules/$version/kernel/virtio-gpu.ko" | cut -c1-16)"
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
# The rebuilt driver (with a 1.1 daemon) resolves faults in the kernel,
# Debian's leaves it to the user-space resolver; discovery checks which.
if [ "$(cat /nc-module)" = rebuilt ]; then
    export NC_EXPECT_RESOLVER=kernel
else
    export NC_EXPECT_RESOLVER=user
fi
echo "NC-PROFILE expected=${profile:-any}"
ko=/lib/modules/$(uname -r)/kernel/virtio-gpu.ko
echo "NC-MODULE virtio_gpu $(cat /nc-module) sha256=$(sha256sum $ko | cut -c1-16) taint=$(cat /sys/module/virtio_gpu/taint) vermagic=$(modinfo -F vermagic $ko | tr ' ' _)"
scenarios=$(sed -n 's/.*nc\.scenarios=\([^ ]*\).*/\1/p' /proc/cmdline)
for s in $(echo "$scenarios" | tr , ' '); do
    echo "NC-SCENARIO $s"
    case "$s" in
        svm-*) timeout 300 /svm-test "$s" || echo "NC-EXIT $s $?" ;;
        *) timeout 300 /nc-guest "$s" || echo "NC-EXIT $s $?" ;;
    esac
done
echo NC-DONE
poweroff -f
INIT
chmod +x "$root/init"
(cd "$root" && find . | cpio -o -H newc --quiet | gzip -1) > "$out"
echo "build-initramfs: $out ($(du -h "$out" | cut -f1))"
