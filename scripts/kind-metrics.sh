#!/usr/bin/env bash
# kind-metrics.sh - port-forward the bundled Prometheus (127.0.0.1:9090) and, when enabled, Grafana
# (127.0.0.1:3000) until Ctrl-C.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/kind-common.sh"
PROMETHEUS_PORT="${PROMETHEUS_PORT:-9090}"
GRAFANA_PORT="${GRAFANA_PORT:-3000}"
require_tools kind kubectl
require_cluster
NAME="$(fullname)"
kc get service "$NAME-prometheus" >/dev/null 2>&1 \
  || die "no Prometheus in release '$RELEASE' (install with --set metrics.prometheus.enabled=true, as deploy/kind/values.yaml does)"

pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true' EXIT INT TERM
kc port-forward --address 127.0.0.1 service/"$NAME-prometheus" "$PROMETHEUS_PORT:9090" >/dev/null &
pids+=("$!")
echo "Prometheus: http://127.0.0.1:$PROMETHEUS_PORT/graph?g0.expr=sum%20by%20(outcome)%20(rate(engram_history_loads_total%5B1m%5D))"
if kc get service "$NAME-grafana" >/dev/null 2>&1; then
  kc port-forward --address 127.0.0.1 service/"$NAME-grafana" "$GRAFANA_PORT:3000" >/dev/null &
  pids+=("$!")
  echo "Grafana:    http://127.0.0.1:$GRAFANA_PORT/  (the Engram dashboard is the home page)"
fi
echo "Ctrl-C stops the port-forwards."
wait
