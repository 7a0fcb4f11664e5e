"""`engram tenant ...` against a real redis-server (run through the parser, as the console script does)."""

from __future__ import annotations

import asyncio
import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import redis.asyncio as aioredis

from engram.history import HistoryStore
from engram.policy import POLICY_FIELDS, PolicyField
from engram.redis_keys import KeySpace
from engram.settings import get_settings
from engram.tenancy.apikeys import hash_secret, parse_api_key
from engram.tenancy.cli import EXIT_OK, EXIT_REFUSED, EXIT_UNAVAILABLE, main
from testkit.redis_server import RedisServer

KEYS = KeySpace()


@pytest.fixture(autouse=True)
def settings_env(redis_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("ENGRAM_REDIS_URL", redis_url)
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


@pytest.fixture
def admin(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    yield client
    client.close()


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(["tenant", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_create_prints_only_the_api_key_on_stdout(capsys: pytest.CaptureFixture[str], admin: redis.Redis) -> None:
    code, out, err = run(capsys, "create", "acme", "--token-limit", "700", "--ttl", "60", "--max-messages", "40")
    assert code == EXIT_OK
    key = out.removesuffix("\n")
    assert out == key + "\n" and "\n" not in key
    parsed = parse_api_key(key)
    assert parsed is not None and parsed.tenant == "acme"
    assert "created tenant acme" in err and key not in err
    record = admin.hgetall(KEYS.tenant_record("acme"))
    assert record["api_key_sha256"] == hash_secret(key)
    assert (record["token_limit"], record["session_ttl_seconds"], record["max_messages_per_session"]) == (
        "700",
        "60",
        "40",
    )
    assert record["owner"] == "cli"
    assert admin.execute_command("ACL", "GETUSER", "engram.acme")


def test_create_takes_policy_defaults_from_settings(
    capsys: pytest.CaptureFixture[str], admin: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ENGRAM_TOKEN_LIMIT", "1234")
    get_settings.cache_clear()
    assert run(capsys, "create", "acme")[0] == EXIT_OK
    assert admin.hget(KEYS.tenant_record("acme"), "token_limit") == "1234"


OUT_OF_BOUNDS = [
    pytest.param(field, value, id=f"{field.cli_flag}={value}")
    for field in POLICY_FIELDS
    for value in (field.minimum - 1, field.maximum + 1)
]


@pytest.mark.parametrize(("field", "value"), OUT_OF_BOUNDS)
def test_create_refuses_a_policy_value_out_of_bounds_with_exit_2_naming_the_range(
    capsys: pytest.CaptureFixture[str], admin: redis.Redis, field: PolicyField, value: int
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["tenant", "create", "acme", field.cli_flag, str(value)])
    out, err = capsys.readouterr()
    assert (exited.value.code, out) == (2, "")
    assert f"argument {field.cli_flag}: expected an integer in [{field.minimum}, {field.maximum}], got {value}" in err
    assert not admin.exists(KEYS.tenant_record("acme"))


@pytest.mark.parametrize("field", POLICY_FIELDS, ids=lambda f: f.cli_flag)
def test_create_takes_each_policy_bound_itself(
    capsys: pytest.CaptureFixture[str], admin: redis.Redis, field: PolicyField
) -> None:
    for name, value in (("low", field.minimum), ("high", field.maximum)):
        assert run(capsys, "create", name, field.cli_flag, str(value))[0] == EXIT_OK
        assert admin.hget(KEYS.tenant_record(name), field.name) == str(value)


def test_create_refuses_a_policy_value_that_is_not_an_integer(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["tenant", "create", "acme", "--ttl", "1h"])
    assert exited.value.code == 2
    assert "argument --ttl: expected an integer in [0, 315360000], got '1h'" in capsys.readouterr().err


def test_create_takes_a_memory_mode_or_leaves_it_to_the_service(
    capsys: pytest.CaptureFixture[str], admin: redis.Redis
) -> None:
    assert run(capsys, "create", "acme", "--memory", "summary")[0] == EXIT_OK
    assert admin.hget(KEYS.tenant_record("acme"), "memory") == "summary"
    assert run(capsys, "create", "other")[0] == EXIT_OK
    assert admin.hget(KEYS.tenant_record("other"), "memory") == ""  # unset: ENGRAM_MEMORY decides
    with pytest.raises(SystemExit) as exited:
        main(["tenant", "create", "third", "--memory", "everything"])
    assert exited.value.code == 2 and "invalid choice: 'everything'" in capsys.readouterr().err
    assert not admin.exists(KEYS.tenant_record("third"))


def test_creating_an_existing_tenant_is_refused_and_prints_no_key(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(capsys, "create", "acme")[0] == EXIT_OK
    code, out, err = run(capsys, "create", "acme")
    assert (code, out) == (EXIT_REFUSED, "")
    assert "exists" in err


def test_an_invalid_tenant_name_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "create", "Not_A_Label")
    assert (code, out) == (EXIT_REFUSED, "")
    assert "invalid tenant" in err


def test_the_redis_password_goes_to_a_private_file_and_logs_in(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, redis_url: str
) -> None:
    path = tmp_path / "acme.password"
    assert run(capsys, "create", "acme", "--redis-password-file", str(path))[0] == EXIT_OK
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    with redis.Redis.from_url(redis_url, username="engram.acme", password=path.read_text().strip()) as tenant:
        assert tenant.ping()


def test_the_password_file_is_private_even_if_it_existed_readable_by_others(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    path = tmp_path / "acme.password"
    path.write_text("old\n")
    path.chmod(0o644)
    assert run(capsys, "create", "acme", "--redis-password-file", str(path))[0] == EXIT_OK
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert path.read_text().strip() != "old"


def test_list_shows_tenants_with_their_policy(capsys: pytest.CaptureFixture[str]) -> None:
    run(capsys, "create", "beta", "--ttl", "0")
    run(capsys, "create", "acme")
    code, out, _ = run(capsys, "list")
    lines = out.splitlines()
    assert code == EXIT_OK
    assert lines[0].split() == [
        "TENANT",
        "TOKEN_LIMIT",
        "TTL_SECONDS",
        "MAX_MESSAGES",
        "RETENTION",
        "OWNER",
        "SESSIONS",
        "MAX_SESSIONS",
        "STORED_BYTES",
        "MAX_BYTES",
        "RPS",
        "BURST",
    ]
    assert [line.split()[0] for line in lines[1:]] == ["acme", "beta"]
    assert lines[2].split()[2] == "0"


def test_rotate_key_replaces_the_key_and_keeps_the_redis_password(
    capsys: pytest.CaptureFixture[str], admin: redis.Redis
) -> None:
    old = run(capsys, "create", "acme")[1].strip()
    password_hash = admin.hget(KEYS.tenant_record("acme"), "password_sha256")
    code, out, _ = run(capsys, "rotate-key", "acme")
    new = out.strip()
    assert code == EXIT_OK and new != old and parse_api_key(new) is not None
    assert admin.hget(KEYS.tenant_record("acme"), "api_key_sha256") == hash_secret(new)
    assert admin.hget(KEYS.tenant_record("acme"), "password_sha256") == password_hash
    assert run(capsys, "rotate-key", "ghost")[0] == EXIT_REFUSED


def test_operator_managed_tenants_are_not_rotated_or_deleted_from_the_cli(
    capsys: pytest.CaptureFixture[str], admin: redis.Redis
) -> None:
    run(capsys, "create", "acme")
    admin.hset(KEYS.tenant_record("acme"), "owner", "MemoryNamespace/team-a/acme")
    code, out, err = run(capsys, "rotate-key", "acme")
    assert (code, out) == (EXIT_REFUSED, "") and "delete its Secret" in err
    assert run(capsys, "delete", "acme")[0] == EXIT_REFUSED
    assert run(capsys, "delete", "acme", "--force")[0] == EXIT_OK


def test_delete_with_purge_removes_the_tenant_and_its_sessions(
    capsys: pytest.CaptureFixture[str], admin: redis.Redis
) -> None:
    run(capsys, "create", "acme")
    for i in range(3):
        admin.zadd(KEYS.session_index("acme"), {f"s{i}": i})
        admin.xadd(KEYS.session("acme", f"s{i}").log, {"role": "user", "content": "hi"})
    code, _, err = run(capsys, "delete", "acme", "--purge")
    assert code == EXIT_OK and "purged 3 sessions" in err
    assert admin.keys("engram:acme:*") == []
    assert not admin.exists(KEYS.tenant_record("acme"))
    assert admin.execute_command("ACL", "GETUSER", "engram.acme") is None
    assert run(capsys, "delete", "acme")[0] == EXIT_REFUSED


def test_delete_with_purge_erases_a_session_missing_from_the_index(
    capsys: pytest.CaptureFixture[str], admin: redis.Redis
) -> None:
    """With TTL 0 nothing expires: a session the index lost must still be erased by the purge."""
    run(capsys, "create", "acme", "--ttl", "0")
    for i in range(3):
        session = KEYS.session("acme", f"s{i}")
        admin.zadd(session.index, {f"s{i}": 0})
        admin.xadd(session.log, {"role": "user", "content": "my secret"})
        admin.hset(session.meta, "epoch", "1")
        admin.xadd(session.archive, {"role": "user", "content": "older secret"})
    admin.zrem(KEYS.session_index("acme"), "s1")  # as a racing listing used to do
    admin.xadd(KEYS.session("acme-2", "keep").log, {"role": "user", "content": "not acme's"})
    code, _, err = run(capsys, "delete", "acme", "--purge")
    assert code == EXIT_OK and "purged 3 sessions" in err
    assert list(admin.scan_iter(match="engram:acme:*")) == []
    assert admin.xlen(KEYS.session("acme-2", "keep").log) == 1


def test_delete_without_purge_keeps_the_sessions(capsys: pytest.CaptureFixture[str], admin: redis.Redis) -> None:
    run(capsys, "create", "acme")
    admin.zadd(KEYS.session_index("acme"), {"s1": 1})
    assert run(capsys, "delete", "acme")[0] == EXIT_OK
    assert admin.zcard(KEYS.session_index("acme")) == 1


def test_unreachable_redis_exits_3(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "list", "--redis-url", "redis://127.0.0.1:1/0")
    assert (code, out) == (EXIT_UNAVAILABLE, "")
    assert "Redis is unavailable" in err


def can_log_in(url: str, password_file: Path) -> bool:
    try:
        with redis.Redis.from_url(url, username="engram.acme", password=password_file.read_text().strip()) as tenant:
            return bool(tenant.ping())
    except redis.exceptions.AuthenticationError:
        return False


def test_a_cli_tenant_keeps_its_redis_user_across_restarts_of_a_redis_with_an_aclfile(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    (tmp_path / "users.acl").touch()
    server = RedisServer(tmp_path / "redis", None, "--aclfile", str(tmp_path / "users.acl")).start()
    try:
        password = tmp_path / "acme.password"
        created = run(capsys, "create", "acme", "--redis-url", server.url, "--redis-password-file", str(password))
        assert created[0] == EXIT_OK
        server.stop()
        server.start()  # `make run` starts its Redis with an aclfile: ACL SAVE made the user durable
        assert can_log_in(server.url, password)
    finally:
        server.stop()


def test_tenant_sync_restores_users_a_restart_lost_and_changes_no_key(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, redis_server: RedisServer, admin: redis.Redis
) -> None:
    password = tmp_path / "acme.password"
    assert run(capsys, "create", "acme", "--redis-password-file", str(password))[0] == EXIT_OK
    record_before = admin.hgetall(KEYS.tenant_record("acme"))
    redis_server.stop()
    redis_server.start()  # no aclfile: users made with ACL SETUSER are gone, the registry (AOF) is not
    assert not can_log_in(redis_server.url, password)

    code, out, err = run(capsys, "sync")
    assert (code, out) == (EXIT_OK, "")
    assert "tenant acme: set ACL user engram.acme" in err
    assert can_log_in(redis_server.url, password)  # the same password...
    assert admin.hgetall(KEYS.tenant_record("acme")) == record_before  # ...and the same API key
    assert run(capsys, "sync")[2].strip().endswith("1 tenants in sync (0 ACL users re-applied)")


def store_turns(redis_url: str, tenant: str, turns: list[tuple[str, str, str | None]]) -> None:
    """Commit (session, message, subject) turns as the service would."""

    async def commit() -> None:
        client = aioredis.Redis.from_url(redis_url, decode_responses=True)
        store = HistoryStore(client, KEYS, cache_sessions=0)
        try:
            for n, (session, message, subject) in enumerate(turns):
                await store.commit_turn(tenant, session, f"t{n}", message, f"re: {message}", subject=subject)
        finally:
            await client.aclose()

    asyncio.run(commit())


def test_update_changes_only_the_flags_given_and_keeps_the_key(
    capsys: pytest.CaptureFixture[str], admin: redis.Redis
) -> None:
    key = run(capsys, "create", "acme", "--token-limit", "700")[1].strip()
    code, out, err = run(capsys, "update", "acme", "--max-sessions", "5", "--requests-per-second", "20")
    assert (code, out) == (EXIT_OK, "")
    assert "max_sessions=5" in err and "requests_per_second=20" in err
    record = admin.hgetall(KEYS.tenant_record("acme"))
    assert (record["max_sessions"], record["requests_per_second"], record["token_limit"]) == ("5", "20", "700")
    assert record["api_key_sha256"] == hash_secret(key)
    assert run(capsys, "update", "nobody", "--burst", "3")[0] == EXIT_REFUSED
    admin.hset(KEYS.tenant_record("acme"), "owner", "memorynamespace/ns/acme")
    code, _, err = run(capsys, "update", "acme", "--burst", "3")
    assert code == EXIT_REFUSED and "pass --force" in err


def test_update_refuses_a_value_out_of_bounds(capsys: pytest.CaptureFixture[str]) -> None:
    run(capsys, "create", "acme")
    with pytest.raises(SystemExit) as exited:
        main(["tenant", "update", "acme", "--max-stored-bytes", "-5"])
    assert exited.value.code == 2


def test_export_prints_every_session_as_json_lines_and_list_shows_the_usage(
    capsys: pytest.CaptureFixture[str], redis_url: str
) -> None:
    run(capsys, "create", "acme", "--max-sessions", "10")
    store_turns(redis_url, "acme", [("s1", "one", None), ("s2", "two", None), ("s1", "three", None)])
    store_turns(redis_url, "other", [("s9", "not acme's", None)])
    code, out, err = run(capsys, "export", "acme")
    assert code == EXIT_OK and "exported 6 messages of 2 sessions" in err
    lines = [json.loads(line) for line in out.splitlines()]
    assert [(line["type"], line["session_id"]) for line in lines] == [
        *[("message", "s1")] * 4,
        ("end", "s1"),
        *[("message", "s2")] * 2,
        ("end", "s2"),
    ]
    assert [line["message"]["content"] for line in lines[:4]] == ["one", "re: one", "three", "re: three"]
    assert lines[4]["messages"] == 4

    code, out, _ = run(capsys, "list")
    header, row = out.splitlines()[0].split(), out.splitlines()[1].split()
    usage = dict(zip(header, row, strict=True))
    assert (usage["SESSIONS"], usage["MAX_SESSIONS"], usage["RPS"]) == ("2", "10", "-")
    stored = sum(len(m) for m in ("one", "re: one", "two", "re: two", "three", "re: three"))
    assert int(usage["STORED_BYTES"]) == stored + 3 * len("user") + 3 * len("assistant")


def test_erase_subject_deletes_only_that_subjects_sessions(capsys: pytest.CaptureFixture[str], redis_url: str) -> None:
    run(capsys, "create", "acme")
    store_turns(redis_url, "acme", [("a1", "hi", "alice"), ("a2", "hi", "alice"), ("b1", "hi", "bob")])
    code, _, err = run(capsys, "erase-subject", "acme", "alice")
    assert code == EXIT_OK and "2 sessions deleted" in err
    code, out, _ = run(capsys, "export", "acme")
    assert {json.loads(line)["session_id"] for line in out.splitlines()} == {"b1"}


def test_export_includes_archived_messages_the_summary_and_memory_blocks(
    capsys: pytest.CaptureFixture[str], redis_url: str, admin: redis.Redis
) -> None:
    run(capsys, "create", "acme")
    store_turns(redis_url, "acme", [("s1", "one", None), ("s1", "two", None)])
    keys = KEYS.session("acme", "s1")
    epoch = admin.hget(keys.meta, "epoch")
    first_id = admin.xrange(keys.log, count=1)[0][0]
    admin.hset(keys.summary, mapping={"text": "they said one", "covers_through": first_id, "epoch": epoch})
    admin.hset(keys.summary, mapping={"messages_covered": 1, "tokens": 3})
    admin.zadd(keys.memory_blocks.facts, {"facts:likes tea": 1, "facts:lives in Oslo": 2})
    admin.hset(keys.memory_blocks.blocks, "persona", '"a support bot"')
    asyncio.run(_archive_oldest(redis_url, 2))
    code, out, err = run(capsys, "export", "acme")
    lines = [json.loads(line) for line in out.splitlines()]
    assert code == EXIT_OK and "exported 4 messages of 1 sessions" in err
    assert [(line["type"], line.get("archived")) for line in lines[:4]] == [("message", True)] * 2 + [
        ("message", False)
    ] * 2
    assert lines[4] == {
        "type": "summary",
        "session_id": "s1",
        "text": "they said one",
        "covers_through": first_id,
        "messages_covered": 1,
    }
    assert lines[5:7] == [
        {"type": "memory_block", "session_id": "s1", "block": "facts", "facts": ["likes tea", "lives in Oslo"]},
        {"type": "memory_block", "session_id": "s1", "block": "persona", "state": '"a support bot"'},
    ]
    assert lines[7] == {"type": "end", "session_id": "s1", "messages": 4}


async def _archive_oldest(redis_url: str, count: int) -> None:
    client = aioredis.Redis.from_url(redis_url, decode_responses=True)
    try:
        await HistoryStore(client, KEYS, cache_sessions=0).take_oldest("acme", "s1", count, archive=True)
    finally:
        await client.aclose()
