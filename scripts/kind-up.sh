#!/usr/bin/env bash
# kind-up.sh - a local Engram on kind: create the cluster from deploy/kind if absent, build the image,
# load it into the nodes, install (or upgrade) the chart with a sample tenant, wait for the rollout and
# print the URL, the tenant's API key and how to watch the metrics. Idempotent: a second run upgrades.
#
# Settings (environment): KIND_CLUSTER, NAMESPACE, RELEASE (see kind-common.sh),
#   IMAGE_TAG        tag of the built image (default dev-<UTC timestamp>; never "latest")
#   KIND_NODE_IMAGE  kindest/node image for a new cluster (default: the one your kind version pins)
#   HELM_EXTRA_ARGS  extra arguments for helm upgrade --install (e.g. "--set chat.replicaCount=5")
#   KIND_UP_EXISTING_CONTEXT  a kubectl context of a cluster that already exists (KUBECONFIG selects the file):
#                    only the Kubernetes half runs there (CRD, chart, rollout, tenant, key); no kind cluster is
#                    created and no image is built or loaded, so IMAGE_TAG must name an image that cluster can
#                    pull. tests/kube_real/test_kind_up.py runs it against scripts/control-plane.sh this way.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/kind-common.sh"

if [[ -n "${KIND_UP_EXISTING_CONTEXT:-}" ]]; then
  require_tools kubectl helm
  [[ -n "${IMAGE_TAG:-}" ]] \
    || die "KIND_UP_EXISTING_CONTEXT is set: set IMAGE_TAG too (an engram image that cluster can pull; nothing is built)"
  CONTEXT="$KIND_UP_EXISTING_CONTEXT"
  IMAGE="engram:$IMAGE_TAG"
  "$KUBECTL" --context "$CONTEXT" get --raw /readyz >/dev/null 2>&1 \
    || die "the API server of context '$CONTEXT' does not answer (KUBECONFIG=${KUBECONFIG:-~/.kube/config})"
  say "using the existing cluster of context '$CONTEXT' (no kind, no image build or load)"
else
  require_tools docker kind kubectl helm
  IMAGE_TAG="${IMAGE_TAG:-dev-$(date -u +%Y%m%d%H%M%S)}"
  IMAGE="engram:$IMAGE_TAG"

  if kind get clusters 2>/dev/null | grep -qx "$KIND_CLUSTER"; then
    say "kind cluster '$KIND_CLUSTER' exists: reusing it"
  else
    say "creating kind cluster '$KIND_CLUSTER' from deploy/kind/cluster.yaml"
    kind create cluster --name "$KIND_CLUSTER" --config "$KIND_CONFIG" --wait 180s \
      ${KIND_NODE_IMAGE:+--image "$KIND_NODE_IMAGE"}
  fi
  require_cluster

  say "building $IMAGE"
  docker build --tag "$IMAGE" "$ROOT"
  say "loading $IMAGE into the kind nodes"
  kind load docker-image "$IMAGE" --name "$KIND_CLUSTER"
fi

# Helm installs crds/ on the first install only and never upgrades them: apply the CRD every time.
say "applying the MemoryNamespace CRD"
"$KUBECTL" --context "$CONTEXT" apply --server-side --force-conflicts -f "$CHART/crds/"
"$KUBECTL" --context "$CONTEXT" wait --for condition=Established --timeout=60s \
  crd/memorynamespaces.engram.dev

say "installing release '$RELEASE' into namespace '$NAMESPACE'"
# shellcheck disable=SC2086  # HELM_EXTRA_ARGS is a list of arguments on purpose
hc upgrade --install "$RELEASE" "$CHART" --create-namespace \
  --values "$KIND_VALUES" --set image.tag="$IMAGE_TAG" \
  --wait --timeout 10m ${HELM_EXTRA_ARGS:-}

NAME="$(fullname)"
say "waiting for the rollout"
kc rollout status statefulset/"$NAME-redis" --timeout=5m
kc rollout status deployment/"$NAME-operator" --timeout=5m
kc rollout status deployment/"$NAME-chat" --timeout=5m

say "waiting for the sample tenant 'demo'"
if ! kc wait memorynamespace/demo --for=jsonpath='{.status.phase}'=Ready --timeout=120s >/dev/null; then
  kc get memorynamespace demo -o yaml >&2 || true
  die "MemoryNamespace demo did not become Ready (operator logs: kubectl --context $CONTEXT -n $NAMESPACE logs deployment/$NAME-operator)"
fi
KEY="$(tenant_key demo)"

cat <<DONE

Engram is running on ${KIND_UP_EXISTING_CONTEXT:+the existing cluster of }${KIND_UP_EXISTING_CONTEXT:-kind cluster '$KIND_CLUSTER'} (context $CONTEXT, namespace $NAMESPACE, image $IMAGE).

  Chat page      http://127.0.0.1:8080/   (paste the API key below into the page's API key box)
  API key (demo) $KEY

  Try it:        curl -s http://127.0.0.1:8080/v1/chat -H "Authorization: Bearer $KEY" \\
                   -H 'Content-Type: application/json' -d '{"session_id":"s1","message":"hello"}'
  Metrics:       make metrics      (Prometheus on http://127.0.0.1:9090, Grafana on http://127.0.0.1:3000)
  Load:          make load         (engram loadgen through the NodePort, a new connection per request)
  Scale:         make scale REPLICAS=5
  Check:         $HELM --kube-context $CONTEXT -n $NAMESPACE test $RELEASE --logs
  Tear down:     make kind-down
DONE
