#!/usr/bin/env bash
# SPDX-License-Identifier: GPL-2.0
#
# build.sh [--kver VERSION] [COMMAND [ARG]]
#
# Builds the guest kernel's virtio-gpu driver out of tree, with the patch
# series of guest/kernel/virtio-gpu/patches applied, against the exact
# Debian kernel the QEMU suite boots (tests/qemu/work/kernel/version,
# written by tests/qemu/setup.sh).
#
# Everything heavy is cached outside the checkout, under
#   ${XDG_CACHE_HOME:-$HOME/.cache}/vhost-gpu-nc/kernel/VERSION/
#     root/        linux-headers-VERSION, -common and linux-kbuild (dpkg -x)
#     src/         pristine parts of linux-source: drivers/gpu/drm/virtio,
#                  include/uapi/drm, checkpatch.pl and its data files
#     modules/KEY/ virtio-gpu.ko (stripped), virtio-gpu.ko.debug, the build
#                  log and the patched uAPI headers (uapi/drm/); KEY hashes
#                  the series and the build recipe
# so that a warm run (same kernel, same series) only hashes the series.
#
# Commands:
#   module      (default) build (or reuse) virtio-gpu.ko; print its path
#   src         fetch the inputs; print the pristine source directory
#   tree DIR    make DIR a git tree of the pristine driver with the series
#               applied as commits (git am), for working on the series;
#               regenerate the patches with git format-patch
#   dev DIR     build the working tree of DIR (made by `tree`), uncached;
#               print the module's path (its user-space uAPI headers are in
#               uapi/ four levels up)
#   each        build after every patch of the series (each must build
#               warning-free on its own)
#
# Compiler warnings and modpost warnings fail the build.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
patches="$here/virtio-gpu/patches"
# Bump when the way a module is built changes (invalidates cached modules).
recipe=3

log() { echo "kernel-build: $*" >&2; }
die() { echo "kernel-build: $*" >&2; exit 1; }
sudo_() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

kver=""
if [ "${1:-}" = "--kver" ]; then
    kver=${2:?--kver needs a version}
    shift 2
fi
kdir="$repo/tests/qemu/work/kernel"
if [ -z "$kver" ]; then
    [ -f "$kdir/version" ] || die "no $kdir/version: run tests/qemu/setup.sh first"
    kver=$(cat "$kdir/version")
fi
# 6.12.95+deb12-amd64 -> abi 6.12.95+deb12, flavour amd64, series 6.12
case "$kver" in
    [0-9]*.[0-9]*.*-*) ;;
    *) die "unexpected kernel version '$kver'" ;;
esac
abi=${kver%-*}
branch=$(echo "$kver" | cut -d. -f1-2)
cache="${XDG_CACHE_HOME:-$HOME/.cache}/vhost-gpu-nc/kernel/$kver"
hdr="$cache/root/usr/src/linux-headers-$kver"
src="$cache/src"

# The Debian version of the guest kernel's packages: recorded by setup.sh
# when it fetched the image, else the one bookworm-backports carries.
deb_version() {
    if [ -f "$kdir/deb-version" ] && [ "$(cat "$kdir/version")" = "$kver" ]; then
        cat "$kdir/deb-version"
        return
    fi
    apt-cache madison "linux-image-$kver" 2>/dev/null \
        | awk -F'|' '$3 ~ /bookworm-backports/ {gsub(/ /, "", $2); print $2; exit}'
}

# The kernel's own compiler, from CONFIG_CC_VERSION_TEXT
# ("x86_64-linux-gnu-gcc-12 (Debian 12.2.0-14+deb12u1) 12.2.0").
kernel_cc() {
    sed -n 's/^CONFIG_CC_VERSION_TEXT="\?\([^ "]*\).*/\1/p' \
        "$hdr/include/config/auto.conf"
}

