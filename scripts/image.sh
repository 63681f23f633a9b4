#!/usr/bin/env bash
# Herald's container image, built from the repository's Dockerfile with buildah.
#
#   image.sh build [BUILDAH-BUD-OPTION...]
#       Builds the Dockerfile and tags it $HERALD_IMAGE:<workspace version>
#       (default ghcr.io/herald-push/herald). Extra options go to `buildah bud`
#       (the release workflow passes --platform). With HERALD_IMAGE_BASES=local
#       it uses the local bases below instead of pulling rust:… and debian:…
#   image.sh bases
#       Makes the two local base images (needs no container registry): a Debian
#       bookworm runtime (glibc, zlib, libgcc, CA certificates) and a builder
#       (build-essential, pkg-config, zlib and OpenSSL headers) with mmdebstrap, from the
#       Debian mirror this machine's apt uses. The builder gets this machine's
#       Rust toolchain mounted read-only at build time.
#   image.sh test
#       The test command's phase: checks the versions agree, makes the bases,
#       builds with them (the same `build` as the release workflow's), then
#       runs `herald standalone` from the image (buildah run, host network,
#       127.0.0.1 only) and has goim clients on loopback receive pushes through
#       it. Prints the image size and the start time.
#   image.sh lint
#       actionlint on .github/workflows (the release workflow cannot run here).
#   image.sh version
#       Prints the workspace version after checking that Chart.yaml's
#       appVersion, the Dockerfile's VERSION, the chart's default image and
#       examples/ agree with it.
#
# Local mode (HERALD_IMAGE_BASES=local, which `test` sets) keeps buildah's
# storage (vfs driver, chroot isolation: what works in this sandbox as root),
# the bases, cargo's registry and the build's target dir under
# $HERALD_CACHE/image, so a second run only rebuilds what changed.

# shellcheck source=e2e/services/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/../e2e/services/lib.sh"
cd "$HERALD_ROOT" || exit

# The published name: the chart, examples/ and the docs use it. A release to
# another registry sets HERALD_IMAGE (release.yml does).
DEFAULT_IMAGE=ghcr.io/herald-push/herald
IMAGE=${HERALD_IMAGE:-$DEFAULT_IMAGE}
BASES=${HERALD_IMAGE_BASES:-registry}
IMAGE_CACHE=$HERALD_CACHE/image
SUITE=bookworm
# What each base holds (the Dockerfile's comments say why).
RUNTIME_PACKAGES=ca-certificates,libgcc-s1,zlib1g
BUILD_PACKAGES=build-essential,ca-certificates,libssl-dev,pkg-config,python3-minimal,zlib1g-dev

# Where buildah keeps images and containers. Local mode: its own store in the
# cache (vfs copies whole layers but needs no overlay support), so everything
# this script makes can be listed and removed without touching anything else.
BUILDAH=(buildah)
if [[ $BASES == local ]]; then
  BUILDAH+=(--storage-driver vfs --root "$IMAGE_CACHE/storage" --runroot "$HERALD_RUN/buildah")
  export BUILDAH_ISOLATION=chroot
fi

# --- versions ---------------------------------------------------------------

