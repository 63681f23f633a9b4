# Shared helpers for the test-bed scripts. Source it; do not run it.
#
# Two directories, both outside the source tree's tracked files:
#   HERALD_CACHE  downloads and builds, kept across runs and clones (under $HOME).
#   HERALD_RUN    one test-bed instance: data dirs, logs, pid files, env files.
# Every service script takes `install`, `start` or `stop`. `start` writes
# $HERALD_RUN/<name>.env (shell `export` lines the tests read) and records every
# process it launches in $HERALD_RUN/<name>.pids, so `stop` ends exactly those.

set -euo pipefail

HERALD_ROOT=${HERALD_ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)}
HERALD_CACHE=${HERALD_CACHE:-$HOME/.cache/herald}
HERALD_RUN=${HERALD_RUN:-$HERALD_ROOT/target/testbed}
mkdir -p "$HERALD_CACHE" "$HERALD_RUN"

log() { printf '[testbed %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# free_port: prints a TCP port on 127.0.0.1 that nothing listens on right now.
free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
}

# wait_port PORT SECONDS [PID]: waits until 127.0.0.1:PORT accepts a connection.
# Fails early if PID (when given) has exited.
wait_port() {
  local port=$1 secs=$2 pid=${3:-} i
  for ((i = 0; i < secs * 10; i++)); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then return 0; fi
    if [[ -n $pid ]] && ! kill -0 "$pid" 2>/dev/null; then
      die "process $pid exited before 127.0.0.1:$port opened"
    fi
    sleep 0.1
  done
  die "127.0.0.1:$port did not open within ${secs}s"
}

# record_pid NAME PID: remembers a process that `stop_pids NAME` must end.
record_pid() { echo "$2" >>"$HERALD_RUN/$1.pids"; }

# stop_pids NAME: TERM each recorded process, wait up to 10 s, then KILL.
stop_pids() {
  local file="$HERALD_RUN/$1.pids" pid i
  [[ -f $file ]] || return 0
  while read -r pid; do
    [[ -n $pid ]] || continue
    kill -TERM "$pid" 2>/dev/null || continue
    for ((i = 0; i < 100; i++)); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
  done <"$file"
  rm -f "$file"
}

# make_certs DIR: a throw-away CA (DIR/ca.pem) and a server certificate for
# 127.0.0.1 and localhost signed by it (DIR/server.pem, key DIR/server.key,
# PKCS#8, unencrypted; DIR/server-bundle.pem = key + certificate, the PEM
# keystore Kafka reads), plus a second CA that signed nothing
# (DIR/other-ca.pem) for "untrusted CA" tests. P-256 keys: quick to make.
make_certs() {
  local dir=$1
  mkdir -p "$dir"
  (
    cd "$dir"
    local ec=(-newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes)
    openssl req -x509 "${ec[@]}" -days 7 -subj /CN=herald-testbed-ca -keyout ca.key -out ca.pem \
      -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign 2>/dev/null
    openssl req -x509 "${ec[@]}" -days 7 -subj /CN=herald-testbed-other-ca -keyout other-ca.key \
      -out other-ca.pem -addext basicConstraints=critical,CA:TRUE 2>/dev/null
    openssl req "${ec[@]}" -subj /CN=127.0.0.1 -keyout server.key -out server.csr 2>/dev/null
    printf '%s\n' 'subjectAltName=IP:127.0.0.1,DNS:localhost' 'basicConstraints=CA:FALSE' \
      'keyUsage=critical,digitalSignature' 'extendedKeyUsage=serverAuth' >server.ext
    openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 7 \
      -extfile server.ext -out server.pem 2>/dev/null
    cat server.key server.pem >server-bundle.pem
    chmod 600 ./*.key server-bundle.pem
  ) || die "could not make test certificates in $dir"
}

# timed LABEL CMD...: runs CMD and appends "LABEL seconds" to $HERALD_RUN/timings.txt.
timed() {
  local label=$1 start end
  shift
  start=$(date +%s)
  "$@"
  end=$(date +%s)
  printf '%-28s %5ss\n' "$label" "$((end - start))" | tee -a "$HERALD_RUN/timings.txt" >&2
}