ensure_tools() {
    local missing=() t
    for t in make:make patch:patch xz:xz-utils perl:perl modinfo:kmod \
             pahole:pahole ld:binutils; do
        command -v "${t%%:*}" >/dev/null || missing+=("${t#*:}")
    done
    # Run-time libraries of linux-kbuild's prebuilt tools.
    for t in libelf1 libssl3 zlib1g; do
        dpkg-query -W -f='${Status}' "$t" 2>/dev/null | grep -q "ok installed" \
            || missing+=("$t")
    done
    if [ -f "$hdr/include/config/auto.conf" ]; then
        local cc
        cc=$(kernel_cc)
        command -v "$cc" >/dev/null || missing+=("${cc##*-linux-gnu-}")
    else
        command -v x86_64-linux-gnu-gcc-12 >/dev/null || missing+=(gcc-12)
    fi
    if [ ${#missing[@]} -gt 0 ]; then
        log "installing ${missing[*]}"
        sudo_ apt-get install -y -q --no-install-recommends "${missing[@]}" >&2
    fi
}

fetch() {
    [ -f "$cache/inputs.ok" ] && return
    ensure_tools
    local debver
    debver=$(deb_version)
    if [ -z "$debver" ]; then
        log "linux-image-$kver not in the apt lists; apt-get update"
        sudo_ apt-get update -q >&2
        debver=$(deb_version)
    fi
    [ -n "$debver" ] || die "no Debian version for $kver (bookworm-backports carries only its newest kernel: rm -rf tests/qemu/work/kernel and rerun tests/qemu/setup.sh)"
    local pkgs=("linux-headers-$kver=$debver" "linux-headers-$abi-common=$debver"
                "linux-kbuild-$abi=$debver" "linux-source-$branch=$debver")
    log "fetching ${pkgs[*]}"
    rm -rf "$cache/root" "$cache/src" "$cache/dl"
    mkdir -p "$cache/dl"
    # apt drops privileges to _apt for downloads; let it write here.
    chmod 0777 "$cache/dl"
    (cd "$cache/dl" && apt-get download -q "${pkgs[@]}" >&2) \
        || die "apt-get download failed (is $debver still in bookworm-backports? rm -rf tests/qemu/work/kernel and rerun tests/qemu/setup.sh)"
    local deb
    for deb in "$cache"/dl/linux-headers-*.deb "$cache"/dl/linux-kbuild-*.deb; do
        dpkg-deb -x "$deb" "$cache/root"
    done
    # The flavour's Makefile includes the -common tree by absolute path.
    sed -i "s|^include /usr/src/|include $cache/root/usr/src/|" "$hdr/Makefile"
    dpkg-deb --fsys-tarfile "$cache"/dl/linux-source-*.deb \
        | tar -xO "./usr/src/linux-source-$branch.tar.xz" \
        | tar -xJ -C "$cache/dl" \
            "linux-source-$branch/Makefile" \
            "linux-source-$branch/drivers/gpu/drm/virtio" \
            "linux-source-$branch/include/uapi/drm" \
            "linux-source-$branch/scripts/checkpatch.pl" \
            "linux-source-$branch/scripts/spelling.txt" \
            "linux-source-$branch/scripts/const_structs.checkpatch"
    mv "$cache/dl/linux-source-$branch" "$src"
    local sv
    sv=$(sed -n 's/^VERSION = //p; s/^PATCHLEVEL = //p; s/^SUBLEVEL = //p' "$src/Makefile" | paste -sd.)
    [ "$sv" = "${kver%%[-+]*}" ] || die "linux-source is $sv, the kernel is $kver"
    rm -rf "$cache/dl"
    echo "$debver" > "$cache/deb-version"
    touch "$cache/inputs.ok"
    log "inputs for $kver ($debver) in $cache ($(du -sh "$cache" | cut -f1))"
}

series_list() {
    [ -f "$patches/series" ] || return 0
    sed -e 's/#.*//' -e 's/[[:space:]]*$//' "$patches/series" | grep -v '^$' || true
}

series_key() {
    local p
    {
        echo "recipe $recipe $kver"
        for p in $(series_list); do
            echo "patch $p"
            cat "$patches/$p"
        done
    } | sha256sum | cut -c1-16
}

# Prepares DIR for an out-of-tree build of DIR/drivers/gpu/drm/virtio:
#  - the patched uapi header must win over the one in the kernel headers,
#    but only that header (include/drm/drm_fourcc.h must stay the kernel's),
#    so drm/virtgpu_drm.h and the uapi headers it includes by quoted path
#    go into DIR/.uapi, searched before the kernel's include paths;
#  - virtgpu_trace.h names its directory relative to include/trace of a
#    kernel tree (TRACE_INCLUDE_PATH ../../drivers/gpu/drm/virtio);
#    DIR/include/trace on the include path resolves that to DIR's driver.
kbuild_wrap() {
    local dir=$1
    mkdir -p "$dir/.uapi/drm" "$dir/include/trace"
    cp "$dir/include/uapi/drm/"{virtgpu_drm.h,drm.h,drm_mode.h} "$dir/.uapi/drm/"
    cat > "$dir/drivers/gpu/drm/virtio/Kbuild" <<'EOF'
# Out-of-tree build wrapper (guest/kernel/build.sh), not part of the series.
NOSTDINC_FLAGS += -I$(VGNC_TREE)/.uapi
CFLAGS_virtgpu_trace_points.o := -I$(VGNC_TREE)/include/trace
include $(src)/Makefile
EOF
}

# make_module DIR LOG: builds DIR's driver, fails on any warning.
make_module() {
    local dir=$1 blog=$2 cc
    cc=$(kernel_cc)
    kbuild_wrap "$dir"
    if ! make -C "$hdr" M="$dir/drivers/gpu/drm/virtio" CC="$cc" \
            VGNC_TREE="$dir" -j"$(nproc)" modules \
            >"$blog" 2>&1; then
        cat "$blog" >&2
        die "build failed"
    fi
    if grep -qiE "warning:|^WARNING" "$blog"; then
        grep -iE -A3 "warning:|^WARNING" "$blog" >&2
        die "the build has warnings (log: $blog)"
    fi
    local vm
    vm=$(modinfo -F vermagic "$dir/drivers/gpu/drm/virtio/virtio-gpu.ko")
    [ "${vm%% *}" = "$kver" ] || die "vermagic '$vm' does not match $kver"
}

# install_uapi DIR DEST: DIR's (patched) DRM uAPI headers for user space
# (headers_install.sh strips __user and friends), for tests of the module.
install_uapi() {
    local f
    mkdir -p "$2/drm"
    for f in virtgpu_drm.h drm.h drm_mode.h; do
        (cd "$hdr" && sh scripts/headers_install.sh "$1/include/uapi/drm/$f" "$2/drm/$f")
    done
}

# pristine_copy DIR: the pristine driver and uapi headers in DIR.
pristine_copy() {
    local dir=$1
    rm -rf "$dir"
    mkdir -p "$dir/drivers/gpu/drm" "$dir/include/uapi"
    cp -a "$src/drivers/gpu/drm/virtio" "$dir/drivers/gpu/drm/"
    cp -a "$src/include/uapi/drm" "$dir/include/uapi/"
}

apply_series() {
    local dir=$1 p
    for p in $(series_list); do
        [ -f "$patches/$p" ] || die "series names $p, which does not exist"
        patch -d "$dir" -p1 -F0 -N -s --no-backup-if-mismatch <"$patches/$p" \
            || die "$p does not apply"
    done
}

cmd_module() {
    fetch
    local key out
    key=$(series_key)
    out="$cache/modules/$key"
    if [ -f "$out/virtio-gpu.ko" ]; then
        log "cached: $out/virtio-gpu.ko (series $key)"
        echo "$out/virtio-gpu.ko"
        return
    fi
    ensure_tools
    local t0 work
    t0=$(date +%s%N)
    work="$cache/build"
    pristine_copy "$work"
    apply_series "$work"
    make_module "$work" "$work/build.log"
    mkdir -p "$out.tmp"
    # Stripped like Debian's modules (INSTALL_MOD_STRIP=1); the unstripped
    # one stays next to it for decoding oopses.
    cp "$work/drivers/gpu/drm/virtio/virtio-gpu.ko" "$out.tmp/virtio-gpu.ko.debug"
    strip --strip-debug -o "$out.tmp/virtio-gpu.ko" "$out.tmp/virtio-gpu.ko.debug"
    cp "$work/build.log" "$out.tmp/"
    install_uapi "$work" "$out.tmp/uapi"
    series_list > "$out.tmp/series"
    rm -rf "$out"
    mv "$out.tmp" "$out"
    rm -rf "$work"
    # Keep the eight newest builds.
    ls -1dt "$cache"/modules/*/ | tail -n +9 | xargs -r rm -rf
    log "built $out/virtio-gpu.ko (series $key, $(series_list | wc -l) patches) in $(( ($(date +%s%N) - t0) / 1000000 )) ms"
    echo "$out/virtio-gpu.ko"
}

cmd_tree() {
    local dir=${1:?tree DIR}
    fetch
    [ -e "$dir" ] && die "$dir exists"
    pristine_copy "$dir"
    local g=(git -C "$dir" -c user.name=pristine -c user.email=pristine@localhost)
    "${g[@]}" init -q
    "${g[@]}" add -A
    "${g[@]}" commit -q -m "Linux $kver: drivers/gpu/drm/virtio and include/uapi/drm (pristine)"
    "${g[@]}" tag pristine
    local p
    for p in $(series_list); do
        "${g[@]}" am -q "$patches/$p" || die "git am $p failed"
    done
    log "$dir: pristine + $(series_list | wc -l) patches (tag 'pristine'); regenerate with: git -C $dir format-patch -o $patches pristine"
}

cmd_dev() {
    local dir=${1:?dev DIR}
    fetch
    ensure_tools
    local work="$cache/dev"
    pristine_copy "$work"
    rm -rf "$work/drivers/gpu/drm/virtio" "$work/include/uapi/drm"
    cp -a "$dir/drivers/gpu/drm/virtio" "$work/drivers/gpu/drm/"
    cp -a "$dir/include/uapi/drm" "$work/include/uapi/"
    rm -f "$work/drivers/gpu/drm/virtio/Kbuild"
    make_module "$work" "$work/build.log"
    install_uapi "$work" "$work/uapi"
    echo "$work/drivers/gpu/drm/virtio/virtio-gpu.ko"
}

cmd_each() {
    fetch
    ensure_tools
    local work="$cache/each" p n=0
    pristine_copy "$work"
    for p in $(series_list); do
        n=$((n + 1))
        patch -d "$work" -p1 -F0 -N -s --no-backup-if-mismatch <"$patches/$p" \
            || die "$p does not apply"
        rm -f "$work/drivers/gpu/drm/virtio/Kbuild"
        make_module "$work" "$work/build.log"
        log "ok after $n: $p"
    done
    rm -rf "$work"
}

case "${1:-module}" in
    module) cmd_module ;;
    src) fetch; echo "$src" ;;
    tree) cmd_tree "${2:-}" ;;
    dev) cmd_dev "${2:-}" ;;
    each) cmd_each ;;
    *) die "unknown command '$1' (module, src, tree DIR, dev DIR, each)" ;;
esac
