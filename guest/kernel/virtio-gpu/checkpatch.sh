#!/usr/bin/env bash
# SPDX-License-Identifier: GPL-2.0
#
# checkpatch.sh [PATCH...]
# Runs the guest kernel's own scripts/checkpatch.pl --strict on every patch
# of the series (or on the patches named), the way a DRM maintainer would.
# Exits 1 if any patch has an error, warning or check.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
src=$("$here/../build.sh" src)
checkpatch="$src/scripts/checkpatch.pl"
[ -f "$checkpatch" ] || { echo "checkpatch: $checkpatch missing" >&2; exit 1; }

if [ $# -eq 0 ]; then
    list=$(sed -e 's/#.*//' -e 's/[[:space:]]*$//' "$here/patches/series" | grep -v '^$' || true)
    set --
    for p in $list; do set -- "$@" "$here/patches/$p"; done
fi
[ $# -gt 0 ] || { echo "checkpatch: the series is empty"; exit 0; }

bad=0
for p in "$@"; do
    # --no-tree: only the driver is unpacked, not a whole kernel tree.
    # FILE_PATH_CHANGES ("does MAINTAINERS need updating?") is raised for
    # every new file; ours are in drivers/gpu/drm/virtio/, which the
    # "VIRTIO GPU DRIVER" entry of MAINTAINERS already covers.
    if out=$(perl "$checkpatch" --strict --no-tree --show-types --summary-file \
                --ignore FILE_PATH_CHANGES "$p" 2>&1) \
            && ! grep -qE "^(ERROR|WARNING|CHECK):" <<<"$out"; then
        echo "ok   $(basename "$p")"
    else
        bad=1
        echo "FAIL $(basename "$p")"
        echo "$out" | sed 's/^/    /'
    fi
done
exit $bad
