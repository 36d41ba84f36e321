#!/usr/bin/env bash
# build-qemu.sh [--cached]
# The QEMU of the native profile: the installed qemu-system-x86 version,
# rebuilt from Debian's source tarball with tests/qemu/patches/*.patch
# applied (vhost-user-gpu passes CONTEXT_INIT and RESOURCE_BLOB through).
#
# Prints the path of the patched qemu-system-x86_64 on stdout (progress goes
# to stderr). The binary is cached outside the checkout in
#   ${XDG_CACHE_HOME:-$HOME/.cache}/vhost-gpu-nc/qemu/<version>-<hash>/
# where <version> is the installed qemu-system-x86 package version and <hash>
# covers the patches and the configure options: a second call with the same
# version and patches only prints the path. With --cached nothing is built:
# the path is printed if the binary is cached, otherwise it fails.
#
# Steps of a build: the deb-src entry for bookworm-backports (added once, on
# the system's own Debian mirror), `apt-get source --download-only
# --tar-only qemu=<version>` (the orig tarball, checked against the sha256 in
# the apt Sources index), the build dependencies from bookworm and
# bookworm-backports (meson >= 1.5, python3-pycotap), the tarball without
# roms/, the patches (a patch that does not apply is an error), a minimal
# configure, `ninja qemu-system-x86_64`. Run it with
# `-L /usr/share/qemu -L /usr/share/seabios`: the firmware comes from the
# installed Debian QEMU. Debian's own patches (debian.tar.xz) are not
# applied: the binary is upstream QEMU <version> plus our patches.
#
# Every failure exits non-zero with a "build-qemu: error:" line.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=apt-lib.sh
. "$here/apt-lib.sh"

log() { echo "build-qemu: $*" >&2; }
die() { echo "build-qemu: error: $*" >&2; exit 1; }

cached_only=false
case "${1:-}" in
    --cached) cached_only=true ;;
    "") ;;
    *) die "usage: build-qemu.sh [--cached]" ;;
esac

configure_args=(
    --python=/usr/bin/python3
    --target-list=x86_64-softmmu
    --without-default-features
    --enable-pixman
    --enable-vhost-user
    --enable-fdt=system
    --disable-docs
    --disable-install-blobs
)
build_deps=(gcc make pkgconf python3-venv ninja-build libglib2.0-dev libpixman-1-dev
    flex bison libfdt-dev xz-utils)
backports_deps=(meson python3-pycotap)

# --- the cache key: installed version + patches + configure options
pkg_version=$(dpkg-query -W -f='${Version}' qemu-system-x86 2>/dev/null) \
    || die "qemu-system-x86 is not installed (tests/qemu/setup.sh installs it)"
