"""The MemoryNamespace resource: its coordinates, and reading its spec into a tenant spec.

The API server validates and defaults the spec with the CRD's schema; this module checks again, because
an operator must not trust what it cannot see enforced (and test API servers such as KMock enforce nothing).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from engram.errors import InvalidTenant
from engram.policy import MEMORY_MODE, POLICY_FIELDS, RETENTION, Policy
from engram.redis_keys import validate_tenant
from engram.tenancy.provision import TenantSpec

GROUP = "engram.dev"
VERSION = "v1alpha1"
PLURAL = "memorynamespaces"
KIND = "MemoryNamespace"

# Label and annotation keys: built here and nowhere else.
LABEL_TENANT = f"{GROUP}/tenant"
LABEL_MEMORY_NAMESPACE = f"{GROUP}/memorynamespace"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
MANAGED_BY = "engram-operator"
FINALIZER = f"{GROUP}/memory-namespace"


class InvalidSpec(ValueError):
    """The resource's spec cannot be reconciled; the message says which field and why."""


def owner_id(namespace: str, name: str) -> str:
    """How the registry record names the resource that manages a tenant."""
    return f"{KIND}/{namespace}/{name}"


def secret_name(name: str) -> str:
    return f"{name}-engram"


def tenant_of(body: Mapping[str, Any]) -> str:
    """``spec.tenant``, defaulting to ``metadata.name``, validated as a DNS label."""
    spec = body.get("spec") or {}
    explicit = spec.get("tenant")
    tenant = body["metadata"]["name"] if explicit is None else explicit
    try:
        return validate_tenant(tenant)
    except InvalidTenant as error:
        hint = "" if explicit is not None else " (it defaults to metadata.name: set spec.tenant)"
        raise InvalidSpec(f"spec.tenant: {error}{hint}") from None


def spec_from_body(body: Mapping[str, Any]) -> TenantSpec:
    """The tenant spec a MemoryNamespace asks for, with the defaults and bounds of
    :data:`engram.policy.POLICY_FIELDS` (the CRD's schema holds the same). Raises :class:`InvalidSpec`."""
    spec = body.get("spec") or {}
    values: dict[str, int] = {}
    for field in POLICY_FIELDS:
        value = spec.get(field.crd_name, field.default)
        problem = field.problem(value)
        if problem is not None:
            raise InvalidSpec(f"spec.{field.crd_name}: {problem}")
        values[field.name] = value
    retention = spec.get(RETENTION.crd_name, RETENTION.default)
    problem = RETENTION.problem(retention)
    if problem is not None:
        raise InvalidSpec(f"spec.{RETENTION.crd_name}: {problem}")
    memory = spec.get(MEMORY_MODE.crd_name)
    if (problem := MEMORY_MODE.problem(memory)) is not None:
        raise InvalidSpec(f"spec.{MEMORY_MODE.crd_name}: {problem}")
    policy = Policy(**values, memory=MEMORY_MODE.parse(memory))
    return TenantSpec(tenant=tenant_of(body), policy=policy, retention=RETENTION.parse(retention))
