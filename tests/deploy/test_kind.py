"""The kind cluster config and the kind values agree with each other and with kind's documented schema."""

from __future__ import annotations

import ipaddress
from typing import Any

import yaml

from tests.deploy.conftest import KIND_DIR, KIND_VALUES, pod_spec, render

# Fields of kind's v1alpha4 Cluster config this file may use (kind.sigs.k8s.io/docs/user/configuration).
CLUSTER_FIELDS = {
    "kind",
    "apiVersion",
    "name",
    "nodes",
    "networking",
    "featureGates",
    "runtimeConfig",
    "kubeadmConfigPatches",
    "kubeadmConfigPatchesJSON6902",
    "containerdConfigPatches",
}
NODE_FIELDS = {"role", "image", "extraMounts", "extraPortMappings", "labels", "kubeadmConfigPatches"}
NETWORKING_FIELDS = {
    "ipFamily",
    "apiServerAddress",
    "apiServerPort",
    "podSubnet",
    "serviceSubnet",
    "disableDefaultCNI",
    "kubeProxyMode",
    "dnsSearch",
}
PORT_MAPPING_FIELDS = {"containerPort", "hostPort", "listenAddress", "protocol"}


def cluster() -> dict[str, Any]:
    return yaml.safe_load((KIND_DIR / "cluster.yaml").read_text())


def test_kind_config_uses_only_known_v1alpha4_fields() -> None:
    config = cluster()
    assert config["kind"] == "Cluster" and config["apiVersion"] == "kind.x-k8s.io/v1alpha4"
    assert set(config) <= CLUSTER_FIELDS
    assert set(config.get("networking", {})) <= NETWORKING_FIELDS
    assert config["networking"].get("disableDefaultCNI") is not True, "kindnet enforces the NetworkPolicy"
    for node in config["nodes"]:
        assert set(node) <= NODE_FIELDS
        assert node["role"] in ("control-plane", "worker")
        for mapping in node.get("extraPortMappings", []):
            assert set(mapping) <= PORT_MAPPING_FIELDS
            assert mapping.get("protocol", "TCP") in ("TCP", "UDP", "SCTP")


def test_kind_cluster_has_several_nodes_for_spreading() -> None:
    roles = [node["role"] for node in cluster()["nodes"]]
    assert roles.count("control-plane") == 1
    assert roles.count("worker") >= 2


def test_kind_ports_listen_on_loopback_only() -> None:
    mappings = [m for node in cluster()["nodes"] for m in node.get("extraPortMappings", [])]
    assert mappings
    for mapping in mappings:
        assert ipaddress.ip_address(mapping["listenAddress"]).is_loopback, mapping
    host_ports = [m["hostPort"] for m in mappings]
    assert len(host_ports) == len(set(host_ports))


def test_kind_values_expose_the_chat_service_on_the_mapped_node_port() -> None:
    rendered = render(KIND_VALUES)
    service = rendered.one("Service", "engram-chat")
    assert service["spec"]["type"] == "NodePort"
    (port,) = service["spec"]["ports"]
    control_plane = next(node for node in cluster()["nodes"] if node["role"] == "control-plane")
    mapped = {m["containerPort"]: m["hostPort"] for m in control_plane["extraPortMappings"]}
    assert mapped.get(port["nodePort"]) == 8080, "the chat NodePort is not the mapped container port"


def test_kind_values_install_a_sample_tenant_and_the_metrics_stack_from_local_images() -> None:
    rendered = render(KIND_VALUES)
    assert [r["metadata"]["name"] for r in rendered.all("MemoryNamespace")] == ["demo"]
    names = {d["metadata"]["name"] for d in rendered.all("Deployment")}
    assert {"engram-chat", "engram-operator", "engram-prometheus", "engram-grafana"} <= names
    for workload in rendered.workloads():
        for container in pod_spec(workload)["containers"]:
            if container["image"].startswith("engram:"):
                # `kind load docker-image` puts the image on the nodes; it must never be pulled.
                assert container["imagePullPolicy"] == "IfNotPresent"
    redis = rendered.one("StatefulSet", "engram-redis")
    assert any(c["name"] == "redis-exporter" for c in pod_spec(redis)["containers"])
