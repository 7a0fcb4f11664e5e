# syntax=docker/dockerfile:1
# Engram: one image, two entrypoints.
#   chat service (default): engram serve --host 0.0.0.0 --port 8000 --workers 2
#   operator:               kopf run --standalone --all-namespaces -m engram_operator.handlers \
#                             --liveness=http://0.0.0.0:8080/healthz
# Build: docker build -t engram:0.1.0 .   (the Helm chart runs both with a read-only root filesystem)

ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

# uv, the tool that made uv.lock, installs exactly the locked versions. Only the build stage has it.
FROM ghcr.io/astral-sh/uv:0.13.9 AS uv

FROM ${PYTHON_IMAGE} AS build
COPY --from=uv /uv /usr/local/bin/uv
ENV UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_PYTHON_DOWNLOADS=never \
    UV_PYTHON_PREFERENCE=only-system \
    UV_PROJECT_ENVIRONMENT=/opt/engram
WORKDIR /src
# Dependencies first: this layer is reused until uv.lock changes.
COPY pyproject.toml uv.lock ./
RUN --mount=type=cache,target=/root/.cache/uv \
    uv sync --locked --no-dev --no-install-project
# Then Engram itself, installed as a regular package (not editable: /src does not exist at run time).
COPY README.md ./
COPY service ./service
COPY operator ./operator
RUN --mount=type=cache,target=/root/.cache/uv \
    uv sync --locked --no-dev --no-editable \
 && /opt/engram/bin/python -c "import engram, engram_operator.handlers" \
 && test -x /opt/engram/bin/engram && test -x /opt/engram/bin/kopf

FROM ${PYTHON_IMAGE} AS runtime
LABEL org.opencontainers.image.title="engram" \
      org.opencontainers.image.description="LlamaIndex chat memory that survives scaling: chat service and kopf operator" \
      org.opencontainers.image.licenses="Apache-2.0"
# No build or packaging tools at run time: the venv below is complete, so pip and friends go.
RUN python -m pip uninstall --yes --quiet pip setuptools wheel \
 && groupadd --system --gid 10001 engram \
 && useradd --system --uid 10001 --gid engram --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin engram
COPY --from=build /opt/engram /opt/engram
# HOME and caches point at /tmp: the chart mounts an emptyDir there and keeps the root filesystem
# read-only. PROMETHEUS_MULTIPROC_DIR is set by the chart (an emptyDir) or made by `engram serve`.
ENV PATH=/opt/engram/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    XDG_CACHE_HOME=/tmp/.cache
USER 10001:10001
WORKDIR /tmp
EXPOSE 8000 8080
# Fits the default command (the chat service); Kubernetes ignores it and uses the chart's probes.
HEALTHCHECK --interval=30s --timeout=3s --start-period=30s --retries=3 \
  CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2).status != 200)"]
CMD ["engram", "serve", "--host", "0.0.0.0", "--port", "8000", "--workers", "2"]
