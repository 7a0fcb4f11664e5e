#!/usr/bin/env bash
# kind-load.sh - drive conversations through the kind NodePort with `engram loadgen`, a new connection per
# request (a Kubernetes Service balances connections, not requests), as tenant "demo".
#   SESSIONS, TURNS, CONCURRENCY (defaults 20, 10, 5); URL (default http://127.0.0.1:8080)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/kind-common.sh"
URL="${URL:-http://127.0.0.1:8080}"
ENGRAM="${ENGRAM:-$ROOT/.venv/bin/engram}"
[[ -x "$ENGRAM" ]] || ENGRAM="$(command -v engram || true)"
[[ -n "$ENGRAM" ]] || die "engram CLI not found: run \`make install\` (or \`uv sync\`) first"
require_tools kind kubectl
require_cluster
KEY="${ENGRAM_API_KEY:-$(tenant_key demo)}"
[[ -n "$KEY" ]] || die "no API key: the MemoryNamespace 'demo' is not Ready (kubectl --context $CONTEXT -n $NAMESPACE get memns)"
say "engram loadgen against $URL"
exec "$ENGRAM" loadgen --url "$URL" --api-key "$KEY" --no-keepalive \
  --sessions "${SESSIONS:-20}" --turns "${TURNS:-10}" --concurrency "${CONCURRENCY:-5}"
