"""The local control plane of scripts/control-plane.sh does what the Kubernetes tests will rely on.

Real programs built from Go modules by scripts/build-control-plane.sh: etcd, kube-apiserver,
kube-controller-manager, kube-scheduler, kubectl, and kwok faking three nodes (pods become Running and Ready
without containers). Skipped, with the reason, when those binaries are not built.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = ROOT / "scripts"
CHART = ROOT / "deploy" / "helm" / "engram"
CRD_FILE = CHART / "crds" / "memorynamespaces.engram.dev.yaml"
K8S_VERSION = os.environ.get("ENGRAM_K8S_VERSION", "v1.36.3")


@cache
def control_plane_bin() -> Path | None:
    """The cached binaries' directory, or None when they are not built (no build is started from here)."""
    result = subprocess.run(
        [str(SCRIPTS / "build-control-plane.sh"), "--print"], capture_output=True, text=True, check=False, timeout=30
    )
    return Path(result.stdout.strip()) if result.returncode == 0 else None


pytestmark = [
    pytest.mark.kube_real,
    pytest.mark.skipif(
        control_plane_bin() is None,
        reason="control-plane binaries not built: run scripts/build-control-plane.sh (Go, ~30 min cold)",
    ),
]


@dataclass(frozen=True)
class ControlPlane:
    dir: Path
    bin: Path
    pids: dict[str, int]

    @property
    def kubeconfig(self) -> Path:
        return self.dir / "kubeconfig"

    def kubectl(self, *args: str, check: bool = True, input: str | None = None) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [str(self.bin / "kubectl"), f"--kubeconfig={self.kubeconfig}", *args],
            capture_output=True,
            text=True,
            check=False,
            timeout=120,
            input=input,
        )
        if check and result.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed ({result.returncode}):\n{result.stderr}")
        return result

    def get(self, *args: str) -> Any:
        return json.loads(self.kubectl("get", *args, "-o", "json").stdout)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is gone for our purpose; /proc says so.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def control_plane_script(command: str, directory: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(SCRIPTS / "control-plane.sh"), command, str(directory)],
        capture_output=True,
        text=True,
        check=False,
        timeout=180,
    )


@pytest.fixture(scope="module")
def plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    directory = tmp_path_factory.mktemp("control-plane")
    started = time.monotonic()
    result = control_plane_script("start", directory)
    if result.returncode != 0:
        control_plane_script("stop", directory)
        raise AssertionError(f"control-plane.sh start failed:\n{result.stderr}")
    print(f"control plane started in {time.monotonic() - started:.1f} s")
    pids = {p.stem: int(p.read_text()) for p in (directory / "run").glob("*.pid")}
    assert set(pids) == {"etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kwok"}
    bin_dir = control_plane_bin()
    assert bin_dir is not None
    yield ControlPlane(directory, bin_dir, pids)
    stopped = control_plane_script("stop", directory)
    assert stopped.returncode == 0, stopped.stderr
    left = {name: pid for name, pid in pids.items() if alive(pid)}
    assert not left, f"still running after control-plane.sh stop: {left}"
    assert not list((directory / "run").glob("*.pid"))


def wait_until(what: str, condition: Any, timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.5)


def test_the_api_server_reports_its_real_version(plane: ControlPlane) -> None:
    # Stamped at build time: unstamped binaries say v0.0.0 and the chart's kubeVersion check refuses them.
    version = json.loads(plane.kubectl("version", "-o", "json").stdout)
    assert version["serverVersion"]["gitVersion"] == K8S_VERSION
    assert version["clientVersion"]["gitVersion"] == K8S_VERSION
    assert version["serverVersion"]["minor"] == K8S_VERSION.split(".")[1]


def test_three_fake_nodes_are_ready(plane: ControlPlane) -> None:
    nodes = plane.get("nodes")["items"]
    assert sorted(n["metadata"]["name"] for n in nodes) == ["kwok-node-1", "kwok-node-2", "kwok-node-3"]
    for node in nodes:
        ready = {c["type"]: c["status"] for c in node["status"]["conditions"]}["Ready"]
        assert ready == "True"


