"""scripts/kind-up.sh's Kubernetes half, unchanged, against the local control plane: with
KIND_UP_EXISTING_CONTEXT it skips kind and docker, then applies the CRD, runs ``helm upgrade --install``,
waits for the rollouts and for the demo tenant, and prints its API key. The operator pod cannot run under kwok,
so the local operator process (the chart's ServiceAccount token, a real redis-server) makes the tenant Ready."""

from __future__ import annotations

import base64
import re
import subprocess
from pathlib import Path

import pytest

from engram.redis_keys import KeySpace
from engram.tenancy.apikeys import hash_secret
from tests.kube_real.conftest import SCRIPTS, ControlPlane, LocalOperator, OperatorRedis, Release, wait_until

pytestmark = pytest.mark.kube_real

RELEASE = Release("engram", "kind-up")
CONTEXT = "engram-local"  # the context scripts/control-plane.sh writes


def kind_up(plane: ControlPlane, tools: Path) -> subprocess.CompletedProcess[str]:
    env = {
        **plane.env,
        "KIND_UP_EXISTING_CONTEXT": CONTEXT,
        "IMAGE_TAG": "kwok-test",
        "NAMESPACE": RELEASE.namespace,
        "RELEASE": RELEASE.name,
        "HELM": plane.helm_path,
        "KUBECTL": str(plane.bin / "kubectl"),
        # docker and kind stand-ins that record being called: the switch must not call them.
        "PATH": f"{tools}:{plane.env['PATH']}",
    }
    return subprocess.run(
        [str(SCRIPTS / "kind-up.sh")], env=env, capture_output=True, text=True, timeout=600, check=False
    )


def tripwires(directory: Path) -> Path:
    for tool in ("docker", "kind"):
        path = directory / tool
        path.write_text(f'#!/bin/sh\necho "{tool} $*" >> "{directory}/called"\nexit 97\n')
        path.chmod(0o755)
    return directory


def test_kind_up_with_an_existing_context_installs_waits_for_the_demo_tenant_and_prints_its_key(
    plane: ControlPlane, local_operator: LocalOperator, operator_redis: OperatorRedis, tmp_path: Path
) -> None:
    tools = tripwires(tmp_path)
    try:
        first = kind_up(plane, tools)
        assert first.returncode == 0, f"{first.stdout}\n{first.stderr}"
        assert not (tools / "called").exists(), (tools / "called").read_text()

        match = re.search(r"API key \(demo\) (\S+)", first.stdout)
        assert match, first.stdout
        secret = plane.get("secret", "demo-engram", "-n", RELEASE.namespace)
        key = base64.b64decode(secret["data"]["api-key"]).decode()
        assert match.group(1) == key
        record = operator_redis.client().hgetall(KeySpace().tenant_record("demo"))
        assert record["api_key_sha256"] == hash_secret(key), "the printed key is the one the operator registered"
        for step in ("applying the MemoryNamespace CRD", "waiting for the rollout", "waiting for the sample tenant"):
            assert step in first.stderr

        # Idempotent: a second run upgrades the release and prints the same key.
        second = kind_up(plane, tools)
        assert second.returncode == 0, f"{second.stdout}\n{second.stderr}"
        assert f"API key (demo) {key}" in second.stdout
        history = plane.helm("history", RELEASE.name, "-n", RELEASE.namespace, "-o", "json").stdout
        assert '"revision":2' in history.replace(" ", "")
    finally:
        # With the operator still running, so the demo tenant's finalizer completes (it purges: Delete).
        plane.helm("uninstall", RELEASE.name, "-n", RELEASE.namespace, "--wait", "--timeout=2m", check=False)
    wait_until(
        "the operator to offboard the demo tenant",
        lambda: not operator_redis.client().exists(KeySpace().tenant_record("demo")),
    )
    assert not plane.get("memorynamespaces", "-n", RELEASE.namespace)["items"]


def test_kind_up_with_an_existing_context_refuses_to_run_without_an_image_tag(plane: ControlPlane) -> None:
    env = {**plane.env, "KIND_UP_EXISTING_CONTEXT": CONTEXT, "HELM": plane.helm_path}
    env.pop("IMAGE_TAG", None)
    env["KUBECTL"] = str(plane.bin / "kubectl")
    result = subprocess.run(
        [str(SCRIPTS / "kind-up.sh")], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode != 0
    assert "set IMAGE_TAG too" in result.stderr
