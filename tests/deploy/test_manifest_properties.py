"""Properties of the rendered manifests that matter for running Engram safely and without affinity."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.deploy.conftest import ALL_VALUES, CI_VALUES, NAMESPACE, pod_labels, pod_spec, render, values_id

CI = {path.name: path for path in CI_VALUES}
DEFAULTS, EXTERNAL, METRICS, HA = (
    CI["defaults-values.yaml"],
    CI["external-redis-values.yaml"],
    CI["metrics-values.yaml"],
    CI["ha-redis-values.yaml"],
)


def containers(workload: dict[str, Any]) -> list[dict[str, Any]]:
    spec = pod_spec(workload)
    return [*spec.get("initContainers", []), *spec["containers"]]


def effective(container: dict[str, Any], pod: dict[str, Any], field: str) -> Any:
    """A security setting as Kubernetes applies it: the container's, else the pod's."""
    return (container.get("securityContext") or {}).get(field, (pod.get("securityContext") or {}).get(field))


@pytest.mark.parametrize("values", ALL_VALUES, ids=values_id)
def test_chat_service_has_no_session_affinity(values: Path) -> None:
    service = render(values).one("Service", "engram-chat")
    assert service["spec"]["sessionAffinity"] == "None"
    assert "sessionAffinityConfig" not in service["spec"]


@pytest.mark.parametrize("values", ALL_VALUES, ids=values_id)
def test_every_container_runs_as_non_root_with_a_read_only_root_filesystem(values: Path) -> None:
    for workload in render(values).workloads():
        spec = pod_spec(workload)
        for container in containers(workload):
            where = f"{workload['kind']}/{workload['metadata']['name']}/{container['name']}"
            assert effective(container, spec, "runAsNonRoot") is True, where
            user = effective(container, spec, "runAsUser")
            assert user is not None and user > 0, f"{where} runs as uid {user}"
            sc = container.get("securityContext") or {}
            assert sc.get("readOnlyRootFilesystem") is True, where
            assert sc.get("allowPrivilegeEscalation") is False, where
            assert sc.get("capabilities", {}).get("drop") == ["ALL"], where
            assert effective(container, spec, "seccompProfile") == {"type": "RuntimeDefault"}, where


@pytest.mark.parametrize("values", ALL_VALUES, ids=values_id)
def test_every_container_sets_cpu_and_memory_requests_and_a_memory_limit(values: Path) -> None:
    for workload in render(values).workloads():
        for container in containers(workload):
            where = f"{workload['kind']}/{workload['metadata']['name']}/{container['name']}"
            resources = container.get("resources") or {}
            assert {"cpu", "memory"} <= set(resources.get("requests", {})), where
            assert "memory" in resources.get("limits", {}), where


@pytest.mark.parametrize("values", ALL_VALUES, ids=values_id)
def test_no_image_floats_on_latest(values: Path) -> None:
    for workload in render(values).workloads():
        for container in containers(workload):
            image = container["image"]
            assert ":" in image.rsplit("/", 1)[-1] or "@sha256:" in image, f"{image} has no tag"
            assert not image.endswith(":latest"), image


def test_chat_deployment_runs_engram_serve_with_probes_and_metrics_dir() -> None:
    deployment = render(DEFAULTS).one("Deployment", "engram-chat")
    assert deployment["spec"]["replicas"] == 3
    spec = pod_spec(deployment)
    (chat,) = spec["containers"]
    assert chat["command"] == ["engram"]
    assert chat["args"] == ["serve", "--host", "0.0.0.0", "--port", "8000", "--workers", "2"]
    assert chat["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert chat["livenessProbe"]["httpGet"]["path"] == "/healthz"
    env = {item["name"]: item for item in chat["env"]}
    assert env["PROMETHEUS_MULTIPROC_DIR"]["value"] == "/tmp/prometheus"
    mounts = {mount["mountPath"] for mount in chat["volumeMounts"]}
    assert {"/tmp", "/tmp/prometheus"} <= mounts
    assert env["ENGRAM_REDIS_URL"]["value"] == f"redis://engram-redis.{NAMESPACE}.svc:6379/0"
    assert env["ENGRAM_REDIS_USERNAME"]["valueFrom"]["secretKeyRef"] == {
        "name": "engram-redis-auth",
        "key": "service-username",
    }
    assert env["ENGRAM_REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"]["key"] == "service-password"
    assert env["ENGRAM_AUTH"]["value"] == "required"
    assert spec["automountServiceAccountToken"] is False
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true" and annotations["prometheus.io/port"] == "8000"


def test_chat_pods_spread_across_nodes_and_keep_serving_through_drains() -> None:
    rendered = render(DEFAULTS)
    deployment = rendered.one("Deployment", "engram-chat")
    (spread,) = pod_spec(deployment)["topologySpreadConstraints"]
    assert spread["topologyKey"] == "kubernetes.io/hostname"
    assert spread["labelSelector"]["matchLabels"].items() <= pod_labels(deployment).items()
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    pdb = rendered.one("PodDisruptionBudget", "engram-chat")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels(deployment).items()


def test_autoscaler_owns_the_replica_count_when_enabled() -> None:
    rendered = render(METRICS)
    assert "replicas" not in rendered.one("Deployment", "engram-chat")["spec"]
    hpa = rendered.one("HorizontalPodAutoscaler", "engram-chat")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "engram-chat"}


@pytest.mark.parametrize("values", ALL_VALUES, ids=values_id)
def test_every_service_selects_the_pods_of_one_workload(values: Path) -> None:
    rendered = render(values)
    workloads = [w for w in rendered.workloads() if w["kind"] in ("Deployment", "StatefulSet")]
    for service in rendered.all("Service"):
        selector = service["spec"]["selector"]
        base = {k: v for k, v in selector.items() if k != "statefulset.kubernetes.io/pod-name"}
        matching = [w for w in workloads if base.items() <= pod_labels(w).items()]
        assert len(matching) == 1, f"Service {service['metadata']['name']} selects {len(matching)} workloads"


def test_operator_is_one_replica_recreated_with_liveness_and_admin_credentials() -> None:
    operator = render(DEFAULTS).one("Deployment", "engram-operator")
    assert operator["spec"]["replicas"] == 1
    assert operator["spec"]["strategy"] == {"type": "Recreate"}
    (container,) = pod_spec(operator)["containers"]
    assert container["command"] == ["kopf"]
    assert container["args"][:6] == [
        "run",
        "--standalone",
        "--all-namespaces",
        "-m",
        "engram_operator.handlers",
        "--liveness=http://0.0.0.0:8080/healthz",
    ]
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert {"name": "health", "containerPort": 8080, "protocol": "TCP"} in container["ports"]
    env = {item["name"]: item for item in container["env"]}
    assert env["ENGRAM_REDIS_USERNAME"]["valueFrom"]["secretKeyRef"]["key"] == "admin-username"
    assert env["ENGRAM_REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"]["key"] == "admin-password"
    assert env["ENGRAM_REDIS_REPLICA_URLS"]["value"] == ""


def test_operator_gets_every_redis_replica_because_acls_do_not_replicate() -> None:
    rendered = render(HA)
    assert rendered.one("StatefulSet", "engram-redis")["spec"]["replicas"] == 3
    (container,) = pod_spec(rendered.one("Deployment", "engram-operator"))["containers"]
    env = {item["name"]: item.get("value") for item in container["env"]}
    assert env["ENGRAM_REDIS_REPLICA_URLS"].split(",") == [
        f"redis://engram-redis-{i}.engram-redis-headless.{NAMESPACE}.svc:6379/0" for i in (1, 2)
    ]


def test_external_redis_replaces_the_bundled_one() -> None:
    rendered = render(EXTERNAL)
    assert not rendered.all("StatefulSet") and not rendered.all("NetworkPolicy")
    assert all(not s["metadata"]["name"].startswith("engram-redis") for s in rendered.all("Service"))
    for name in ("engram-chat", "engram-operator"):
        (container,) = pod_spec(rendered.one("Deployment", name))["containers"]
        env = {item["name"]: item for item in container["env"]}
        assert env["ENGRAM_REDIS_URL"]["value"] == "rediss://redis.example.com:6380/0"
        assert env["ENGRAM_REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == "engram-redis-credentials"
    (operator,) = pod_spec(rendered.one("Deployment", "engram-operator"))["containers"]
    replicas = next(item["value"] for item in operator["env"] if item["name"] == "ENGRAM_REDIS_REPLICA_URLS")
    assert replicas.count("rediss://") == 2
    (chat,) = pod_spec(rendered.one("Deployment", "engram-chat"))["containers"]
    key = next(item for item in chat["env"] if item["name"] == "ENGRAM_LLM_API_KEY")
    assert key["valueFrom"]["secretKeyRef"] == {"name": "vllm-api-key", "key": "api-key"}


# --- RBAC -------------------------------------------------------------------------------------------

# What the operator does with the API, and so the only permissions it may have (see operator-rbac.yaml):
#   kopf (1.45, --standalone --all-namespaces): list/watch CRDs (resource observer), list/watch/patch the
#   custom resource (finalizers, progress annotations), patch its status, create core/v1 Events;
#   engram_operator.secrets: read, create, patch and delete the tenant Secret it owns.
OPERATOR_RULES = {
    ("apiextensions.k8s.io", "customresourcedefinitions"): {"list", "watch"},
    ("engram.dev", "memorynamespaces"): {"get", "list", "watch", "patch"},
    ("engram.dev", "memorynamespaces/status"): {"get", "patch"},
    ("", "events"): {"create"},
    ("", "secrets"): {"get", "create", "patch", "delete"},
}


def rule_set(rules: list[dict[str, Any]]) -> dict[tuple[str, str], set[str]]:
    granted: dict[tuple[str, str], set[str]] = {}
    for rule in rules:
        assert "resourceNames" not in rule and "nonResourceURLs" not in rule
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                granted.setdefault((group, resource), set()).update(rule["verbs"])
    return granted


@pytest.mark.parametrize("values", ALL_VALUES, ids=values_id)
def test_operator_role_grants_exactly_what_the_operator_uses(values: Path) -> None:
    rendered = render(values)
    (role,) = rendered.all("ClusterRole")
    granted = rule_set(role["rules"])
    assert granted == OPERATOR_RULES
    for (_, resource), verbs in granted.items():
        assert "*" not in verbs and resource != "*"
    (binding,) = rendered.all("ClusterRoleBinding")
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "ClusterRole",
        "name": role["metadata"]["name"],
    }
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "engram-operator", "namespace": NAMESPACE}]
    operator = rendered.one("Deployment", "engram-operator")
    assert pod_spec(operator)["serviceAccountName"] == "engram-operator"


def test_operator_secrets_code_stays_within_its_role() -> None:
    """The calls engram_operator makes on Secrets map onto the verbs granted, and no other API is called."""
    source = "\n".join(p.read_text() for p in (Path(__file__).parents[2] / "operator" / "engram_operator").glob("*.py"))
    calls = {
        "read_namespaced_secret": "get",
        "create_namespaced_secret": "create",
        "patch_namespaced_secret": "patch",
        "delete_namespaced_secret": "delete",
        "replace_namespaced_secret": "update",
        "list_namespaced_secret": "list",
        "list_secret_for_all_namespaces": "list",
    }
    used = {verb for call, verb in calls.items() if f".{call}(" in source}
    assert used <= OPERATOR_RULES[("", "secrets")], f"operator calls Secret verbs {used}"
    for api in ("AppsV1Api", "RbacAuthorizationV1Api", "BatchV1Api", "CustomObjectsApi", "NetworkingV1Api"):
        assert f"{api}(" not in source, f"operator uses {api}: extend operator-rbac.yaml and this test"


def test_metrics_stack_rbac_is_namespaced_and_read_only() -> None:
    rendered = render(METRICS)
    role = rendered.one("Role", "engram-prometheus")
    assert rule_set(role["rules"]) == {("", "pods"): {"get", "list", "watch"}}
    assert len(rendered.all("ClusterRole")) == 1  # only the operator's


def test_uninstall_hook_deletes_sample_tenants_first_with_a_minimal_role() -> None:
    """Helm deletes custom resources after the operator: a pre-delete Job removes the samples while it runs."""
    assert not [d for d in render(DEFAULTS).docs if d["metadata"]["name"] == "engram-uninstall-tenants"]
    rendered = render(HA)
    hook = [d for d in rendered.docs if d["metadata"]["name"] == "engram-uninstall-tenants"]
    assert sorted(d["kind"] for d in hook) == ["Job", "Role", "RoleBinding", "ServiceAccount"]
    for doc in hook:
        assert doc["metadata"]["annotations"]["helm.sh/hook"] == "pre-delete"
    role = rendered.one("Role", "engram-uninstall-tenants")
    assert rule_set(role["rules"]) == {("engram.dev", "memorynamespaces"): {"list", "delete"}}
    job = rendered.one("Job", "engram-uninstall-tenants")
    (container,) = pod_spec(job)["containers"]
    env = {item["name"]: item["value"] for item in container["env"]}
    samples = rendered.all("MemoryNamespace")
    selector = dict(pair.split("=") for pair in env["SELECTOR"].split(","))
    assert samples and all(selector.items() <= s["metadata"]["labels"].items() for s in samples)
    compile(container["args"][0], "uninstall-tenants.py", "exec")


def test_only_the_operator_mounts_a_service_account_token() -> None:
    rendered = render(METRICS)
    for workload in rendered.workloads():
        name = workload["metadata"]["name"]
        mounts = pod_spec(workload).get("automountServiceAccountToken")
        if name in ("engram-operator", "engram-prometheus", "engram-uninstall-tenants"):
            assert mounts is not False, name
        else:
            assert mounts is False, name


# --- NetworkPolicy ----------------------------------------------------------------------------------


def peers_allowed_on(policy: dict[str, Any], port: str) -> list[dict[str, str]] | None:
    """Pod label sets allowed to reach `port`; None means anyone."""
    allowed: list[dict[str, str]] = []
    for rule in policy["spec"]["ingress"]:
        if not any(p.get("port") == port for p in rule.get("ports", [])):
            continue
        if "from" not in rule:
            return None
        for peer in rule["from"]:
            assert set(peer) == {"podSelector"}, "only same-namespace pod selectors"
            allowed.append(peer["podSelector"]["matchLabels"])
    return allowed


@pytest.mark.parametrize("values", [DEFAULTS, HA, METRICS, ALL_VALUES[-1]], ids=values_id)
def test_network_policy_lets_only_chat_operator_and_replicas_reach_redis(values: Path) -> None:
    rendered = render(values)
    (policy,) = rendered.all("NetworkPolicy")
    redis = rendered.one("StatefulSet", "engram-redis")
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= pod_labels(redis).items()
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    allowed = peers_allowed_on(policy, "redis")
    assert allowed is not None
    components = sorted(peer["app.kubernetes.io/component"] for peer in allowed)
    assert components == ["chat", "operator", "redis"]
    for peer in allowed:
        assert peer["app.kubernetes.io/instance"] == "engram"
    # Each allowed selector matches the pods of exactly one workload of this release.
    workloads = [w for w in rendered.workloads() if w["kind"] in ("Deployment", "StatefulSet")]
    for peer in allowed:
        assert sum(peer.items() <= pod_labels(w).items() for w in workloads) == 1
    # The test pod and the metrics stack cannot reach Redis.
    for workload in rendered.workloads():
        if pod_labels(workload)["app.kubernetes.io/component"] not in ("chat", "operator", "redis"):
            assert not any(peer.items() <= pod_labels(workload).items() for peer in allowed)
    exporter_port_open = peers_allowed_on(policy, "metrics") is None
    exporter_on = any(c["name"] == "redis-exporter" for c in pod_spec(redis)["containers"])
    assert exporter_port_open == exporter_on


# --- Redis ------------------------------------------------------------------------------------------


def test_redis_persists_on_a_pvc_with_the_official_image_and_a_generated_secret() -> None:
    rendered = render(DEFAULTS)
    redis = rendered.one("StatefulSet", "engram-redis")
    assert redis["spec"]["serviceName"] == "engram-redis-headless"
    (claim,) = redis["spec"]["volumeClaimTemplates"]
    assert claim["metadata"]["name"] == "data" and claim["spec"]["resources"]["requests"]["storage"] == "8Gi"
    (container,) = pod_spec(redis)["containers"]
    assert container["image"].startswith("redis:") and "bitnami" not in container["image"]
    assert {"name": "data", "mountPath": "/data"} in container["volumeMounts"]
    assert container["command"] == ["sh", "/opt/engram/redis/start.sh"]
    secret = rendered.one("Secret", "engram-redis-auth")
    assert set(secret["data"]) == {
        "admin-username",
        "admin-password",
        "service-username",
        "service-password",
        "replication-password",
        "exporter-password",
    }
    config = rendered.one("ConfigMap", "engram-redis")["data"]["redis.conf"]
    for line in ("appendonly yes", "maxmemory-policy noeviction", "appendfsync everysec"):
        assert line in config.splitlines()
    headless = rendered.one("Service", "engram-redis-headless")
    assert headless["spec"]["clusterIP"] == "None" and headless["spec"]["publishNotReadyAddresses"] is True
    client = rendered.one("Service", "engram-redis")
    assert client["spec"]["selector"]["statefulset.kubernetes.io/pod-name"] == "engram-redis-0"


def test_redis_exporter_sidecar_uses_its_own_user_and_is_scraped() -> None:
    rendered = render(METRICS)
    redis = rendered.one("StatefulSet", "engram-redis")
    exporter = next(c for c in pod_spec(redis)["containers"] if c["name"] == "redis-exporter")
    env = {item["name"]: item for item in exporter["env"]}
    assert env["REDIS_USER"]["value"] == "exporter"
    assert env["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"]["key"] == "exporter-password"
    assert redis["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"] == "9121"
    monitors = {m["metadata"]["name"]: m for m in rendered.all("ServiceMonitor")}
    assert monitors["engram-redis"]["spec"]["endpoints"][0]["port"] == "metrics"
    headless_ports = {p["name"] for p in rendered.one("Service", "engram-redis-headless")["spec"]["ports"]}
    assert "metrics" in headless_ports


# --- metrics ----------------------------------------------------------------------------------------


def test_service_monitors_carry_the_configurable_release_label_and_match_service_ports() -> None:
    rendered = render(METRICS)
    monitors = rendered.all("ServiceMonitor")
    assert {m["metadata"]["name"] for m in monitors} == {"engram-chat", "engram-redis"}
    for monitor in monitors:
        assert monitor["metadata"]["labels"]["release"] == "prometheus"
        assert monitor["metadata"]["labels"]["team"] == "platform"
        assert monitor["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
        selector = monitor["spec"]["selector"]["matchLabels"]
        services = [s for s in rendered.all("Service") if selector.items() <= s["metadata"]["labels"].items()]
        ports = {p["name"] for s in services for p in s["spec"]["ports"]}
        for endpoint in monitor["spec"]["endpoints"]:
            assert endpoint["port"] in ports
            assert endpoint["path"] == "/metrics"
    assert not render(DEFAULTS).all("ServiceMonitor")


def test_bundled_prometheus_scrapes_this_release_by_annotation() -> None:
    rendered = render(METRICS)
    config = rendered.one("ConfigMap", "engram-prometheus")["data"]["prometheus.yml"]
    import yaml

    parsed = yaml.safe_load(config)
    (job,) = parsed["scrape_configs"]
    assert job["kubernetes_sd_configs"] == [{"role": "pod", "namespaces": {"names": [NAMESPACE]}}]
    relabels = {tuple(r["source_labels"]): r for r in job["relabel_configs"]}
    assert relabels[("__meta_kubernetes_pod_label_app_kubernetes_io_instance",)]["regex"] == "engram"
    assert relabels[("__meta_kubernetes_pod_annotation_prometheus_io_scrape",)]["action"] == "keep"
    targets = {r.get("target_label") for r in job["relabel_configs"]}
    assert {"namespace", "pod", "__address__", "__metrics_path__"} <= targets


def test_grafana_is_provisioned_with_the_bundled_prometheus_and_the_dashboard() -> None:
    rendered = render(METRICS)
    config = rendered.one("ConfigMap", "engram-grafana")["data"]
    assert "url: http://engram-prometheus:9090" in config["datasources.yaml"]
    grafana = rendered.one("Deployment", "engram-grafana")
    volumes = {v["name"]: v for v in pod_spec(grafana)["volumes"]}
    assert volumes["dashboards"]["configMap"]["name"] == "engram-dashboard"
    (container,) = pod_spec(grafana)["containers"]
    env = {item["name"]: item.get("value") for item in container["env"]}
    assert env["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer" and env["GF_AUTH_BASIC_ENABLED"] == "false"
