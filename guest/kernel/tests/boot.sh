#!/usr/bin/env bash
# SPDX-License-Identifier: GPL-2.0
#
# boot.sh [-k MODULE.ko] [-d DAEMON] [-p compat|native] SCENARIOS
# Boots the QEMU suite's guest once against a fresh daemon with a given
# virtio-gpu module (default: the one setup.sh rebuilt; e.g. the output of
# `guest/kernel/build.sh dev DIR` while working on the series), in the
# given transport profile (default compat), runs SCENARIOS (comma
# separated: svm-* from tests/svm-test.c, others from nc-guest) and prints
# the RESULT lines and the kernel's warnings.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../../.." && pwd)
ko="" daemon="$root/target/release/vhost-gpu-nc" profile=compat
while getopts k:d:p: o; do
    case $o in
        k) ko=$OPTARG ;;
        d) daemon=$OPTARG ;;
        p) profile=$OPTARG ;;
        *) exit 2 ;;
    esac
done
shift $((OPTIND - 1))
scenarios=${1:?scenarios}
guest="$root/target/x86_64-unknown-linux-musl/release/nc-guest"
[ -x "$daemon" ] && [ -x "$guest" ] || { echo "boot: build the daemon and nc-guest first (tests/qemu/run-suite.sh does)" >&2; exit 1; }

out=$(mktemp -d)
dpid=""
trap '[ -n "$dpid" ] && kill "$dpid" 2>/dev/null; wait 2>/dev/null; rm -rf "$out"' EXIT
uapi=""
if [ -n "$ko" ]; then
    # build.sh dev keeps the patched uAPI headers next to the driver.
    uapi="$(dirname "$ko")/../../../../uapi"
    export NC_VIRTIO_GPU_KO=$ko
else
    uapi="$(dirname "$(readlink -f "$(cd "$root" && guest/kernel/build.sh module 2>/dev/null)")")/uapi"
fi
mkdir -p "$out/inc/drm"
cp "$uapi/drm/"{virtgpu_drm.h,drm.h,drm_mode.h} "$out/inc/drm/"
gcc -static -O2 -Wall -Wextra -Werror -I "$out/inc" -o "$out/svm-test" "$here/svm-test.c"
export NC_SVM_TEST="$out/svm-test"
"$root/tests/qemu/build-initramfs.sh" "$guest" "$out/initrd.gz" >&2
RUST_LOG=${RUST_LOG:-info} "$daemon" --socket-path "$out/sock" --fault-timeout-ms 5000 >"$out/daemon.log" 2>&1 &
dpid=$!
for _ in $(seq 100); do [ -S "$out/sock" ] && break; sleep 0.05; done
sleep 0.2
"$root/tests/qemu/run-qemu.sh" "$profile" "$out/sock" "$out/initrd.gz" "$scenarios" "$out/console.log" 600 || true
grep -a -E "^(RESULT|NC-MODULE|NC-ERROR|NC-EXIT)|WARNING|BUG|Oops|virtio_gpu|Call Trace" "$out/console.log" || true
if [ -n "${BOOT_LOG:-}" ]; then cp "$out/console.log" "$BOOT_LOG"; cp "$out/daemon.log" "$BOOT_LOG.daemon"; fi