def test_a_deployment_gets_three_ready_pods_on_the_fake_nodes(plane: ControlPlane) -> None:
    plane.kubectl("create", "namespace", "smoke-deploy")
    # The image never runs (kwok fakes the containers), so any name will do.
    plane.kubectl("create", "deployment", "web", "-n", "smoke-deploy", "--image=registry.invalid/web:1", "--replicas=3")
    plane.kubectl("rollout", "status", "deployment/web", "-n", "smoke-deploy", "--timeout=60s")
    pods = plane.get("pods", "-n", "smoke-deploy", "-l", "app=web")["items"]
    assert len(pods) == 3
    for pod in pods:
        assert pod["status"]["phase"] == "Running"
        assert {c["type"]: c["status"] for c in pod["status"]["conditions"]}["Ready"] == "True"
        assert pod["spec"]["nodeName"].startswith("kwok-node-")  # placed by the real scheduler
        assert pod["spec"]["serviceAccountName"] == "default"  # ServiceAccount admission ran


def test_a_serviceaccount_token_from_the_tokenrequest_api_carries_exactly_its_rbac(plane: ControlPlane) -> None:
    ns, sa = "smoke-rbac", "reader"
    plane.kubectl("create", "namespace", ns)
    plane.kubectl("create", "serviceaccount", sa, "-n", ns)
    plane.kubectl("create", "role", "read-configmaps", "-n", ns, "--verb=get,list", "--resource=configmaps")
    plane.kubectl("create", "rolebinding", "reader", "-n", ns, "--role=read-configmaps", f"--serviceaccount={ns}:{sa}")

    token = plane.kubectl("create", "token", sa, "-n", ns, "--duration=10m").stdout.strip()
    payload = token.split(".")[1]
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    assert claims["sub"] == f"system:serviceaccount:{ns}:{sa}"

    who = f"--as=system:serviceaccount:{ns}:{sa}"
    assert plane.kubectl("auth", "can-i", "list", "configmaps", "-n", ns, who).stdout.strip() == "yes"
    denied = plane.kubectl("auth", "can-i", "list", "secrets", "-n", ns, who, check=False)
    assert (denied.returncode, denied.stdout.strip()) == (1, "no")
    assert plane.kubectl("auth", "can-i", "list", "configmaps", "-A", who, check=False).stdout.strip() == "no"

    # The token itself authenticates as the ServiceAccount against the API server (not only impersonation).
    as_sa = ["--kubeconfig=/dev/null", f"--server={server_url(plane)}", f"--token={token}"]
    as_sa.append(f"--certificate-authority={plane.dir / 'pki' / 'ca.crt'}")
    ok = subprocess.run(
        [str(plane.bin / "kubectl"), *as_sa, "get", "configmaps", "-n", ns], capture_output=True, text=True, timeout=60
    )
    assert ok.returncode == 0, ok.stderr
    forbidden = subprocess.run(
        [str(plane.bin / "kubectl"), *as_sa, "get", "secrets", "-n", ns], capture_output=True, text=True, timeout=60
    )
    assert forbidden.returncode != 0 and "forbidden" in forbidden.stderr.lower()


def server_url(plane: ControlPlane) -> str:
    env = dict(line.split("=", 1) for line in (plane.dir / "env").read_text().splitlines())
    return env["API_URL"]


def test_the_garbage_collector_deletes_dependents(plane: ControlPlane) -> None:
    plane.kubectl("create", "namespace", "smoke-gc")
    plane.kubectl("create", "configmap", "owner", "-n", "smoke-gc")
    uid = plane.get("configmap", "owner", "-n", "smoke-gc")["metadata"]["uid"]
    dependent = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": "dependent",
            "namespace": "smoke-gc",
            "ownerReferences": [{"apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": uid}],
        },
    }
    plane.kubectl("apply", "-f", "-", input=json.dumps(dependent))
    plane.kubectl("delete", "configmap", "owner", "-n", "smoke-gc", "--wait=false")
    wait_until(
        "kube-controller-manager to collect the dependent",
        lambda: plane.kubectl("get", "configmap", "dependent", "-n", "smoke-gc", check=False).returncode != 0,
    )


