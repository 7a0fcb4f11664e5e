#!/usr/bin/env bash
# ensure-uv.sh - print the path of a uv binary, installing a pinned uv into ./.tools/uv when none is found.
#
# Why a fixed place: `pip install uv` puts the binary wherever that pip's scheme says (pyenv shims,
# ~/.local/bin, a venv's bin, /usr/local/bin), so guessing where it landed fails on some machine.
# `pip install --target .tools/uv` always puts it in .tools/uv/bin/uv, and needs no write access
# outside the checkout.
#
# Order: $UV if set (must be executable), a uv on PATH, .tools/uv/bin/uv, else install uv==$UV_VERSION
# with the first of $PYTHON, python3, python that has pip.
# Usage: uv="$(scripts/ensure-uv.sh)"        exit 0 with the path on stdout; 1 with advice on stderr.
set -euo pipefail

UV_VERSION="${UV_VERSION:-0.13.9}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TARGET="$ROOT/.tools/uv"
LOCAL_UV="$TARGET/bin/uv"

log() { printf 'ensure-uv: %s\n' "$*" >&2; }
advice() {
  log "install uv yourself and run make again, with any of:"
  log "  python3 -m pip install --user uv==$UV_VERSION     (then put ~/.local/bin on PATH)"
  log "  pipx install uv==$UV_VERSION"
  log "  make UV=/path/to/uv ..."
}

if [[ -n "${UV:-}" ]]; then
  if [[ -x "$UV" ]] || command -v "$UV" >/dev/null 2>&1; then
    command -v "$UV"
    exit 0
  fi
  log "UV=$UV is not an executable file"
  exit 1
fi
if found="$(command -v uv 2>/dev/null)" && "$found" --version >/dev/null 2>&1; then
  echo "$found"
  exit 0
fi
if [[ -x "$LOCAL_UV" ]] && "$LOCAL_UV" --version >/dev/null 2>&1; then
  echo "$LOCAL_UV"
  exit 0
fi

python=""
for candidate in "${PYTHON:-}" python3 python; do
  [[ -n "$candidate" ]] || continue
  if command -v "$candidate" >/dev/null 2>&1 && "$candidate" -m pip --version >/dev/null 2>&1; then
    python="$candidate"
    break
  fi
done
if [[ -z "$python" ]]; then
  log "no uv found, and no python3 with pip to install it (Debian: apt-get install -y python3-pip)"
  advice
  exit 1
fi

log "no uv found: installing uv==$UV_VERSION into $TARGET with $(command -v "$python") -m pip"
rm -rf "$TARGET"
if ! PIP_ROOT_USER_ACTION=ignore PIP_DISABLE_PIP_VERSION_CHECK=1 \
  "$python" -m pip install --quiet --target "$TARGET" "uv==$UV_VERSION" >&2; then
  log "pip could not install uv==$UV_VERSION (is PyPI reachable?)"
  advice
  exit 1
fi
if ! "$LOCAL_UV" --version >/dev/null 2>&1; then
  log "pip installed uv, but $LOCAL_UV does not run"
  advice
  exit 1
fi
log "installed $("$LOCAL_UV" --version)"
echo "$LOCAL_UV"
