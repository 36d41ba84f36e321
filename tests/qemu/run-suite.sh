#!/usr/bin/env bash
# run-suite.sh [DAEMON_BIN] [GUEST_BIN]
# The QEMU-driven end-to-end suite: boots a real Linux 6.12 guest under
# QEMU 10.0 against one running daemon, in both transport profiles:
#   compat  the installed Debian QEMU (CONTEXT_INIT and RESOURCE_BLOB masked),
#   native  the patched QEMU of build-qemu.sh (both features passed through;
#           $NC_NATIVE_QEMU overrides the cached build).
# Each profile gets two boots: the scenarios, then QEMU restarted against the
# same daemon. The guest is told the profile it must find (nc.profile=) and
# fails discovery otherwise. Prints one line per scenario per profile
# ("PASS native/discovery: ...") and a final "N passed, N failed" line for
# the whole suite. Exits 1 on any failure.
# Then, per profile, a third boot of the ROCm guest root (Debian's
# unmodified ROCr 5.2.3 and rocminfo over our libhsakmt.so.1, and the HSA
# test program): "PASS compat/rocm/rocminfo: ...". ROCM_SCENARIOS
# overrides its case list. Cases that need the device's user-mode queues
# (protocol 1.1) report SKIP, with the reason, on a device without them;
# the final line then reads "N passed, N failed, N skipped".
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
cd "$root"

daemon=${1:-}
guest=${2:-}
if [ -z "$daemon" ]; then
    cargo build --release --locked -p vhost-gpu-nc
    daemon="$root/target/release/vhost-gpu-nc"
fi
if [ -z "$guest" ]; then
    cargo build --release --locked -p nc-guest \
        --target x86_64-unknown-linux-musl
    guest="$root/target/x86_64-unknown-linux-musl/release/nc-guest"
fi

NC_NATIVE_QEMU=${NC_NATIVE_QEMU:-$("$here/build-qemu.sh" --cached)}
export NC_NATIVE_QEMU
echo "compat QEMU: $(command -v qemu-system-x86_64) ($(qemu-system-x86_64 --version | head -n1))"
echo "native QEMU: $NC_NATIVE_QEMU"

out=$(mktemp -d)
sock="$out/vhost-gpu-nc.sock"
"$here/build-initramfs.sh" "$guest" "$out/initrd.gz"
# The ROCm guest root: our thunk (its exports checked against Debian's
# ROCr), the HSA test program built against Debian's headers.
rocm_root=$("$here/rocm-setup.sh")/root
"$root/guest/hsakmt/build-lib.sh" "$out/thunk" "$rocm_root/usr/lib/x86_64-linux-gnu/libhsa-runtime64.so.1" >/dev/null
"$root/guest/hsa-tests/build.sh" "$out/hsa-tests" "$out/thunk" >/dev/null
"$here/build-rocm-initramfs.sh" "$out/thunk/libhsakmt.so.1" "$out/hsa-tests" "$out/rocm-initrd.gz"

RUST_LOG=${RUST_LOG:-info} "$daemon" --socket-path "$sock" --fault-timeout-ms 5000 \
    >"$out/daemon.log" 2>&1 &
daemon_pid=$!
cleanup() {
    kill "$daemon_pid" 2>/dev/null || true
    wait "$daemon_pid" 2>/dev/null || true
}
trap cleanup EXIT
for _ in $(seq 100); do [ -S "$sock" ] && break; sleep 0.05; done
[ -S "$sock" ] || { echo "daemon did not start"; cat "$out/daemon.log"; exit 1; }
sleep 0.2 # the socket file appears at bind(), just before listen()

passed=0
failed=0
skipped=0
report() { # profile name log [result-name]
    local profile=$1 name=$2 log=$3 rname=${4:-$2} line
    line=$(grep -a "^RESULT $rname " "$log" | tail -n1 || true)
    case "$line" in
        "RESULT $rname PASS"*) passed=$((passed + 1))
            echo "PASS $profile/$name: ${line#RESULT $rname PASS }" ;;
        "RESULT $rname FAIL"*) failed=$((failed + 1))
            echo "FAIL $profile/$name: ${line#RESULT $rname FAIL }" ;;
        "RESULT $rname SKIP"*) skipped=$((skipped + 1))
            echo "SKIP $profile/$name: ${line#RESULT $rname SKIP }" ;;
        *) failed=$((failed + 1)); echo "FAIL $profile/$name: no result (console tail below)"
           tail -n 15 "$log" | sed 's/^/    | /' ;;
    esac
}
boot() { # profile scenarios log timeout [initramfs]
    local start
    start=$(date +%s)
    "$here/run-qemu.sh" "$1" "$sock" "${5:-$out/initrd.gz}" "$2" "$3" "$4" || true
    echo "   ($(( $(date +%s) - start )) s)"
}

