"""``engram tenant``: manage tenants in Redis without Kubernetes, with the operator's own reconcile code.

    engram tenant create NAME [--token-limit N] [--ttl SECONDS] [--max-messages N] [--max-sessions N]
                              [--max-stored-bytes N] [--requests-per-second N] [--burst N]   prints the API key
    engram tenant update NAME [the same policy flags]          changes only the flags given
    engram tenant delete NAME [--purge]
    engram tenant list                                         policy, owner and usage of each tenant
    engram tenant rotate-key NAME                              prints the new key
    engram tenant sync                       re-apply every tenant's ACL user (keys and passwords unchanged)
    engram tenant export NAME                all of its sessions as JSON Lines on stdout, at constant memory
    engram tenant erase-subject NAME SUBJECT delete every session of one end user

Only the requested value goes to stdout (so ``KEY=$(engram tenant create demo)`` works); everything
else goes to stderr. Exit codes: 0 done, 1 refused (exists, not found, managed by the operator),
2 bad arguments (e.g. a policy value outside its bounds, which come from ``engram.policy``),
3 Redis unavailable.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from engram.connections import key_space
from engram.errors import EngramError, StoreUnavailable
from engram.export import MESSAGE_LINE, session_lines
from engram.history.store import HistoryStore
from engram.policy import MEMORY_MODE, POLICY_FIELDS, RETENTION, Policy, PolicyField
from engram.redis_keys import KeySpace
from engram.settings import Settings, get_settings
from engram.tenancy.apikeys import generate_api_key, hash_secret
from engram.tenancy.nodes import RedisNodes
from engram.tenancy.provision import (
    Credentials,
    TenantSpec,
    count_sessions,
    current_record,
    desired_record,
    ensure_tenant,
    list_tenants,
    record_for,
    remove_tenant,
    tenant_usage,
)
from engram.tenancy.records import CLI_OWNER

EXIT_OK = 0
EXIT_REFUSED = 1
EXIT_UNAVAILABLE = 3

Command = Callable[[argparse.Namespace, RedisNodes, KeySpace, Settings], Awaitable[int]]


def _say(message: str) -> None:
    print(message, file=sys.stderr)


def _policy_value(policy_field: PolicyField) -> Callable[[str], int]:
    """An argparse ``type`` that takes an integer within the field's bounds (else exit 2, naming them)."""

    def parse(text: str) -> int:
        try:
            value: object = int(text)
        except ValueError:
            value = text
        problem = policy_field.problem(value)
        if problem is not None:
            raise argparse.ArgumentTypeError(problem)
        return int(text)

    return parse


def add_parser(subparsers: Any) -> None:
    """Register ``tenant`` and its sub-commands on an ``argparse`` sub-parsers object."""
    tenant = subparsers.add_parser(
        "tenant", help="create, delete, list tenants and rotate their API keys (Redis only, no Kubernetes)"
    )
    commands = tenant.add_subparsers(dest="tenant_command", required=True, metavar="COMMAND")

    def command(name: str, help: str, run: Command) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = commands.add_parser(name, help=help, description=help)
        parser.add_argument("--redis-url", help="primary Redis URL (default: ENGRAM_REDIS_URL)")
        parser.set_defaults(func=lambda args: _run(run, args))
        return parser

    create = command("create", "create a tenant and print its API key (only the key, on stdout)", _create)
    create.add_argument("name", help="tenant name: a DNS label ([a-z0-9-], at most 63)")
    update = command("update", "change a tenant's policy: only the flags given (its key stays)", _update)
    update.add_argument("name")
    update.add_argument("--force", action="store_true", help="even if a MemoryNamespace manages the tenant")
    for parser, default in ((create, "default: {env}, else {default}"), (update, "default: unchanged")):
        for policy_field in POLICY_FIELDS:
            parser.add_argument(
                policy_field.cli_flag,
                dest=policy_field.name,
                type=_policy_value(policy_field),
                metavar="SECONDS" if policy_field.name.endswith("_seconds") else "N",
                help=f"{policy_field.description} {policy_field.minimum}..{policy_field.maximum} "
                f"({default.format(env=policy_field.env_name, default=policy_field.default)})",
            )
    create.add_argument(
        RETENTION.cli_flag,
        dest=RETENTION.name,
        choices=RETENTION.choices,
        default=RETENTION.default,
        help="recorded for reference; `delete --purge` decides what is deleted",
    )
    for parser in (create, update):
        parser.add_argument(
            MEMORY_MODE.cli_flag,
            dest=MEMORY_MODE.name,
            choices=MEMORY_MODE.choices,
            default=None,
            help=MEMORY_MODE.description,
        )
    create.add_argument(
        "--redis-password-file",
        type=Path,
        help="write the tenant's Redis ACL password to this file (mode 0600); it is shown nowhere else",
    )

    delete = command("delete", "revoke a tenant: its API key and Redis user stop working", _delete)
    delete.add_argument("name")
    delete.add_argument("--purge", action="store_true", help="also delete all of the tenant's sessions")
    delete.add_argument("--force", action="store_true", help="even if a MemoryNamespace manages the tenant")

    command("list", "list tenants: name, policy, owner, sessions", _list)

    command(
        "sync",
        "re-apply every tenant's Redis ACL user from its registry record on every node (after a Redis restart "
        "without an aclfile): API keys and passwords do not change",
        _sync,
    )

    rotate = command("rotate-key", "give a tenant a new API key (the old one stops working); print it", _rotate)
    rotate.add_argument("name")

    export = command("export", "print all of a tenant's sessions as JSON Lines (one message per line)", _export)
    export.add_argument("name")

    erase = command("erase-subject", "delete every session of one end user (subject) of a tenant", _erase_subject)
    erase.add_argument("name")
    erase.add_argument("subject")


