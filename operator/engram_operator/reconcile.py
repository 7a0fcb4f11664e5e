"""What the operator does for a MemoryNamespace, as plain async functions (the kopf handlers only call these).

``reconcile`` is level-triggered: creation, spec changes, operator restarts and the repair timer all run it,
and it changes only what differs from the desired state. ``finalize`` undoes it when the resource goes.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import os
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from kubernetes_asyncio import client, config

from engram.connections import key_space
from engram.errors import StoreUnavailable
from engram.redis_keys import KeySpace
from engram.settings import Settings
from engram.tenancy.nodes import RedisNodes
from engram.tenancy.provision import (
    Removal,
    TenantConflict,
    count_sessions,
    ensure_tenant,
    record_for,
    remove_tenant,
    tenant_usage,
)
from engram_operator.resource import InvalidSpec, owner_id, spec_from_body, tenant_of
from engram_operator.secrets import SecretConflict, delete_secret, ensure_secret

log = logging.getLogger(__name__)

Phase = Literal["Pending", "Ready", "Failed"]
REDIS_RETRY_SECONDS = 10.0
# Reconciles running at once: bounds Redis connections (the pool has ENGRAM_REDIS_MAX_CONNECTIONS) and API
# calls when an operator restart resumes every resource together.
MAX_CONCURRENT_RECONCILES = 16


@dataclass
class Runtime:
    """What the handlers share: clients and settings, made once at operator start-up."""

    settings: Settings
    keys: KeySpace
    nodes: RedisNodes
    api: client.ApiClient
    core: client.CoreV1Api
    # One reconcile at a time per resource: the change handlers and the repair timer may overlap.
    locks: defaultdict[tuple[str, str], asyncio.Lock] = field(default_factory=lambda: defaultdict(asyncio.Lock))
    slots: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(MAX_CONCURRENT_RECONCILES))

    @classmethod
    async def start(cls, settings: Settings) -> Runtime:
        api = await kubernetes_client()
        return cls(
            settings=settings,
            keys=key_space(settings),
            nodes=RedisNodes.from_settings(settings),
            api=api,
            core=client.CoreV1Api(api),
        )

    async def close(self) -> None:
        await self.nodes.aclose()
        await self.api.close()


async def kubernetes_client() -> client.ApiClient:
    """An API client from the pod's service account, else from $KUBECONFIG / ~/.kube/config."""
    configuration = client.Configuration()
    try:
        config.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
    except config.ConfigException:
        await config.load_kube_config(
            config_file=os.environ.get("KUBECONFIG"), client_configuration=configuration, persist_config=False
        )
    return client.ApiClient(configuration=configuration)


@dataclass(frozen=True, slots=True)
class Outcome:
    """The status to write, what changed (for Events), and whether to retry soon."""

    status: dict[str, Any]
    changes: list[str] = field(default_factory=list)
    retry_after: float | None = None

    @property
    def phase(self) -> str:
        return str(self.status.get("phase", ""))

    @property
    def message(self) -> str:
        conditions = self.status.get("conditions") or [{}]
        return str(conditions[0].get("message", ""))


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def build_status(body: Mapping[str, Any], phase: Phase, reason: str, message: str, **fields: Any) -> dict[str, Any]:
    """The status subresource, with a Ready condition whose transition time moves only on transitions."""
    previous = body.get("status") or {}
    ready = "True" if phase == "Ready" else "False"
    old = next((c for c in previous.get("conditions") or [] if c.get("type") == "Ready"), None)
    unchanged = old is not None and old.get("status") == ready and old.get("lastTransitionTime")
    since = old["lastTransitionTime"] if old is not None and unchanged else _now()
    generation = (body.get("metadata") or {}).get("generation")
    condition: dict[str, Any] = {
        "type": "Ready",
        "status": ready,
        "reason": reason,
        "message": message,
        "lastTransitionTime": since,
    }
    status: dict[str, Any] = {"phase": phase, "conditions": [condition], **fields}
    if generation is not None:
        condition["observedGeneration"] = generation
        status["observedGeneration"] = generation
    return status


