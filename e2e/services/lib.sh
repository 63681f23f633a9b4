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

# timed LABEL CMD...: runs CMD and appends "LABEL seconds" to $HERALD_RUN/timings.txt.
timed() {
  local label=$1 start end
  shift
  start=$(date +%s)
  "$@"
  end=$(date +%s)
  printf '%-28s %5ss\n' "$label" "$((end - start))" | tee -a "$HERALD_RUN/timings.txt" >&2
}
