#!/usr/bin/env bash
# kind-down.sh - delete the kind cluster (and with it every volume: the Redis data is gone).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/kind-common.sh"
require_tools kind
if kind get clusters 2>/dev/null | grep -qx "$KIND_CLUSTER"; then
  say "deleting kind cluster '$KIND_CLUSTER'"
  kind delete cluster --name "$KIND_CLUSTER"
else
  say "no kind cluster named '$KIND_CLUSTER': nothing to do"
fi
