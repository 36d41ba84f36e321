#!/usr/bin/env bash
# build.sh OUT THUNK_DIR: builds hsa-tests with Debian's gcc against
# Debian's libhsa-runtime-dev 5.2.3 from the rocm-setup.sh cache. The link
# resolves ROCr's libhsakmt.so.1 against ours in THUNK_DIR, so the linker
# checks ROCr's HSAKMT_1 imports against our exports.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=${1:?usage: build.sh OUT THUNK_DIR}
thunk_dir=${2:?usage: build.sh OUT THUNK_DIR}
rocm=$("$here/../../tests/qemu/rocm-setup.sh")/root
gcc -O2 -Wall -Wextra -Werror -std=gnu11 -I"$rocm/usr/include" -o "$out" "$here/hsa-tests.c" \
    -L"$rocm/usr/lib/x86_64-linux-gnu" -l:libhsa-runtime64.so.1 \
    -Wl,-rpath-link,"$thunk_dir" -Wl,--no-allow-shlib-undefined -ldl -lpthread
echo "$out"
