"""The Helm chart against a real API server, controllers and scheduler (pods faked by kwok).

What a user relies on when they run helm: ``install --wait`` finishes with every workload Ready for each
configuration we ship, ``upgrade`` rolls the chat pods, ``uninstall`` leaves nothing of the release, the
scheduler spreads the chat pods as the chart asks, and the API server accepts the PDB and the HPA.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.kube_real.conftest import CHART, ControlPlane, Release, wait_until

pytestmark = pytest.mark.kube_real

CI_VALUES = sorted((CHART / "ci").glob("*-values.yaml"))


def ready_condition(obj: dict[str, Any]) -> str | None:
    return {c["type"]: c["status"] for c in obj["status"].get("conditions", [])}.get("Ready")


def assert_workloads_ready(plane: ControlPlane, release: Release) -> dict[str, list[dict[str, Any]]]:
    """Every Deployment and StatefulSet of the release has all its replicas Ready, on the fake nodes."""
    found: dict[str, list[dict[str, Any]]] = {}
    for kind in ("deployments", "statefulsets"):
        found[kind] = plane.get(kind, "-n", release.namespace, "-l", release.selector)["items"]
        for workload in found[kind]:
            name, spec, status = workload["metadata"]["name"], workload["spec"], workload["status"]
            assert status.get("readyReplicas") == spec["replicas"], f"{kind}/{name}: {status}"
            assert status.get("observedGeneration") == workload["metadata"]["generation"], name
    pods = plane.get("pods", "-n", release.namespace, "-l", release.selector)["items"]
    for pod in pods:
        if pod["status"].get("phase") == "Succeeded":
            continue  # a hook's Job pod
        assert pod["spec"]["nodeName"].startswith("kwok-node-"), pod["metadata"]["name"]
        assert ready_condition(pod) == "True", pod["metadata"]["name"]
    return found


def release_objects(plane: ControlPlane, release: Release) -> list[str]:
    """Every object labelled as the release's, of every listable namespaced kind, in its namespace, and of the
    cluster-scoped kinds the chart makes (ClusterRoles and their bindings)."""
    kinds = plane.kubectl("api-resources", "--verbs=list", "--namespaced", "-o", "name").stdout.split()
    # Events are not the release's objects (they are never labelled); skip them to keep one request small.
    kinds = [k for k in kinds if k not in ("events", "events.events.k8s.io")]
    names = plane.kubectl("get", ",".join(kinds), "-n", release.namespace, "-l", release.selector, "-o", "name")
    cluster = plane.kubectl("get", "clusterroles,clusterrolebindings", "-l", release.selector, "-o", "name")
    return names.stdout.split() + cluster.stdout.split()


def prepare_for(plane: ControlPlane, values: Path, namespace: str) -> None:
    """What a values file expects the cluster to have already, created as its user would."""
    plane.kubectl("create", "namespace", namespace)
    if values.name in ("external-redis-values.yaml", "external-cluster-values.yaml"):
        # The managed Redis' (or Redis Cluster's, users on every node) credentials are the user's Secret.
        plane.kubectl(
            "create", "secret", "generic", "engram-redis-credentials", "-n", namespace,
            "--from-literal=admin-username=engram-admin", "--from-literal=admin-password=a",
            "--from-literal=service-username=engram-service", "--from-literal=service-password=s",
        )  # fmt: skip
    if values.name == "external-redis-values.yaml":  # and the model's API key
        plane.kubectl("create", "secret", "generic", "vllm-api-key", "-n", namespace, "--from-literal=api-key=k")
    if values.name == "external-sentinel-values.yaml":
        # The Sentinel-managed Redis' credentials, with the Sentinels' password, are the user's Secret.
        plane.kubectl(
            "create", "secret", "generic", "engram-redis-credentials", "-n", namespace,
            "--from-literal=admin-username=engram-admin", "--from-literal=admin-password=a",
            "--from-literal=service-username=engram-service", "--from-literal=service-password=s",
            "--from-literal=sentinel-password=p",
        )  # fmt: skip
    if values.name == "ha-redis-values.yaml":
        # It names StorageClass "standard" (kind's and several clouds' default): this cluster provides one, with
        # static volumes big enough for its 20Gi claims (no provisioner exists here).
        storage_class = {
            "apiVersion": "storage.k8s.io/v1",
            "kind": "StorageClass",
            "metadata": {"name": "standard"},
            "provisioner": "kubernetes.io/no-provisioner",
            "volumeBindingMode": "Immediate",
            "reclaimPolicy": "Retain",
        }
        volumes = [
            {
                "apiVersion": "v1",
                "kind": "PersistentVolume",
                "metadata": {"name": f"standard-pv-{i}"},
                "spec": {
                    "storageClassName": "standard",
                    "capacity": {"storage": "20Gi"},
                    "accessModes": ["ReadWriteOnce"],
                    "persistentVolumeReclaimPolicy": "Retain",
                    "hostPath": {"path": str(plane.dir / "pv" / f"standard-{i}"), "type": "DirectoryOrCreate"},
                },
            }
            for i in range(3)
        ]
        plane.apply(storage_class, *volumes)
    if values.name == "metrics-values.yaml":
        # The ServiceMonitor and the HTTPRoute are kinds of the Prometheus Operator and the Gateway API, which
        # this bare cluster lacks: stand-in CRDs (any content accepted) let the API server take them. Their
        # content is checked offline (tests/deploy), not here.
        plane.apply(
            stand_in_crd("monitoring.coreos.com", "ServiceMonitor", "servicemonitors"),
            stand_in_crd("gateway.networking.k8s.io", "HTTPRoute", "httproutes"),
        )
        for crd in ("servicemonitors.monitoring.coreos.com", "httproutes.gateway.networking.k8s.io"):
            plane.kubectl("wait", "--for=condition=Established", f"crd/{crd}", "--timeout=30s")


def stand_in_crd(group: str, kind: str, plural: str) -> dict[str, Any]:
    schema = {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
    # Groups under k8s.io are reserved for APIs reviewed by Kubernetes: the API server wants this annotation.
    annotations = {"api-approved.kubernetes.io": "unapproved, test stand-in"} if group.endswith(".k8s.io") else {}
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.{group}", "annotations": annotations},
        "spec": {
            "group": group,
            "scope": "Namespaced",
            "names": {"kind": kind, "plural": plural, "singular": kind.lower(), "listKind": f"{kind}List"},
            "versions": [{"name": "v1", "served": True, "storage": True, "schema": {"openAPIV3Schema": schema}}],
        },
    }


def test_helm_install_with_the_defaults_waits_until_every_workload_is_ready(
    plane: ControlPlane, release: Release
) -> None:
    workloads = assert_workloads_ready(plane, release)
    names = sorted(d["metadata"]["name"] for d in workloads["deployments"])
    assert names == ["engram-chat", "engram-operator"]
    [redis] = workloads["statefulsets"]
    assert redis["metadata"]["name"] == "engram-redis"
    claims = plane.get("pvc", "-n", release.namespace)["items"]
    assert len(claims) == redis["spec"]["replicas"] and all(c["status"]["phase"] == "Bound" for c in claims)
    # The generated Redis Secret exists and carries every password the pods reference.
    secret = plane.get("secret", "engram-redis-auth", "-n", release.namespace)
    assert {"admin-password", "service-password", "replication-password"} <= set(secret["data"])


@pytest.mark.parametrize("values", CI_VALUES, ids=[v.name for v in CI_VALUES])
def test_helm_install_wait_with_each_ci_values_file_then_uninstall_leaves_nothing(
    plane: ControlPlane, values: Path
) -> None:
    """Install --wait succeeds, every workload is Ready, then uninstall --wait leaves no object of the release.

    What kwok cannot give, and what stands in: no container runs, so Ready means scheduled, not serving; the
    pre-delete hook's Job (files with memoryNamespaces) "succeeds" after 1 s without running its script (the
    operator-side deletion it waits for is tested with a real operator in test_operator.py and test_kind_up.py);
    the metrics file's ServiceMonitor and HTTPRoute go to stand-in CRDs; ha-redis's "standard" StorageClass is
    made here. The Redis claims stay after uninstall, as the chart says (persistentVolumeClaimRetentionPolicy)."""
    name = values.name.removesuffix("-values.yaml")
    release = Release(f"ci-{name}", f"ci-{name}")
    prepare_for(plane, values, release.namespace)
    plane.helm(
        "install", release.name, str(CHART), "-n", release.namespace, "--values", str(values),
        "--wait", "--timeout=3m",
    )  # fmt: skip
    workloads = assert_workloads_ready(plane, release)
    wanted = yaml.safe_load(values.read_text()) or {}
    samples = [s["name"] for s in wanted.get("memoryNamespaces", [])]
    installed = plane.get("memorynamespaces", "-n", release.namespace)["items"]
    assert sorted(m["metadata"]["name"] for m in installed) == sorted(samples)

    if name in ("external-redis", "external-sentinel", "external-cluster"):
        assert not workloads["statefulsets"], "no bundled Redis with an external one"
    if name == "sentinel":
        ready = {s["metadata"]["name"]: s["status"]["readyReplicas"] for s in workloads["statefulsets"]}
        assert ready == {f"{release.fullname}-redis": 3, f"{release.fullname}-sentinel": 3}, ready
    if name == "cluster":
        # 6 Redis pods, each with its claim; the bootstrap hook Job "succeeded" (kwok runs no script: the script
        # is run against real redis-server processes in tests/deploy/test_redis_cluster.py) and was deleted.
        [redis] = workloads["statefulsets"]
        assert redis["status"]["readyReplicas"] == 6
        claims = plane.get("pvc", "-n", release.namespace)["items"]
        assert len(claims) == 6 and all(c["status"]["phase"] == "Bound" for c in claims)
        assert not plane.exists("job", f"{release.fullname}-redis-cluster-bootstrap", "-n", release.namespace)
    if name == "ha-redis":
        [redis] = workloads["statefulsets"]
        assert redis["status"]["readyReplicas"] == 3  # the primary and 2 replicas
        claims = plane.get("pvc", "-n", release.namespace)["items"]
        assert {c["spec"]["storageClassName"] for c in claims} == {"standard"}
        assert all(c["status"]["phase"] == "Bound" for c in claims)
        assert_spread(plane, release, replicas=5, max_skew=1)
    if name == "metrics":
        # No replicas in the Deployment: the HPA owns the count. The real HPA controller raises it to minReplicas
        # (it does so without metrics; scaling on CPU needs metrics-server, which is not here).
        chat = f"{release.fullname}-chat"
        wait_until(
            "the HPA to scale the chat Deployment to minReplicas",
            lambda: plane.get("deployment", chat, "-n", release.namespace)["status"].get("readyReplicas") == 3,
        )
        hpa = plane.get("hpa", chat, "-n", release.namespace)
        assert hpa["status"]["desiredReplicas"] == 3
        assert plane.exists("servicemonitor", chat, "-n", release.namespace)
        assert plane.exists("httproute", chat, "-n", release.namespace)

    plane.helm("uninstall", release.name, "-n", release.namespace, "--wait", "--timeout=2m")
    wait_until("the release's pods to go", lambda: not plane.get("pods", "-n", release.namespace)["items"])
    left = [o for o in release_objects(plane, release) if not o.startswith("persistentvolumeclaim/")]
    assert not left, f"left after helm uninstall: {left}"
    assert not plane.get("memorynamespaces", "-n", release.namespace)["items"]
    if samples:
        # The pre-delete hook ran (its Job made a pod) and was deleted after it succeeded.
        hook = f"{release.fullname}-uninstall-tenants"
        events = plane.get("events", "-n", release.namespace, "--field-selector", f"involvedObject.name={hook}")
        assert any(e["reason"] == "SuccessfulCreate" for e in events["items"]), events["items"]
        assert not plane.exists("job", hook, "-n", release.namespace)


def assert_spread(plane: ControlPlane, release: Release, replicas: int, max_skew: int) -> None:
    """``replicas`` Ready chat pods, placed by the scheduler with at most ``max_skew`` between the nodes."""
    selector = f"{release.selector},app.kubernetes.io/component=chat"
    pods = [
        p
        for p in plane.get("pods", "-n", release.namespace, "-l", selector)["items"]
        if ready_condition(p) == "True" and not p["metadata"].get("deletionTimestamp")
    ]
    per_node = Counter(p["spec"]["nodeName"] for p in pods)
    assert len(pods) == replicas, [p["metadata"]["name"] for p in pods]
    nodes = [n["metadata"]["name"] for n in plane.get("nodes")["items"]]
    counts = [per_node.get(n, 0) for n in nodes]
    assert max(counts) - min(counts) <= max_skew, per_node


def test_helm_upgrade_with_a_changed_value_rolls_the_chat_deployment(plane: ControlPlane, release: Release) -> None:
    chat = f"{release.fullname}-chat"
    before = plane.get("deployment", chat, "-n", release.namespace)
    old_sets = {
        rs["metadata"]["name"] for rs in plane.get("rs", "-n", release.namespace, "-l", release.selector)["items"]
    }
    plane.helm(
        "upgrade", release.name, str(CHART), "-n", release.namespace, "--reuse-values",
        "--set", "chat.workers=3", "--wait", "--timeout=3m",
    )  # fmt: skip
    after = plane.get("deployment", chat, "-n", release.namespace)
    assert after["metadata"]["generation"] == before["metadata"]["generation"] + 1
    assert "3" in after["spec"]["template"]["spec"]["containers"][0]["args"]
    plane.kubectl("rollout", "status", f"deployment/{chat}", "-n", release.namespace, "--timeout=60s")
    sets = plane.get("rs", "-n", release.namespace, "-l", f"{release.selector},app.kubernetes.io/component=chat")
    new = [rs for rs in sets["items"] if rs["metadata"]["name"] not in old_sets]
    assert len(new) == 1, "one new ReplicaSet for the new pod template"
    assert new[0]["status"].get("readyReplicas") == before["spec"]["replicas"]
    for rs in sets["items"]:
        if rs is not new[0]:
            assert rs["spec"]["replicas"] == 0, f"old ReplicaSet {rs['metadata']['name']} scaled down"
    pods = plane.get("pods", "-n", release.namespace, "-l", f"{release.selector},app.kubernetes.io/component=chat")
    assert {p["metadata"]["labels"]["pod-template-hash"] for p in pods["items"]} == {
        new[0]["metadata"]["labels"]["pod-template-hash"]
    }


def test_kubectl_scale_to_5_spreads_ready_pods_over_the_3_nodes_and_the_pdb_counts_them(
    plane: ControlPlane, release: Release
) -> None:
    chat = f"{release.fullname}-chat"
    constraint = plane.get("deployment", chat, "-n", release.namespace)["spec"]["template"]["spec"][
        "topologySpreadConstraints"
    ][0]
    assert (constraint["topologyKey"], constraint["maxSkew"]) == ("kubernetes.io/hostname", 1)
    plane.kubectl("scale", f"deployment/{chat}", "-n", release.namespace, "--replicas=5")
    plane.kubectl("rollout", "status", f"deployment/{chat}", "-n", release.namespace, "--timeout=60s")
    selector = f"{release.selector},app.kubernetes.io/component=chat"
    # Pods of a scale-down or an old ReplicaSet go at once here (kwok), so the count settles quickly.
    wait_until("5 chat pods", lambda: len(plane.get("pods", "-n", release.namespace, "-l", selector)["items"]) == 5)
    assert_spread(plane, release, replicas=5, max_skew=constraint["maxSkew"])

    # The disruption controller matched the PDB to the pods: with maxUnavailable 1, one may be evicted.
    def pdb_counts() -> Any:
        status = plane.get("pdb", chat, "-n", release.namespace).get("status", {})
        return status if status.get("expectedPods") == 5 and status.get("currentHealthy") == 5 else None

    status = wait_until("the PDB to count 5 healthy pods", pdb_counts)
    assert (status["desiredHealthy"], status["disruptionsAllowed"]) == (4, 1)

    # kubectl scale took .spec.replicas from Helm (server-side apply field ownership): a later helm upgrade, even
    # of an unrelated value, is refused until forced, which gives the field back to the chart's replicaCount
    # (docs/deploy.md, Upgrading).
    upgrade = ["upgrade", release.name, str(CHART), "-n", release.namespace, "--reuse-values", "--wait"]
    refused = plane.helm(*upgrade, check=False)
    assert refused.returncode != 0 and "conflict" in refused.stderr and ".spec.replicas" in refused.stderr
    plane.helm(*upgrade, "--force-conflicts")
    assert plane.get("deployment", chat, "-n", release.namespace)["spec"]["replicas"] == 3


def test_the_api_server_accepts_the_hpa_and_the_hpa_controller_owns_the_replica_count(
    plane: ControlPlane, release: Release
) -> None:
    """Enabling chat.autoscaling on an installed release: the HPA is accepted and acted on (scaled to
    minReplicas; CPU-based scaling needs metrics-server, which this cluster lacks). Disabling it again is run
    with ``--force-conflicts``: Helm 4 applies server-side and the HPA controller has written .spec.replicas,
    which can make a plain upgrade conflict (docs/deploy.md, Upgrading)."""
    chat = f"{release.fullname}-chat"
    plane.helm(
        "upgrade", release.name, str(CHART), "-n", release.namespace, "--reuse-values",
        "--set", "chat.autoscaling.enabled=true", "--set", "chat.autoscaling.minReplicas=4",
        "--wait", "--timeout=3m",
    )  # fmt: skip
    wait_until(
        "the HPA to scale chat to minReplicas 4",
        lambda: plane.get("deployment", chat, "-n", release.namespace)["status"].get("readyReplicas") == 4,
    )
    hpa = plane.get("hpa", chat, "-n", release.namespace)
    conditions = {c["type"]: c for c in hpa["status"]["conditions"]}
    assert conditions["AbleToScale"]["status"] == "True", conditions
    assert hpa["status"]["desiredReplicas"] == 4
    plane.helm(
        "upgrade", release.name, str(CHART), "-n", release.namespace, "--reuse-values", "--force-conflicts",
        "--set", "chat.autoscaling.enabled=false", "--wait", "--timeout=3m",
    )  # fmt: skip
    assert not plane.exists("hpa", chat, "-n", release.namespace)
    assert plane.get("deployment", chat, "-n", release.namespace)["spec"]["replicas"] == 3
