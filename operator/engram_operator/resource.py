"""The MemoryNamespace resource: its coordinates, and reading its spec into a tenant spec.

The API server validates and defaults the spec with the CRD's schema; this module checks again, because
an operator must not trust what it cannot see enforced (and test API servers such as KMock enforce nothing).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from engram.errors import InvalidTenant
from engram.policy import Policy
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

# Defaults and bounds, as in the CRD's openAPIV3Schema.
DEFAULTS: dict[str, Any] = {
    "sessionTTLSeconds": 604_800,
    "maxMessagesPerSession": 10_000,
    "tokenLimit": 3000,
    "retentionPolicy": "Retain",
}
BOUNDS: dict[str, tuple[int, int]] = {
    "sessionTTLSeconds": (0, 315_360_000),
    "maxMessagesPerSession": (2, 10_000_000),
    "tokenLimit": (16, 1_000_000),
}


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
    """The tenant spec a MemoryNamespace asks for. Raises :class:`InvalidSpec`."""
    spec = {**DEFAULTS, **(body.get("spec") or {})}
    for field, (low, high) in BOUNDS.items():
        value = spec[field]
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
            raise InvalidSpec(f"spec.{field}: expected an integer in [{low}, {high}], got {value!r}")
    retention = spec["retentionPolicy"]
    if retention not in ("Delete", "Retain"):
        raise InvalidSpec(f"spec.retentionPolicy: expected Delete or Retain, got {retention!r}")
    return TenantSpec(
        tenant=tenant_of(body),
        policy=Policy(
            token_limit=spec["tokenLimit"],
            session_ttl_seconds=spec["sessionTTLSeconds"],
            max_messages_per_session=spec["maxMessagesPerSession"],
        ),
        retention=retention,
    )