workspace_version() {
  awk '/^\[workspace.package\]/ { s = 1; next } /^\[/ { s = 0 }
       s && $1 == "version" { gsub(/"/, "", $3); print $3; exit }' Cargo.toml
}

# version: the workspace version, after checking every place that names it.
version() {
  local v app repo bad=0
  v=$(workspace_version)
  [[ -n $v ]] || die "no [workspace.package] version in Cargo.toml"
  app=$(sed -n 's/^appVersion: *"\{0,1\}\([^"]*\)"\{0,1\} *$/\1/p' charts/herald/Chart.yaml)
  if [[ $app != "$v" ]]; then
    log "ERROR: charts/herald/Chart.yaml appVersion is '$app', the workspace version is '$v'"
    bad=1
  fi
  repo=$(awk '/^image:/ { s = 1; next } /^[^ #]/ { s = 0 } s && $1 == "repository:" { print $2; exit }' \
    charts/herald/values.yaml)
  if [[ $repo != "$DEFAULT_IMAGE" ]]; then
    log "ERROR: charts/herald/values.yaml image.repository is '$repo', not $DEFAULT_IMAGE"
    bad=1
  fi
  # A plain `docker build .` labels the image with the Dockerfile's default.
  if ! grep -qx "ARG VERSION=$v" Dockerfile; then
    log "ERROR: the Dockerfile's ARG VERSION default is not $v"
    bad=1
  fi
  local f
  for f in examples/pushcluster.yaml charts/herald/values.yaml; do
    if ! grep -qE "^ *image: *\"?$DEFAULT_IMAGE:$v\"?\$" "$f"; then
      log "ERROR: $f does not name the image $DEFAULT_IMAGE:$v"
      bad=1
    fi
  done
  ((bad == 0)) || exit 1
  echo "$v"
}

# --- local bases ------------------------------------------------------------

# debian_sources: the Debian entries of this machine's apt sources, as a
# deb822 file for mmdebstrap (so the bases come from the same mirror, whatever
# it is). Empty when there are none: mmdebstrap then uses its default mirror.
debian_sources() {
  python3 - /etc/apt/sources.list /etc/apt/sources.list.d/* <<'PY'
import re, sys
DEBIAN = re.compile(r"/debian(-security)?/?$")
out = []
for path in sys.argv[1:]:
    try:
        text = open(path, encoding="utf-8").read()
    except (OSError, UnicodeDecodeError):
        continue
    if path.endswith(".sources"):
        for stanza in re.split(r"\n\s*\n", text):
            fields = {}
            for line in stanza.splitlines():
                if line.startswith("#") or ":" not in line:
                    continue
                k, v = line.split(":", 1)
                fields[k.strip().lower()] = v.strip()
            uris = fields.get("uris", "").split()
            if fields.get("enabled", "yes") != "no" and "deb" in fields.get("types", "").split() \
                    and uris and all(DEBIAN.search(u) for u in uris):
                out.append("Types: deb\nURIs: %s\nSuites: %s\nComponents: main\n"
                           % (" ".join(uris), fields.get("suites", "")))
    elif path.endswith(".list"):
        for line in text.splitlines():
            parts = re.sub(r"\[[^]]*\]", "", line).split()
            if len(parts) >= 3 and parts[0] == "deb" and DEBIAN.search(parts[1]):
                out.append("Types: deb\nURIs: %s\nSuites: %s\nComponents: main\n" % (parts[1], parts[2]))
print("\n".join(out), end="")
PY
}

# base_key KIND PACKAGES: names a base by everything it is made from.
base_key() {
  { echo "$1 $SUITE $2 v2"; cat "$IMAGE_CACHE/sources"; } | sha256sum | cut -c1-16
}

image_exists() { "${BUILDAH[@]}" inspect --type image "$1" >/dev/null 2>&1; }

# make_base KIND VARIANT PACKAGES: builds localhost/herald-base-KIND:<key>
# unless it exists, removes this script's older bases of that kind, prints the name.
make_base() {
  local kind=$1 variant=$2 packages=$3 key name ctr mnt old
  key=$(base_key "$kind" "$packages")
  name=localhost/herald-base-$kind:$key
  if ! image_exists "$name"; then
    log "making base $name ($variant + $packages) with mmdebstrap"
    ctr=$("${BUILDAH[@]}" from --name "herald-base-$kind-$key" scratch)
    mnt=$("${BUILDAH[@]}" mount "$ctr")
    local -a srcs=()
    [[ -s $IMAGE_CACHE/sources ]] && srcs=("$IMAGE_CACHE/sources")
    # Documentation, man pages and translations are of no use in an image;
    # apt's lists and caches go too ($1 is the hook's argument, the root).
    # shellcheck disable=SC2016
    # merged-usr: /usr merged without the usrmerge package (and its perl).
    if ! mmdebstrap --quiet --variant="$variant" --include="$packages" \
      --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr \
      --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-include=/usr/share/doc/*/copyright' \
      --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/locale/*' \
      --dpkgopt='path-exclude=/usr/share/info/*' \
      --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/* "$1"/var/log/*' \
      "$SUITE" "$mnt" "${srcs[@]}" >"$HERALD_RUN/mmdebstrap-$kind.log" 2>&1; then
      tail -n 30 "$HERALD_RUN/mmdebstrap-$kind.log" >&2
      "${BUILDAH[@]}" rm "$ctr" >/dev/null
      die "mmdebstrap failed for the $kind base (log: $HERALD_RUN/mmdebstrap-$kind.log)"
    fi
    if [[ $kind == build ]]; then
      # The Rust toolchain is mounted at /usr/local/rust at build time and
      # cargo's registry at /usr/local/cargo/registry, as in rust:… images.
      mkdir -p "$mnt/usr/local/rust" "$mnt/usr/local/cargo/registry"
      "${BUILDAH[@]}" config --env CARGO_HOME=/usr/local/cargo \
        --env PATH=/usr/local/rust/bin:/usr/local/cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
        "$ctr"
    fi
    "${BUILDAH[@]}" config --cmd /bin/sh --label "org.opencontainers.image.description=herald $kind base ($SUITE)" "$ctr"
    "${BUILDAH[@]}" umount "$ctr" >/dev/null
    "${BUILDAH[@]}" commit --quiet --rm "$ctr" "$name" >/dev/null
  fi
  for old in $("${BUILDAH[@]}" images --format '{{.Name}}:{{.Tag}}' 2>/dev/null |
    grep -E "^localhost/herald-base-$kind:" | grep -vF "$name" || true); do
    log "removing old base $old"
    "${BUILDAH[@]}" rmi "$old" >/dev/null || true
  done
  echo "$name"
}

bases() {
  [[ $BASES == local ]] || die "bases: set HERALD_IMAGE_BASES=local"
  bash e2e/services/buildah.sh install
  mkdir -p "$IMAGE_CACHE"
  debian_sources >"$IMAGE_CACHE/sources"
  RUNTIME_BASE=$(make_base runtime essential "$RUNTIME_PACKAGES")
  BUILD_BASE=$(make_base build minbase "$BUILD_PACKAGES")
  log "bases: $BUILD_BASE, $RUNTIME_BASE"
}

# --- build ------------------------------------------------------------------

build() {
  local v tag old new
  v=$(version)
  tag=$IMAGE:$v
  local -a args=(--file Dockerfile --tag "$tag" --build-arg "VERSION=$v")
  [[ -n ${HERALD_IMAGE_SOURCE:-} ]] && args+=(--build-arg "SOURCE=$HERALD_IMAGE_SOURCE")
  if [[ $BASES == local ]]; then
    bases
    local sysroot key target
    sysroot=$(rustc --print sysroot)
    # The build's target dir belongs to one builder base and one toolchain.
    key=$({ echo "$BUILD_BASE"; rustc -V; } | sha256sum | cut -c1-16)
    target=$IMAGE_CACHE/target-$key
    find "$IMAGE_CACHE" -maxdepth 1 -name 'target-*' ! -name "target-$key" -exec rm -rf {} +
    # Builds after dependency changes leave old artifacts behind, and old
    # crate versions pile up in the registry: bound both (a cold build redoes them).
    if [[ -d $target ]] && (($(du -sm "$target" | cut -f1) > 4096)); then rm -rf "$target"; fi
    if [[ -d $IMAGE_CACHE/cargo-home ]] && (($(du -sm "$IMAGE_CACHE/cargo-home" | cut -f1) > 2048)); then
      rm -rf "$IMAGE_CACHE/cargo-home"
    fi
    mkdir -p "$target"
    # The crates are fetched here, where the machine's TLS setup is trusted,
    # into a cargo home of the image's own; the build then runs offline.
    CARGO_HOME=$IMAGE_CACHE/cargo-home cargo fetch --locked --quiet \
      --target "$(rustc -vV | sed -n 's/^host: //p')"
    args+=(--build-arg "RUST_IMAGE=$BUILD_BASE" --build-arg "RUNTIME_IMAGE=$RUNTIME_BASE"
      --build-arg CARGO_NET_OFFLINE=true --pull=never
      --volume "$sysroot:/usr/local/rust:ro"
      --volume "$IMAGE_CACHE/cargo-home/registry:/usr/local/cargo/registry"
      --volume "$target:/build/target")
  fi
  old=$("${BUILDAH[@]}" inspect --type image --format '{{.FromImageID}}' "$tag" 2>/dev/null || true)
  log "building $tag ($BASES bases)"
  "${BUILDAH[@]}" bud "${args[@]}" "$@" .
  new=$("${BUILDAH[@]}" inspect --type image --format '{{.FromImageID}}' "$tag")
  # The previous build of this tag is now untagged: remove it (by its id).
  if [[ $BASES == local && -n $old && $old != "$new" ]]; then
    "${BUILDAH[@]}" rmi "$old" >/dev/null 2>&1 || true
  fi
  log "built $tag ($new)"
}

# --- test: herald standalone from the image ----------------------------------

# goim_client COMET_PORT LOGIC_PORT API_KEY [SECONDS]: a goim client written from the
# protocol alone (no Herald code): connects to 127.0.0.1, authenticates, then
# pushes to its key and to everyone through the HTTP API and must receive both.
goim_client() {
  python3 - "$@" <<'PY'
import json, socket, struct, sys, time, urllib.request
comet, logic, api_key = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
secs = float(sys.argv[4]) if len(sys.argv) > 4 else 30.0
deadline = time.monotonic() + secs
s = socket.create_connection(("127.0.0.1", comet), timeout=30)
token = json.dumps({"mid": 7, "key": "image-test", "room_id": "live://1", "accepts": [1000]}).encode()
s.sendall(struct.pack(">ihhii", 16 + len(token), 16, 1, 7, 1) + token)  # op 7: auth
buf = b""
def frames():
    global buf
    while time.monotonic() < deadline:
        s.settimeout(max(0.1, deadline - time.monotonic()))
        try:
            data = s.recv(65536)
        except TimeoutError:
            break
        if not data:
            sys.exit("the comet closed the connection")
        buf += data
        while len(buf) >= 16 and len(buf) >= struct.unpack(">i", buf[:4])[0]:
            size, hlen, _, op, _ = struct.unpack(">ihhii", buf[:16])
            body, buf = buf[hlen:size], buf[size:]
            yield op, body
    sys.exit(f"the goim client got none of {sorted(w.decode() for w in want)} within {secs:g} s")
def push(path, body):
    req = urllib.request.Request(f"http://127.0.0.1:{logic}{path}", data=body, method="POST",
                                 headers={"Authorization": f"Bearer {api_key}"})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            answer = json.load(r)
    except OSError as e:
        sys.exit(f"push {path}: {e}")
    if answer.get("code") != 0:
        sys.exit(f"push {path}: {answer}")
want = {b"op 8 (authenticated)"}
received = frames()
for op, body in received:
    if op == 8:
        break
push("/goim/push/keys?operation=1000&keys=image-test", b"to my key")
push("/goim/push/all?operation=1000&speed=100", b"to everyone")
want = {b"to my key", b"to everyone"}
for op, body in received:
    if op == 1000 and body in want:
        want.discard(body)
        print(f"goim client received op 1000 {body.decode()!r}")
        if not want:
            break
PY
}

# descendant PID NAME: the pid of PID's descendant whose command is NAME.
descendant() {
  local pid=$1 name=$2 child found
  # shellcheck disable=SC2013 # the file is one line of pids
  for child in $(cat "/proc/$pid/task/"*/children 2>/dev/null); do
    if [[ $(cat "/proc/$child/comm" 2>/dev/null) == "$name" ]]; then echo "$child"; return 0; fi
    found=$(descendant "$child" "$name") && { echo "$found"; return 0; }
  done
  return 1
}

smoke() {
  local tag=$1 ctr probe_ctr run_pid herald_pid api_key t0 t1 ms uid size csize
  local tcp ws grpc http lgrpc chttp logs=$HERALD_RUN/image-standalone.log
  tcp=$(free_port) ws=$(free_port) grpc=$(free_port) http=$(free_port) lgrpc=$(free_port)
  chttp=$(free_port)
  api_key=$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')
  local -a entrypoint
  # The role is the first argument after the image's own ENTRYPOINT.
  mapfile -t entrypoint < <("${BUILDAH[@]}" inspect --type image "$tag" |
    python3 -c 'import json, sys; print("\n".join(json.load(sys.stdin)["OCIv1"]["config"].get("Entrypoint") or []))')
  [[ ${entrypoint[0]:-} == herald ]] || die "the image's ENTRYPOINT is '${entrypoint[*]}', not herald"
  check_labels "$tag"
  trap smoke_cleanup EXIT
  ctr=$("${BUILDAH[@]}" from --pull=never --name "herald-image-test-$$" "$tag")
  SMOKE_CTRS+=("$ctr")
  probe_ctr=$("${BUILDAH[@]}" from --pull=never --name "herald-image-probe-$$" "$tag")
  SMOKE_CTRS+=("$probe_ctr")

  t0=$(date +%s%N)
  "${BUILDAH[@]}" run --network host --env NO_COLOR=1 "$ctr" -- "${entrypoint[@]}" standalone \
    --tcp-addr "127.0.0.1:$tcp" --ws-addr "127.0.0.1:$ws" --grpc-addr "127.0.0.1:$grpc" \
    --http-addr "127.0.0.1:$http" --logic-grpc-addr "127.0.0.1:$lgrpc" --comet-http-addr "127.0.0.1:$chttp" \
    --api-key "$api_key" \
    </dev/null >"$logs" 2>&1 &
  run_pid=$!
  record_pid image "$run_pid"
  local port
  for port in "$tcp" "$ws" "$http" "$grpc" "$lgrpc" "$chttp"; do
    wait_port "$port" 60 "$run_pid" || { tail -n 20 "$logs" >&2; exit 1; }
  done
  t1=$(date +%s%N)
  ms=$(((t1 - t0) / 1000000))
  herald_pid=$(descendant "$run_pid" herald) || die "no herald process under buildah run ($run_pid)"
  # Stopped first: TERM to herald itself, then its buildah run.
  printf '%s\n' "$herald_pid" "$run_pid" >"$HERALD_RUN/image.pids"
  check_stripped "$ctr"
  uid=$(awk '/^Uid:/ { print $2 }' "/proc/$herald_pid/status")
  [[ $uid == 65532 ]] || die "herald runs as uid $uid in the image, not 65532"
  log "herald standalone from the image: ports answering ${ms} ms after buildah run (pid $herald_pid, uid $uid)"

  # A goim client on the host, then herald probe from the image (its own
  # client library; key and room pushes) against the same ports.
  goim_client "$tcp" "$http" "$api_key" ||
    { tail -n 20 "$logs" >&2; die "the goim client on 127.0.0.1 did not receive its pushes from the image's herald"; }
  "${BUILDAH[@]}" run --network host --env NO_COLOR=1 "$probe_ctr" -- "${entrypoint[@]}" probe \
    --comet "127.0.0.1:$tcp" --logic "127.0.0.1:$http" --api-key "$api_key" --timeout-secs 30 ||
    { tail -n 20 "$logs" >&2; die "herald probe (from the image) failed against the image's herald standalone"; }

  size=$("${BUILDAH[@]}" inspect --type image --format '{{.FromImageID}}' "$tag" | cut -c1-12)
  size=$("${BUILDAH[@]}" images --format '{{.ID}} {{.Size}}' | awk -v id="$size" '$1 == id { $1 = ""; print substr($0, 2) }')
  csize=$(compressed_size "$tag")
  printf 'image %s: %s unpacked, %s MB compressed (gzip layers); standalone ports answering %s ms after buildah run\n' \
    "$tag" "$size" "$csize" "$ms" | tee "$HERALD_RUN/image.txt" >&2
  smoke_cleanup
  trap - EXIT
}

# check_labels TAG: the OCI labels a registry and scanners read are set, the
# version one to the workspace's version (a stale Dockerfile default would
# label a new build with an old version).
check_labels() {
  local tag=$1 want
  want=$(workspace_version)
  "${BUILDAH[@]}" inspect --type image "$tag" | WANT=$want python3 -c '
import json, os, sys
labels = json.load(sys.stdin)["OCIv1"]["config"].get("Labels") or {}
p = "org.opencontainers.image."
missing = [k for k in ("title", "description", "version", "source", "licenses") if not labels.get(p + k)]
if missing:
    sys.exit("the image lacks the OCI labels " + ", ".join(p + k for k in missing))
if labels[p + "version"] != os.environ["WANT"]:
    sys.exit("the image is labelled version %s, the workspace is %s" % (labels[p + "version"], os.environ["WANT"]))
' || die "OCI labels"
  log "OCI labels: title, description, version $want, source, licenses"
}

# check_stripped CTR: the binary in the container's image has no symbol
# table (the Dockerfile strips it; an unstripped one is several times larger).
check_stripped() {
  local root
  root=$("${BUILDAH[@]}" mount "$1")
  if readelf -S --wide "$root/usr/local/bin/herald" | grep -q '[.]symtab'; then
    "${BUILDAH[@]}" umount "$1" >/dev/null
    die "the image's herald binary is not stripped (it has a .symtab)"
  fi
  log "the image's herald binary is stripped: $(du -h "$root/usr/local/bin/herald" | cut -f1)"
  "${BUILDAH[@]}" umount "$1" >/dev/null
}

# smoke_cleanup: stops what smoke started (by pid) and removes its containers.
SMOKE_CTRS=()
smoke_cleanup() {
  stop_pids image
  if ((${#SMOKE_CTRS[@]} > 0)); then
    "${BUILDAH[@]}" rm "${SMOKE_CTRS[@]}" >/dev/null 2>&1 || true
    SMOKE_CTRS=()
  fi
}

# compressed_size TAG: MB of the image's gzip-compressed layers (what a
# registry stores and a node pulls), from a throw-away OCI layout.
compressed_size() {
  local dir=$HERALD_RUN/image-oci
  rm -rf "$dir"
  "${BUILDAH[@]}" push --quiet --compression-format gzip "$1" "oci:$dir" >/dev/null
  python3 - "$dir" <<'PY'
import json, os, sys
d = sys.argv[1]
index = json.load(open(os.path.join(d, "index.json")))
digest = index["manifests"][0]["digest"].split(":")[1]
manifest = json.load(open(os.path.join(d, "blobs", "sha256", digest)))
print(f'{sum(l["size"] for l in manifest["layers"]) / 1e6:.1f}')
PY
  rm -rf "$dir"
}

test_image() {
  [[ $BASES == local ]] || die "test: set HERALD_IMAGE_BASES=local (scripts/test.sh does)"
  local v
  v=$(version)
  build
  smoke "$IMAGE:$v"
}

# --- lint: the release workflow ---------------------------------------------

ACTIONLINT_VERSION=v1.7.12

# lint: actionlint (built once from its Go module into $HERALD_CACHE/tools)
# on .github/workflows, with shellcheck on their run: scripts when it is there.
lint() {
  local tools=$HERALD_CACHE/tools bin
  bash e2e/services/buildah.sh install
  bin=$tools/actionlint-$ACTIONLINT_VERSION
  if [[ ! -x $bin ]]; then
    log "building actionlint $ACTIONLINT_VERSION"
    mkdir -p "$tools/bin"
    GOBIN=$tools/bin GOFLAGS=-trimpath go install -ldflags='-s -w' \
      "github.com/rhysd/actionlint/cmd/actionlint@$ACTIONLINT_VERSION"
    mv "$tools/bin/actionlint" "$bin"
  fi
  local -a files=(.github/workflows/*.yml)
  "$bin" -no-color "${files[@]}"
  log "actionlint $ACTIONLINT_VERSION (shellcheck: $(command -v shellcheck || echo none)): ${files[*]} clean"
}

case "${1:-}" in
  version) version ;;
  bases) bases ;;
  build) shift && build "$@" ;;
  test) test_image ;;
  lint) lint ;;
  *) die "usage: $0 build [BUILDAH-BUD-OPTION...] | bases | test | lint | version" ;;
esac
