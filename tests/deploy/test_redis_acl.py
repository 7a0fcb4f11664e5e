"""The chart's Redis, run for real: start.sh and probe.sh from the rendered ConfigMap, a real redis-server.

What runs here is exactly what the container runs, except the Debian redis-server (7.0) instead of the
image's, the loopback address instead of the pod IP, and the allow-lists filtered to the commands this
older server knows (it has no ``client|setinfo``; ACL SETUSER rejects a rule naming an unknown command).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml

from testkit.redis_server import commands_known, free_port, strict_client
from tests.deploy.conftest import CHART, RELEASE, helm, render

ADMIN, ADMIN_PASSWORD = "engram-admin", "admin-secret-1"
SERVICE, SERVICE_PASSWORD = "engram-service", "service-secret-1"
REPLICATION_PASSWORD = "replication-secret-1"
EXPORTER_PASSWORD = "exporter-secret-1"


def chart_values() -> dict[str, Any]:
    return yaml.safe_load((CHART / "values.yaml").read_text())


def tenant_commands() -> tuple[str, ...]:
    functions = pytest.importorskip("engram.history.functions", reason="engram.history.functions not written yet")
    return tuple(functions.TENANT_COMMANDS)


def test_service_user_allow_list_equals_tenant_commands() -> None:
    """The chat service's Redis user may run exactly the commands the history store needs."""
    rendered = chart_values()["redis"]["acl"]["serviceCommands"]
    assert len(rendered) == len(set(rendered)), "duplicates in redis.acl.serviceCommands"
    assert sorted(rendered) == sorted(tenant_commands())


def test_rendered_service_rule_lists_each_command_and_no_category() -> None:
    script = render().one("ConfigMap", "engram-redis")["data"]["start.sh"]
    line = next(line for line in script.splitlines() if line.strip().startswith("SERVICE_COMMANDS="))
    rules = line.split("=", 1)[1].strip("'").split()
    assert sorted(rule.removeprefix("+") for rule in rules) == sorted(tenant_commands())
    assert all(rule.startswith("+") and "@" not in rule for rule in rules)


def test_allow_lists_contain_no_dangerous_command() -> None:
    dangerous = {
        "keys",
        "scan",
        "randomkey",
        "dbsize",
        "flushall",
        "flushdb",
        "config",
        "debug",
        "shutdown",
        "eval",
        "evalsha",
        "script",
        "module",
        "function|flush",
        "function|delete",
        "function|restore",
        "migrate",
        "restore",
        "monitor",
        "replicaof",
        "slaveof",
        "sync",
        "psync",
        "save",
        "bgsave",
    }
    acl = chart_values()["redis"]["acl"]
    for name in ("serviceCommands", "adminCommands"):
        # the admin user purges a tenant by SCAN MATCH on its prefix (complete even if the index is not)
        allowed = {"scan"} if name == "adminCommands" else set()
        forbidden = dangerous - allowed
        assert not forbidden & set(acl[name]), f"redis.acl.{name} allows {forbidden & set(acl[name])}"
    assert not {command for command in acl["serviceCommands"] if command.startswith("acl")}


# --- the chart's Redis container, locally --------------------------------------------------------------


@pytest.fixture(scope="module")
def known_commands(tmp_path_factory: pytest.TempPathFactory) -> set[str]:
    """The allow-list commands this redis-server knows (asked of a scratch server with ACL SETUSER)."""
    if shutil.which("redis-server") is None:
        pytest.fail("redis-server is not installed: run `make install` (Debian package redis-server)")
    acl = chart_values()["redis"]["acl"]
    return commands_known(tmp_path_factory.mktemp("scratch"), {*acl["serviceCommands"], *acl["adminCommands"]})


