#!/usr/bin/env bash
# Installs the Debian packages Engram's tests and `make run` use, when they are missing:
#   redis-server (the store's tests start their own servers), redis-sentinel (the Sentinel failover test and
#   `make run REDIS_MODE=sentinel`), haproxy (the local load balancer),
#   chromium (the web page test). Usage: scripts/ensure-system-packages.sh [binary:package ...]
set -euo pipefail

wanted=("$@")
if [ ${#wanted[@]} -eq 0 ]; then
  wanted=(redis-server:redis-server redis-sentinel:redis-sentinel haproxy:haproxy chromium:chromium)
fi

missing=()
for pair in "${wanted[@]}"; do
  binary=${pair%%:*}; package=${pair#*:}
  command -v "$binary" >/dev/null 2>&1 || missing+=("$package")
done
[ ${#missing[@]} -eq 0 ] && exit 0

echo "installing missing system packages: ${missing[*]}" >&2
if ! command -v apt-get >/dev/null 2>&1; then
  echo "error: ${missing[*]} missing and apt-get is not available; install them with your package manager" >&2
  exit 1
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else
    echo "error: ${missing[*]} missing; run as root or install them: apt-get install ${missing[*]}" >&2
    exit 1
  fi
fi
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
