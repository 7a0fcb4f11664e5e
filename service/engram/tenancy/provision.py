"""Bringing a tenant's Redis side to its desired state: shared by the operator and ``engram tenant``.

Both functions are level-triggered and idempotent: they read what is there, change only what differs,
and say what they changed (an empty list means "already in shape"). Call them again after any failure.

A tenant in Redis is:
- its registry record and membership of the tenant set (what the chat service reads);
- an ACL user on every node, limited to the tenant's keys and Engram's command allow-list;
- Engram's function library on the primary (tenants may FCALL it but never load functions themselves).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from engram.connections import RedisClient
from engram.errors import InvalidTenant, StoreUnavailable
from engram.history.functions import CLUSTER_CLIENT_COMMANDS, TENANT_COMMANDS, ensure_library
from engram.history.store import HistoryStore
from engram.messages import Usage
from engram.policy import Policy, Retention
from engram.redis_keys import KeySpace, validate_tenant
from engram.tenancy import acl
from engram.tenancy.apikeys import generate_api_key, generate_password, hash_secret
from engram.tenancy.nodes import RedisNodes, node_name
from engram.tenancy.records import CLI_OWNER, InvalidRecord, TenantRecord
from engram.tenancy.registry import read_record, redis_call

log = logging.getLogger(__name__)


class TenantConflict(InvalidTenant):
    """The tenant exists and is managed by someone else (another resource, or the CLI)."""

    code = "tenant_conflict"


@dataclass(frozen=True, slots=True)
class TenantSpec:
    """What a tenant should be (from a MemoryNamespace's spec or the CLI's flags)."""

    tenant: str
    policy: Policy = field(default_factory=Policy)
    retention: Retention = "Retain"

    def __post_init__(self) -> None:
        validate_tenant(self.tenant)


@dataclass(frozen=True, slots=True)
class Credentials:
    """A tenant's secrets in clear: handed out once (stdout or a Secret), stored in Redis only hashed."""

    api_key: str
    redis_password: str

    @classmethod
    def generate(cls, tenant: str) -> Credentials:
        return cls(api_key=generate_api_key(tenant), redis_password=generate_password())

    def __repr__(self) -> str:  # never print secrets by accident
        return "Credentials(<redacted>)"


def desired_record(
    keys: KeySpace, spec: TenantSpec, *, api_key_sha256: str, password_sha256: str, owner: str
) -> TenantRecord:
    return TenantRecord(
        tenant=spec.tenant,
        policy=spec.policy,
        api_key_sha256=api_key_sha256,
        redis_username=acl.acl_username(keys, spec.tenant),
        password_sha256=password_sha256,
        retention=spec.retention,
        owner=owner,
    )


def record_for(keys: KeySpace, spec: TenantSpec, credentials: Credentials, owner: str) -> TenantRecord:
    return desired_record(
        keys,
        spec,
        api_key_sha256=hash_secret(credentials.api_key),
        password_sha256=hash_secret(credentials.redis_password),
        owner=owner,
    )


async def current_record(nodes: RedisNodes, keys: KeySpace, tenant: str) -> TenantRecord | None:
    """The stored record; an unreadable one counts as absent (it will be rewritten)."""
    try:
        return await read_record(nodes.primary, keys, tenant)
    except InvalidRecord as error:
        log.warning("tenant %s: registry record unreadable, it will be rewritten: %s", tenant, error)
        return None


async def ensure_tenant(
    nodes: RedisNodes,
    keys: KeySpace,
    record: TenantRecord,
    *,
    commands: Sequence[str] = TENANT_COMMANDS,
) -> list[str]:
    """Make Redis hold ``record``, the tenant's ACL user on every node, and the function library.

    Returns what was changed. Raises :class:`TenantConflict` when the tenant belongs to another owner
    (nothing is changed then) and :class:`~engram.errors.StoreUnavailable` when a node could not be
    reached; the nodes that could be reached are brought up to date first.
    """
    tenant = record.tenant
    if keys.tenant_slot:  # a Cluster: its users need what redis-py's Cluster client sends too
        commands = (*commands, *CLUSTER_CLIENT_COMMANDS)
    current = await current_record(nodes, keys, tenant)
    if current is not None and current.owner != record.owner:
        raise TenantConflict(f"tenant {tenant!r} is already managed by {current.owner}")

    changes: list[str] = []
    if await redis_call(lambda: ensure_library(nodes.primary), "load the function library"):
        changes.append("loaded the Redis function library")

    failures: list[str] = []
    for client in await redis_call(nodes.every_node, "list the nodes"):
        try:
            if await _ensure_acl_user(nodes, client, keys, record, commands):
                changes.append(f"set ACL user {record.redis_username} on {node_name(client)}")
        except (RedisError, OSError) as error:
            failures.append(f"{node_name(client)}: {type(error).__name__}: {error}")

    changes.extend(await _ensure_record(nodes.primary, keys, current, record))
    if failures:
        raise StoreUnavailable(f"tenant {tenant}: could not set the ACL user on {'; '.join(failures)}")
    return changes


