#!/usr/bin/env bash
# A real Kubernetes control plane (etcd + kube-apiserver + kube-controller-manager)
# plus kubectl and helm, all built from Go modules and bound to 127.0.0.1 only.
#
#   k8s.sh install   build the binaries once into $HERALD_CACHE/k8s-<version>/bin
#   k8s.sh start     fresh cluster (new PKI, empty etcd), writes $HERALD_RUN/k8s.env
#   k8s.sh stop      end exactly the processes `start` launched
#
# There is no kubelet, scheduler or proxy: objects are stored, controllers
# reconcile them (Deployment -> ReplicaSet -> Pods), Pods stay Pending. That is
# what a client of the API needs, without containers or a pod network.

source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

# One pinned set. Kubernetes v1.Y.Z publishes its staging modules as v0.Y.Z.
K8S_VERSION=v1.36.3
ETCD_VERSION=v3.6.16 # the 3.6 line is what Kubernetes 1.36 is tested against
HELM_VERSION=v3.22.0 # helm 3.22 supports Kubernetes 1.34-1.37

K8S_HOME=$HERALD_CACHE/k8s-$K8S_VERSION
BIN=$K8S_HOME/bin
STAMP=$BIN/.stamp
BINARIES=(etcd kube-apiserver kube-controller-manager kubectl helm)

# The stamp names every pin, so changing one rebuilds (a Go upgrade does not).
stamp_text() { echo "k8s=$K8S_VERSION etcd=$ETCD_VERSION helm=$HELM_VERSION"; }

installed() {
  local b
  [[ -f $STAMP && $(cat "$STAMP") == "$(stamp_text)" ]] || return 1
  for b in "${BINARIES[@]}"; do [[ -x $BIN/$b ]] || return 1; done
}

# quiet CMD...: hides the per-module "downloading" chatter unless CMD fails.
quiet() {
  local out
  out=$("$@" 2>&1) || { printf '%s\n' "$out" >&2; die "failed: $*"; }
}

# Static binaries; -trimpath/-s -w keep them small and free of this machine's paths.
export CGO_ENABLED=0

