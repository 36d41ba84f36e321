#!/usr/bin/env bash
# build-rocm-initramfs.sh HSAKMT_SO HSA_TESTS OUT
# The ROCm guest root: busybox, the virtio-gpu modules, Debian's glibc and
# the libraries ROCr and rocminfo need (found from their ELF NEEDED
# entries in the rocm-setup.sh cache), Debian's unmodified ROCr 5.2.3 and
# rocminfo, our libhsakmt.so.1 where Debian's thunk would be, and the HSA
# test program. Its /init runs the ROCm scenarios named on the kernel
# command line (nc.scenarios=a,b,...) and powers off.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
thunk=${1:?usage: build-rocm-initramfs.sh HSAKMT_SO HSA_TESTS OUT}
tests=${2:?usage: build-rocm-initramfs.sh HSAKMT_SO HSA_TESTS OUT}
out=${3:?usage: build-rocm-initramfs.sh HSAKMT_SO HSA_TESTS OUT}
kdir="$here/work/kernel"
version=$(cat "$kdir/version")
rocm=$("$here/rocm-setup.sh")/root
busybox=$(command -v busybox)
[ -f "$kdir/vmlinuz" ] || { echo "build-rocm-initramfs: run setup.sh first" >&2; exit 1; }

root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
lib=lib/x86_64-linux-gnu
ulib=usr/lib/x86_64-linux-gnu
mkdir -p "$root"/{bin,dev,proc,sys,tmp,etc,lib64,usr/bin,"$lib","$ulib"} "$root/lib/modules/$version/kernel"
cp "$busybox" "$root/bin/busybox"
for m in "$kdir/lib/modules/$version/kernel/"*; do
    case "$m" in
        *.xz) xz -dc "$m" > "$root/lib/modules/$version/kernel/$(basename "${m%.xz}")" ;;
        *.zst) zstd -dcq "$m" > "$root/lib/modules/$version/kernel/$(basename "${m%.zst}")" ;;
        *) cp "$m" "$root/lib/modules/$version/kernel/" ;;
    esac
done
# virtio-gpu: the module setup.sh rebuilt with our patch series (the
# thunk's faults, userptrs and SVM prefetches then go through the guest
# kernel's resolver), or Debian's with NC_STOCK_VIRTIO_GPU=1 (the thunk
# falls back to the user-space resolver), as build-initramfs.sh does.
if [ "${NC_STOCK_VIRTIO_GPU:-0}" != 1 ]; then
    rebuilt=${NC_VIRTIO_GPU_KO:-$kdir/rebuilt/virtio-gpu.ko}
    [ -f "$rebuilt" ] || { echo "build-rocm-initramfs: no rebuilt virtio-gpu.ko: run setup.sh (or NC_STOCK_VIRTIO_GPU=1)" >&2; exit 1; }
    rm -f "$root/lib/modules/$version/kernel/virtio-gpu.ko"
    cp "$rebuilt" "$root/lib/modules/$version/kernel/virtio-gpu.ko"
    echo rebuilt > "$root/nc-module"
else
    echo debian > "$root/nc-module"
fi
touch "$root/lib/modules/$version/"{modules.order,modules.builtin,modules.builtin.modinfo}
/sbin/depmod -b "$root" "$version"

# Debian's binaries, unmodified, and ours.
cp "$rocm/usr/bin/rocminfo" "$root/usr/bin/"
cp -P "$rocm/$ulib"/libhsa-runtime64.so.1* "$root/$ulib/"
cp "$thunk" "$root/$ulib/libhsakmt.so.1"
cp "$tests" "$root/usr/bin/hsa-tests"

