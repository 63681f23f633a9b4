#!/usr/bin/env bash
# Builds herald in release mode and runs a benchmark profile, writing
# docs/benchmarks.md and its PNG plots (and target/bench/*.json).
#   ./scripts/bench.sh            # the quick profile (a few minutes)
#   ./scripts/bench.sh full       # the full profile
#   ./scripts/bench.sh s2 --clients 10000   # one scenario (target/bench only), any flags
# Needs 2 cores, util-linux taskset, and `ulimit -n` >= 19100.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
what=${1:-quick}
shift || true
cargo build --release -p herald
target_dir=${CARGO_TARGET_DIR:-target}
# Only whole profiles replace the published figures.
docs=()
if [[ $what == quick || $what == full ]]; then docs=(--docs docs); fi
exec "$target_dir/release/herald" bench "$what" "${docs[@]}" "$@"