async def reconcile(rt: Runtime, body: Mapping[str, Any]) -> Outcome:
    """Bring the tenant of one MemoryNamespace to its desired state (Secret, Redis) and report status."""
    meta = body["metadata"]
    async with rt.locks[(meta["namespace"], meta["name"])], rt.slots:
        return await _reconcile(rt, body)


async def _reconcile(rt: Runtime, body: Mapping[str, Any]) -> Outcome:
    meta = body["metadata"]
    try:
        spec = spec_from_body(body)
    except InvalidSpec as error:
        return Outcome(build_status(body, "Failed", "InvalidSpec", str(error)))
    established = (body.get("status") or {}).get("tenant")
    if established and established != spec.tenant:
        message = f"spec.tenant changed from {established!r} to {spec.tenant!r}: it is immutable, recreate the resource"
        return Outcome(build_status(body, "Failed", "TenantImmutable", message, tenant=established))

    identity: dict[str, Any] = {"tenant": spec.tenant, "keyPrefix": rt.keys.tenant_prefix(spec.tenant)}
    try:
        secret = await ensure_secret(rt.core, body, rt.keys, spec.tenant)
        identity["secretName"] = secret.name
        record = record_for(rt.keys, spec, secret.credentials, owner_id(meta["namespace"], meta["name"]))
        changes = secret.changes + await ensure_tenant(rt.nodes, rt.keys, record)
        identity["sessions"] = await count_sessions(rt.nodes.primary, rt.keys, spec.tenant)
        usage = await tenant_usage(rt.nodes.primary, rt.keys, spec.tenant)
        identity["usage"] = {"sessions": usage.sessions, "storedBytes": usage.stored_bytes}
    except (SecretConflict, TenantConflict) as error:
        # The tenant is not ours: status.tenant would mark it as established (see TenantImmutable above).
        reason = "SecretConflict" if isinstance(error, SecretConflict) else "TenantConflict"
        return Outcome(build_status(body, "Failed", reason, str(error)))
    except StoreUnavailable as error:
        status = build_status(body, "Pending", "RedisUnavailable", str(error), **identity)
        return Outcome(status, retry_after=min(REDIS_RETRY_SECONDS, rt.settings.operator_repair_interval_seconds))
    message = f"tenant {spec.tenant} ready: keys {identity['keyPrefix']}*, credentials in Secret {secret.name}"
    return Outcome(build_status(body, "Ready", "Reconciled", message, **identity), changes)


async def finalize(rt: Runtime, body: Mapping[str, Any]) -> list[str]:
    """Undo a MemoryNamespace: revoke the tenant, purge or keep its data, delete the Secret.

    Returns what was done. Raises :class:`StoreUnavailable` while Redis is unreachable (the finalizer
    then stays and deletion is retried: dropping it would leave a live ACL user and API key behind).
    """
    meta = body["metadata"]
    status = body.get("status") or {}
    async with rt.locks[(meta["namespace"], meta["name"])], rt.slots:
        done: list[str] = []
        try:
            # The tenant actually set up (status) wins over an illegally edited spec.
            tenant = status.get("tenant") or tenant_of(body)
            retention = spec_from_body(body).retention
        except InvalidSpec:
            tenant, retention = status.get("tenant"), "Retain"
        if tenant:
            try:
                removal: Removal = await remove_tenant(
                    rt.nodes,
                    rt.keys,
                    tenant,
                    owner=owner_id(meta["namespace"], meta["name"]),
                    purge=retention == "Delete",
                    batch=rt.settings.operator_purge_batch,
                )
            except TenantConflict as error:
                done.append(f"left tenant {tenant} alone: {error}")
            else:
                done.append(f"revoked tenant {tenant} (API key and Redis user)")
                if removal.sessions_purged is None:
                    done.append("kept its sessions (retentionPolicy Retain)")
                else:
                    done.append(f"purged {removal.sessions_purged} sessions (retentionPolicy Delete)")
        if await delete_secret(rt.core, body):
            done.append("deleted its Secret")
    rt.locks.pop((meta["namespace"], meta["name"]), None)
    return done