# Shared libraries by NEEDED, from the cache (never the build machine's).
find_lib() {
    local name=$1 d
    for d in "$rocm/$lib" "$rocm/$ulib"; do
        [ -e "$d/$name" ] && { echo "$d/$name"; return; }
    done
    return 1
}
declare -A seen=()
queue=("$root/usr/bin/rocminfo" "$root/usr/bin/hsa-tests" "$root/$ulib/libhsa-runtime64.so.1" "$root/$ulib/libhsakmt.so.1")
while [ ${#queue[@]} -gt 0 ]; do
    f=${queue[0]}; queue=("${queue[@]:1}")
    for n in $(readelf -d "$f" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p'); do
        [ -n "${seen[$n]:-}" ] && continue
        seen[$n]=1
        [ -e "$root/$ulib/$n" ] && continue
        src=$(find_lib "$n") || { echo "build-rocm-initramfs: $n (needed by $(basename "$f")) not in the cache" >&2; exit 1; }
        cp -L "$src" "$root/$lib/$n"
        queue+=("$root/$lib/$n")
    done
done
cp -L "$rocm/$lib/ld-linux-x86-64.so.2" "$root/$lib/"
ln -s "/$lib/ld-linux-x86-64.so.2" "$root/lib64/ld-linux-x86-64.so.2"
printf '/%s\n/%s\n' "$lib" "$ulib" > "$root/etc/ld.so.conf"
echo 'root:x:0:0:root:/:/bin/sh' > "$root/etc/passwd"
echo 'root:x:0:' > "$root/etc/group"

# rocminfo (not ROCr) insists on two things before it starts ROCr:
# `lsmod | grep amdgpu` printing something and open("/dev/kfd", O_RDWR).
# The least invasive answer: a wrapper that runs rocminfo in a mount
# namespace of its own where /proc/modules has one more line naming the
# native context (busybox's shell runs its own lsmod applet, so a PATH
# entry would not do), and /dev/kfd a symlink to the render node (the
# device the thunk really uses; rocminfo only opens and closes it).
mkdir -p "$root/usr/lib/vhost-gpu-nc"
cat > "$root/usr/lib/vhost-gpu-nc/rocminfo" <<'WRAP'
#!/bin/sh
# rocminfo over the vhost-gpu-nc native context (see docs/rocm.md).
[ -e /dev/kfd ] || ln -s /dev/dri/renderD128 /dev/kfd
modules=$(mktemp)
cat /proc/modules > "$modules"
echo "amdgpu 0 0 - Live 0x0000000000000000 (virtio_gpu native context, libhsakmt.so.1 of vhost-gpu-nc)" >> "$modules"
exec unshare -m /bin/sh -c 'mount --bind "$0" /proc/modules && rm -f "$0" && exec /usr/bin/rocminfo "$@"' "$modules" "$@"
WRAP
chmod +x "$root/usr/lib/vhost-gpu-nc/rocminfo"

cat > "$root/init" <<'INIT'
#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin:/usr/bin LD_LIBRARY_PATH=/lib/x86_64-linux-gnu:/usr/lib/x86_64-linux-gnu
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
echo "NC-BOOTED $(uname -r)"
modprobe virtio-gpu || echo "NC-ERROR modprobe virtio-gpu failed"
i=0
while [ ! -e /dev/dri/renderD128 ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
[ -e /dev/dri/renderD128 ] || echo "NC-ERROR no render node"
echo "NC-MODULE virtio_gpu $(cat /nc-module) taint=$(cat /sys/module/virtio_gpu/taint)"
scenarios=$(sed -n 's/.*nc\.scenarios=\([^ ]*\).*/\1/p' /proc/cmdline)
# The profile the suite booted for (hsa-tests' agents case checks it).
export NC_PROFILE=$(sed -n 's/.*nc\.profile=\([^ ]*\).*/\1/p' /proc/cmdline)
for s in $(echo "$scenarios" | tr , ' '); do
    case "$s" in
        rocminfo)
            echo "NC-SCENARIO rocm/$s"
            timeout 300 /usr/lib/vhost-gpu-nc/rocminfo > /tmp/rocminfo.txt 2>&1
            rc=$?
            sed 's/^/rocminfo| /' /tmp/rocminfo.txt
            name=$(grep -m1 -E '^ +Name: +gfx90a' /tmp/rocminfo.txt)
            isa=$(grep -m1 -o 'amdgcn-amd-amdhsa--gfx90a:[a-z+:-]*' /tmp/rocminfo.txt)
            cus=$(sed -n '/gfx90a/,$ s/^ *Compute Unit: *\([0-9]*\).*/\1/p' /tmp/rocminfo.txt | head -n1)
            pools=$(grep -c 'Segment:' /tmp/rocminfo.txt)
            if [ $rc = 0 ] && [ -n "$name" ] && [ -n "$isa" ] && [ "${isa#*xnack+}" != "$isa" ] && [ -n "$cus" ]; then
                echo "RESULT rocm/rocminfo PASS agent gfx90a, ISA $isa, $cus CUs, $pools pools"
            else
                echo "RESULT rocm/rocminfo FAIL rc=$rc name='$name' isa='$isa' cus='$cus'"
            fi
            ;;
        *) hsa="${hsa:+$hsa,}$s" ;;
    esac
done
# The HSA cases run in one process (one ROCr start-up under TCG).
if [ -n "${hsa:-}" ]; then
    echo "NC-SCENARIO rocm/hsa-tests $hsa"
    timeout 900 /usr/bin/hsa-tests "$hsa" || echo "NC-EXIT rocm/hsa-tests $?"
fi
echo NC-DONE
poweroff -f
INIT
chmod +x "$root/init"
(cd "$root" && find . | cpio -o -H newc --quiet | gzip -1) > "$out"
echo "build-rocm-initramfs: $out ($(du -h "$out" | cut -f1))"