@dataclass
class RedisPod:
    """One pod of the chart's Redis StatefulSet, run as local processes."""

    root: Path
    host: str
    port: int
    pod_name: str
    known: set[str]
    primary_host: str | None = None
    process: subprocess.Popen[bytes] | None = None
    auth: Path = field(init=False)
    conf: Path = field(init=False)

    def __post_init__(self) -> None:
        self.auth, self.conf = self.root / "auth", self.root / "conf"
        for folder in (self.auth, self.conf, self.root / "run", self.root / "data"):
            folder.mkdir(parents=True, exist_ok=True)
        self.write_secret(ADMIN_PASSWORD, SERVICE_PASSWORD)
        self.render()

    def write_secret(self, admin_password: str, service_password: str) -> None:
        """The Secret volume (keys as files), as the kubelet mounts it."""
        for key, value in {
            "admin-username": ADMIN,
            "admin-password": admin_password,
            "service-username": SERVICE,
            "service-password": service_password,
            "replication-password": REPLICATION_PASSWORD,
            "exporter-password": EXPORTER_PASSWORD,
        }.items():
            (self.auth / key).write_text(value)

    def render(self) -> None:
        acl = chart_values()["redis"]["acl"]
        overrides = [
            f"redis.acl.serviceCommands={_json([c for c in acl['serviceCommands'] if c in self.known])}",
            f"redis.acl.adminCommands={_json([c for c in acl['adminCommands'] if c in self.known])}",
            f"redis.service.port={self.port}",
            # Replicas sync at once instead of after Redis' default 5 s wait for more replicas.
            'redis.extraConfig="repl-diskless-sync-delay 0"',
        ]
        args = ["template", RELEASE, str(CHART), "-s", "templates/redis-configmap.yaml"]
        for item in overrides:
            args += ["--set-json", item]
        data = yaml.safe_load(helm(*args).stdout)["data"]
        for name, content in data.items():
            (self.conf / name).write_text(content)
        # The pod listens on its own IP; here that is one loopback address per pod.
        conf = self.conf / "redis.conf"
        conf.write_text(conf.read_text().replace("bind * -::*", f"bind {self.host}"))

    def env(self) -> dict[str, str]:
        env = {
            "PATH": os.environ["PATH"],
            "POD_NAME": self.pod_name,
            "REDIS_AUTH_DIR": str(self.auth),
            "REDIS_CONF_DIR": str(self.conf),
            "REDIS_RUN_DIR": str(self.root / "run"),
            "REDIS_DATA_DIR": str(self.root / "data"),
        }
        if self.primary_host:
            env["REDIS_PRIMARY_HOST"] = self.primary_host
        return env

    def start(self) -> RedisPod:
        log = (self.root / "redis.log").open("ab")
        self.process = subprocess.Popen(
            ["sh", str(self.conf / "start.sh")], env=self.env(), stdout=log, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"redis exited {self.process.returncode}:\n{self.log()}")
            try:
                if self.client(ADMIN, self.admin_password()).ping():
                    return self
            except (redis.ConnectionError, redis.AuthenticationError, redis.ResponseError):
                time.sleep(0.05)
        raise AssertionError(f"redis did not answer:\n{self.log()}")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)  # what the kubelet sends: Redis flushes and exits
            self.process.wait(timeout=10)
        self.process = None

    def log(self) -> str:
        return (self.root / "redis.log").read_text(errors="replace")

    def admin_password(self) -> str:
        return (self.auth / "admin-password").read_text()

    def client(self, username: str | None, password: str | None) -> redis.Redis:
        return strict_client(self.host, self.port, username, password)

    def probe(self, mode: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["sh", str(self.conf / "probe.sh"), mode],
            env=self.env(),
            capture_output=True,
            text=True,
            check=False,
            timeout=10,
        )


def _json(value: object) -> str:
    import json

    return json.dumps(value)


@pytest.fixture
def pods(tmp_path: Path, known_commands: set[str]) -> Iterator[list[RedisPod]]:
    started: list[RedisPod] = []
    yield started
    for pod in started:
        pod.stop()


@pytest.fixture
def primary(tmp_path: Path, known_commands: set[str], pods: list[RedisPod]) -> RedisPod:
    pod = RedisPod(tmp_path / "redis-0", "127.0.0.1", free_port(), "engram-redis-0", known_commands)
    pods.append(pod)
    return pod.start()


def denied(client: redis.Redis, *command: str) -> bool:
    try:
        client.execute_command(*command)
    except redis.exceptions.NoPermissionError:
        return True
    return False


def test_default_user_is_off_and_passwords_are_stored_only_hashed(primary: RedisPod) -> None:
    anonymous = primary.client(None, None)
    with pytest.raises(redis.AuthenticationError):
        anonymous.ping()
    with pytest.raises((redis.AuthenticationError, redis.ResponseError)):
        primary.client("default", "").ping()
    acl_file = (primary.root / "data" / "users.acl").read_text()
    for secret in (ADMIN_PASSWORD, SERVICE_PASSWORD, REPLICATION_PASSWORD, EXPORTER_PASSWORD):
        assert secret not in acl_file
    assert acl_file.splitlines()[0] == "user default off resetpass resetkeys resetchannels -@all"
    assert oct((primary.root / "data" / "users.acl").stat().st_mode & 0o777) == "0o600"


