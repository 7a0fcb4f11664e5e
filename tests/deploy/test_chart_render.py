"""The chart lints, renders with every values file, and every built-in object passes kubernetes-validate
--strict for the oldest and newest Kubernetes versions the chart supports."""

from __future__ import annotations

import re
from pathlib import Path

import kubernetes_validate
import pytest

from tests.deploy.conftest import (
    ALL_VALUES,
    CHART,
    CI_VALUES,
    KUBERNETES_VERSIONS,
    NAMESPACE,
    RELEASE,
    helm,
    render,
    values_id,
)

# Custom resources: no schema ships with kubernetes-validate. MemoryNamespace is checked against its
# CRD in test_samples.py; the others get structural asserts in test_manifest_properties.py.
CUSTOM_KINDS = {
    ("engram.dev/v1alpha1", "MemoryNamespace"),
    ("monitoring.coreos.com/v1", "ServiceMonitor"),
    ("gateway.networking.k8s.io/v1", "HTTPRoute"),
}


def test_ci_values_cover_the_required_scenarios() -> None:
    names = {path.name for path in CI_VALUES}
    assert {
        "defaults-values.yaml",
        "external-redis-values.yaml",
        "metrics-values.yaml",
        "ha-redis-values.yaml",
    } <= names


def test_chart_lints_strictly_with_default_values() -> None:
    result = helm("lint", "--strict", str(CHART))
    assert "0 chart(s) failed" in result.stdout


@pytest.mark.parametrize("values", ALL_VALUES, ids=values_id)
def test_chart_lints_strictly_with_values_file(values: Path) -> None:
    result = helm("lint", "--strict", str(CHART), "--values", str(values))
    assert "0 chart(s) failed" in result.stdout


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("values", ALL_VALUES, ids=values_id)
def test_rendered_objects_pass_kubernetes_validate_strict(values: Path, version: str) -> None:
    rendered = render(values)
    assert rendered.docs, "nothing rendered"
    for doc in rendered.docs:
        if (doc["apiVersion"], doc["kind"]) in CUSTOM_KINDS:
            continue
        name = f"{doc['kind']}/{doc['metadata']['name']}"
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as error:
            path = ".".join(str(part) for part in error.path)
            pytest.fail(f"{name} is invalid for Kubernetes {version} at {path}: {error.message}")
        except kubernetes_validate.SchemaNotFoundError as error:
            pytest.fail(f"{name}: {error.message} (an API version this Kubernetes does not serve?)")


def test_kubernetes_validate_rejects_an_unknown_field() -> None:
    """The strict check is live: a misspelt field in a rendered Deployment fails it."""
    deployment = render(CI_VALUES[0]).one("Deployment", "engram-chat")
    broken = {**deployment, "spec": {**deployment["spec"], "replica": 3}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSIONS[-1], strict=True)


def test_values_schema_rejects_an_unknown_key() -> None:
    result = helm("template", RELEASE, str(CHART), "--set", "chat.replicas=4", check=False)
    assert result.returncode != 0
    assert "additional properties 'replicas' not allowed" in result.stderr


def test_values_schema_rejects_an_invalid_value() -> None:
    result = helm("template", RELEASE, str(CHART), "--set", "config.auth=optional", check=False)
    assert result.returncode != 0
    assert "/config/auth" in result.stderr


def test_external_redis_requires_its_url_and_secret() -> None:
    result = helm("template", RELEASE, str(CHART), "--set", "redis.enabled=false", check=False)
    assert result.returncode != 0
    assert "externalRedis.url is required" in result.stderr or "externalRedis.existingSecret is required" in (
        result.stderr
    )


def test_grafana_without_prometheus_is_refused() -> None:
    result = helm("template", RELEASE, str(CHART), "--set", "metrics.grafana.enabled=true", check=False)
    assert result.returncode != 0
    assert "metrics.grafana.enabled needs metrics.prometheus.enabled" in result.stderr


@pytest.mark.parametrize("values", ALL_VALUES, ids=values_id)
def test_every_object_is_in_the_release_namespace_or_cluster_scoped(values: Path) -> None:
    cluster_scoped = {"ClusterRole", "ClusterRoleBinding"}
    for doc in render(values).docs:
        if doc["kind"] in cluster_scoped:
            assert "namespace" not in doc["metadata"]
        else:
            assert doc["metadata"].get("namespace") == NAMESPACE, f"{doc['kind']}/{doc['metadata']['name']}"


@pytest.mark.parametrize("values", ALL_VALUES, ids=values_id)
def test_every_object_carries_the_recommended_labels(values: Path) -> None:
    required = {
        "helm.sh/chart",
        "app.kubernetes.io/name",
        "app.kubernetes.io/instance",
        "app.kubernetes.io/version",
        "app.kubernetes.io/component",
        "app.kubernetes.io/part-of",
        "app.kubernetes.io/managed-by",
    }
    for doc in render(values).docs:
        labels = set((doc["metadata"].get("labels") or {}).keys())
        assert required <= labels, f"{doc['kind']}/{doc['metadata']['name']} lacks {required - labels}"


def test_notes_render_with_next_steps_for_the_installed_options() -> None:
    """NOTES.txt renders (helm template skips it; a client-side dry-run install renders it)."""
    defaults = helm("install", RELEASE, str(CHART), "-n", NAMESPACE, "--dry-run=client").stdout
    notes = defaults[defaults.index("NOTES:") :]
    assert "kubectl -n engram port-forward service/engram-chat 8080:80" in notes
    assert "kind: MemoryNamespace" in notes  # no sample tenant: it says how to create one
    assert "Authorization: Bearer $ENGRAM_API_KEY" in notes
    assert "helm -n engram test engram --logs" in notes
    assert "--set chat.replicaCount=5" in notes

    kind = helm(
        "install", RELEASE, str(CHART), "-n", NAMESPACE, "--dry-run=client", "--values", str(ALL_VALUES[-1])
    ).stdout
    kind_notes = kind[kind.index("NOTES:") :]
    assert "get secret demo-engram" in kind_notes
    assert "service/engram-prometheus 9090:9090" in kind_notes
    assert "service/engram-grafana 3000:3000" in kind_notes

    open_auth = helm(
        "install", RELEASE, str(CHART), "-n", NAMESPACE, "--dry-run=client", "--set", "config.auth=disabled"
    ).stdout
    assert "Authorization" not in open_auth[open_auth.index("NOTES:") :]


@pytest.mark.parametrize("values", CI_VALUES, ids=values_id)
def test_notes_render_for_every_ci_values_file(values: Path) -> None:
    result = helm("install", RELEASE, str(CHART), "-n", NAMESPACE, "--dry-run=client", "--values", str(values))
    notes = result.stdout[result.stdout.index("NOTES:") :]
    assert "<no value>" not in notes
    assert "1. Wait for the rollout" in notes and "6. Check the whole path" in notes


def test_packaged_chart_renders_like_the_source(tmp_path: Path) -> None:
    """.helmignore keeps what templates read with .Files (dashboard, hook scripts) in the package."""
    helm("package", str(CHART), "--destination", str(tmp_path))
    (package,) = tmp_path.glob("engram-*.tgz")
    kind_values = ALL_VALUES[-1]
    packaged = helm("template", RELEASE, str(package), "--namespace", NAMESPACE, "--values", str(kind_values))
    source = helm("template", RELEASE, str(CHART), "--namespace", NAMESPACE, "--values", str(kind_values))
    strip = re.compile(r"^\s*(checksum/|[a-z-]+-password:|admin-password|service-password).*$", re.M)
    assert strip.sub("", packaged.stdout) == strip.sub("", source.stdout)
