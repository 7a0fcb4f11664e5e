# Engram. `make help` lists every target.
SHELL = /usr/bin/env bash -o pipefail
.SHELLFLAGS = -ec
.DEFAULT_GOAL := help

# uv: found on PATH, else installed (pinned) into .tools/uv by scripts/ensure-uv.sh at recipe run time.
# Override with `make UV=/path/to/uv`. Never computed at parse time: make expands a recipe before running it.
export UV_VERSION ?= 0.13.9
export UV
VENV := .venv
PY := $(VENV)/bin/python
REPLICAS ?= 3
REDIS_MODE ?= standalone
PYTEST_ARGS ?=

##@ General

.PHONY: help
help: ## List every target with what it does
	@awk 'BEGIN {FS = ":.*##"; printf "Usage: make \033[36m<target>\033[0m\n"} \
	  /^[a-zA-Z0-9_-]+:.*?##/ { printf "  \033[36m%-14s\033[0m %s\n", $$1, $$2 } \
	  /^##@/ { printf "\n\033[1m%s\033[0m\n", substr($$0, 5) }' $(MAKEFILE_LIST)

##@ Development

.PHONY: install
install: ## Install uv (if missing), Python deps from uv.lock into .venv, and redis-server/redis-sentinel/haproxy/chromium
	@uv="$$(scripts/ensure-uv.sh)"; echo "$$uv sync --frozen --quiet --compile-bytecode"; "$$uv" sync --frozen --quiet --compile-bytecode
	scripts/ensure-system-packages.sh

# $(call timed,PHASE,COMMAND): run COMMAND and print how long it took, also when it fails (CI logs show where
# the time goes: the control-plane build is ~20 min on an empty cache, 0 s once cached).
timed = t0=$$(date +%s); rc=0; $(2) || rc=$$?; printf '==> %s: %s s\n' '$(1)' "$$(($$(date +%s) - t0))" >&2; exit $$rc

.PHONY: test
test: ## Lint and the whole suite: real redis-server, uvicorn, haproxy, chromium, helm, and a local Kubernetes control plane (built from Go modules on the first run)
	@$(call timed,install,$(MAKE) --no-print-directory install)
	@$(call timed,helm,$(MAKE) --no-print-directory helm)
	@$(call timed,control-plane build,$(MAKE) --no-print-directory control-plane)
	@$(call timed,lint,$(MAKE) --no-print-directory lint-code)
	@# ENGRAM_REQUIRE_CONTROL_PLANE: here the kube_real tests must run; a missing binary fails them instead of skipping.
	@$(call timed,tests,ENGRAM_REQUIRE_CONTROL_PLANE=1 $(VENV)/bin/pytest -m "not slow" $(PYTEST_ARGS))

.PHONY: lint
lint: install lint-code ## Install, then ruff (lint + format check) and mypy --strict

.PHONY: lint-code
lint-code: ## ruff check, ruff format --check and mypy --strict, without installing (what make test runs)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

.PHONY: format
format: install ## Apply ruff's fixes and formatting
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

##@ Run

.PHONY: run
run: install ## Local stack: redis-server (REDIS_MODE=sentinel: 1 primary, 2 replicas, 3 Sentinels; REDIS_MODE=cluster: 3 primaries + 3 replicas), $(REPLICAS) replicas, HAProxy round-robin (no affinity), web page
	REPLICAS=$(REPLICAS) REDIS_MODE=$(REDIS_MODE) scripts/run-local.sh

.PHONY: bench
bench: install ## Benchmarks: per-turn cost vs the alternatives, end to end through make run's stack, footprint, bursts on one replica, standalone vs Sentinel vs Cluster and local vs replicated commits (writes docs/benchmarks.md)
	$(PY) -m bench

include deploy/deploy.mk
include tests/reliability/reliability.mk

##@ Cleanup

.PHONY: clean
clean: ## Remove the venv, local run data and caches
	rm -rf $(VENV) .run .pytest_cache .ruff_cache .mypy_cache tests/artifacts