async def _ensure_acl_user(
    nodes: RedisNodes, client: aioredis.Redis, keys: KeySpace, record: TenantRecord, commands: Sequence[str]
) -> bool:
    name = node_name(client)
    if name not in nodes.supported:
        nodes.supported[name] = await acl.supported_commands(client, commands)
    rule = acl.tenant_acl_rule(keys, record.tenant, record.password_sha256, nodes.supported[name])
    if not await acl.apply_user(client, rule):
        return False
    await acl.save_acl(client)  # no-op without an aclfile; the repair timer covers restarts then
    return True


async def _ensure_record(
    client: RedisClient, keys: KeySpace, current: TenantRecord | None, record: TenantRecord
) -> list[str]:
    changes: list[str] = []
    key = keys.tenant_record(record.tenant)
    if current is None or current.content() != record.content():
        now = str(time.time())
        fields: dict[Any, Any] = {**record.content(), "updated_at": now}  # redis-py's Mapping is invariant
        async with client.pipeline(transaction=True) as pipe:
            pipe.hset(key, mapping=fields)
            pipe.hsetnx(key, "created_at", now)
            await redis_call(pipe.execute, "write tenant record")
        if current is None:
            changes.append("wrote the registry record")
        else:
            old, new = current.content(), record.content()
            changed = sorted(name for name in new if old.get(name) != new[name])
            changes.append(f"updated the registry record ({', '.join(changed)})")
    if await redis_call(lambda: client.sadd(keys.tenant_set(), record.tenant), "register tenant"):
        changes.append("added the tenant to the tenant set")
    return changes


@dataclass(frozen=True, slots=True)
class Removal:
    record_deleted: bool
    acl_deleted_on: list[str]
    sessions_purged: int | None  # None: data retained


async def remove_tenant(
    nodes: RedisNodes,
    keys: KeySpace,
    tenant: str,
    *,
    owner: str | None,
    purge: bool,
    batch: int = 100,
) -> Removal:
    """Revoke the tenant (registry record first, so its API key stops working), delete its ACL user on
    every node, and with ``purge`` delete every key of the tenant (SCAN in batches, never KEYS).

    With ``owner`` set, a tenant managed by someone else is left alone (:class:`TenantConflict`).
    Safe to repeat after a partial failure.
    """
    validate_tenant(tenant)
    current = await current_record(nodes, keys, tenant)
    if current is not None and owner is not None and current.owner != owner:
        raise TenantConflict(f"tenant {tenant!r} is managed by {current.owner}, not {owner}")

    primary = nodes.primary
    async with primary.pipeline(transaction=False) as pipe:
        pipe.delete(keys.tenant_record(tenant))
        pipe.srem(keys.tenant_set(), tenant)
        deleted, _ = await redis_call(pipe.execute, "delete tenant record")

    username = acl.acl_username(keys, tenant)
    deleted_on: list[str] = []
    failures: list[str] = []
    for client in await redis_call(nodes.every_node, "list the nodes"):
        try:
            if await acl.delete_user(client, username):
                deleted_on.append(node_name(client))
                await acl.save_acl(client)
        except (RedisError, OSError) as error:
            failures.append(f"{node_name(client)}: {type(error).__name__}: {error}")

    purged = await purge_sessions(primary, keys, tenant, batch=batch) if purge else None
    if failures:
        raise StoreUnavailable(f"tenant {tenant}: could not delete the ACL user on {'; '.join(failures)}")
    return Removal(record_deleted=bool(deleted), acl_deleted_on=deleted_on, sessions_purged=purged)


def _history(client: RedisClient, keys: KeySpace) -> HistoryStore:
    # Purging and counting never tokenize or cache: a no-op tokenizer spares loading tiktoken.
    return HistoryStore(client, keys, cache_sessions=0, tokenizer=lambda _text: 0)


async def purge_sessions(client: RedisClient, keys: KeySpace, tenant: str, *, batch: int = 100) -> int:
    """Delete every key of ``tenant`` (sessions and session index; its registry record is not one of
    them) with SCAN MATCH on its prefix, ``batch`` per step: a session the index misses goes too."""
    return await _history(client, keys).purge_tenant(tenant, batch=batch)


async def count_sessions(client: RedisClient, keys: KeySpace, tenant: str) -> int:
    return await _history(client, keys).count_sessions(tenant)


async def tenant_usage(client: RedisClient, keys: KeySpace, tenant: str) -> Usage:
    """What the tenant stores, as its quotas count it (sessions that expired are swept out first)."""
    return await _history(client, keys).usage(tenant)


async def list_tenants(client: RedisClient, keys: KeySpace) -> list[TenantRecord]:
    """Registered tenants, by name (members whose record is missing or unreadable are skipped)."""
    members = await redis_call(lambda: client.smembers(keys.tenant_set()), "list tenants")
    names = sorted(m.decode() if isinstance(m, bytes) else str(m) for m in members)
    records = []
    for name in names:
        try:
            record = await read_record(client, keys, name)
        except (InvalidRecord, InvalidTenant) as error:
            log.warning("tenant %s: skipped, unreadable registry record: %s", name, error)
            continue
        if record is not None:
            records.append(record)
    return records


__all__ = [
    "CLI_OWNER",
    "Credentials",
    "Removal",
    "TenantConflict",
    "TenantSpec",
    "count_sessions",
    "desired_record",
    "ensure_tenant",
    "list_tenants",
    "purge_sessions",
    "record_for",
    "remove_tenant",
]
