#!/usr/bin/env bash
# run-suite.sh [DAEMON_BIN] [GUEST_BIN]
# The QEMU-driven end-to-end suite: boots a real Linux 6.12 guest under
# QEMU 10.0 against the daemon, twice (the second boot is QEMU restarted
# against the same running daemon), then a third time with the ROCm guest
# root (Debian's unmodified ROCr and rocminfo over our libhsakmt.so.1),
# and prints one line per scenario and a final "N passed, N failed" line.
# Exits 1 on any failure. ROCM_SCENARIOS overrides the ROCm case list.
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

out=$(mktemp -d)
sock="$out/vhost-gpu-nc.sock"
"$here/build-initramfs.sh" "$guest" "$out/initrd.gz"
# The ROCm guest root: our thunk (exports checked against Debian's ROCr),
# the HSA test program built against Debian's headers.
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
report() { # name log
    local name=$1 log=$2 line
    line=$(grep -a "^RESULT $name " "$log" | tail -n1 || true)
    case "$line" in
        "RESULT $name PASS"*) passed=$((passed + 1)); echo "PASS $name: ${line#RESULT $name PASS }" ;;
        "RESULT $name FAIL"*) failed=$((failed + 1)); echo "FAIL $name: ${line#RESULT $name FAIL }" ;;
        *) failed=$((failed + 1)); echo "FAIL $name: no result (console tail below)"
           tail -n 15 "$log" | sed 's/^/    | /' ;;
    esac
}

first="discovery,binds,unified,offset,isolation,bad-address,killed,whole-process"
echo "== boot 1: $first"
start=$(date +%s)
"$here/run-qemu.sh" "$sock" "$out/initrd.gz" "$first" "$out/console1.log" 900 || true
echo "   ($(( $(date +%s) - start )) s)"
for s in ${first//,/ }; do report "$s" "$out/console1.log"; done

echo "== boot 2: QEMU restarted against the same daemon"
if kill -0 "$daemon_pid" 2>/dev/null; then
    "$here/run-qemu.sh" "$sock" "$out/initrd.gz" smoke "$out/console2.log" 300 || true
    sed -i 's/^RESULT smoke /RESULT qemu-restart /' "$out/console2.log"
    report qemu-restart "$out/console2.log"
else
    failed=$((failed + 1)); echo "FAIL qemu-restart: the daemon died"
fi

rocm=${ROCM_SCENARIOS:-rocminfo,agents,pools,signals,svm-attrs,copy,memory-lock,unified,aql-barrier,kernel-dispatch,fatal-fault}
echo "== boot 3: ROCm guest root: $rocm"
if kill -0 "$daemon_pid" 2>/dev/null; then
    start=$(date +%s)
    "$here/run-qemu.sh" "$sock" "$out/rocm-initrd.gz" "$rocm" "$out/console3.log" 900 || true
    echo "   ($(( $(date +%s) - start )) s)"
    grep -a -E '^rocminfo[|] +(Name|Marketing Name|Compute Unit):' "$out/console3.log" | sed 's/^/   /' || true
    grep -a -E '^rocm/|^rocm:' "$out/console3.log" | sed 's/^/   /' || true
    for s in ${rocm//,/ }; do report "rocm/$s" "$out/console3.log"; done
else
    failed=$((failed + 1)); echo "FAIL rocm: the daemon died"
fi
kill -0 "$daemon_pid" 2>/dev/null || { failed=$((failed + 1)); echo "FAIL daemon-alive: the daemon exited"; }

echo "$passed passed, $failed failed"
if [ "$failed" -gt 0 ]; then
    echo "--- daemon log (tail)"; tail -n 40 "$out/daemon.log"
    exit 1
fi
rm -rf "$out"
