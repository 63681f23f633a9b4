#!/usr/bin/env bash
# Test-bed service: a real Redis server (Debian's redis-server) on a free
# 127.0.0.1 port, no persistence, so every test-bed start is a clean store.
#
#   redis.sh install   apt-get install redis-server, unless it is already there
#   redis.sh start     start it, wait for PING, write $HERALD_RUN/redis.env
#   redis.sh stop      stop the server started by `start`
#
# Tests read HERALD_REDIS_URL (redis://127.0.0.1:PORT/) from redis.env.

source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

REDIS_RUN="$HERALD_RUN/redis"

install() {
  if command -v redis-server >/dev/null && command -v redis-cli >/dev/null; then
    log "redis already installed: $(redis-server --version | cut -d' ' -f3)"
    return 0
  fi
  log "installing redis-server from Debian's packages"
  # The package list may be missing or stale on a new machine.
  DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    redis-server redis-tools >/dev/null
  # The package starts a system-wide instance on 6379 where an init system
  # runs; the test bed never uses it and keeps to its own port.
}

start() {
  stop_pids redis
  rm -rf "$REDIS_RUN" "$HERALD_RUN/redis.env"
  mkdir -p "$REDIS_RUN"
  local port
  port=$(free_port)
  # No RDB/AOF: the test bed is throw-away and persistence costs fsyncs.
  redis-server --bind 127.0.0.1 --port "$port" --protected-mode yes \
    --save '' --appendonly no --dir "$REDIS_RUN" --daemonize no \
    --logfile "$REDIS_RUN/redis.log" </dev/null >>"$REDIS_RUN/redis.log" 2>&1 &
  local pid=$!
  record_pid redis "$pid"
  wait_port "$port" 20 "$pid" || { tail -n 20 "$REDIS_RUN/redis.log" >&2; exit 1; }
  [[ $(redis-cli -h 127.0.0.1 -p "$port" ping) == PONG ]] || die "redis on $port does not answer PING"
  echo "export HERALD_REDIS_URL=redis://127.0.0.1:$port/" >"$HERALD_RUN/redis.env"
  log "redis ready on 127.0.0.1:$port (pid $pid)"
}

stop() { stop_pids redis; }

case "${1:-}" in
  install | start | stop) "$1" ;;
  *) die "usage: $0 install|start|stop" ;;
esac
