#!/usr/bin/env bash
# Stops every test-bed service that up.sh started, by the pids it recorded.
# Safe to run twice, or when nothing is running.

source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

status=0
for service in k8s kafka redis; do
  bash "$HERALD_ROOT/e2e/services/$service.sh" stop || status=1
done
rm -f "$HERALD_RUN/env"
exit $status
