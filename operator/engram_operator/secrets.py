"""The Secret a MemoryNamespace owns: the tenant's credentials in clear, for its workloads.

Data keys: ``tenant``, ``key-prefix``, ``api-key``, ``redis-username``, ``redis-password``.

The Secret is the source of truth for the clear credentials: Redis keeps only their hashes. So a restarted
operator reads the Secret and changes nothing, and a deleted Secret can only be replaced with new
credentials (deleting it is how an operator-managed key is rotated).
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, cast

from kubernetes_asyncio import client
from kubernetes_asyncio.client.rest import ApiException

from engram.redis_keys import KeySpace
from engram.tenancy.acl import acl_username
from engram.tenancy.apikeys import parse_api_key
from engram.tenancy.provision import Credentials
from engram_operator.resource import (
    GROUP,
    KIND,
    LABEL_MANAGED_BY,
    LABEL_MEMORY_NAMESPACE,
    LABEL_TENANT,
    MANAGED_BY,
    VERSION,
    secret_name,
)


class SecretConflict(Exception):
    """A Secret with our name exists but was not made for this resource: we never overwrite it."""


@dataclass(frozen=True, slots=True)
class SecretState:
    name: str
    credentials: Credentials
    changes: list[str]


def _encode(data: Mapping[str, str]) -> dict[str, str]:
    return {key: base64.b64encode(value.encode()).decode() for key, value in data.items()}


def _decode(data: Mapping[str, str] | None) -> dict[str, str]:
    decoded: dict[str, str] = {}
    for key, value in (data or {}).items():
        try:
            decoded[key] = base64.b64decode(value, validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            continue  # an unreadable entry counts as missing
    return decoded


def secret_data(keys: KeySpace, tenant: str, credentials: Credentials) -> dict[str, str]:
    return {
        "tenant": tenant,
        "key-prefix": keys.tenant_prefix(tenant),
        "api-key": credentials.api_key,
        "redis-username": acl_username(keys, tenant),
        "redis-password": credentials.redis_password,
    }


def build_secret(body: Mapping[str, Any], keys: KeySpace, tenant: str, credentials: Credentials) -> dict[str, Any]:
    meta = body["metadata"]
    secret: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "metadata": {
            "name": secret_name(meta["name"]),
            "namespace": meta["namespace"],
            "labels": {
                LABEL_MANAGED_BY: MANAGED_BY,
                LABEL_TENANT: tenant,
                LABEL_MEMORY_NAMESPACE: meta["name"],
            },
        },
        "data": _encode(secret_data(keys, tenant, credentials)),
    }
    # Owned by the resource: Kubernetes garbage-collects it with the MemoryNamespace.
    secret["metadata"]["ownerReferences"] = [
        {
            "apiVersion": body.get("apiVersion", f"{GROUP}/{VERSION}"),
            "kind": body.get("kind", KIND),
            "name": meta["name"],
            "uid": meta.get("uid"),
            "controller": True,
            "blockOwnerDeletion": True,
        }
    ]
    return secret


def credentials_from(data: Mapping[str, str], keys: KeySpace, tenant: str) -> Credentials | None:
    """The credentials a Secret holds, if they are complete and belong to ``tenant``."""
    api_key = data.get("api-key", "")
    parsed = parse_api_key(api_key)
    password = data.get("redis-password", "")
    if parsed is None or parsed.tenant != tenant or not password:
        return None
    return Credentials(api_key=api_key, redis_password=password)


async def ensure_secret(
    core: client.CoreV1Api, body: Mapping[str, Any], keys: KeySpace, tenant: str, *, after_conflict: bool = False
) -> SecretState:
    """Read the resource's Secret, creating it (with new credentials) when missing or unusable."""
    meta = body["metadata"]
    namespace, name = meta["namespace"], secret_name(meta["name"])
    existing = await _read(core, namespace, name)
    if existing is None:
        credentials = Credentials.generate(tenant)
        try:
            # A plain dict is serialized as is; the client's models would only be converted back.
            await core.create_namespaced_secret(namespace, cast(Any, build_secret(body, keys, tenant, credentials)))
        except ApiException as error:
            if error.status != 409 or after_conflict:
                raise
            # Created meanwhile (a replayed ADDED event, a concurrent handler): use that one.
            return await ensure_secret(core, body, keys, tenant, after_conflict=True)
        return SecretState(name, credentials, [f"created Secret {name} with new credentials"])

    labels, raw_data = existing
    if labels.get(LABEL_MEMORY_NAMESPACE) != meta["name"] or labels.get(LABEL_MANAGED_BY) != MANAGED_BY:
        raise SecretConflict(f"Secret {namespace}/{name} exists and was not created for this MemoryNamespace")

    data = _decode(raw_data)
    changes: list[str] = []
    found = credentials_from(data, keys, tenant)
    if found is None:
        changes.append(f"Secret {name} held no usable credentials: issued new ones")
    credentials = found or Credentials.generate(tenant)
    wanted = secret_data(keys, tenant, credentials)
    # Compare only our keys: entries someone else added are left alone.
    if any(data.get(key) != value for key, value in wanted.items()) or labels.get(LABEL_TENANT) != tenant:
        patch = {"metadata": {"labels": {LABEL_TENANT: tenant}}, "data": _encode(wanted)}
        await core.patch_namespaced_secret(name, namespace, patch)
        if not changes:
            changes.append(f"repaired Secret {name}")
    return SecretState(name, credentials, changes)


async def delete_secret(core: client.CoreV1Api, body: Mapping[str, Any]) -> bool:
    """Delete the resource's Secret if it is ours (Kubernetes would collect it too; this is immediate)."""
    meta = body["metadata"]
    namespace, name = meta["namespace"], secret_name(meta["name"])
    existing = await _read(core, namespace, name)
    if existing is None or existing[0].get(LABEL_MEMORY_NAMESPACE) != meta["name"]:
        return False
    try:
        await core.delete_namespaced_secret(name, namespace)
    except ApiException as error:
        if error.status != 404:
            raise
        return False
    return True


async def _read(core: client.CoreV1Api, namespace: str, name: str) -> tuple[dict[str, str], dict[str, str]] | None:
    """The Secret's labels and (base64) data, or None when there is no such Secret."""
    try:
        secret = await core.read_namespaced_secret(name, namespace)
    except ApiException as error:
        if error.status == 404:
            return None
        raise
    labels = dict((secret.metadata.labels if secret.metadata else None) or {})
    return labels, dict(secret.data or {})
