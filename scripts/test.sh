#!/usr/bin/env bash
# The whole test suite, from a fresh machine of this kind to a summary line:
#   1. cargo fmt --check, and the crate graph (no test code in the binary,
#      no component crate importing another)
#   2. the real-service test bed: installs (cached under ~/.cache/herald) and
#      starts Redis, Kafka (KRaft), etcd + kube-apiserver + controller-manager
#      and helm, all on 127.0.0.1
#   3. cargo clippy --all-targets -D warnings
#   4. crds/ is what `herald crdgen` prints (fails on any difference)
#   5. helm lint + helm template of charts/herald (its CRD copy must match)
#   6. actionlint on .github/workflows (the release workflow)
#   7. the container image: the Dockerfile built with buildah on local Debian
#      bases, `herald standalone` run from it, goim clients on loopback
#      receive pushes through it (scripts/image.sh test)
#   8. short cargo-fuzz runs of every target in protocol/fuzz: the frame
#      decoder, the HTTP API query, the op-7 token (JSON and JWT), the
#      node list, the WebSocket upgrade head and job's Kafka record, each
#      from its committed seeds with a scratch corpus (the repo stays clean)
#   9. cargo test for the whole workspace against that test bed
# Services are stopped by pid on exit, also after a failure. Phase durations are
# printed at the end (and kept in target/testbed/timings.txt).
#
# Environment: FUZZ_SECONDS (the frame decoder, default 30),
# FUZZ_SECONDS_EACH (every other fuzz target, default 8), HERALD_CACHE, KEEP_TESTBED=1 to leave
# the services running afterwards (stop them with e2e/services/down.sh).

source "$(dirname "${BASH_SOURCE[0]}")/../e2e/services/lib.sh"
cd "$HERALD_ROOT"

# Builds are cached outside the clone so that a second clone (CI's) reuses them.
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HERALD_CACHE/target}
# One-shot builds: incremental state would only add gigabytes to the cache.
export CARGO_INCREMENTAL=${CARGO_INCREMENTAL:-0}
export CARGO_TERM_COLOR=never
FUZZ_SECONDS=${FUZZ_SECONDS:-30}
FUZZ_SECONDS_EACH=${FUZZ_SECONDS_EACH:-8}

: >"$HERALD_RUN/timings.txt"
rm -f "$HERALD_RUN/summary.txt" "$HERALD_RUN/rollout.txt" "$HERALD_RUN/image.txt"
cleanup() {
  local status=$?
  if [[ ${KEEP_TESTBED:-0} != 1 ]]; then bash e2e/services/down.sh || status=1; fi
  echo "--- phase timings ---"
  cat "$HERALD_RUN/timings.txt"
  # Figures written for the record: the image's size and start time
  # (scripts/image.sh), the rollout table (operator_rollout.rs).
  [[ -f $HERALD_RUN/image.txt ]] && cat "$HERALD_RUN/image.txt"
  [[ -f $HERALD_RUN/rollout.txt ]] && cat "$HERALD_RUN/rollout.txt"
  # The runner's summary stays the last line of the output.
  [[ -f $HERALD_RUN/summary.txt ]] && cat "$HERALD_RUN/summary.txt"
  exit $status
}
trap cleanup EXIT

