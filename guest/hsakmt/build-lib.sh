#!/usr/bin/env bash
# build-lib.sh OUT_DIR [ROCR_LIB]
# Builds guest/hsakmt as OUT_DIR/libhsakmt.so.1: the crate's static
# archive linked by gcc into a shared library with soname libhsakmt.so.1
# and the version script hsakmt.ver (HSAKMT_1). Then checks that it
# defines exactly the hsaKmt* symbols, all versioned HSAKMT_1, and - when
# ROCR_LIB (Debian's libhsa-runtime64.so.1) is given - exactly the ones
# that library imports.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
out=${1:?usage: build-lib.sh OUT_DIR [ROCR_LIB]}
rocr=${2:-}
mkdir -p "$out"
cargo build --release --locked -p hsakmt --manifest-path "$root/Cargo.toml" >&2
target=${CARGO_TARGET_DIR:-$root/target}
gcc -shared -o "$out/libhsakmt.so.1" \
    -Wl,--whole-archive "$target/release/libhsakmt.a" -Wl,--no-whole-archive \
    -Wl,-soname,libhsakmt.so.1 -Wl,--version-script="$here/hsakmt.ver" \
    -Wl,-z,now -Wl,--gc-sections -lpthread -ldl -lm -lrt -lgcc_s
strip --strip-unneeded "$out/libhsakmt.so.1"

defined=$(nm -D --defined-only "$out/libhsakmt.so.1" | awk '$3 ~ /^hsaKmt/ {print $3}' | sort)
count=$(echo "$defined" | grep -c . || true)
unversioned=$(echo "$defined" | grep -v '@@HSAKMT_1$' || true)
[ -z "$unversioned" ] || { echo "build-lib: not versioned HSAKMT_1: $unversioned" >&2; exit 1; }
[ "$count" = 42 ] || { echo "build-lib: $count hsaKmt symbols defined, want 42" >&2; exit 1; }
other=$(nm -D --defined-only "$out/libhsakmt.so.1" | awk '$2 ~ /^[TDBR]$/ {print $3}' \
    | grep -v '^hsaKmt' | grep -v '^vgncKmtQueryCounters@@VGNC_DEBUG_1$' || true)
[ -z "$other" ] || { echo "build-lib: other symbols exported: $other" >&2; exit 1; }
if [ -n "$rocr" ]; then
    want=$(nm -D --undefined-only "$rocr" | awk '$2 ~ /^hsaKmt/ {print $2}' | sed 's/@HSAKMT_1$/@@HSAKMT_1/' | sort)
    if [ "$want" != "$defined" ]; then
        echo "build-lib: exports differ from what $(basename "$rocr") imports:" >&2
        diff <(echo "$want") <(echo "$defined") >&2 || true
        exit 1
    fi
    echo "build-lib: the 42 imports of $(basename "$rocr") are all defined, versioned HSAKMT_1" >&2
fi
readelf -d "$out/libhsakmt.so.1" | grep -q 'SONAME.*\[libhsakmt.so.1\]' || { echo "build-lib: no soname" >&2; exit 1; }
echo "$out/libhsakmt.so.1"
