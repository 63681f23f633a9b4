#!/usr/bin/env bash
# Tools of the container-image phases (scripts/image.sh): Debian's buildah
# (builds the Dockerfile without a daemon, runs the image with chroot
# isolation), mmdebstrap (makes the Debian base images locally, because no
# container registry can be reached from the test machines) and shellcheck
# (actionlint checks the workflows' scripts with it).
#
#   buildah.sh install   apt-get install them, unless already there
#   buildah.sh start     nothing to start (kept for up.sh's interface)
#   buildah.sh stop      nothing to stop
#
# It is not one of up.sh's default services: scripts/image.sh installs it.

# shellcheck source=e2e/services/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

install() {
  if command -v buildah >/dev/null && command -v mmdebstrap >/dev/null && command -v shellcheck >/dev/null; then
    log "buildah already installed: $(buildah --version | cut -d' ' -f3), mmdebstrap $(mmdebstrap --version | cut -d' ' -f2)"
    return 0
  fi
  log "installing buildah, mmdebstrap and shellcheck from Debian's packages"
  # The package list may be missing or stale on a new machine.
  DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    buildah mmdebstrap shellcheck >/dev/null
}

case "${1:-}" in
  install) install ;;
  start) : >"$HERALD_RUN/buildah.env" ;;
  stop) ;;
  *) die "usage: $0 install|start|stop" ;;
esac
