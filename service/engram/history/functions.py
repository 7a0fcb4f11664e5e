"""Engram's Redis Functions library and the command allow-list derived from it.

Why Redis Functions rather than EVAL scripts: a function library is loaded once by a privileged user
(operator, CLI, or the store when it may) and then only *called* with FCALL. Tenant users therefore need
neither EVAL (arbitrary Lua) nor SCRIPT, and the library is persisted and replicated by Redis itself.
The library name carries a version (``engram_v4``) so replicas of two releases can run side by side: any
change to engram.lua bumps it (and the function names), otherwise ensure_library of the old and the new
release would keep replacing each other's code.
"""

from __future__ import annotations

from importlib import resources

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.exceptions import NoPermissionError

from engram.errors import StoreUnavailable

LIBRARY_NAME = "engram_v4"  # v4: quotas (usage, expiry), rate limit in load, subjects, the rolling summary
# v3: insert_at, sessions labelled with the LlamaIndex key (meta "key")
# v2: prune_index, writable, write-checked load; deletes may run at maxmemory
LIBRARY = resources.files("engram.history").joinpath("engram.lua").read_text(encoding="utf-8")

FN_LOAD = "engram_v4_load"
FN_COMMIT = "engram_v4_commit"
FN_REPLACE = "engram_v4_replace"
FN_DELETE_AT = "engram_v4_delete_at"
FN_DELETE_SESSION = "engram_v4_delete_session"
FN_TAKE_OLDEST = "engram_v4_take_oldest"
FN_PRUNE_INDEX = "engram_v4_prune_index"
FN_WRITABLE = "engram_v4_writable"
FN_INSERT_AT = "engram_v4_insert_at"
FN_RATE = "engram_v4_rate"
FN_USAGE = "engram_v4_usage"
FN_SUMMARY_ADVANCE = "engram_v4_summary_advance"

# Every command a user of Engram's history store sends, or that the library runs on its behalf (ACLs
# apply inside functions too). This is the explicit allow-list for tenant and service Redis users:
# no categories, because category rules leak (KEYS via @read, FLUSHALL via @write; see docs/design.md).
TENANT_COMMANDS: tuple[str, ...] = (
    # issued by the client
    "ping",  # readiness checks
    "client|setinfo",  # redis-py's connection handshake (library name/version)
    "client|setname",  # connections are named "engram", so CLIENT LIST shows who is who
    "fcall",  # load (write-checked), commit, replace, delete_at, delete_session, writable
    "fcall_ro",  # read-only functions
    "xrange",  # paging through a session's messages
    "xrevrange",
    "xlen",  # message counts
    "hget",  # session metadata (updated time)
    "hgetall",  # the service reading a tenant's registry record (its user may read engram:_sys:*)
    "zrange",  # paging through the tenant's session index (BYLEX; never KEYS/SCAN); sweeping expired usage
    "zcard",  # session count
    "sscan",  # a subject's sessions, for erasure by subject
    # durable memory blocks (engram.history.blocks): facts are added with ZADD NX and condensed with an
    # optimistic compare-and-set (WATCH the facts key, MULTI ... EXEC); redis-py ends a watch with UNWATCH
    # and an aborted transaction with DISCARD. All on the session's own keys (one slot).
    "watch",
    "unwatch",
    "multi",
    "exec",
    "discard",
    "wait",  # ENGRAM_COMMIT_DURABILITY=replicated: a commit is acknowledged once a replica has it
    # run by the library inside FCALL
    "hset",
    "hsetnx",
    "hdel",
    "xadd",
    "xtrim",
    "xdel",
    "expire",
    "persist",
    "zadd",
    "del",
    "time",
    "ttl",
    "exists",  # prune_index: is the session's log still there?
    "zrem",  # delete_session, replace and prune_index unindex sessions
    "hincrby",  # usage: bytes per session and the tenant's total
    "hexists",
    "sadd",  # a subject's set of sessions
    "srem",
    # the rolling summary: read by load and summary_advance, its TTL copied from the log's
    "hmget",
    "pttl",
    "pexpire",
)


# What redis-py's Cluster client sends besides (ENGRAM_REDIS_MODE=cluster): added to the tenant and service
# users' allow-lists on a Cluster only.
CLUSTER_CLIENT_COMMANDS: tuple[str, ...] = (
    "cluster|slots",  # the slot map, at start and after a MOVED or a failover
    "command",  # its command table, read once at start to find the keys of commands
    "asking",  # follows an ASK redirect while a slot migrates
)


async def ensure_library(client: aioredis.Redis | RedisCluster) -> bool:
    """Load the library unless this exact code is already there. Returns True when this call loaded it.

    Needs a user allowed to run FUNCTION (the operator's admin user, or Redis without ACLs as in
    ``make run``). Run it against the primary only: functions replicate to replicas by themselves. On a
    Cluster every primary is checked (a node added later, or a primary restarted empty, gets it too).
    """
    try:
        if isinstance(client, RedisCluster):
            await client.initialize()  # (once) its slot map: which nodes are primaries
            loaded = [await _ensure_on(client, node) for node in client.get_primaries()]
            return any(loaded)
        return await _ensure_on(client, None)
    except NoPermissionError as error:
        raise StoreUnavailable(
            f"Redis function library {LIBRARY_NAME} is not loaded and this Redis user may not load it; "
            "the operator (or `engram tenant` with an admin user) loads it"
        ) from error


async def _ensure_on(client: aioredis.Redis | RedisCluster, node: ClusterNode | None) -> bool:
    """Load the library on one node (a Cluster's primary ``node``, or the one node of ``client``)."""
    target = {"target_nodes": node} if node is not None else {}
    listed = await client.execute_command("FUNCTION LIST", "LIBRARYNAME", LIBRARY_NAME, "WITHCODE", **target)
    if any(_library_code(entry) == LIBRARY for entry in listed or []):
        return False
    await client.execute_command("FUNCTION LOAD", "REPLACE", LIBRARY, **target)
    return True


def _library_code(entry: object) -> str | None:
    """The code of one FUNCTION LIST entry (a flat list or a dict, depending on the protocol)."""
    if isinstance(entry, dict):
        code = entry.get("library_code")
    elif isinstance(entry, list):
        pairs = dict(zip(entry[::2], entry[1::2], strict=False))
        code = pairs.get("library_code", pairs.get(b"library_code"))
    else:
        return None
    return code.decode() if isinstance(code, bytes) else code