# fuzz: every target of protocol/fuzz (`cargo fuzz list`), decode for
# FUZZ_SECONDS, each other for FUZZ_SECONDS_EACH. Each starts from its
# committed seeds (protocol/fuzz/seeds/<target>, only read) and writes new
# inputs to a scratch corpus, so a run neither dirties nor grows the
# repository. Any crash, leak or timeout fails the phase; the crashing input
# is kept under $HERALD_RUN/fuzz/ and its path printed.
fuzz() {
  rustup toolchain list | grep -q '^nightly' ||
    die "cargo fuzz needs the nightly toolchain (rustup's 'nightly'), which this machine lacks"
  local tools="$HERALD_CACHE/tools"
  if [[ ! -x $tools/bin/cargo-fuzz ]]; then
    cargo install cargo-fuzz --locked --root "$tools"
  fi
  local scratch artifacts="$HERALD_RUN/fuzz" targets target secs failed=()
  rm -rf "$artifacts" && mkdir -p "$artifacts"
  # Its own target dir: sanitizer builds never mix with the normal ones.
  local -x CARGO_TARGET_DIR="$HERALD_CACHE/fuzz-target" PATH="$tools/bin:$PATH"
  (cd protocol && cargo +nightly fuzz build)
  targets=$(cd protocol && cargo +nightly fuzz list)
  [[ -n $targets ]] || die "cargo fuzz list found no fuzz target in protocol/fuzz"
  scratch=$(mktemp -d)
  for target in $targets; do
    secs=$FUZZ_SECONDS_EACH
    [[ $target == decode ]] && secs=$FUZZ_SECONDS
    log "fuzz $target (${secs}s)"
    mkdir -p "$scratch/$target"
    if ! (cd protocol && cargo +nightly fuzz run "$target" "$scratch/$target" "$HERALD_ROOT/protocol/fuzz/seeds/$target" -- \
      -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 -artifact_prefix="$artifacts/$target-" 2>&1 |
      { grep -E '^(#[0-9]+ +DONE|Done|INFO: -max_total_time|==[0-9]+== ERROR)|panicked|SUMMARY|Test unit written to' || true; }
      test "${PIPESTATUS[0]}" -eq 0); then
      failed+=("$target")
    fi
  done
  rm -rf "$scratch"
  if ((${#failed[@]})); then
    log "ERROR: fuzz targets failed: ${failed[*]}; crashing inputs:"
    ls -1 "$artifacts"/* 2>/dev/null || true
    return 1
  fi
}

# crds_current: the committed CRD must be exactly what the Rust types generate.
crds_current() {
  local generated="$HERALD_RUN/pushcluster.yaml"
  cargo run --quiet -p herald -- crdgen >"$generated"
  diff -u crds/pushcluster.yaml "$generated" ||
    die "crds/pushcluster.yaml differs from \`herald crdgen\`: regenerate it with
  cargo run -p herald -- crdgen > crds/pushcluster.yaml"
}

# helm_chart: lints and renders the chart (defaults and every option switched
# on) with the test bed's helm, and checks that its CRD is the generated one.
helm_chart() {
  local chart=charts/herald
  "$HERALD_HELM" lint --strict "$chart"
  "$HERALD_HELM" template herald "$chart" >/dev/null
  "$HERALD_HELM" template herald "$chart" --namespace ops --set examplePushCluster.enabled=true \
    --set 'watchNamespaces={a,b}' --set serviceAccount.create=false --set serviceAccount.name=op >/dev/null
  # crds/ is generated by `herald crdgen`; the chart ships a copy of it.
  cmp crds/pushcluster.yaml "$chart/crds/pushcluster.yaml" ||
    die "$chart/crds/pushcluster.yaml differs from crds/pushcluster.yaml: copy it over"
}

# crate_graph: the architecture, as the crate graph must show it. The shipped
# binary links no test-support crate, and the components (comet, logic, job,
# operator) depend on none of each other, not even for their tests: they meet
# over gRPC, Kafka and the node-list document; tests that run several roles
# live in herald/tests.
crate_graph() {
  local tree bad=0 c sib
  tree=$(cargo tree -p herald -e normal --prefix none)
  if grep -qE '^herald-(e2e|testkit) ' <<<"$tree"; then
    log "ERROR: the herald binary links test code: $(grep -oE '^herald-(e2e|testkit)' <<<"$tree" | sort -u | tr '\n' ' ')"
    bad=1
  fi
  for c in comet logic job operator; do
    sib=$(cargo tree -p "herald-$c" -e normal,dev --depth 1 --prefix none |
      tail -n +2 | grep -oE '^herald-(comet|logic|job|operator) ' | sort -u | tr '\n' ' ' || true)
    if [[ -n $sib ]]; then
      log "ERROR: herald-$c depends on $sib(components meet over gRPC, Kafka or the node list)"
      bad=1
    fi
  done
  return $bad
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

# prune_stale_binaries: every rebuilt test or binary leaves its previous
# hashed copy in the shared cache (hundreds of MB each); keep the newest two
# of each name (a crate's binary and its unit-test harness share one), so a
# long-lived cache cannot fill the disk (it did, at 67 GB).
prune_stale_binaries() {
  local deps="$CARGO_TARGET_DIR/debug/deps"
  [[ -d $deps ]] || return 0
  find "$deps" -maxdepth 1 -type f -perm -u+x -regextype posix-extended \
    -regex '.*/[^./]+-[0-9a-f]{16}' -printf '%T@ %f\n' |
    sort -rn | awk '{ name = $2; sub(/-[0-9a-f]+$/, "", name); if (seen[name]++ >= 2) print $2 }' |
    while read -r stale; do rm -f -- "$deps/$stale"; done
}

timed "prune stale test binaries" prune_stale_binaries
timed "cargo fmt --check" cargo fmt --all -- --check
timed "crate graph" crate_graph
timed "test bed (install + start)" bash e2e/services/up.sh
source "$HERALD_RUN/env"
timed "cargo clippy" cargo clippy --workspace --all-targets -- -D warnings
timed "crds up to date" crds_current
timed "helm lint + template" helm_chart
timed "release workflow lint" bash scripts/image.sh lint
timed "container image" env HERALD_IMAGE_BASES=local bash scripts/image.sh test
timed "cargo fuzz (decode ${FUZZ_SECONDS}s, others ${FUZZ_SECONDS_EACH}s each)" fuzz
timed "cargo test" cargo_test