# k8s.io/kubernetes is not meant to be a dependency: its go.mod requires every
# staging module at v0.0.0 and replaces it with ./staging/src/... . A wrapper
# module that replaces each of them with the published v0.Y.Z tag resolves to
# exactly the dependency set upstream builds with. The list is read from the
# release's own go.mod, so a version bump needs no hand-kept list.
build_kubernetes() (
  local src=$K8S_HOME/build/kubernetes staging gomod pkg p minor ldflags="-s -w"
  local -a edits
  staging=v0.${K8S_VERSION#v1.}
  minor=${K8S_VERSION#v1.} && minor=${minor%%.*}
  rm -rf "$src" && mkdir -p "$src" && cd "$src"

  gomod=$(go mod download -json "k8s.io/kubernetes@$K8S_VERSION" |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["GoMod"])')
  mapfile -t edits < <(go mod edit -json "$gomod" | python3 -c '
import json, sys
m = json.load(sys.stdin)
# Same go line as upstream, so the godebug defaults match too.
print("-go=" + m["Go"])
for r in m.get("Replace") or []:
    if r["New"]["Path"].startswith("./staging/"):
        p = r["Old"]["Path"]
        print("-replace=%s=%s@%s" % (p, p, sys.argv[1]))
' "$staging")
  ((${#edits[@]} > 10)) || die "could not read the staging replaces from $gomod"
  go mod init herald.testbed/k8s >/dev/null 2>&1
  go mod edit "${edits[@]}" -require="k8s.io/kubernetes@$K8S_VERSION"
  # Resolves and records (go.sum, checked against the checksum database)
  # everything the three commands import.
  quiet go get "k8s.io/kubernetes/cmd/kube-apiserver@$K8S_VERSION" \
    "k8s.io/kubernetes/cmd/kube-controller-manager@$K8S_VERSION" \
    "k8s.io/kubernetes/cmd/kubectl@$K8S_VERSION"

  # Version stamps as hack/lib/version.sh sets them; without them the binaries
  # report v0.0.0-master, which helm's kubeVersion checks and `kubectl version` see.
  for p in k8s.io/client-go/pkg/version k8s.io/component-base/version; do
    ldflags+=" -X $p.gitVersion=$K8S_VERSION -X $p.gitMajor=1 -X $p.gitMinor=$minor"
    ldflags+=" -X $p.gitTreeState=clean -X $p.buildDate=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
  done
  for pkg in kube-apiserver kube-controller-manager kubectl; do
    timed "build $pkg" go build -trimpath -ldflags "$ldflags" -o "$BIN/$pkg" "k8s.io/kubernetes/cmd/$pkg"
  done
)

# etcd's server module is itself the etcd main package, but its go.mod has
# replace directives, so `go install ...@version` refuses it; an empty wrapper
# module that requires it builds it with the versions it publishes.
build_etcd() (
  local src=$K8S_HOME/build/etcd
  rm -rf "$src" && mkdir -p "$src" && cd "$src"
  go mod init herald.testbed/etcd >/dev/null 2>&1
  quiet go get "go.etcd.io/etcd/server/v3@$ETCD_VERSION"
  timed "build etcd" go build -trimpath -ldflags "-s -w" -o "$BIN/etcd" go.etcd.io/etcd/server/v3
)

# helm needs no replaces; it goes through a wrapper module too so that
# resolving and downloading (`go get`) stay apart from the timed build. The -X
# flags are the ones helm's Makefile sets; the default Kubernetes version (used
# by `helm template`/`lint` without a cluster) is set to the one we run.
build_helm() (
  local src=$K8S_HOME/build/helm minor=${K8S_VERSION#v1.} ldflags="-s -w" p
  minor=${minor%%.*}
  ldflags+=" -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION"
  ldflags+=" -X helm.sh/helm/v3/internal/version.gitTreeState=clean"
  for p in pkg/lint/rules pkg/chartutil; do
    ldflags+=" -X helm.sh/helm/v3/$p.k8sVersionMajor=1 -X helm.sh/helm/v3/$p.k8sVersionMinor=$minor"
  done
  rm -rf "$src" && mkdir -p "$src" && cd "$src"
  go mod init herald.testbed/helm >/dev/null 2>&1
  quiet go get "helm.sh/helm/v3/cmd/helm@$HELM_VERSION"
  timed "build helm" go build -trimpath -ldflags "$ldflags" -o "$BIN/helm" helm.sh/helm/v3/cmd/helm
)

build_all() {
  build_etcd
  build_helm
  build_kubernetes
}

cmd_install() {
  if installed; then
    log "k8s: $(stamp_text) already built in $BIN"
    return 0
  fi
  command -v go >/dev/null || die "go is required to build the Kubernetes binaries"
  log "k8s: building $(stamp_text) into $BIN (takes minutes)"
  rm -rf "$BIN" && mkdir -p "$BIN"
  timed "k8s install (all)" build_all
  # build/ keeps only the generated wrapper go.mod/go.sum; handy to inspect.
  stamp_text >"$STAMP"
  log "k8s: installed $(stamp_text)"
}

# --- start ---------------------------------------------------------------

DIR=$HERALD_RUN/k8s
PKI=$DIR/pki
CURRENT_LOG=

kubectl_() { "$BIN/kubectl" --kubeconfig="$DIR/kubeconfig" "$@"; }

# Dependents first: an apiserver whose etcd is gone retries until KILLed, and
# lib.sh ends pids in the order they were recorded (etcd first).
stop_reversed() {
  local file=$HERALD_RUN/k8s.pids
  if [[ -f $file ]]; then
    tac "$file" >"$file.tmp" && mv "$file.tmp" "$file"
  fi
  stop_pids k8s
}

# On failure: show why, and leave nothing half-started behind.
on_exit() {
  local rc=$?
  ((rc == 0)) && return 0
  if [[ -n $CURRENT_LOG && -f $CURRENT_LOG ]]; then
    log "k8s: last lines of $CURRENT_LOG:"
    tail -n 40 "$CURRENT_LOG" >&2
  fi
  stop_reversed
  exit "$rc"
}

# leaf NAME SUBJECT EXTENSIONS: a P-256 key and a certificate signed by the test CA.
# Short-lived on purpose: every start makes a new PKI.
leaf() {
  openssl req -new -nodes -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 \
    -keyout "$PKI/$1.key" -out "$PKI/$1.csr" -subj "$2" 2>/dev/null
  openssl x509 -req -in "$PKI/$1.csr" -CA "$PKI/ca.crt" -CAkey "$PKI/ca.key" \
    -set_serial "0x$(openssl rand -hex 16)" -days 7 -out "$PKI/$1.crt" \
    -extfile <(printf '%s\n' "$3") 2>/dev/null
  rm -f "$PKI/$1.csr"
}

make_pki() {
  mkdir -p "$PKI"
  openssl req -x509 -new -nodes -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 \
    -keyout "$PKI/ca.key" -out "$PKI/ca.crt" -days 7 -subj "/CN=herald-testbed-ca" \
    -addext "basicConstraints=critical,CA:TRUE" \
    -addext "keyUsage=critical,keyCertSign,cRLSign,digitalSignature" 2>/dev/null
  # Only 127.0.0.1/localhost are ever dialled; the in-cluster names and the
  # service IP are what a real apiserver certificate carries, kept for fidelity.
  leaf apiserver "/CN=kube-apiserver" "basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
subjectAltName=IP:127.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,IP:$SERVICE_IP"
  local client="basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=clientAuth"
  # system:masters bypasses RBAC for the test harness itself; everything else
  # (controllers, service accounts, whatever the tests create) goes through RBAC.
  leaf admin "/O=system:masters/CN=herald-admin" "$client"
  # The identity kubeadm gives the controller manager; its RBAC role is built in.
  leaf controller-manager "/CN=system:kube-controller-manager" "$client"
  openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$PKI/sa.key" 2>/dev/null
  openssl pkey -in "$PKI/sa.key" -pubout -out "$PKI/sa.pub" 2>/dev/null
  chmod 600 "$PKI"/*.key
}

# make_kubeconfig FILE USER: self-contained (embedded certs), so tests may copy it.
make_kubeconfig() {
  local k=(env KUBECONFIG="$1" "$BIN/kubectl" config)
  "${k[@]}" set-cluster herald --server="https://127.0.0.1:$API_PORT" \
    --certificate-authority="$PKI/ca.crt" --embed-certs=true >/dev/null
  "${k[@]}" set-credentials "$2" --client-certificate="$PKI/$2.crt" \
    --client-key="$PKI/$2.key" --embed-certs=true >/dev/null
  "${k[@]}" set-context herald --cluster=herald --user="$2" >/dev/null
  "${k[@]}" use-context herald >/dev/null
  chmod 600 "$1"
}

# wait_for SECONDS PID DESCRIPTION CMD...: retries CMD until it succeeds.
wait_for() {
  local secs=$1 pid=$2 what=$3 i
  shift 3
  for ((i = 0; i < secs * 4; i++)); do
    if "$@" >/dev/null 2>&1; then return 0; fi
    kill -0 "$pid" 2>/dev/null || die "k8s: process $pid exited while waiting for $what"
    sleep 0.25
  done
  die "k8s: $what not within ${secs}s"
}

cmd_start() {
  installed || die "k8s: binaries missing or stale; run: $0 install"
  local t0=$SECONDS pid
  # A leftover instance would hold the data dir; these are only our own pids.
  stop_reversed
  rm -rf "$DIR" "$HERALD_RUN/k8s.env"
  mkdir -p "$DIR"
  trap on_exit EXIT
  # kubectl would otherwise create ~/.kube/cache.
  export KUBECACHEDIR=$DIR/kube-cache

  # Service ClusterIPs are only ever bookkeeping here (no kube-proxy, nothing
  # dials them). A loopback range keeps even an accidental dial on this host.
  SERVICE_CIDR=127.100.0.0/16
  SERVICE_IP=127.100.0.1
  local etcd_port peer_port
  etcd_port=$(free_port)
  peer_port=$(free_port)
  API_PORT=$(free_port)
  # free_port releases its port at once, so two calls could in principle agree.
  [[ $etcd_port != "$peer_port" && $API_PORT != "$etcd_port" && $API_PORT != "$peer_port" ]] ||
    die "k8s: free_port returned a port twice; run start again"
  make_pki
  make_kubeconfig "$DIR/kubeconfig" admin
  make_kubeconfig "$DIR/controller-manager.kubeconfig" controller-manager

  # etcd: single member, plain HTTP on loopback; fsync off because the data is
  # thrown away at the next start anyway.
  CURRENT_LOG=$DIR/etcd.log
  "$BIN/etcd" --name=herald --data-dir="$DIR/etcd-data" \
    --listen-client-urls="http://127.0.0.1:$etcd_port" \
    --advertise-client-urls="http://127.0.0.1:$etcd_port" \
    --listen-peer-urls="http://127.0.0.1:$peer_port" \
    --initial-advertise-peer-urls="http://127.0.0.1:$peer_port" \
    --initial-cluster="herald=http://127.0.0.1:$peer_port" \
    --initial-cluster-state=new --unsafe-no-fsync \
    --log-level=warn </dev/null >"$CURRENT_LOG" 2>&1 &
  pid=$!
  record_pid k8s "$pid"
  wait_port "$etcd_port" 30 "$pid"

  # --endpoint-reconciler-type=none: the reconciler would publish the advertise
  # address as the endpoint of Service "kubernetes", and Endpoint(Slice)
  # validation rejects loopback addresses (it would log errors forever).
  CURRENT_LOG=$DIR/kube-apiserver.log
  "$BIN/kube-apiserver" \
    --bind-address=127.0.0.1 --advertise-address=127.0.0.1 \
    --secure-port="$API_PORT" --cert-dir="$DIR/apiserver-certs" \
    --etcd-servers="http://127.0.0.1:$etcd_port" \
    --service-cluster-ip-range="$SERVICE_CIDR" \
    --endpoint-reconciler-type=none \
    --client-ca-file="$PKI/ca.crt" \
    --tls-cert-file="$PKI/apiserver.crt" --tls-private-key-file="$PKI/apiserver.key" \
    --service-account-issuer=https://kubernetes.default.svc \
    --service-account-key-file="$PKI/sa.pub" \
    --service-account-signing-key-file="$PKI/sa.key" \
    --authorization-mode=RBAC \
    --allow-privileged=true \
    --profiling=false \
    </dev/null >"$CURRENT_LOG" 2>&1 &
  pid=$!
  record_pid k8s "$pid"
  wait_for 90 "$pid" "kube-apiserver /readyz" kubectl_ get --raw=/readyz

  # --use-service-account-credentials: each controller acts as its own service
  # account with its own RBAC role, as in a kubeadm cluster.
  # --secure-port=0: no health/metrics endpoint, nothing to authenticate there.
  # --flex-volume-plugin-dir: the default is under /usr/libexec, which it creates.
  # --cluster-signing-*: lets the CSR signing controllers run (they are skipped
  # without a CA), so CertificateSigningRequests behave as in kubeadm.
  CURRENT_LOG=$DIR/kube-controller-manager.log
  "$BIN/kube-controller-manager" \
    --kubeconfig="$DIR/controller-manager.kubeconfig" \
    --bind-address=127.0.0.1 --secure-port=0 \
    --leader-elect=false \
    --controllers='*' \
    --use-service-account-credentials=true \
    --service-account-private-key-file="$PKI/sa.key" \
    --root-ca-file="$PKI/ca.crt" \
    --cluster-signing-cert-file="$PKI/ca.crt" --cluster-signing-key-file="$PKI/ca.key" \
    --service-cluster-ip-range="$SERVICE_CIDR" \
    --flex-volume-plugin-dir="$DIR/flexvolume" \
    --profiling=false \
    </dev/null >"$CURRENT_LOG" 2>&1 &
  pid=$!
  record_pid k8s "$pid"

  # Self-check: the API answers with our credentials, and the controller manager
  # works (its serviceaccount controller creates "default" in every namespace).
  CURRENT_LOG=$DIR/kube-apiserver.log
  kubectl_ get namespaces >/dev/null || die "k8s: kubectl get namespaces failed"
  CURRENT_LOG=$DIR/kube-controller-manager.log
  wait_for 30 "$pid" "ServiceAccount default/default" kubectl_ -n default get serviceaccount default

  # KUBECACHEDIR / HELM_*_HOME keep kubectl's discovery cache and helm's state
  # in the run dir instead of $HOME.
  cat >"$HERALD_RUN/k8s.env" <<EOF
export KUBECONFIG='$DIR/kubeconfig'
export HERALD_KUBECTL='$BIN/kubectl'
export HERALD_HELM='$BIN/helm'
export HERALD_K8S_VERSION='$K8S_VERSION'
export KUBECACHEDIR='$DIR/kube-cache'
export HELM_CACHE_HOME='$DIR/helm/cache'
export HELM_CONFIG_HOME='$DIR/helm/config'
export HELM_DATA_HOME='$DIR/helm/data'
export PATH='$BIN':"\$PATH"
EOF
  CURRENT_LOG=
  trap - EXIT
  log "k8s: $K8S_VERSION API at https://127.0.0.1:$API_PORT (etcd 127.0.0.1:$etcd_port), ready in $((SECONDS - t0))s"
}

cmd_stop() { stop_reversed; }

case ${1:-} in
  install) cmd_install ;;
  start) cmd_start ;;
  stop) cmd_stop ;;
  *) die "usage: $0 install|start|stop" ;;
esac
