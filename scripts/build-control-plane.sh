#!/usr/bin/env bash
# Build a local Kubernetes control plane from Go modules, cached outside the repo.
#
#   scripts/build-control-plane.sh            build if missing; print the bin dir on stdout (last line)
#   scripts/build-control-plane.sh --print    print the bin dir only (no build; exit 1 if it is not built)
#
# Binaries: etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kubectl, kwok.
# Cache: ${ENGRAM_CONTROL_PLANE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/engram/control-plane}/<versions>/bin
# Go's own caches (GOPATH, GOMODCACHE, GOCACHE) live under the same cache root unless the caller set them,
# so nothing is ever written into the repository.
#
# Why a generated module: `go install k8s.io/kubernetes/cmd/...@vX` is refused because k8s.io/kubernetes's go.mod
# has replace directives (its staging modules point at ./staging/...). A main module of our own may carry
# replace directives, so we require k8s.io/kubernetes and replace every staging module with its published
# v0.X.Y twin. The staging list is read from the downloaded go.mod, never hard-coded, so a new release's new
# staging module is picked up.
set -euo pipefail

K8S_VERSION="${ENGRAM_K8S_VERSION:-v1.36.3}"
ETCD_VERSION="${ENGRAM_ETCD_VERSION:-v3.6.16}"
KWOK_VERSION="${ENGRAM_KWOK_VERSION:-v0.8.0}"
GO="${GO:-$(command -v go || echo /usr/local/go/bin/go)}"
# Parallel compile jobs. Two by default (this machine's cores); the whole build runs under nice so other work
# on the machine keeps priority.
JOBS="${ENGRAM_CONTROL_PLANE_BUILD_JOBS:-2}"

CACHE_ROOT="${ENGRAM_CONTROL_PLANE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/engram/control-plane}"
KEY="k8s-${K8S_VERSION}_etcd-${ETCD_VERSION}_kwok-${KWOK_VERSION}"
DEST="$CACHE_ROOT/$KEY"
BINARIES=(etcd kube-apiserver kube-controller-manager kube-scheduler kubectl kwok)

log() { printf '[build-control-plane] %s\n' "$*" >&2; }

is_built() {
  local b
  [[ -f "$DEST/.complete" ]] || return 1
  for b in "${BINARIES[@]}"; do [[ -x "$DEST/bin/$b" ]] || return 1; done
}

if [[ "${1:-}" == "--print" ]]; then
  is_built || { log "not built: $DEST (run scripts/build-control-plane.sh)"; exit 1; }
  echo "$DEST/bin"
  exit 0
fi

# Warm path: no go invocation at all, so it costs milliseconds.
if is_built; then
  log "cached: $DEST/bin"
  echo "$DEST/bin"
  exit 0
fi

[[ -x "$GO" ]] || { log "go not found (set GO=/path/to/go)"; exit 1; }
mkdir -p "$CACHE_ROOT"

# One builder at a time per cache root: a second caller waits, then finds the cache warm.
exec 9>"$CACHE_ROOT/.lock"
if command -v flock >/dev/null; then flock 9; fi
if is_built; then echo "$DEST/bin"; exit 0; fi

export GOPATH="${GOPATH:-$CACHE_ROOT/go}"
export GOMODCACHE="${GOMODCACHE:-$GOPATH/pkg/mod}"
export GOCACHE="${GOCACHE:-$CACHE_ROOT/go-build}"
# -modcacherw: the module cache stays deletable with plain rm -rf.
export GOFLAGS="-modcacherw -buildvcs=false -p=$JOBS"
export CGO_ENABLED=0 GOTOOLCHAIN=local GOWORK=off

# Build into a temp dir beside the destination and rename at the end: an interrupted build leaves no half cache,
# only a temp dir that the next run removes.
rm -rf "$CACHE_ROOT"/.tmp-"$KEY".* 2>/dev/null || true
WORK="$(mktemp -d "$CACHE_ROOT/.tmp-$KEY.XXXXXX")"
trap 'cp "$WORK/go.log" "$CACHE_ROOT/last-build.log" 2>/dev/null; rm -rf "$WORK"' EXIT
# bash skips the EXIT trap when a signal kills it; turning the signals into an exit runs it.
trap 'exit 130' INT TERM HUP
mkdir -p "$WORK/bin"

gorun() { nice -n 19 "$GO" "$@"; }
# A go step whose output goes to a log; on failure the log's tail (the exact go error) is shown.
step() {
  if ! gorun "$@" >>"$WORK/go.log" 2>&1; then
    log "FAILED: go $*"
    tail -n 30 "$WORK/go.log" >&2
    exit 1
  fi
}

start_all=$(date +%s)

