#!/usr/bin/env bash
# sandbox-syscalls.sh: derives the daemon's system-call set the way the
# allowlist in src/sandbox.rs was derived, and compares the two.
#
# Runs the socket-harness tests and the QEMU suite with every daemon under
# `strace -f` and --sandbox=none, keeps the system calls made after the
# point where the sandbox would be installed (the "sandbox disabled" log
# line), and prints those missing from the allowlist (exit 1 if any) and
# those allowed but not seen. Needs strace (apt-get install strace) and the
# QEMU suite's setup (tests/qemu/setup.sh). Not part of CI: the suite
# itself runs sandboxed, so a missing entry fails it with SIGSYS anyway.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
command -v strace >/dev/null || { echo "sandbox-syscalls: strace is needed" >&2; exit 1; }
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

cargo build --locked -q -p vhost-gpu-nc
cargo build --release --locked -q -p vhost-gpu-nc
cargo build --release --locked -q -p nc-guest --target x86_64-unknown-linux-musl

# A daemon wrapper: strace with the sandbox off. -I1 lets a signal end
# strace (by default it blocks them with -o), and the daemon dies with it
# (setpriv --pdeathsig): a test that kills its daemon leaves nothing behind.
cat >"$out/wrap" <<EOF
#!/bin/sh
exec strace -I1 -f -qq -s 256 -o "$out/trace.\$\$" setpriv --pdeathsig KILL "\$@" --sandbox=none
EOF
chmod +x "$out/wrap"
cat >"$out/wrap-release" <<EOF
#!/bin/bash
exec "$out/wrap" "$root/target/release/vhost-gpu-nc" "\$@"
EOF
chmod +x "$out/wrap-release"

echo "== socket harness under strace"
# Tests that signal or inspect the daemon process itself do not run under
# a wrapper.
VHOST_GPU_NC_WRAPPER="$out/wrap" cargo test --locked -q -p vhost-gpu-nc \
    --test daemon_virtio --test daemon_compute --test daemon_launch --test daemon_metrics -- \
    --skip sigterm --skip an_inherited_listening --skip the_running_daemon_is_sandboxed \
    --skip systemd 2>&1 | grep -E "test result|FAILED" || true
echo "== QEMU suite under strace"
tests/qemu/run-suite.sh "$out/wrap-release" \
    "$root/target/x86_64-unknown-linux-musl/release/nc-guest" | tail -n1

for f in "$out"/trace.*; do
    awk '/sandbox disabled/ {on = 1; next} on' "$f"
done | sed -E 's/^[0-9]+ +([a-z0-9_]+)\(.*/\1/; s/^[0-9]+ +<\.\.\. ([a-z0-9_]+) resumed>.*/\1/; t; d' \
    | sort -u >"$out/used"
grep -o 'libc::SYS_[a-z0-9_]*' src/sandbox.rs | sed 's/libc::SYS_//' | sort -u >"$out/allowed"
echo "== $(wc -l <"$out/used") system calls after the install point, $(wc -l <"$out/allowed") allowed"
missing=$(comm -23 "$out/used" "$out/allowed")
echo "allowed, not seen in these runs: $(comm -13 "$out/used" "$out/allowed" | tr '\n' ' ')"
if [ -n "$missing" ]; then
    echo "USED BUT NOT ALLOWED: $missing"
    exit 1
fi
echo "every system call seen is allowed"
