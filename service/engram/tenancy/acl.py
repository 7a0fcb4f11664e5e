"""Redis ACL users for tenants.

A tenant's user is set with one ``ACL SETUSER`` that starts from ``reset`` (SETUSER otherwise adds to
whatever rules the user had) and then allows, explicitly, only the commands Engram's history store needs
(:data:`engram.history.functions.TENANT_COMMANDS`) on the tenant's own key patterns. No categories: even
``+@all -@dangerous -scan -@admin`` still lets RANDOMKEY, DBSIZE and FUNCTION FLUSH through.

ACLs are not replicated and users made with SETUSER vanish on restart unless Redis has an aclfile, so
the same rule is applied to every node (primary and replicas) and re-applied when it drifts.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from engram.history.functions import CLUSTER_CLIENT_COMMANDS
from engram.redis_keys import KeySpace, validate_tenant

log = logging.getLogger(__name__)


# What the operator's (and `engram tenant`'s) own Redis user needs, on keys ``~<namespace>:*``. ACL SETUSER
# lets a user grant itself anything, so treat these credentials as admin credentials all the same; the list
# only keeps honest mistakes (KEYS, FLUSHALL, CONFIG) out. docs/tenancy.md shows the full rule.
OPERATOR_COMMANDS: tuple[str, ...] = (
    "acl|setuser",  # create and repair tenant users
    "acl|getuser",  # drift check
    "acl|deluser",  # revoke
    "acl|save",  # persist users when Redis has an aclfile
    "command|info",  # which allow-listed commands this server knows
    "function|list",  # is Engram's library loaded?
    "function|load",  # load it (tenants may only FCALL it)
    "hgetall",  # read registry records
    "hset",  # write them
    "hsetnx",  # created_at, once
    "sadd",  # the tenant set
    "srem",
    "smembers",  # engram tenant list
    "del",  # delete records, purge sessions
    "scan",  # purge: find every key of the tenant, indexed or not (tenant users never get SCAN)
    "zcard",  # session counts for status
    "multi",  # the record and its timestamps are written together
    "exec",
    "ping",
    "client|setname",  # the client names its connections
    # a Redis Cluster (ENGRAM_REDIS_MODE=cluster): what redis-py's Cluster client sends, and the node list
    *CLUSTER_CLIENT_COMMANDS,
    "cluster|nodes",  # every node gets the tenants' users, replicas included
)


# Redis describes a user's commands with categories where it can: a rule naming every command of a category
# comes back from ACL GETUSER as ``+@category`` (and ``+@category -command`` when one is missing). The
# categories an allow-list may cover whole, with their commands (``ACL CAT <category>``, the same since Redis 6):
CATEGORY_COMMANDS: dict[str, frozenset[str]] = {
    "transaction": frozenset({"watch", "unwatch", "multi", "exec", "discard"}),
}


def allowed_commands(rules: Sequence[str]) -> set[str] | None:
    """The commands ACL command rules (``-@all +get +@transaction -discard ...``) allow, or None if they use a
    category not in :data:`CATEGORY_COMMANDS` (so they cannot be compared to an allow-list)."""
    allowed: set[str] = set()
    for rule in rules:
        sign, name = rule[:1], rule[1:]
        if name == "@all" and sign == "-":
            allowed.clear()
            continue
        members = CATEGORY_COMMANDS.get(name[1:]) if name.startswith("@") else frozenset({name})
        if members is None or sign not in ("+", "-"):
            return None
        allowed = allowed | members if sign == "+" else allowed - members
    return allowed


def acl_username(keys: KeySpace, tenant: str) -> str:
    """``<namespace>.<tenant>``: '.' is in neither part, so two (namespace, tenant) pairs never collide."""
    return f"{keys.namespace}.{validate_tenant(tenant)}"


@dataclass(frozen=True, slots=True)
class AclRule:
    """What a tenant's ACL user must look like."""

    username: str
    password_sha256: str
    key_patterns: tuple[str, ...]
    commands: tuple[str, ...]

    def setuser_args(self) -> list[str]:
        """Arguments after ``ACL SETUSER <username>``, in the order Redis applies them."""
        return [
            "reset",
            "on",
            f"#{self.password_sha256}",
            *(f"~{pattern}" for pattern in self.key_patterns),
            "resetchannels",
            *(f"+{command}" for command in self.commands),
        ]

    def matches(self, current: dict[str, Any] | None) -> bool:
        """Whether ``ACL GETUSER``'s raw reply (decoded) describes exactly this rule."""
        if not current:
            return False
        return (
            "on" in _words(current.get("flags"))
            and _words(current.get("passwords")) == [self.password_sha256]
            and set(_words(current.get("keys"))) == {f"~{p}" for p in self.key_patterns}
            and not _words(current.get("channels"))
            and _words(current.get("commands"))[:1] == ["-@all"]
            and allowed_commands(_words(current.get("commands"))) == set(self.commands)
            and not current.get("selectors")
        )


