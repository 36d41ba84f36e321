#!/usr/bin/env bash
# rocm-setup.sh: fetches Debian bookworm's ROCm 5.2.3 user space - ROCr
# (libhsa-runtime64-1), rocminfo, the headers (libhsa-runtime-dev,
# libhsakmt-dev) - and the shared libraries a glibc guest root needs for
# them (libc6, libstdc++6, libgcc-s1, libelf1, zlib1g), with
# `apt-get download` + `dpkg -x`, into a cache outside the checkout:
#   ${XDG_CACHE_HOME:-$HOME/.cache}/vhost-gpu-nc/rocm/<rocr version>/root
# Debian's own thunk (libhsakmt1) is fetched for reference only: the guest
# root gets ours. Idempotent; prints the cache directory on stdout.
set -euo pipefail
log() { echo "rocm-setup: $*" >&2; }
cache=${XDG_CACHE_HOME:-$HOME/.cache}/vhost-gpu-nc/rocm
pkgs=(libhsa-runtime64-1 libhsa-runtime-dev libhsakmt1 libhsakmt-dev rocminfo
      libc6 libstdc++6 libgcc-s1 libelf1 zlib1g)

candidate() { apt-cache policy "$1" 2>/dev/null | awk '/Candidate:/ {print $2; exit}'; }
version=$(candidate libhsa-runtime64-1)
if [ -z "$version" ] || [ "$version" = "(none)" ]; then
    log "apt knows no libhsa-runtime64-1; running apt-get update"
    if [ "$(id -u)" = 0 ]; then apt-get update -q >&2; else sudo apt-get update -q >&2; fi
    version=$(candidate libhsa-runtime64-1)
fi
[ -n "$version" ] && [ "$version" != "(none)" ] || { log "libhsa-runtime64-1 is not available from apt"; exit 1; }
case "$version" in 5.2.*) ;; *) log "expected ROCr 5.2.x, apt offers $version"; exit 1 ;; esac
dir="$cache/${version%%-*}"
if [ -f "$dir/ok" ] && [ "$(cat "$dir/ok")" = "$version" ]; then
    echo "$dir"
    exit 0
fi
log "fetching ROCr $version and the guest root's libraries into $dir"
rm -rf "$dir"
mkdir -p "$dir/debs" "$dir/root"
(cd "$dir/debs" && apt-get download -q "${pkgs[@]}" >&2)
for deb in "$dir"/debs/*.deb; do
    dpkg -x "$deb" "$dir/root"
done
for f in usr/include/hsakmt.h usr/include/hsakmttypes.h usr/include/hsa/hsa.h \
         usr/lib/x86_64-linux-gnu/libhsa-runtime64.so.1 usr/bin/rocminfo; do
    [ -e "$dir/root/$f" ] || { log "missing $f after unpacking"; exit 1; }
done
(cd "$dir/debs" && ls) > "$dir/packages"
echo "$version" > "$dir/ok"
log "done: $(wc -l < "$dir/packages") packages"
echo "$dir"
