"""Offline checks of everything that deploys Engram: the Helm chart, the Dockerfile, the kind config.

Real tools only: the pinned helm binary (scripts/ensure-helm.sh puts it in .tools/bin), the
kubernetes-validate schemas, hadolint, redis-server. Renders are cached per values file for the session,
so the whole folder runs in seconds.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

from testkit.redis_server import redis_server_binary as support_redis_server_binary

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "deploy" / "helm" / "engram"
CI_VALUES = sorted((CHART / "ci").glob("*-values.yaml"))
KIND_DIR = ROOT / "deploy" / "kind"
KIND_VALUES = KIND_DIR / "values.yaml"
CRD_FILE = CHART / "crds" / "memorynamespaces.engram.dev.yaml"
RELEASE = "engram"
NAMESPACE = "engram"
KUBERNETES_VERSIONS = ("1.31.0", "1.35.0")

# Every values file a user or CI renders: the chart's ci/ files and the kind values.
ALL_VALUES = [*CI_VALUES, KIND_VALUES]


def values_id(path: Path) -> str:
    return f"{path.parent.name}/{path.name}"


@cache
def helm_binary() -> str:
    """The helm binary: $HELM, else the one scripts/ensure-helm.sh installs (idempotent, ~0.05 s when present)."""
    if os.environ.get("HELM"):
        return os.environ["HELM"]
    result = subprocess.run(
        [str(ROOT / "scripts" / "ensure-helm.sh")], capture_output=True, text=True, check=False, timeout=300
    )
    if result.returncode != 0:
        raise RuntimeError(f"scripts/ensure-helm.sh failed (exit {result.returncode}):\n{result.stderr}")
    return str(Path(result.stdout.strip()) / "helm")


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([helm_binary(), *args], capture_output=True, text=True, check=False, timeout=120)
    if check and result.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
    return result


@dataclass(frozen=True)
class Rendered:
    """One `helm template` output, parsed."""

    docs: list[dict[str, Any]]

    def all(self, kind: str) -> list[dict[str, Any]]:
        return [doc for doc in self.docs if doc["kind"] == kind]

    def one(self, kind: str, name: str) -> dict[str, Any]:
        found = [doc for doc in self.all(kind) if doc["metadata"]["name"] == name]
        assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
        return found[0]

    def workloads(self) -> list[dict[str, Any]]:
        """Everything that runs pods: Deployments, StatefulSets, Jobs (hooks) and bare Pods (the test hook)."""
        return [doc for doc in self.docs if doc["kind"] in ("Deployment", "StatefulSet", "Job", "Pod")]


def render_redis_config(conf: Path, known: set[str], *settings: str) -> None:
    """The chart's Redis ConfigMap (start scripts and configs) written to ``conf``, a file per key, to run for
    real: the ACL allow-lists cut to the commands this server ``known``s (Debian's 7.0 lacks a few), replicas
    that sync at once, no AOF (a replica refuses SIGTERM while it writes its first one), and ``settings``
    (``--set-json`` items: mode, ports, timeouts)."""
    acl = yaml.safe_load((CHART / "values.yaml").read_text())["redis"]["acl"]
    args = ["template", RELEASE, str(CHART), "-s", "templates/redis-configmap.yaml"]
    for item in (
        f"redis.acl.serviceCommands={json.dumps([c for c in acl['serviceCommands'] if c in known])}",
        f"redis.acl.adminCommands={json.dumps([c for c in acl['adminCommands'] if c in known])}",
        f"redis.extraConfig={json.dumps(chr(10).join(['repl-diskless-sync-delay 0', 'appendonly no']))}",
        *settings,
    ):
        args += ["--set-json", item]
    data = yaml.safe_load(helm(*args).stdout)["data"]
    conf.mkdir(parents=True, exist_ok=True)
    for name, content in data.items():
        (conf / name).write_text(content)


def pod_spec(workload: dict[str, Any]) -> dict[str, Any]:
    return workload["spec"] if workload["kind"] == "Pod" else workload["spec"]["template"]["spec"]


def pod_labels(workload: dict[str, Any]) -> dict[str, str]:
    meta = workload["metadata"] if workload["kind"] == "Pod" else workload["spec"]["template"]["metadata"]
    return dict(meta.get("labels") or {})


@cache
def _render(values: tuple[str, ...], sets: tuple[str, ...]) -> Rendered:
    args = ["template", RELEASE, str(CHART), "--namespace", NAMESPACE]
    for path in values:
        args += ["--values", path]
    for item in sets:
        args += ["--set-json", item]
    out = helm(*args).stdout
    return Rendered([doc for doc in yaml.safe_load_all(out) if doc])


def render(*values: Path, set_json: tuple[str, ...] = ()) -> Rendered:
    """`helm template` with the given values files and --set-json overrides (cached)."""
    return _render(tuple(str(v) for v in values), set_json)


@pytest.fixture(scope="session")
def render_chart() -> Callable[..., Rendered]:
    return render


@pytest.fixture(scope="session")
def crd() -> dict[str, Any]:
    return yaml.safe_load(CRD_FILE.read_text())


@pytest.fixture
def redis_server_binary() -> str:
    return support_redis_server_binary()
