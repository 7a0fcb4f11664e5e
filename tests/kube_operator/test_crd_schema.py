"""The MemoryNamespace CRD: a valid CRD manifest, samples that pass its own openAPIV3Schema, invalid resources
that fail it, and defaults and bounds that agree with what the operator assumes."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from engram.policy import MEMORY_MODE, POLICY_FIELDS, RETENTION, Policy, PolicyField
from engram.redis_keys import TENANT_PATTERN
from engram_operator.resource import GROUP, KIND, PLURAL, VERSION, InvalidSpec, spec_from_body

ROOT = Path(__file__).resolve().parents[2]
CRD_PATH = ROOT / "deploy/helm/engram/crds/memorynamespaces.engram.dev.yaml"
SAMPLES = sorted((ROOT / "deploy/samples").glob("memorynamespace-*.yaml"))


def crd() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(CRD_PATH.read_text())
    return loaded


def schema() -> dict[str, Any]:
    (version,) = crd()["spec"]["versions"]
    found: dict[str, Any] = version["schema"]["openAPIV3Schema"]
    return found


def validate(resource: dict[str, Any]) -> None:
    jsonschema.Draft7Validator(schema()).validate(resource)


def resource(**spec: Any) -> dict[str, Any]:
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": KIND, "metadata": {"name": "acme"}, "spec": spec}


def test_the_crd_is_a_valid_kubernetes_manifest() -> None:
    kubernetes_validate.validate(crd(), "1.35.0", strict=True)
    spec = crd()["spec"]
    assert (spec["group"], spec["names"]["plural"], spec["names"]["kind"]) == (GROUP, PLURAL, KIND)
    assert spec["scope"] == "Namespaced"
    (version,) = spec["versions"]
    assert version["name"] == VERSION and version["subresources"] == {"status": {}}


def test_the_schema_is_structural_enough_for_the_api_server() -> None:
    # properties and additionalProperties are mutually exclusive in CRD schemas: unknown fields are pruned.
    def walk(node: Any) -> None:
        if isinstance(node, dict):
            assert not ("properties" in node and "additionalProperties" in node)
            if "properties" in node or "items" in node:
                assert "type" in node
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(schema())


@pytest.mark.parametrize("path", SAMPLES, ids=lambda p: p.name)
def test_samples_are_valid(path: Path) -> None:
    sample = yaml.safe_load(path.read_text())
    validate(sample)
    spec_from_body({**sample, "metadata": {**sample["metadata"], "namespace": "default"}})


def test_there_are_samples() -> None:
    assert len(SAMPLES) >= 2


INVALID = {
    "tenant with capitals": {"tenant": "Acme"},
    "tenant with underscore": {"tenant": "acme_2"},
    "tenant ending in a dash": {"tenant": "acme-"},
    "tenant of 64 characters": {"tenant": "a" * 64},
    "empty tenant": {"tenant": ""},
    "negative TTL": {"sessionTTLSeconds": -1},
    "TTL as a string": {"sessionTTLSeconds": "1h"},
    "one message per session": {"maxMessagesPerSession": 1},
    "tiny token limit": {"tokenLimit": 8},
    "huge token limit": {"tokenLimit": 10_000_000},
    "unknown retention": {"retentionPolicy": "Archive"},
    "retention in lower case": {"retentionPolicy": "delete"},
    "unknown memory mode": {"memory": "everything"},
    "memory mode in capitals": {"memory": "Summary"},
}


@pytest.mark.parametrize("spec", INVALID.values(), ids=INVALID.keys())
def test_invalid_resources_are_rejected_by_the_schema_and_by_the_operator(spec: dict[str, Any]) -> None:
    with pytest.raises(jsonschema.ValidationError):
        validate(resource(**spec))
    body = resource(**spec)
    body["metadata"]["namespace"] = "default"
    with pytest.raises(InvalidSpec):
        spec_from_body(body)


def test_a_resource_without_spec_is_rejected() -> None:
    body = resource()
    del body["spec"]
    with pytest.raises(jsonschema.ValidationError):
        validate(body)


def test_crd_tenant_pattern_and_retention_choices_match_the_operator() -> None:
    # (each policy field's default and bounds: tests/deploy/test_policy_fields.py)
    fields = schema()["properties"]["spec"]["properties"]
    assert fields["tenant"]["pattern"] == f"^{TENANT_PATTERN.pattern}$"
    assert fields["retentionPolicy"]["enum"] == list(RETENTION.choices)


def test_the_memory_mode_reaches_the_tenants_policy_and_unset_means_the_services_default() -> None:
    for mode in MEMORY_MODE.choices:
        body = resource(memory=mode)
        validate(body)
        body["metadata"]["namespace"] = "default"
        assert spec_from_body(body).policy.memory == mode
    assert schema()["properties"]["spec"]["properties"]["memory"]["enum"] == list(MEMORY_MODE.choices)
    assert "default" not in schema()["properties"]["spec"]["properties"]["memory"]


def test_an_empty_spec_gets_the_policy_defaults() -> None:
    body = resource()
    body["metadata"]["namespace"] = "default"
    tenant_spec = spec_from_body(body)
    assert (tenant_spec.policy, tenant_spec.retention) == (Policy(), RETENTION.default)


OUT_OF_BOUNDS = [
    pytest.param(field, value, id=f"{field.crd_name}={value}")
    for field in POLICY_FIELDS
    for value in (field.minimum - 1, field.maximum + 1)
]


@pytest.mark.parametrize(("field", "value"), OUT_OF_BOUNDS)
def test_the_operator_refuses_a_policy_value_out_of_bounds_naming_the_field(field: PolicyField, value: int) -> None:
    body = resource(**{field.crd_name: value})
    body["metadata"]["namespace"] = "default"
    expected = f"spec.{field.crd_name}: expected an integer in [{field.minimum}, {field.maximum}], got {value}"
    with pytest.raises(InvalidSpec) as refused:
        spec_from_body(body)
    assert str(refused.value) == expected
    with pytest.raises(jsonschema.ValidationError):
        validate(resource(**{field.crd_name: value}))


@pytest.mark.parametrize("field", POLICY_FIELDS, ids=lambda f: f.crd_name)
def test_the_operator_takes_each_policy_bound_itself(field: PolicyField) -> None:
    for value in (field.minimum, field.maximum):
        body = resource(**{field.crd_name: value})
        body["metadata"]["namespace"] = "default"
        validate(body)
        assert getattr(spec_from_body(body).policy, field.name) == value


def test_status_fields_the_operator_writes_are_declared() -> None:
    declared = set(schema()["properties"]["status"]["properties"])
    assert {"phase", "conditions", "observedGeneration", "keyPrefix", "secretName", "sessions", "tenant"} <= declared
    status = {
        "phase": "Ready",
        "tenant": "acme",
        "keyPrefix": "engram:acme:",
        "secretName": "acme-engram",
        "sessions": 3,
        "observedGeneration": 2,
        "conditions": [{"type": "Ready", "status": "True", "reason": "Reconciled", "message": "ok",
                        "lastTransitionTime": "2026-01-01T00:00:00Z", "observedGeneration": 2}],
    }  # fmt: skip
    body = copy.deepcopy(resource())
    body["status"] = status
    validate(body)
