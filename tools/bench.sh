#!/usr/bin/env bash
# tools/bench.sh [--quick]
# Every performance goal's benchmark, each printing its figure next to a
# baseline measured in the same run, then the plots of docs/perf:
#   benches/socket.rs       VM_BIND through the socket (batched, one op per
#                           submit, at 0..1M existing mappings), fault round
#                           trip with a polling guest, batched faults, the
#                           idle cost of a connected guest;
#   benches/qemu_2d.rs      the 2D workload against QEMU's own C backend
#                           (/usr/lib/qemu/vhost-user-gpu, Debian's
#                           qemu-system-gui; tests/qemu/setup.sh installs it);
#   backend/benches/sim.rs  COPY through the GPU VM against memcpy by size,
#                           the in-process fault round trip;
# then tools/plot turns their CSVs (target/bench-results) into SVGs under
# docs/perf. About 3 minutes on 2 cores; run it on an otherwise idle machine.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
quick=()
[ "${1:-}" = --quick ] && quick=(--quick)
cargo bench --locked --bench socket -- "${quick[@]}"
cargo bench --locked --bench qemu_2d -- "${quick[@]}"
# The filter keeps criterion to the fault round trip; the COPY table and
# the round-trip percentiles are printed whatever the filter.
cargo bench --locked -p gpu-backend --bench sim -- fault_round_trip
cargo run --release --locked --manifest-path tools/plot/Cargo.toml -- target/bench-results docs/perf
