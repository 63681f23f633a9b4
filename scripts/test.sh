#!/usr/bin/env bash
# The whole test suite, from a fresh machine of this kind to a summary line:
#   1. cargo fmt --check
#   2. the real-service test bed: installs (cached under ~/.cache/herald) and
#      starts Redis, Kafka (KRaft), etcd + kube-apiserver + controller-manager
#      and helm, all on 127.0.0.1
#   3. cargo clippy --all-targets -D warnings
#   4. crds/ is what `herald crdgen` prints (fails on any difference)
#   5. a short cargo-fuzz run of the frame decoder
#   6. cargo test for the whole workspace against that test bed
# Services are stopped by pid on exit, also after a failure. Phase durations are
# printed at the end (and kept in target/testbed/timings.txt).
#
# Environment: FUZZ_SECONDS (default 30), HERALD_CACHE, KEEP_TESTBED=1 to leave
# the services running afterwards (stop them with e2e/services/down.sh).

source "$(dirname "${BASH_SOURCE[0]}")/../e2e/services/lib.sh"
cd "$HERALD_ROOT"

# Builds are cached outside the clone so that a second clone (CI's) reuses them.
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HERALD_CACHE/target}
export CARGO_TERM_COLOR=never
FUZZ_SECONDS=${FUZZ_SECONDS:-30}

: >"$HERALD_RUN/timings.txt"
rm -f "$HERALD_RUN/summary.txt"
cleanup() {
  local status=$?
  if [[ ${KEEP_TESTBED:-0} != 1 ]]; then bash e2e/services/down.sh || status=1; fi
  echo "--- phase timings ---"
  cat "$HERALD_RUN/timings.txt"
  # The runner's summary stays the last line of the output.
  [[ -f $HERALD_RUN/summary.txt ]] && cat "$HERALD_RUN/summary.txt"
  exit $status
}
trap cleanup EXIT

fuzz() {
  rustup toolchain list | grep -q '^nightly' ||
    die "cargo fuzz needs the nightly toolchain (rustup's 'nightly'), which this machine lacks"
  local tools="$HERALD_CACHE/tools"
  if [[ ! -x $tools/bin/cargo-fuzz ]]; then
    cargo install cargo-fuzz --locked --root "$tools"
  fi
  # Its own target dir: sanitizer builds never mix with the normal ones.
  (cd protocol && CARGO_TARGET_DIR="$HERALD_CACHE/fuzz-target" PATH="$tools/bin:$PATH" \
    cargo +nightly fuzz run decode -- -max_total_time="$FUZZ_SECONDS" -rss_limit_mb=2048 2>&1 |
    grep -E '^(#[0-9]+ +DONE|Done|INFO: -max_total_time|==[0-9]+== ERROR)|panicked|SUMMARY' || true
   test "${PIPESTATUS[0]}" -eq 0)
}

# crds_current: the committed CRD must be exactly what the Rust types generate.
crds_current() {
  local generated="$HERALD_RUN/pushcluster.yaml"
  cargo run --quiet -p herald -- crdgen >"$generated"
  diff -u crds/pushcluster.yaml "$generated" ||
    die "crds/pushcluster.yaml differs from \`herald crdgen\`: regenerate it with
  cargo run -p herald -- crdgen > crds/pushcluster.yaml"
}

# cargo_test: runs the suite, then prints one line summing every test binary.
cargo_test() {
  local out="$HERALD_RUN/cargo-test.log" status=0
  cargo test --workspace --no-fail-fast 2>&1 | tee "$out" || status=$?
  awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($i ~ /^passed/) p += $(i-1); if ($i ~ /^failed/) f += $(i-1); if ($i ~ /^ignored/) s += $(i-1) } }
       END { printf "tests: %d passed, %d failed, %d skipped\n", p, f, s; if (p == 0 || f > 0) exit 1 }' \
    "$out" >"$HERALD_RUN/summary.txt" || status=1
  return $status
}

timed "cargo fmt --check" cargo fmt --all -- --check
timed "test bed (install + start)" bash e2e/services/up.sh
source "$HERALD_RUN/env"
timed "cargo clippy" cargo clippy --workspace --all-targets -- -D warnings
timed "crds up to date" crds_current
timed "cargo fuzz (${FUZZ_SECONDS}s run)" fuzz
timed "cargo test" cargo_test
