#!/usr/bin/env bash
# Installs what the QEMU suite needs on a fresh Debian bookworm x86-64
# machine, idempotently:
#   - bookworm-backports in the apt sources (the mirror URI is taken from the
#     system's own Debian sources, nothing is hard-coded),
#   - QEMU 10.0 (qemu-system-x86) from backports, busybox-static, cpio, kmod,
#   - QEMU's vhost-user-gpu (qemu-system-gui of the same version), the
#     reference backend of benches/qemu_2d.rs,
#   - the Rust musl target for the static guest program,
#   - promtool (Debian's prometheus package), which checks the daemon's
#     metrics exposition in tests/daemon_metrics.rs,
#   - the Debian 6.12 guest kernel and its virtio-gpu modules, unpacked under
#     tests/qemu/work/kernel (vmlinuz + modules with modules.dep),
#   - the patched QEMU of the native profile (build-qemu.sh: built once per
#     QEMU version and patch set, cached under ~/.cache/vhost-gpu-nc/qemu),
#   - virtio-gpu.ko rebuilt out of tree from Debian's linux-source for that
#     exact kernel with our patch series (guest/kernel/build.sh, cached under
#     ~/.cache/vhost-gpu-nc/kernel), in tests/qemu/work/kernel/rebuilt; the
#     initramfs loads it instead of Debian's module unless
#     NC_STOCK_VIRTIO_GPU=1,
#   - Debian's ROCm 5.2.3 user space and the glibc guest root's libraries
#     (rocm-setup.sh, cached outside the checkout).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
work="$here/work"
kdir="$work/kernel"
mkdir -p "$work"

# shellcheck source=apt-lib.sh
. "$here/apt-lib.sh"
log() { echo "setup: $*"; }

add_backports() {
    if apt-cache policy | grep ' bookworm-backports/main amd64 Packages' >/dev/null; then
        return
    fi
    log "adding bookworm-backports from $(debian_uri)"
    add_apt_source backports.sources deb bookworm-backports
}

qemu_ok() {
    command -v qemu-system-x86_64 >/dev/null || return 1
    local v
    v=$(qemu-system-x86_64 --version | sed -n 's/.*version \([0-9]*\)\..*/\1/p' | head -n1)
    [ "${v:-0}" -ge 10 ] || return 1
    qemu-system-x86_64 -device help 2>/dev/null | grep vhost-user-gpu-pci >/dev/null
}

