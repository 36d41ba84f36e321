#!/usr/bin/env bash
# run-suite.sh [DAEMON_BIN] [GUEST_BIN]
# The QEMU-driven end-to-end suite: boots a real Linux 6.12 guest under
# QEMU 10.0 against the daemon, twice (the second boot is QEMU restarted
# against the same running daemon), and prints one line per scenario and a
# final "N passed, N failed" line. Exits 1 on any failure.
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
    cargo build --release --locked -p guest-proto --features guest --bin nc-guest \
        --target x86_64-unknown-linux-musl
    guest="$root/target/x86_64-unknown-linux-musl/release/nc-guest"
fi

out=$(mktemp -d)
sock="$out/vhost-gpu-nc.sock"
"$here/build-initramfs.sh" "$guest" "$out/initrd.gz"

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

first="discovery,binds,unified,offset,isolation,bad-address,killed"
# The rebuilt driver's SVM uAPI (guest/kernel/tests/svm-test.c); svm-dmesg
# last: no kernel warning during the whole boot.
[ "${NC_STOCK_VIRTIO_GPU:-0}" = 1 ] || first="$first,svm-uapi,svm-register,svm-notifier,svm-mm,svm-enable,svm-prefetch,svm-filter,svm-dmesg"
echo "== boot 1: $first"
start=$(date +%s)
"$here/run-qemu.sh" "$sock" "$out/initrd.gz" "$first" "$out/console1.log" 900 || true
echo "   ($(( $(date +%s) - start )) s)"
for s in ${first//,/ }; do report "$s" "$out/console1.log"; done
# Which virtio-gpu the guest loaded: the rebuilt one is out of tree and
# unsigned, so the kernel taints with O (and E).
module=$(grep -a "^NC-MODULE virtio_gpu " "$out/console1.log" | tail -n1 || true)
want=rebuilt
[ "${NC_STOCK_VIRTIO_GPU:-0}" = 1 ] && want=debian
case "$want:$module" in
    "rebuilt:NC-MODULE virtio_gpu rebuilt "*taint=*O*|"debian:NC-MODULE virtio_gpu debian "*)
        passed=$((passed + 1)); echo "PASS module: ${module#NC-MODULE }" ;;
    *) failed=$((failed + 1)); echo "FAIL module: want the $want virtio-gpu, guest said '${module:-nothing}'" ;;
esac

echo "== boot 2: QEMU restarted against the same daemon"
if kill -0 "$daemon_pid" 2>/dev/null; then
    "$here/run-qemu.sh" "$sock" "$out/initrd.gz" smoke "$out/console2.log" 300 || true
    sed -i 's/^RESULT smoke /RESULT qemu-restart /' "$out/console2.log"
    report qemu-restart "$out/console2.log"
else
    failed=$((failed + 1)); echo "FAIL qemu-restart: the daemon died"
fi
kill -0 "$daemon_pid" 2>/dev/null || { failed=$((failed + 1)); echo "FAIL daemon-alive: the daemon exited"; }

echo "$passed passed, $failed failed"
if [ "$failed" -gt 0 ]; then
    echo "--- daemon log (tail)"; tail -n 40 "$out/daemon.log"
    exit 1
fi
rm -rf "$out"
