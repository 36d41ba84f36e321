#!/usr/bin/env bash
# build-deb.sh: builds target/debian/vhost-gpu-nc_*.deb with cargo-deb.
# cargo-deb is installed from crates.io on first use, cached outside the
# checkout under ${XDG_CACHE_HOME:-$HOME/.cache}/vhost-gpu-nc/ by version.
# Prints the path of the .deb on its last line.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
cargo_deb_version=3.8.0
cache="${XDG_CACHE_HOME:-$HOME/.cache}/vhost-gpu-nc/cargo-deb-$cargo_deb_version"
if [ ! -x "$cache/bin/cargo-deb" ]; then
    echo "build-deb: installing cargo-deb $cargo_deb_version into $cache" >&2
    cargo install cargo-deb --version "$cargo_deb_version" --locked --root "$cache" >&2
fi
export PATH="$cache/bin:$PATH"

cargo build --release --locked -p vhost-gpu-nc >&2
target=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
mkdir -p "$target/man"
cargo run --release --locked -q -p vhost-gpu-nc --example manpage > "$target/man/vhost-gpu-nc.1"
# --no-build: the binary above; the man page asset is under target/.
cargo deb --no-build --locked -p vhost-gpu-nc --no-strip >&2
ls -t "$target"/debian/vhost-gpu-nc_*.deb | head -n1
