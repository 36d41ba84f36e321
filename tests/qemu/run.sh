#!/usr/bin/env bash
# Set up (idempotent) and run the QEMU suite.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
"$here/setup.sh"
exec "$here/run-suite.sh" "$@"