def tenant_acl_rule(keys: KeySpace, tenant: str, password_sha256: str, commands: Iterable[str]) -> AclRule:
    return AclRule(
        username=acl_username(keys, tenant),
        password_sha256=password_sha256,
        key_patterns=tuple(keys.tenant_acl_key_patterns(tenant)),
        commands=tuple(dict.fromkeys(command.lower() for command in commands)),
    )


async def command(client: aioredis.Redis, *args: str) -> Any:
    """One raw Redis command (redis-py leaves replies of commands it has no parser for as they are)."""
    return await client.execute_command(*args)  # type: ignore[no-untyped-call]


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _words(value: Any) -> list[str]:
    """GETUSER gives some fields as lists and others as space-separated strings (RESP2 and RESP3)."""
    if value is None:
        return []
    if isinstance(value, list | tuple):
        return [_text(item) for item in value]
    return _text(value).split()


async def get_user(client: aioredis.Redis, username: str) -> dict[str, Any] | None:
    """``ACL GETUSER`` as a ``str``-keyed dict, or None.

    Sent as two words so redis-py leaves the reply raw (its ``acl_getuser`` reshapes the fields).
    """
    reply = await command(client, "ACL", "GETUSER", username)
    if not reply:
        return None
    if isinstance(reply, dict):
        return {_text(k): v for k, v in reply.items()}
    items = list(reply)  # RESP2: flat [name, value, ...]
    return {_text(items[i]): items[i + 1] for i in range(0, len(items), 2)}


async def supported_commands(client: aioredis.Redis, commands: Sequence[str]) -> tuple[str, ...]:
    """The subset of ``commands`` that this server knows.

    ACL SETUSER rejects the whole rule if one name is unknown, and the allow-list names commands of newer
    servers (``client|setinfo`` is Redis >= 7.2). A command the server lacks cannot be sent anyway.
    """
    wanted = [command.lower() for command in commands]
    parents = sorted({command.split("|", 1)[0] for command in wanted})
    # One string "COMMAND INFO" (not two words) so redis-py hands back the raw reply: its parser for
    # COMMAND chokes on the nil entry an unknown command gets.
    infos = await command(client, "COMMAND INFO", *parents)
    known: set[str] = set()
    for parent, info in zip(parents, infos, strict=True):
        if not info:
            continue
        known.add(parent)
        # Redis 7 replies with the subcommands' own info entries in the tenth element.
        subcommands = info[9] if len(info) > 9 else []
        for sub in subcommands or []:
            known.add(_text(sub[0]).lower())
    kept = tuple(command for command in wanted if command in known)
    if len(kept) != len(wanted):
        skipped = sorted(set(wanted) - set(kept))
        log.info("Redis does not know %s: left out of tenant ACLs", ", ".join(skipped))
    return kept


async def apply_user(client: aioredis.Redis, rule: AclRule) -> bool:
    """Make the user match ``rule``. Returns True when it had to be created or changed.

    Re-setting an unchanged user is skipped, so a healthy tenant costs one GETUSER per check.
    """
    if rule.matches(await get_user(client, rule.username)):
        return False
    await command(client, "ACL", "SETUSER", rule.username, *rule.setuser_args())
    return True


async def delete_user(client: aioredis.Redis, username: str) -> bool:
    """Delete the user (Redis also disconnects its clients). Returns True if it existed."""
    return bool(await command(client, "ACL", "DELUSER", username))


async def save_acl(client: aioredis.Redis) -> bool:
    """``ACL SAVE`` when the server has an aclfile, so users survive a restart; False when it has none."""
    try:
        await command(client, "ACL", "SAVE")
    except ResponseError as error:
        if "aclfile" in str(error).lower() or "acl file" in str(error).lower():
            return False
        raise
    return True