# --- Kubernetes -------------------------------------------------------------------------------------------------
k8s_start=$(date +%s)
mkdir -p "$WORK/k8s"
cd "$WORK/k8s"
step mod init engram.local/control-plane/k8s
k8s_modfile="$(gorun mod download -json "k8s.io/kubernetes@$K8S_VERSION" | sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",$/\1/p')"
[[ -f "$k8s_modfile" ]] || { log "could not download k8s.io/kubernetes@$K8S_VERSION"; exit 1; }
staging_version="v0.${K8S_VERSION#v1.}"
# Lines look like `k8s.io/api => ./staging/src/k8s.io/api` (inside a replace block, or after `replace`).
mapfile -t staging < <(sed -n 's#^[[:space:]]*\(replace[[:space:]]\+\)\?\(k8s\.io/[^[:space:]]*\)[[:space:]]\+=>[[:space:]]\+\./staging/.*#\2#p' "$k8s_modfile" | sort -u)
((${#staging[@]} > 10)) || { log "found only ${#staging[@]} staging modules in $k8s_modfile"; exit 1; }
log "k8s.io/kubernetes $K8S_VERSION: ${#staging[@]} staging modules replaced by $staging_version"
go_directive="$(sed -n 's/^go \([0-9.]*\)$/\1/p' "$k8s_modfile")"
{
  echo "module engram.local/control-plane/k8s"
  echo
  echo "go ${go_directive:-1.24}"
  echo
  echo "require k8s.io/kubernetes $K8S_VERSION"
  echo
  echo "replace ("
  for m in "${staging[@]}"; do echo "	$m => $m $staging_version"; done
  echo ")"
} >go.mod
k8s_pkgs=(k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager
  k8s.io/kubernetes/cmd/kube-scheduler k8s.io/kubernetes/cmd/kubectl)
# `go get` of the main packages resolves every module they need into go.mod/go.sum.
step get "${k8s_pkgs[@]/%/@$K8S_VERSION}"
ver="${K8S_VERSION#v}"
major="${ver%%.*}"
minor="${ver#*.}"
minor="${minor%%.*}"
ldflags="-s -w"
# Without these, /version says v0.0.0 and helm (kubeVersion checks) and kubectl's version skew warnings misbehave.
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  ldflags+=" -X $pkg.gitVersion=$K8S_VERSION -X $pkg.gitMajor=$major -X $pkg.gitMinor=$minor"
  ldflags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
done
log "building ${k8s_pkgs[*]##*/} (-p=$JOBS, nice 19)"
step build -trimpath -ldflags "$ldflags" -o "$WORK/bin/" "${k8s_pkgs[@]}"
log "kubernetes built in $(($(date +%s) - k8s_start)) s"

# --- etcd: its server module is the main package; its own go.mod has replace directives, hence a wrapper -------
etcd_start=$(date +%s)
mkdir -p "$WORK/etcd"
cd "$WORK/etcd"
printf 'module engram.local/control-plane/etcd\n\ngo 1.24\n' >go.mod
step get "go.etcd.io/etcd/server/v3@$ETCD_VERSION"
step build -trimpath -ldflags "-s -w" -o "$WORK/bin/etcd" go.etcd.io/etcd/server/v3
log "etcd built in $(($(date +%s) - etcd_start)) s"

# --- kwok: fake nodes whose pods become Running and Ready without a kubelet --------------------------------------
kwok_start=$(date +%s)
mkdir -p "$WORK/kwok"
cd "$WORK/kwok"
printf 'module engram.local/control-plane/kwok\n\ngo 1.24\n' >go.mod
step get "sigs.k8s.io/kwok/cmd/kwok@$KWOK_VERSION"
step build -trimpath -ldflags "-s -w -X sigs.k8s.io/kwok/pkg/consts.Version=$KWOK_VERSION" -o "$WORK/bin/kwok" sigs.k8s.io/kwok/cmd/kwok
log "kwok built in $(($(date +%s) - kwok_start)) s"

cd "$CACHE_ROOT"
for b in "${BINARIES[@]}"; do [[ -x "$WORK/bin/$b" ]] || { log "missing $b after build"; exit 1; }; done
"$WORK/bin/kube-apiserver" --version >&2
"$WORK/bin/etcd" --version | sed -n 1p >&2  # (sed reads it all: head could end etcd with SIGPIPE, 141 under pipefail)
printf 'k8s=%s\netcd=%s\nkwok=%s\ngo=%s\nbuild_seconds=%s\n' "$K8S_VERSION" "$ETCD_VERSION" "$KWOK_VERSION" \
  "$("$GO" env GOVERSION)" "$(($(date +%s) - start_all))" >"$WORK/.complete"
# Keep only bin/ and the stamp; the generated modules are throwaway.
rm -rf "$WORK/k8s" "$WORK/etcd" "$WORK/kwok"
cp "$WORK/go.log" "$CACHE_ROOT/last-build.log" 2>/dev/null || true
rm -rf "$DEST"
mv "$WORK" "$DEST"
trap - EXIT
log "built in $(($(date +%s) - start_all)) s: $DEST/bin"
echo "$DEST/bin"
