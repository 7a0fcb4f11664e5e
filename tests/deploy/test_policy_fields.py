"""The chart's static files hold the memory policy exactly as ``engram.policy`` defines it.

Helm needs the CRD and ``values.schema.json`` as files, so they repeat each policy field's default and
bounds; these tests fail as soon as one of them, ``values.yaml`` or the chat Deployment's environment
disagrees with the Python definition.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from engram.policy import MEMORY_MODE, POLICY_FIELDS, RETENTION, PolicyField
from tests.deploy.conftest import CHART, render

CRD_ONLY = {"tenant"}  # spec fields that are not policy


def crd_spec_properties(crd: dict[str, Any]) -> dict[str, Any]:
    (version,) = crd["spec"]["versions"]
    properties: dict[str, Any] = version["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
    return properties


def values_schema() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((CHART / "values.schema.json").read_text())
    return loaded


def policy_nodes(node: Any, path: str = "") -> Iterator[tuple[str, str, dict[str, Any]]]:
    """Every ``properties`` entry named like a policy field, anywhere in a JSON schema: (path, name, schema)."""
    names = {f.crd_name for f in POLICY_FIELDS} | {RETENTION.crd_name}
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "properties" and isinstance(value, dict):
                for name, schema in value.items():
                    if name in names:
                        yield f"{path}.{name}", name, schema
            yield from policy_nodes(value, f"{path}.{key}" if key != "properties" else path)
    elif isinstance(node, list):
        for value in node:
            yield from policy_nodes(value, path)


def bounds(schema: dict[str, Any]) -> dict[str, Any]:
    return {key: schema.get(key) for key in ("type", "default", "minimum", "maximum")}


def expected_bounds(field: PolicyField) -> dict[str, Any]:
    return {"type": "integer", "default": field.default, "minimum": field.minimum, "maximum": field.maximum}


@pytest.mark.parametrize("field", POLICY_FIELDS, ids=lambda f: f.crd_name)
def test_the_crd_holds_each_policy_fields_default_and_bounds(crd: dict[str, Any], field: PolicyField) -> None:
    assert bounds(crd_spec_properties(crd)[field.crd_name]) == expected_bounds(field)


def test_the_crd_holds_the_retention_choices_and_default(crd: dict[str, Any]) -> None:
    retention = crd_spec_properties(crd)[RETENTION.crd_name]
    assert (retention["enum"], retention["default"]) == (list(RETENTION.choices), RETENTION.default)


def test_the_crd_spec_has_no_policy_field_python_does_not_define(crd: dict[str, Any]) -> None:
    defined = {f.crd_name for f in POLICY_FIELDS} | {RETENTION.crd_name, MEMORY_MODE.crd_name} | CRD_ONLY
    assert set(crd_spec_properties(crd)) == defined


def test_values_schema_holds_each_policy_fields_default_and_bounds_wherever_it_appears() -> None:
    found = list(policy_nodes(values_schema()))
    by_field = {f.crd_name: f for f in POLICY_FIELDS}
    wrong = {}
    for path, name, schema in found:
        if name == RETENTION.crd_name:
            got: dict[str, Any] = {"default": schema.get("default"), "enum": schema.get("enum")}
            want: dict[str, Any] = {"default": RETENTION.default, "enum": list(RETENTION.choices)}
        else:
            got, want = bounds(schema), expected_bounds(by_field[name])
        if got != want:
            wrong[path] = (got, want)
    assert not wrong, f"values.schema.json differs from engram.policy (got, expected): {wrong}"
    # the policy appears in the service's defaults and in each sample MemoryNamespace
    paths = {path for path, _, _ in found}
    for field in POLICY_FIELDS:
        assert {f".config.{field.crd_name}", f".memoryNamespaces.items.spec.{field.crd_name}"} <= paths
    assert ".memoryNamespaces.items.spec.retentionPolicy" in paths


def test_the_memory_mode_has_the_same_choices_in_the_crd_the_values_schema_and_values_yaml(
    crd: dict[str, Any],
) -> None:
    mode = crd_spec_properties(crd)[MEMORY_MODE.crd_name]
    assert mode["enum"] == list(MEMORY_MODE.choices) and "default" not in mode  # unset: the service's default
    properties = values_schema()["properties"]
    assert properties["config"]["properties"]["memory"]["enum"] == list(MEMORY_MODE.choices)
    sample_spec = properties["memoryNamespaces"]["items"]["properties"]["spec"]["properties"]
    assert sample_spec[MEMORY_MODE.crd_name]["enum"] == list(MEMORY_MODE.choices)
    assert yaml.safe_load((CHART / "values.yaml").read_text())["config"]["memory"] in MEMORY_MODE.choices


def test_the_chat_deployment_passes_the_memory_mode_as_engram_memory() -> None:
    (container,) = render().one("Deployment", "engram-chat")["spec"]["template"]["spec"]["containers"]
    env = {item["name"]: item.get("value") for item in container["env"]}
    assert env["ENGRAM_MEMORY"] == "window"


def test_values_yaml_defaults_are_the_policy_defaults() -> None:
    config = yaml.safe_load((CHART / "values.yaml").read_text())["config"]
    assert {f.crd_name: config[f.crd_name] for f in POLICY_FIELDS} == {f.crd_name: f.default for f in POLICY_FIELDS}


def test_the_chat_deployment_passes_each_policy_default_in_its_settings_variable() -> None:
    (container,) = render().one("Deployment", "engram-chat")["spec"]["template"]["spec"]["containers"]
    env = {item["name"]: item.get("value") for item in container["env"]}
    assert {f.env_name: env.get(f.env_name) for f in POLICY_FIELDS} == {
        f.env_name: str(f.default) for f in POLICY_FIELDS
    }