def test_service_user_is_confined_to_its_commands_and_key_namespace(primary: RedisPod) -> None:
    service = primary.client(SERVICE, SERVICE_PASSWORD)
    assert service.ping()
    assert service.hget("engram:acme:{acme:s1}:meta", "epoch") is None
    assert denied(service, "HGET", "other:key", "field")
    for command in (
        ("KEYS", "*"),
        ("SCAN", "0"),
        ("RANDOMKEY",),
        ("DBSIZE",),
        ("FLUSHALL",),
        ("FLUSHDB",),
        ("CONFIG", "GET", "*"),
        ("ACL", "LIST"),
        ("FUNCTION", "FLUSH"),
        ("EVAL", "return 1", "0"),
        ("SET", "engram:x", "1"),
        ("GET", "engram:x"),
        ("SHUTDOWN",),
    ):
        assert denied(service, *command), f"service user may run {command}"
    with pytest.raises(redis.ResponseError):
        service.publish("engram:channel", "x")  # no channels at all


def test_admin_user_manages_acl_users_but_cannot_flush_or_configure(primary: RedisPod) -> None:
    admin = primary.client(ADMIN, ADMIN_PASSWORD)
    admin.execute_command("ACL", "SETUSER", "engram.acme", "reset", "on", ">tenant-pw", "~engram:acme:*", "+ping")
    assert "engram.acme" in admin.execute_command("ACL", "LIST")[-1] or any(
        "engram.acme" in line for line in admin.execute_command("ACL", "LIST")
    )
    assert admin.execute_command("ACL", "SAVE") in (True, "OK")
    assert primary.client("engram.acme", "tenant-pw").ping()
    for command in (
        ("FLUSHALL",),
        ("KEYS", "*"),
        ("CONFIG", "SET", "appendonly", "no"),
        ("SHUTDOWN",),
        ("FUNCTION", "FLUSH"),
        ("HGET", "elsewhere", "f"),
    ):
        assert denied(admin, *command), f"admin user may run {command}"


def test_tenant_users_survive_a_restart_and_chart_users_follow_the_secret(primary: RedisPod) -> None:
    admin = primary.client(ADMIN, ADMIN_PASSWORD)
    admin.execute_command("ACL", "SETUSER", "engram.acme", "reset", "on", ">tenant-pw", "~engram:acme:*", "+ping")
    admin.execute_command("ACL", "SAVE")
    admin.hset("engram:_sys:tenant:acme", "policy", "kept")  # data goes through the AOF
    primary.stop()

    primary.write_secret("admin-secret-2", "service-secret-2")  # a rotated Secret, then a restart
    primary.start()
    assert primary.client("engram.acme", "tenant-pw").ping(), "the tenant user was lost"
    assert primary.client(SERVICE, "service-secret-2").ping()
    with pytest.raises(redis.AuthenticationError):
        primary.client(SERVICE, SERVICE_PASSWORD).ping()
    admin = primary.client(ADMIN, "admin-secret-2")
    assert admin.hget("engram:_sys:tenant:acme", "policy") == "kept"
    users = (primary.root / "data" / "users.acl").read_text().split()
    assert users.count("engram-service") == 1 and users.count("engram.acme") == 1


def test_missing_secret_key_stops_the_start_with_a_clear_message(tmp_path: Path, known_commands: set[str]) -> None:
    pod = RedisPod(tmp_path / "redis-0", "127.0.0.1", free_port(), "engram-redis-0", known_commands)
    (pod.auth / "service-password").unlink()
    result = subprocess.run(
        ["sh", str(pod.conf / "start.sh")], env=pod.env(), capture_output=True, text=True, timeout=10, check=False
    )
    assert result.returncode == 1
    assert "service-password is missing or empty" in result.stderr


def test_replica_follows_the_primary_with_the_replication_user(
    tmp_path: Path, known_commands: set[str], pods: list[RedisPod]
) -> None:
    port = free_port()  # every pod uses the same port, on its own address
    primary = RedisPod(tmp_path / "redis-0", "127.0.0.2", port, "engram-redis-0", known_commands, "127.0.0.2")
    replica = RedisPod(tmp_path / "redis-1", "127.0.0.3", port, "engram-redis-1", known_commands, "127.0.0.2")
    pods.extend([primary, replica])
    primary.start()
    replica.start()
    primary.client(ADMIN, ADMIN_PASSWORD).hset("engram:_sys:tenant:acme", "policy", "replicated")
    reader = replica.client(ADMIN, ADMIN_PASSWORD)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and reader.hget("engram:_sys:tenant:acme", "policy") != "replicated":
        time.sleep(0.05)
    assert reader.hget("engram:_sys:tenant:acme", "policy") == "replicated", replica.log()
    assert f"replicaof 127.0.0.2 {port}" in (replica.root / "run" / "redis.conf").read_text().splitlines()
    assert not any(
        line.startswith("replicaof") for line in (primary.root / "run" / "redis.conf").read_text().splitlines()
    )
    with pytest.raises(redis.ResponseError, match="read only replica"):
        reader.hset("engram:x", "f", "v")


