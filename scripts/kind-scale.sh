#!/usr/bin/env bash
# kind-scale.sh N - set the chat service to N replicas through Helm (so the next upgrade keeps it) and
# wait for the rollout. Sessions are not sticky, so chats go on while pods come and go.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/kind-common.sh"
REPLICAS="${1:-${REPLICAS:-}}"
[[ "$REPLICAS" =~ ^[0-9]+$ ]] || die "usage: make scale REPLICAS=<number> (got '${REPLICAS}')"
require_tools kind kubectl helm
require_cluster
hc status "$RELEASE" >/dev/null 2>&1 || die "release '$RELEASE' is not installed in namespace '$NAMESPACE': run \`make kind-up\`"
say "scaling the chat service to $REPLICAS replicas"
hc upgrade "$RELEASE" "$CHART" --reuse-values --set chat.replicaCount="$REPLICAS" --wait --timeout 5m
kc rollout status deployment/"$(fullname)-chat" --timeout=5m
kc get pods -l app.kubernetes.io/instance="$RELEASE",app.kubernetes.io/component=chat -o wide