common="discovery,binds,unified,offset,isolation,bad-address,killed,whole-process"
# Only the native profile has the event ring and guest-memory blobs.
native_only="event-poll,rings,blob-memory"
# The rebuilt driver: nc-guest's comparisons of the kernel's fault resolver
# with the user-space one on the same scenarios ("kernel-X" must be right,
# "user-X" must show the corruption or stale view, see guest/nc-guest/src/
# svm.rs; reported as kernel/X and user-resolver/X, with their figures),
# then the SVM uAPI and the end-to-end scenarios of
# guest/kernel/tests/svm-test.c; svm-dmesg last: no kernel warning during
# the whole boot.
compare="unified,remap,dontneed,fork,exit"
svm="svm-uapi,svm-register,svm-notifier,svm-mm,svm-enable,svm-prefetch,svm-filter"
svm="$svm,svm-e2e-unified,svm-e2e-remap,svm-e2e-dontneed,svm-e2e-fork,svm-e2e-exit,svm-e2e-holes,svm-dmesg"
want=rebuilt
[ "${NC_STOCK_VIRTIO_GPU:-0}" = 1 ] && want=debian
for profile in compat native; do
    first=$common
    [ "$profile" = native ] && first="$first,$native_only"
    pairs=""
    if [ "$want" = rebuilt ]; then
        for c in ${compare//,/ }; do pairs="$pairs,kernel-$c,user-$c"; done
        first="$first$pairs,$svm"
    fi
    echo "== $profile boot 1: $first"
    boot "$profile" "$first" "$out/$profile-1.log" 900
    for s in ${first//,/ }; do
        case "$s" in
            kernel-*) report "$profile" "kernel/${s#kernel-}" "$out/$profile-1.log" "$s" ;;
            user-*) report "$profile" "user-resolver/${s#user-}" "$out/$profile-1.log" "$s" ;;
            *) report "$profile" "$s" "$out/$profile-1.log" ;;
        esac
    done
    # Which virtio-gpu the guest loaded: the rebuilt one is out of tree and
    # unsigned, so the kernel taints with O (and E).
    module=$(grep -a "^NC-MODULE virtio_gpu " "$out/$profile-1.log" | tail -n1 || true)
    case "$want:$module" in
        "rebuilt:NC-MODULE virtio_gpu rebuilt "*taint=*O*|"debian:NC-MODULE virtio_gpu debian "*)
            passed=$((passed + 1)); echo "PASS $profile/module: ${module#NC-MODULE }" ;;
        *) failed=$((failed + 1)); echo "FAIL $profile/module: want the $want virtio-gpu, guest said '${module:-nothing}'" ;;
    esac

    echo "== $profile boot 2: QEMU restarted against the same daemon"
    if kill -0 "$daemon_pid" 2>/dev/null; then
        boot "$profile" smoke "$out/$profile-2.log" 300
        report "$profile" qemu-restart "$out/$profile-2.log" smoke
    else
        failed=$((failed + 1)); echo "FAIL $profile/qemu-restart: the daemon died"
    fi

    rocm=${ROCM_SCENARIOS:-rocminfo,agents,pools,signals,svm-attrs,copy,copy-stream,memory-lock,unified,aql-barrier,kernel-dispatch,fatal-fault}
    echo "== $profile boot 3: ROCm guest root: $rocm"
    if kill -0 "$daemon_pid" 2>/dev/null; then
        log="$out/$profile-rocm.log"
        boot "$profile" "$rocm" "$log" 900 "$out/rocm-initrd.gz"
        grep -a -E '^rocminfo[|] +(Name|Marketing Name|Compute Unit):' "$log" | sed 's/^/   /' || true
        grep -a -E '^rocm/|^rocm:' "$log" | sed 's/^/   /' || true
        for s in ${rocm//,/ }; do report "$profile" "rocm/$s" "$log"; done
    else
        failed=$((failed + 1)); echo "FAIL $profile/rocm: the daemon died"
    fi
done
kill -0 "$daemon_pid" 2>/dev/null || { failed=$((failed + 1)); echo "FAIL daemon-alive: the daemon exited"; }

echo "$passed passed, $failed failed, $skipped skipped"
if [ "$failed" -gt 0 ]; then
    echo "--- daemon log (tail)"; tail -n 40 "$out/daemon.log"
    echo "--- logs kept in $out"
    exit 1
fi
rm -rf "$out"
