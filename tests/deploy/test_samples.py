"""Sample MemoryNamespaces rendered from values are valid against the CRD's own openAPIV3Schema."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from tests.deploy.conftest import ALL_VALUES, CHART, CRD_FILE, NAMESPACE, render, values_id


def crd_schema(crd: dict[str, Any]) -> dict[str, Any]:
    assert crd["spec"]["group"] == "engram.dev" and crd["spec"]["names"]["kind"] == "MemoryNamespace"
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1alpha1"]
    assert version["served"] and version["storage"] and "status" in version["subresources"]
    return version["schema"]["openAPIV3Schema"]


def validator(crd: dict[str, Any]) -> jsonschema.Validator:
    # OpenAPI v3 schemas are a JSON Schema draft-4 dialect; x-kubernetes-* keywords are ignored here.
    return jsonschema.Draft4Validator(crd_schema(crd))


@pytest.mark.parametrize("values", ALL_VALUES, ids=values_id)
def test_rendered_memory_namespaces_match_the_crd_schema(values: Path, crd: dict[str, Any]) -> None:
    check = validator(crd)
    for resource in render(values).all("MemoryNamespace"):
        assert resource["apiVersion"] == "engram.dev/v1alpha1"
        assert resource["metadata"]["namespace"] == NAMESPACE
        errors = [f"{'.'.join(map(str, e.path))}: {e.message}" for e in check.iter_errors(resource)]
        assert not errors, f"{resource['metadata']['name']}: {errors}"


def test_samples_are_rendered_from_values(crd: dict[str, Any]) -> None:
    ha = next(path for path in ALL_VALUES if path.name == "ha-redis-values.yaml")
    resources = {r["metadata"]["name"]: r for r in render(ha).all("MemoryNamespace")}
    assert set(resources) == {"acme", "globex"}
    assert resources["acme"]["spec"] == {
        "tenant": "acme",
        "sessionTTLSeconds": 86400,
        "maxMessagesPerSession": 2000,
        "tokenLimit": 4000,
        "maxSessions": 10000,
        "maxStoredBytes": 1073741824,
        "requestsPerSecond": 50,
        "burst": 100,
        "retentionPolicy": "Retain",
    }
    assert not render().all("MemoryNamespace")


def test_crd_schema_rejects_an_invalid_sample(crd: dict[str, Any]) -> None:
    """The validation is live: what the API server would refuse fails here too."""
    rendered = render(set_json=('memoryNamespaces=[{"name": "bad", "spec": {"tokenLimit": 16}}]',))
    (resource,) = rendered.all("MemoryNamespace")
    check = validator(crd)
    assert not list(check.iter_errors(resource))
    # (Unknown fields are not errors: the API server prunes them from structural schemas.)
    for field, value in (("retentionPolicy", "Forever"), ("tokenLimit", 1), ("tenant", "Not_A_Label")):
        broken = {**resource, "spec": {**resource["spec"], field: value}}
        assert list(check.iter_errors(broken)), f"spec.{field}={value!r} was accepted"


def test_values_schema_for_samples_names_only_crd_fields(crd: dict[str, Any]) -> None:
    values_schema = json.loads((CHART / "values.schema.json").read_text())
    sample_spec = values_schema["properties"]["memoryNamespaces"]["items"]["properties"]["spec"]["properties"]
    crd_spec = crd_schema(crd)["properties"]["spec"]["properties"]
    assert set(sample_spec) <= set(crd_spec), f"values.schema.json names {set(sample_spec) - set(crd_spec)}"
    assert crd_spec["retentionPolicy"]["enum"] == sample_spec["retentionPolicy"]["enum"]


def test_crd_ships_in_the_chart_crds_folder() -> None:
    if not CRD_FILE.exists():
        pytest.skip("the CRD is written by the tenancy work")
    assert CRD_FILE.parent == CHART / "crds"
