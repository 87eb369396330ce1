#!/usr/bin/env bash
# Runs the whole test suite through ctest (labels: dist, parity, slow, cli). Extra arguments go to ctest,
# e.g. scripts/test.sh -L parity   or   scripts/test.sh -R config
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BUILD_DIR="${BUILD_DIR:-build}"
cd "$ROOT/$BUILD_DIR" 2>/dev/null || { echo "test.sh: no $BUILD_DIR/ — run scripts/setup.sh first" >&2; exit 1; }
exec ctest --output-on-failure -j "${JOBS:-2}" "$@"