def test_a_statefulset_claim_binds_to_a_static_volume(plane: ControlPlane) -> None:
    plane.kubectl("create", "namespace", "smoke-sts")
    sts = {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": {"name": "db", "namespace": "smoke-sts"},
        "spec": {
            "serviceName": "db",
            "replicas": 1,
            "selector": {"matchLabels": {"app": "db"}},
            "template": {
                "metadata": {"labels": {"app": "db"}},
                "spec": {"containers": [{"name": "db", "image": "registry.invalid/db:1"}]},
            },
            "volumeClaimTemplates": [
                {
                    "metadata": {"name": "data"},
                    "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}},
                }
            ],
        },
    }
    plane.kubectl("apply", "-f", "-", input=json.dumps(sts))
    plane.kubectl("rollout", "status", "statefulset/db", "-n", "smoke-sts", "--timeout=60s")
    claim = plane.get("pvc", "data-db-0", "-n", "smoke-sts")
    assert claim["status"]["phase"] == "Bound"
    assert claim["spec"]["storageClassName"] == "engram-static"  # the default class was filled in by admission


def test_the_charts_crd_is_established_and_validates(plane: ControlPlane) -> None:
    plane.kubectl("apply", "--server-side", "-f", str(CRD_FILE))
    plane.kubectl("wait", "--for=condition=Established", "crd/memorynamespaces.engram.dev", "--timeout=30s")
    # The API server, not a client-side check, refuses an object outside the schema.
    plane.kubectl("create", "namespace", "smoke-crd")
    bad = {
        "apiVersion": "engram.dev/v1alpha1",
        "kind": "MemoryNamespace",
        "metadata": {"name": "bad", "namespace": "smoke-crd"},
        "spec": {"retentionPolicy": "Sometimes"},
    }
    refused = plane.kubectl("create", "-f", "-", input=json.dumps(bad), check=False)
    assert refused.returncode != 0
    assert 'spec.retentionPolicy: Unsupported value: "Sometimes"' in refused.stderr, refused.stderr


def helm_binary() -> str | None:
    if os.environ.get("HELM"):
        return os.environ["HELM"]
    local = ROOT / ".tools" / "bin" / "helm"
    return str(local) if local.exists() else None


def test_helm_install_of_the_chart_with_defaults_waits_until_ready(plane: ControlPlane) -> None:
    helm = helm_binary()
    if helm is None:
        pytest.skip("no helm: run scripts/ensure-helm.sh (or set HELM)")
    env = {**os.environ, "KUBECONFIG": str(plane.kubeconfig)}
    install = subprocess.run(
        [helm, "install", "engram", str(CHART), "-n", "engram", "--create-namespace", "--wait", "--timeout=3m"],
        capture_output=True,
        text=True,
        env=env,
        timeout=240,
    )
    assert install.returncode == 0, f"{install.stdout}\n{install.stderr}"
    deployments = plane.get("deployments", "-n", "engram")["items"]
    assert sorted(d["metadata"]["name"] for d in deployments) == ["engram-chat", "engram-operator"]
    for deployment in deployments:
        status = deployment["status"]
        assert status.get("readyReplicas") == deployment["spec"]["replicas"], deployment["metadata"]["name"]
    [redis] = plane.get("statefulsets", "-n", "engram")["items"]
    assert redis["metadata"]["name"] == "engram-redis"
    assert redis["status"].get("readyReplicas") == redis["spec"]["replicas"]
    claims = plane.get("pvc", "-n", "engram")["items"]
    assert len(claims) == redis["spec"]["replicas"] and all(c["status"]["phase"] == "Bound" for c in claims)

    uninstall = subprocess.run(
        [helm, "uninstall", "engram", "-n", "engram", "--wait", "--timeout=2m"],
        capture_output=True,
        text=True,
        env=env,
        timeout=180,
    )
    assert uninstall.returncode == 0, f"{uninstall.stdout}\n{uninstall.stderr}"
    release = "app.kubernetes.io/instance=engram"
    kinds = "deployments,statefulsets,services,serviceaccounts,configmaps,secrets,poddisruptionbudgets,roles"
    left = plane.kubectl("get", kinds, "-n", "engram", "-l", release, "-o", "name").stdout.split()
    assert not left
    assert not plane.kubectl("get", "clusterroles,clusterrolebindings", "-l", release, "-o", "name").stdout.split()
    wait_until("the release's pods to go", lambda: not plane.get("pods", "-n", "engram")["items"])
    # The StatefulSet's claims stay after uninstall (Kubernetes keeps them unless a retention policy says otherwise).
