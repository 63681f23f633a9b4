#!/usr/bin/env bash
# Brings up the whole test bed: installs (cached) and starts every real service
# the tests need, on loopback, then writes $HERALD_RUN/env for the tests to
# source. Each phase's duration is appended to $HERALD_RUN/timings.txt.
#
#   up.sh [SERVICE...]   default: redis kafka k8s chromium
#
# Stop everything with down.sh (by recorded pid), also after a failure.

source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

services=("$@")
[[ ${#services[@]} -gt 0 ]] || services=(redis kafka k8s chromium)

for service in "${services[@]}"; do
  timed "install $service" bash "$HERALD_ROOT/e2e/services/$service.sh" install
done
for service in "${services[@]}"; do
  timed "start $service" bash "$HERALD_ROOT/e2e/services/$service.sh" start
done

{
  echo "# Written by e2e/services/up.sh: where each test-bed service listens."
  for service in "${services[@]}"; do cat "$HERALD_RUN/$service.env"; done
} >"$HERALD_RUN/env"
log "test bed up: $(grep -c '^export' "$HERALD_RUN/env") variables in $HERALD_RUN/env"
