#!/usr/bin/env bash
# The whole test suite, from a fresh checkout:
#   1. installs what the QEMU suite needs (QEMU 10.0, the Debian 6.12 guest
#      kernel and its virtio-gpu modules, virtio-gpu rebuilt with our patch
#      series, busybox-static, cpio, the musl target, the patched QEMU of the
#      native profile - built once per QEMU version and patch set, cached
#      outside the checkout) - idempotent, fast when everything is there;
#      checkpatch over the series;
#   2. formatting, lints and every Rust test of the workspace (unit, codec,
#      property, backend fault lifecycle, the vhost-user socket harness) and
#      of tools/plot;
#   3. the QEMU-driven end-to-end suite against the real daemon (sandboxed), in
#      the compat (stock QEMU) and native (patched QEMU) profiles;
#   4. the package and the libvirt launch path: the .deb in a scratch root,
#      the vhost-user discovery contract, Debian's libvirt booting a domain
#      with <driver name='vhostuser'/> against the installed daemon;
#   5. every cargo-fuzz target for a short fixed time (fuzz/run.sh; a longer
#      run of one target: fuzz/run.sh 3600 TARGET).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

echo "== setup"
tests/qemu/setup.sh
tests/libvirt/setup.sh

echo "== guest kernel patches: checkpatch --strict"
guest/kernel/virtio-gpu/checkpatch.sh

echo "== cargo fmt / clippy / doc"
cargo fmt --all -- --check
cargo fmt --manifest-path fuzz/Cargo.toml -- --check
cargo fmt --manifest-path tools/plot/Cargo.toml -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo clippy --manifest-path tools/plot/Cargo.toml --all-targets --locked -- -D warnings
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --locked

echo "== cargo test"
cargo test --workspace --locked
cargo test --manifest-path tools/plot/Cargo.toml --locked

echo "== QEMU suite"
tests/qemu/run-suite.sh

echo "== package + libvirt"
tests/libvirt/run.sh

echo "== fuzz: every target for ${NC_FUZZ_SECONDS:-60} s"
fuzz/run.sh "${NC_FUZZ_SECONDS:-60}"
