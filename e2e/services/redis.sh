#!/usr/bin/env bash
# Test-bed service: a real Redis server (Debian's redis-server) on a free
# 127.0.0.1 port, no persistence, so every test-bed start is a clean store.
#
#   redis.sh install   apt-get install redis-server, unless it is already there
#   redis.sh start     start it, wait for PING, write $HERALD_RUN/redis.env
#   redis.sh stop      stop the server started by `start`
#
# Tests read HERALD_REDIS_URL (redis://127.0.0.1:PORT/) from redis.env. The
# same server also listens with TLS on a second port (certificates made at
# start by openssl, e2e/services/lib.sh make_certs), where clients must log in
# as an ACL user; redis.env names it:
#   HERALD_REDIS_TLS_URL       rediss://127.0.0.1:TLS_PORT/ (no credentials)
#   HERALD_REDIS_TLS_CA        the CA that signed the server certificate
#   HERALD_REDIS_TLS_OTHER_CA  a CA that did not (untrusted-CA tests)
#   HERALD_REDIS_TLS_USER, HERALD_REDIS_TLS_PASSWORD   the ACL user
# The plain port keeps the default user without a password, as before.

source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

REDIS_RUN="$HERALD_RUN/redis"

install() {
  if command -v redis-server >/dev/null && command -v redis-cli >/dev/null &&
    command -v openssl >/dev/null; then
    log "redis already installed: $(redis-server --version | cut -d' ' -f3)"
    return 0
  fi
  log "installing redis-server from Debian's packages"
  # The package list may be missing or stale on a new machine.
  DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    redis-server redis-tools openssl >/dev/null
  # The package starts a system-wide instance on 6379 where an init system
  # runs; the test bed never uses it and keeps to its own port.
}

start() {
  stop_pids redis
  rm -rf "$REDIS_RUN" "$HERALD_RUN/redis.env"
  mkdir -p "$REDIS_RUN"
  local port tls_port tls="$REDIS_RUN/tls" user=herald password
  port=$(free_port)
  tls_port=$(free_port)
  while [[ $tls_port == "$port" ]]; do tls_port=$(free_port); done
  password=$(python3 -c 'import secrets; print(secrets.token_hex(12))')
  make_certs "$tls"
  # No RDB/AOF: the test bed is throw-away and persistence costs fsyncs.
  # The ACL user may do everything; the default user stays open (plain port).
  # No client certificates: clients authenticate with the ACL user.
  redis-server --bind 127.0.0.1 --port "$port" --protected-mode yes \
    --tls-port "$tls_port" --tls-cert-file "$tls/server.pem" --tls-key-file "$tls/server.key" \
    --tls-ca-cert-file "$tls/ca.pem" --tls-auth-clients no \
    --user "$user" on ">$password" '~*' '&*' '+@all' \
    --save '' --appendonly no --dir "$REDIS_RUN" --daemonize no \
    --logfile "$REDIS_RUN/redis.log" </dev/null >>"$REDIS_RUN/redis.log" 2>&1 &
  local pid=$!
  record_pid redis "$pid"
  wait_port "$port" 20 "$pid" || { tail -n 20 "$REDIS_RUN/redis.log" >&2; exit 1; }
  wait_port "$tls_port" 20 "$pid" || { tail -n 20 "$REDIS_RUN/redis.log" >&2; exit 1; }
  [[ $(redis-cli -h 127.0.0.1 -p "$port" ping) == PONG ]] || die "redis on $port does not answer PING"
  [[ $(redis-cli -h 127.0.0.1 -p "$tls_port" --tls --cacert "$tls/ca.pem" --user "$user" \
    --pass "$password" --no-auth-warning ping) == PONG ]] ||
    die "redis on $tls_port does not answer PING over TLS as $user"
  {
    echo "export HERALD_REDIS_URL=redis://127.0.0.1:$port/"
    echo "export HERALD_REDIS_TLS_URL=rediss://127.0.0.1:$tls_port/"
    echo "export HERALD_REDIS_TLS_CA=$tls/ca.pem"
    echo "export HERALD_REDIS_TLS_OTHER_CA=$tls/other-ca.pem"
    echo "export HERALD_REDIS_TLS_USER=$user"
    echo "export HERALD_REDIS_TLS_PASSWORD=$password"
  } >"$HERALD_RUN/redis.env"
  log "redis ready on 127.0.0.1:$port, TLS on 127.0.0.1:$tls_port (pid $pid)"
}

stop() { stop_pids redis; }

case "${1:-}" in
  install | start | stop) "$1" ;;
  *) die "usage: $0 install|start|stop" ;;
esac