def test_probe_passes_while_redis_answers_and_fails_when_it_does_not(primary: RedisPod) -> None:
    assert primary.probe("ready").returncode == 0
    assert primary.probe("live").returncode == 0
    primary.stop()
    down = primary.probe("ready")
    assert down.returncode == 1 and "redis probe ready" in down.stderr


# --- Engram's own code against the chart's users --------------------------------------------------------


def tenant_cli(primary: RedisPod, *args: str) -> subprocess.CompletedProcess[str]:
    """`engram tenant ...` (the operator's reconcile code, Redis only) as the chart's admin user."""
    pytest.importorskip("engram.tenancy.cli", reason="engram.tenancy.cli not written yet")
    env = {
        **os.environ,
        "ENGRAM_REDIS_URL": f"redis://{primary.host}:{primary.port}/0",
        "ENGRAM_REDIS_USERNAME": ADMIN,
        "ENGRAM_REDIS_PASSWORD": ADMIN_PASSWORD,
    }
    code = "import sys; from engram.tenancy.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run(
        [sys.executable, "-c", code, "tenant", *args], env=env, capture_output=True, text=True, timeout=60, check=False
    )


def test_operator_tenant_reconcile_runs_with_the_admin_user(primary: RedisPod) -> None:
    """The operator's reconcile code (ACL user, registry record, functions, purge) runs as the admin user."""
    created = tenant_cli(primary, "create", "acme")
    assert created.returncode == 0, created.stderr
    assert created.stdout.strip(), "no API key printed"
    admin = primary.client(ADMIN, ADMIN_PASSWORD)
    assert any("engram.acme" in line for line in admin.execute_command("ACL", "LIST"))
    listed = tenant_cli(primary, "list")
    assert listed.returncode == 0 and "acme" in listed.stdout, listed.stderr
    deleted = tenant_cli(primary, "delete", "acme", "--purge")
    assert deleted.returncode == 0, deleted.stderr
    assert not any("engram.acme" in line for line in admin.execute_command("ACL", "LIST"))


def test_chat_service_resolves_api_keys_as_the_service_user(primary: RedisPod) -> None:
    registry = pytest.importorskip("engram.tenancy.registry")
    from engram.redis_keys import KeySpace

    created = tenant_cli(primary, "create", "acme")
    assert created.returncode == 0, created.stderr
    api_key = created.stdout.strip()

    async def resolve() -> object:
        import redis.asyncio as aioredis

        client = aioredis.Redis(
            host=primary.host, port=primary.port, username=SERVICE, password=SERVICE_PASSWORD, decode_responses=True
        )
        try:
            return await registry.TenantRegistry(client, KeySpace("engram"), 0).resolve_api_key(api_key)
        finally:
            await client.aclose()

    tenant = asyncio.run(resolve())
    assert tenant is not None and "acme" in repr(tenant)


def test_history_store_runs_its_functions_as_the_service_user(primary: RedisPod) -> None:
    """Every command the function library runs inside FCALL is on the service user's list."""
    store_module = pytest.importorskip("engram.history.store", reason="engram.history.store not written yet")
    from engram.history.functions import ensure_library
    from engram.redis_keys import KeySpace

    async def scenario() -> tuple[int, list[str]]:
        import redis.asyncio as aioredis

        admin = aioredis.Redis(host=primary.host, port=primary.port, username=ADMIN, password=ADMIN_PASSWORD)
        await ensure_library(admin)  # the operator loads the library; the service user may not
        await admin.aclose()
        client = aioredis.Redis(
            host=primary.host, port=primary.port, username=SERVICE, password=SERVICE_PASSWORD, decode_responses=True
        )
        store = store_module.HistoryStore(client, KeySpace("engram"))
        await store.commit_turn("acme", "s1", "t1", "hello", "hi")
        await store.commit_turn("acme", "s1", "t2", "again", "hi again")
        window = await store.load_window("acme", "s1", 3000)
        count = await store.count_sessions("acme")
        await store.delete_session("acme", "s1")
        await client.aclose()
        return count, [m.content for m in window.messages]

    count, contents = asyncio.run(scenario())
    assert contents == ["hello", "hi", "again", "hi again"]
    assert count == 1


def test_chat_service_redis_client_connects_as_the_service_user(primary: RedisPod) -> None:
    """engram.connections.create_redis (the chat service's client) can open a connection as the service user."""
    connections = pytest.importorskip("engram.connections")
    from engram.settings import Settings

    async def ping() -> bool:
        settings = Settings(
            redis_url=f"redis://{primary.host}:{primary.port}/0",
            redis_username=SERVICE,
            redis_password=SERVICE_PASSWORD,
        )
        client = connections.create_redis(settings)
        try:
            return bool(await client.ping())
        finally:
            await client.aclose()

    assert asyncio.run(ping())
