#!/usr/bin/env bash
# Test-bed tool: a headless browser (Debian's chromium) for the comet's
# browser test, which drives it with a page that speaks goim over WebSocket.
#
#   chromium.sh install   apt-get install chromium, unless it is already there
#   chromium.sh start     write $HERALD_RUN/chromium.env (nothing runs: each
#                         test starts its own browser and stops it by pid)
#   chromium.sh stop      nothing to stop
#
# Tests read HERALD_CHROMIUM (the browser binary) from chromium.env.

source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

# The real binary: /usr/bin/chromium is a wrapper script that adds flags from
# /etc/chromium.d, which the tests do not want.
binary() {
  if [[ -x /usr/lib/chromium/chromium ]]; then
    echo /usr/lib/chromium/chromium
  else
    command -v chromium
  fi
}

install() {
  if binary >/dev/null; then
    log "chromium already installed: $("$(binary)" --version 2>/dev/null)"
    return 0
  fi
  log "installing chromium from Debian's packages"
  DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null
  binary >/dev/null || die "chromium installed but no binary found"
}

start() {
  local bin
  bin=$(binary) || die "chromium is not installed: run $0 install"
  echo "export HERALD_CHROMIUM=$bin" >"$HERALD_RUN/chromium.env"
  log "chromium at $bin"
}

stop() { :; }

case "${1:-}" in
  install | start | stop) "$1" ;;
  *) die "usage: $0 install|start|stop" ;;
esac