def _run(command: Command, args: argparse.Namespace) -> int:
    try:
        settings = get_settings()
    except ValueError as error:
        _say(f"engram tenant: invalid settings: {error}")
        return EXIT_REFUSED
    return asyncio.run(_with_nodes(command, args, settings))


async def _with_nodes(command: Command, args: argparse.Namespace, settings: Settings) -> int:
    nodes = RedisNodes.from_settings(settings, redis_url=args.redis_url)
    try:
        return await command(args, nodes, key_space(settings), settings)
    except StoreUnavailable as error:
        _say(f"engram tenant: {error}")
        return EXIT_UNAVAILABLE
    except EngramError as error:
        _say(f"engram tenant: {error}")
        return EXIT_REFUSED
    finally:
        await nodes.aclose()


async def _create(args: argparse.Namespace, nodes: RedisNodes, keys: KeySpace, settings: Settings) -> int:
    policy = Policy(
        **{
            f.name: getattr(settings, f.name) if getattr(args, f.name) is None else getattr(args, f.name)
            for f in POLICY_FIELDS
        },
        memory=getattr(args, MEMORY_MODE.name),
    )
    spec = TenantSpec(args.name, policy, args.retention)
    existing = await current_record(nodes, keys, spec.tenant)
    if existing is not None:
        _say(f"tenant {spec.tenant} exists (managed by {existing.owner}); use `engram tenant rotate-key`")
        return EXIT_REFUSED
    credentials = Credentials.generate(spec.tenant)
    record = record_for(keys, spec, credentials, CLI_OWNER)
    if args.redis_password_file:
        _write_private(args.redis_password_file, credentials.redis_password)
    await ensure_tenant(nodes, keys, record)
    _say(f"created tenant {spec.tenant}: Redis user {record.redis_username}, keys {keys.tenant_prefix(spec.tenant)}*")
    print(credentials.api_key)
    return EXIT_OK


async def _delete(args: argparse.Namespace, nodes: RedisNodes, keys: KeySpace, settings: Settings) -> int:
    existing = await current_record(nodes, keys, args.name)
    if existing is None and not args.purge:
        _say(f"tenant {args.name} does not exist")
        return EXIT_REFUSED
    if existing is not None and existing.owner != CLI_OWNER and not args.force:
        _say(f"tenant {args.name} is managed by {existing.owner}: delete that resource, or pass --force")
        return EXIT_REFUSED
    removal = await remove_tenant(
        nodes, keys, args.name, owner=None, purge=args.purge, batch=settings.operator_purge_batch
    )
    purged = f", purged {removal.sessions_purged} sessions" if removal.sessions_purged is not None else ""
    _say(f"deleted tenant {args.name}{purged}")
    return EXIT_OK


async def _update(args: argparse.Namespace, nodes: RedisNodes, keys: KeySpace, settings: Settings) -> int:
    existing = await current_record(nodes, keys, args.name)
    if existing is None:
        _say(f"tenant {args.name} does not exist")
        return EXIT_REFUSED
    if existing.owner != CLI_OWNER and not args.force:
        # The operator would put its MemoryNamespace's policy back at its next repair.
        _say(f"tenant {args.name} is managed by {existing.owner}: change that resource, or pass --force")
        return EXIT_REFUSED
    names = [f.name for f in POLICY_FIELDS] + [MEMORY_MODE.name]
    changes = {name: getattr(args, name) for name in names if getattr(args, name) is not None}
    policy = dataclasses.replace(existing.policy, **changes)
    spec = TenantSpec(existing.tenant, policy, existing.retention)
    record = desired_record(
        keys,
        spec,
        api_key_sha256=existing.api_key_sha256,
        password_sha256=existing.password_sha256,
        owner=existing.owner,
    )
    await ensure_tenant(nodes, keys, record)
    _say(f"updated tenant {existing.tenant}: " + (", ".join(f"{k}={v}" for k, v in changes.items()) or "no change"))
    _say("replicas apply it within ENGRAM_TENANT_CACHE_SECONDS")
    return EXIT_OK