install_packages() {
    local missing=()
    command -v busybox >/dev/null && busybox --list 2>/dev/null | grep -qx modprobe || missing+=(busybox-static)
    command -v cpio >/dev/null || missing+=(cpio)
    command -v depmod >/dev/null || missing+=(kmod)
    command -v xz >/dev/null || missing+=(xz-utils)
    if [ ${#missing[@]} -gt 0 ]; then
        log "installing ${missing[*]}"
        sudo_ apt-get install -y -q "${missing[@]}"
    fi
    if ! qemu_ok; then
        add_backports
        log "installing QEMU from bookworm-backports"
        sudo_ apt-get install -y -q -t bookworm-backports --no-install-recommends qemu-system-x86
    fi
    qemu_ok || { echo "setup: QEMU >= 10.0 with vhost-user-gpu-pci is not available" >&2; exit 1; }
    log "$(qemu-system-x86_64 --version | head -n1)"
}

# promtool (Debian's prometheus package) checks the daemon's metrics
# exposition in tests/daemon_metrics.rs. Only the tool is wanted: no
# recommends, and the Prometheus server the package enables is stopped.
install_promtool() {
    if command -v promtool >/dev/null; then
        return
    fi
    log "installing promtool (Debian's prometheus package)"
    DEBIAN_FRONTEND=noninteractive sudo_ apt-get install -y -q --no-install-recommends prometheus
    if command -v systemctl >/dev/null && systemctl is-enabled prometheus >/dev/null 2>&1; then
        sudo_ systemctl disable --now prometheus >/dev/null 2>&1 || true
    fi
    command -v promtool >/dev/null || { echo "setup: promtool is not available" >&2; exit 1; }
}

# QEMU's own C backend, /usr/lib/qemu/vhost-user-gpu (package
# qemu-system-gui), of exactly the installed qemu-system-x86 version: the
# reference peer of the daemon's 2D benchmark (benches/qemu_2d.rs).
install_qemu_backend() {
    local v have
    v=$(dpkg-query -W -f='${Version}' qemu-system-x86)
    have=$(dpkg-query -W -f='${Version}' qemu-system-gui 2>/dev/null || true)
    if [ "$have" = "$v" ] && [ -x /usr/lib/qemu/vhost-user-gpu ]; then
        return
    fi
    add_backports
    log "installing qemu-system-gui $v (QEMU's vhost-user-gpu)"
    sudo_ apt-get install -y -q --no-install-recommends "qemu-system-gui=$v"
    [ -x /usr/lib/qemu/vhost-user-gpu ] || { echo "setup: /usr/lib/qemu/vhost-user-gpu missing" >&2; exit 1; }
}

install_musl_target() {
    if ! rustup target list --installed 2>/dev/null | grep -qx x86_64-unknown-linux-musl; then
        log "adding the Rust musl target"
        rustup target add x86_64-unknown-linux-musl
    fi
}

install_kernel() {
    if [ -f "$kdir/vmlinuz" ] && [ -f "$kdir/modules.ok" ]; then
        log "guest kernel $(cat "$kdir/version") present"
        return
    fi
    add_backports
    local pkg
    pkg=$(apt-cache depends -t bookworm-backports linux-image-amd64 2>/dev/null \
        | awk '/Depends: linux-image-6\.12/ {print $2; exit}')
    [ -n "$pkg" ] || { echo "setup: no 6.12 kernel package in bookworm-backports" >&2; exit 1; }
    log "fetching $pkg"
    rm -rf "$kdir" "$work/deb"
    mkdir -p "$kdir" "$work/deb"
    (cd "$work/deb" && apt-get download -t bookworm-backports "$pkg")
    local root="$work/deb/root"
    dpkg -x "$work"/deb/*.deb "$root"
    local version
    version=$(ls "$root/lib/modules")
    cp "$root"/boot/vmlinuz-* "$kdir/vmlinuz"
    echo "$version" > "$kdir/version"
    dpkg-deb -f "$work"/deb/*.deb Version > "$kdir/deb-version"
    # virtio-gpu and what it depends on, as modinfo says.
    local mroot="$root/lib/modules/$version"
    local want=(virtio-gpu) seen=() mod file deps
    mkdir -p "$kdir/lib/modules/$version/kernel"
    while [ ${#want[@]} -gt 0 ]; do
        mod=${want[0]}; want=("${want[@]:1}")
        [[ " ${seen[*]} " == *" $mod "* ]] && continue
        seen+=("$mod")
        file=$(find "$mroot" -name "${mod}.ko*" -o -name "$(echo "$mod" | tr - _).ko*" | head -n1)
        [ -n "$file" ] || { echo "setup: module $mod not found" >&2; exit 1; }
        cp "$file" "$kdir/lib/modules/$version/kernel/"
        deps=$(/sbin/modinfo -F depends "$file" | tr , ' ')
        for d in $deps; do want+=("$d"); done
    done
    cp "$mroot"/modules.order "$mroot"/modules.builtin* "$kdir/lib/modules/$version/" 2>/dev/null || true
    /sbin/depmod -b "$kdir" "$version"
    rm -rf "$work/deb"
    touch "$kdir/modules.ok"
    log "guest kernel $version with modules: ${seen[*]}"
}

install_virtio_gpu() {
    local version ko out="$kdir/rebuilt"
    version=$(cat "$kdir/version")
    ko=$("$here/../../guest/kernel/build.sh" --kver "$version" module)
    mkdir -p "$out"
    if ! cmp -s "$ko" "$out/virtio-gpu.ko"; then
        cp "$ko" "$out/virtio-gpu.ko.tmp"
        mv "$out/virtio-gpu.ko.tmp" "$out/virtio-gpu.ko"
    fi
    local mine debian
    mine=$(/sbin/modinfo -F vermagic "$out/virtio-gpu.ko")
    debian=$(/sbin/modinfo -F vermagic "$kdir/lib/modules/$version/kernel/virtio-gpu.ko.xz" 2>/dev/null || echo "?")
    log "rebuilt virtio-gpu.ko $(sha256sum "$out/virtio-gpu.ko" | cut -c1-16): vermagic '$mine' (Debian's: '$debian')"
    [ "$mine" = "$debian" ] || { echo "setup: the rebuilt module's vermagic differs from Debian's" >&2; exit 1; }
    # The guest-side tests of the module's uAPI, against its patched header.
    gcc -static -O2 -Wall -Wextra -Werror -I "$(dirname "$ko")/uapi" \
        -o "$out/svm-test.tmp" "$here/../../guest/kernel/tests/svm-test.c"
    mv "$out/svm-test.tmp" "$out/svm-test"
}

install_packages
install_promtool
install_qemu_backend
install_musl_target
install_kernel
native_qemu=$("$here/build-qemu.sh")
log "patched QEMU (native profile): $native_qemu"
install_virtio_gpu
log "ROCm user space in $("$here/rocm-setup.sh")"
log "done"
