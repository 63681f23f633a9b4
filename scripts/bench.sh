#!/usr/bin/env bash
# Builds herald in release mode and runs a benchmark profile, writing
# docs/benchmarks.md and its PNG plots (and target/bench/*.json).
#   ./scripts/bench.sh            # the quick profile (a few minutes)
#   ./scripts/bench.sh full       # the full profile
#   ./scripts/bench.sh s5         # S5 alone (end to end through Redis + Kafka)
#   ./scripts/bench.sh s2 --clients 10000   # one scenario (target/bench only), any flags
# quick, full, s5 and s5-smoke start their own Redis and Kafka on loopback
# through e2e/services (instance in target/bench-testbed, stopped on exit).
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
services=()
case $what in
  quick | full | s5 | s5-smoke)
    # A test-bed instance of its own, so a running test suite is not touched.
    export HERALD_RUN=$PWD/target/bench-testbed
    trap 'bash e2e/services/down.sh' EXIT
    bash e2e/services/up.sh redis kafka
    # shellcheck source=/dev/null
    source "$HERALD_RUN/env"
    services=(--redis "$HERALD_REDIS_URL" --kafka "$HERALD_KAFKA_BROKERS")
    ;;
esac
# Not exec: the trap must stop the services afterwards.
"$target_dir/release/herald" bench "$what" "${docs[@]}" "${services[@]}" "$@"