def _quota(value: int) -> str:
    return str(value) if value else "-"


async def _list(args: argparse.Namespace, nodes: RedisNodes, keys: KeySpace, settings: Settings) -> int:
    header = ("TENANT", "TOKEN_LIMIT", "TTL_SECONDS", "MAX_MESSAGES", "RETENTION", "OWNER", "SESSIONS")
    rows = [(*header, "MAX_SESSIONS", "STORED_BYTES", "MAX_BYTES", "RPS", "BURST")]
    for record in await list_tenants(nodes.primary, keys):
        policy = record.policy
        usage = await tenant_usage(nodes.primary, keys, record.tenant)
        sessions = await count_sessions(nodes.primary, keys, record.tenant)
        rows.append(
            (
                record.tenant,
                str(policy.token_limit),
                str(policy.session_ttl_seconds),
                str(policy.max_messages_per_session),
                record.retention,
                record.owner,
                str(max(sessions, usage.sessions)),
                _quota(policy.max_sessions),
                str(usage.stored_bytes),
                _quota(policy.max_stored_bytes),
                _quota(policy.requests_per_second),
                _quota(policy.effective_burst if policy.requests_per_second else 0),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
    return EXIT_OK


async def _rotate(args: argparse.Namespace, nodes: RedisNodes, keys: KeySpace, settings: Settings) -> int:
    existing = await current_record(nodes, keys, args.name)
    if existing is None:
        _say(f"tenant {args.name} does not exist")
        return EXIT_REFUSED
    if existing.owner != CLI_OWNER:
        # The operator treats its Secret as the truth and would undo a rotation made here.
        _say(f"tenant {args.name} is managed by {existing.owner}: delete its Secret to rotate the key")
        return EXIT_REFUSED
    api_key = generate_api_key(existing.tenant)
    spec = TenantSpec(existing.tenant, existing.policy, existing.retention)
    record = desired_record(
        keys, spec, api_key_sha256=hash_secret(api_key), password_sha256=existing.password_sha256, owner=CLI_OWNER
    )
    await ensure_tenant(nodes, keys, record)
    _say(f"rotated the API key of tenant {existing.tenant}; the old key stops working within seconds")
    print(api_key)
    return EXIT_OK


async def _sync(args: argparse.Namespace, nodes: RedisNodes, keys: KeySpace, settings: Settings) -> int:
    """What the operator's repair timer does for its tenants, for all of them, once: a Redis restarted
    without an aclfile (or a new replica) has lost the ACL users made with ACL SETUSER."""
    records = await list_tenants(nodes.primary, keys)
    changed = 0
    for record in records:
        changes = [c for c in await ensure_tenant(nodes, keys, record) if c.startswith("set ACL user")]
        changed += len(changes)
        for change in changes:
            _say(f"tenant {record.tenant}: {change}")
    _say(f"{len(records)} tenants in sync ({changed} ACL users re-applied)")
    return EXIT_OK


async def _export(args: argparse.Namespace, nodes: RedisNodes, keys: KeySpace, settings: Settings) -> int:
    """Every session of the tenant, one JSON object per message (with its session id), then one
    ``end`` line per session; sessions page by page from the index, messages page by page: constant memory."""
    store = HistoryStore(nodes.primary, keys, cache_sessions=0)
    out = sys.stdout.buffer
    sessions = messages = 0
    cursor: str | None = None
    while True:
        page = await store.list_sessions(args.name, limit=200, cursor=cursor)
        for info in page.sessions:
            async for line in session_lines(store, args.name, info.session_id):
                out.write(line)
                messages += line.startswith(MESSAGE_LINE)
            sessions += 1
        if page.next_cursor is None:
            break
        cursor = page.next_cursor
    out.flush()
    _say(f"exported {messages} messages of {sessions} sessions of tenant {args.name}")
    return EXIT_OK


async def _erase_subject(args: argparse.Namespace, nodes: RedisNodes, keys: KeySpace, settings: Settings) -> int:
    store = HistoryStore(nodes.primary, keys, cache_sessions=0)
    deleted = await store.erase_subject(args.name, args.subject)
    _say(f"erased subject {args.subject} of tenant {args.name}: {deleted} sessions deleted")
    return EXIT_OK


def _write_private(path: Path, secret: str) -> None:
    """Write ``secret`` readable by its owner only, whatever mode an existing file had: the mode is
    fixed on the open descriptor before the secret is written (O_CREAT's mode applies to new files only)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)
    with os.fdopen(fd, "w") as file:
        file.write(secret + "\n")


def main(argv: list[str] | None = None) -> int:
    """``python -m engram.tenancy.cli tenant ...``: the same commands without the ``engram`` entry point."""
    parser = argparse.ArgumentParser(prog="engram")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