src_package=$(dpkg-query -W -f='${source:Package}' qemu-system-x86)
src_version=$(dpkg-query -W -f='${source:Version}' qemu-system-x86)
shopt -s nullglob
patches=("$here"/patches/*.patch)
shopt -u nullglob
[ ${#patches[@]} -gt 0 ] || die "no patches in $here/patches"
hash=$({
    for p in "${patches[@]}"; do basename "$p"; cat "$p"; done
    printf '%s\n' "${configure_args[@]}"
} | sha256sum | cut -c1-16)
cache_root="${XDG_CACHE_HOME:-$HOME/.cache}/vhost-gpu-nc/qemu"
dir="$cache_root/${pkg_version#*:}-$hash"
bin="$dir/qemu-system-x86_64"

if [ -x "$bin" ] && [ -f "$dir/build-info" ]; then
    echo "$bin"
    exit 0
fi
$cached_only && die "no patched QEMU cached at $dir: run tests/qemu/setup.sh"

mkdir -p "$cache_root"
exec 9>"$cache_root/.lock"
flock 9 # another build of the same cache finishes first
if [ -x "$bin" ] && [ -f "$dir/build-info" ]; then
    echo "$bin"
    exit 0
fi
start=$(date +%s)
log "building QEMU $pkg_version with ${#patches[@]} patch(es) into $dir"

# --- the source tarball, through apt
sources_stanza() {
    apt-cache showsrc "$src_package" 2>/dev/null \
        | awk -v v="$src_version" 'BEGIN { RS = ""; FS = "\n" }
            { for (i = 1; i <= NF; i++) if ($i == "Version: " v) { print; exit } }'
}
if [ -z "$(sources_stanza)" ]; then
    log "adding the bookworm-backports deb-src entry"
    add_apt_source backports-src.sources deb-src bookworm-backports \
        || die "cannot add the deb-src entry for bookworm-backports"
fi
stanza=$(sources_stanza)
[ -n "$stanza" ] || die "source package $src_package $src_version is not in the apt sources"
read -r orig_sha orig_size orig_name < <(printf '%s\n' "$stanza" \
    | sed -n '/^Checksums-Sha256:/,/^[^ ]/p' | awk '$3 ~ /\.orig\.tar\./ {print $1, $2, $3; exit}') \
    || die "no orig tarball listed for $src_package $src_version"

srcdir="$cache_root/src"
mkdir -p "$srcdir"
tarball="$srcdir/$orig_name"
if ! [ -f "$tarball" ] || [ "$(sha256sum < "$tarball" | cut -d' ' -f1)" != "$orig_sha" ]; then
    rm -f "$tarball"
    log "fetching $orig_name ($((orig_size / 1048576)) MB) with apt-get source"
    (cd "$srcdir" && apt-get source -q --download-only --tar-only "$src_package=$src_version" >&2) \
        || die "apt-get source --download-only $src_package=$src_version failed"
    [ -f "$tarball" ] || die "apt-get source did not bring $orig_name"
    [ "$(sha256sum < "$tarball" | cut -d' ' -f1)" = "$orig_sha" ] \
        || die "$orig_name does not match the sha256 of the Sources index"
fi

# --- build dependencies (only what is missing)
installed() { [ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null)" = "install ok installed" ]; }
missing=()
for p in "${build_deps[@]}"; do installed "$p" || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
    log "installing ${missing[*]}"
    sudo_ apt-get install -y -q --no-install-recommends "${missing[@]}" >&2 \
        || die "cannot install ${missing[*]}"
fi
meson_ok() {
    command -v meson >/dev/null || return 1
    dpkg --compare-versions "$(meson --version)" ge 1.5
}
if ! meson_ok || ! installed python3-pycotap; then
    log "installing ${backports_deps[*]} from bookworm-backports"
    sudo_ apt-get install -y -q --no-install-recommends -t bookworm-backports \
        "${backports_deps[@]}" >&2 || die "cannot install ${backports_deps[*]} from bookworm-backports"
fi
meson_ok || die "meson >= 1.5 is needed, $(meson --version 2>/dev/null || echo none) is installed"

# --- unpack, patch, configure, build
build="$cache_root/build-$hash"
rm -rf "$build" "$dir.tmp"
mkdir -p "$build/src"
buildlog="$cache_root/build-$hash.log"
: > "$buildlog"
fail() { # what: the log stays, the half-built tree goes
    echo "build-qemu: error: $1 (log: $buildlog)" >&2
    tail -n 30 "$buildlog" | sed 's/^/    | /' >&2
    rm -rf "$build" "$dir.tmp"
    exit 1
}
log "unpacking"
tar -xf "$tarball" -C "$build/src" --strip-components=1 --exclude='*/roms/*' \
    || die "cannot unpack $tarball"
for p in "${patches[@]}"; do
    log "applying $(basename "$p")"
    # Outside any git repository: git apply works like patch(1) then.
    GIT_CEILING_DIRECTORIES="$build" git -C "$build/src" apply --verbose "$p" >>"$buildlog" 2>&1 \
        || fail "$(basename "$p") does not apply to QEMU $pkg_version"
done
# The +ds tarball lacks the edk2 firmware blobs that pc-bios/meson.build
# unpacks for x86_64-softmmu whenever bzip2 is found; the firmware comes
# from the installed Debian QEMU instead.
sed -i 's/^if unpack_edk2_blobs$/if false # no edk2 blobs in the +ds tarball/' \
    "$build/src/pc-bios/meson.build"
grep -q '^if false # no edk2 blobs' "$build/src/pc-bios/meson.build" \
    || die "pc-bios/meson.build changed: cannot skip the edk2 blobs"
log "configure ${configure_args[*]}"
mkdir -p "$build/obj"
(cd "$build/obj" && ../src/configure "${configure_args[@]}") >>"$buildlog" 2>&1 \
    || fail "configure failed"
log "ninja qemu-system-x86_64 ($(nproc) jobs)"
ninja -C "$build/obj" -j"$(nproc)" qemu-system-x86_64 >>"$buildlog" 2>&1 \
    || fail "the build failed"

# --- check and install
out="$build/obj/qemu-system-x86_64"
"$out" --version >>"$buildlog" 2>&1 || fail "the built QEMU does not run"
"$out" -device help 2>>"$buildlog" | grep vhost-user-gpu-pci >/dev/null \
    || fail "the built QEMU has no vhost-user-gpu-pci"
mkdir -p "$dir.tmp"
cp "$out" "$dir.tmp/qemu-system-x86_64"
strip "$dir.tmp/qemu-system-x86_64" 2>/dev/null || true
cp "$buildlog" "$dir.tmp/build.log"
{
    echo "qemu-system-x86 $pkg_version (source $src_package $src_version, $orig_name sha256 $orig_sha)"
    for p in "${patches[@]}"; do echo "patch $(basename "$p") sha256 $(sha256sum < "$p" | cut -d' ' -f1)"; done
    echo "configure ${configure_args[*]}"
    echo "built $(date -u +%Y-%m-%dT%H:%M:%SZ) in $(( $(date +%s) - start )) s on $(nproc) cores"
} > "$dir.tmp/build-info"
rm -rf "$dir"
mv "$dir.tmp" "$dir"
rm -rf "$build" "$buildlog"
log "built in $(( $(date +%s) - start )) s"
echo "$bin"
