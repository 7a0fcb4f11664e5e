"""The local control plane of scripts/control-plane.sh does what the Kubernetes tests rely on.

Real programs built from Go modules by scripts/build-control-plane.sh: etcd, kube-apiserver,
kube-controller-manager, kube-scheduler, kubectl, and kwok faking three nodes (pods become Running and Ready
without containers). The control plane is the session's one fixture (tests/kube_real/conftest.py).
"""

from __future__ import annotations

import base64
import json
import subprocess

import pytest

from tests.kube_real.conftest import CRD_FILE, K8S_VERSION, ControlPlane, wait_until

pytestmark = pytest.mark.kube_real


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
    as_sa = ["--kubeconfig=/dev/null", f"--server={plane.api_url}", f"--token={token}"]
    as_sa.append(f"--certificate-authority={plane.dir / 'pki' / 'ca.crt'}")
    ok = subprocess.run(
        [str(plane.bin / "kubectl"), *as_sa, "get", "configmaps", "-n", ns], capture_output=True, text=True, timeout=60
    )
    assert ok.returncode == 0, ok.stderr
    forbidden = subprocess.run(
        [str(plane.bin / "kubectl"), *as_sa, "get", "secrets", "-n", ns], capture_output=True, text=True, timeout=60
    )
    assert forbidden.returncode != 0 and "forbidden" in forbidden.stderr.lower()


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
