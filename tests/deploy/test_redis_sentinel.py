"""The chart's sentinel mode, run for real: start.sh, sentinel.sh and sentinel.conf from the rendered ConfigMap,
three real redis-server processes (pods engram-redis-0..2) and three real redis-sentinel processes
(engram-sentinel-0..2), each on a loopback address of its own (the pod IP) and the chart's ports.

What differs from the containers: Debian's redis-server/redis-sentinel (7.0) instead of the image's, loopback
addresses instead of the pods' DNS names, allow-lists filtered to the commands this server knows, and no AOF
(a replica refuses SIGTERM while it writes its first AOF; durability on disk is not what this checks).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml

from testkit.processes import LEAK_MARKER, stop_process
from testkit.redis_server import commands_known, free_port, strict_client
from testkit.sentinel import wait_until
from tests.deploy.conftest import CHART, RELEASE, helm, render, render_redis_config

ADMIN, ADMIN_PASSWORD = "engram-admin", "admin-secret-1"
SERVICE, SERVICE_PASSWORD = "engram-service", "service-secret-1"
SENTINEL_PASSWORD = "sentinel-secret-1"
MONITOR_PASSWORD = "sentinel-monitor-secret-1"
MASTER = "engram"
REDIS_HOSTS = ("127.0.0.21", "127.0.0.22", "127.0.0.23")
SENTINEL_HOSTS = ("127.0.0.31", "127.0.0.32", "127.0.0.33")
SECRET = {
    "admin-username": ADMIN,
    "admin-password": ADMIN_PASSWORD,
    "service-username": SERVICE,
    "service-password": SERVICE_PASSWORD,
    "replication-password": "replication-secret-1",
    "exporter-password": "exporter-secret-1",
    "sentinel-password": SENTINEL_PASSWORD,
    "sentinel-monitor-password": MONITOR_PASSWORD,
}


def sentinel_values(*extra: str) -> list[str]:
    return ["--set", "redis.mode=sentinel", "--set", "redis.replicas=2", *extra]


# --- rendering ---------------------------------------------------------------------------------------------


def test_sentinel_mode_renders_sentinels_pdbs_and_no_primary_only_service() -> None:
    rendered = render(CHART / "ci" / "sentinel-values.yaml")
    sentinels = rendered.one("StatefulSet", "engram-sentinel")
    assert sentinels["spec"]["replicas"] == 3
    assert rendered.one("StatefulSet", "engram-redis")["spec"]["replicas"] == 3
    headless = rendered.one("Service", "engram-sentinel-headless")
    assert headless["spec"]["clusterIP"] == "None"
    assert [p["port"] for p in headless["spec"]["ports"]] == [26379]
    # A Service pinned to pod 0 would send clients to a replica after a failover: there is none.
    assert not [s for s in rendered.all("Service") if s["metadata"]["name"] == "engram-redis"]
    budgets = {p["metadata"]["name"]: p["spec"] for p in rendered.all("PodDisruptionBudget")}
    assert budgets["engram-sentinel"]["maxUnavailable"] == 1
    assert budgets["engram-redis"]["maxUnavailable"] == 1
    secret_keys = set(rendered.one("Secret", "engram-redis-auth")["data"])
    assert {"sentinel-password", "sentinel-monitor-password"} <= secret_keys
    # No Redis Cluster bus port anywhere (that is cluster mode's).
    assert "16379" not in json.dumps(rendered.docs)


def env_of(rendered: Any, name: str) -> dict[str, Any]:
    (container,) = [c for c in rendered.one("Deployment", name)["spec"]["template"]["spec"]["containers"]]
    return {item["name"]: item for item in container["env"]}


def test_chat_service_and_operator_ask_the_sentinels_with_the_sentinel_password() -> None:
    rendered = render(CHART / "ci" / "sentinel-values.yaml")
    sentinels = ",".join(f"engram-sentinel-{i}.engram-sentinel-headless.engram.svc:26379" for i in range(3))
    for name in ("engram-chat", "engram-operator"):
        env = env_of(rendered, name)
        assert env["ENGRAM_REDIS_MODE"]["value"] == "sentinel"
        assert env["ENGRAM_REDIS_SENTINELS"]["value"] == sentinels
        assert env["ENGRAM_REDIS_SENTINEL_SERVICE"]["value"] == "engram"
        assert env["ENGRAM_REDIS_SENTINEL_PASSWORD"]["valueFrom"]["secretKeyRef"] == {
            "name": "engram-redis-auth",
            "key": "sentinel-password",
        }
        assert env["ENGRAM_COMMIT_DURABILITY"]["value"] == "replicated"
        assert env["ENGRAM_COMMIT_REPLICA_TIMEOUT_MS"]["value"] == "500"
    # The operator asks the Sentinels for every node; no fixed replica list.
    assert env_of(rendered, "engram-operator")["ENGRAM_REDIS_REPLICA_URLS"]["value"] == ""


def test_commit_durability_defaults_to_replicated_with_sentinels_and_local_without() -> None:
    def durability(*args: str) -> str:
        docs = [d for d in yaml.safe_load_all(helm("template", RELEASE, str(CHART), *args).stdout) if d]
        (chat,) = [d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "engram-chat"]
        env = {e["name"]: e for e in chat["spec"]["template"]["spec"]["containers"][0]["env"]}
        return str(env["ENGRAM_COMMIT_DURABILITY"]["value"])

    assert durability(*sentinel_values()) == "replicated"
    assert durability() == "local"
    assert durability(*sentinel_values("--set", "config.commitDurability=local")) == "local"


def test_external_sentinels_are_passed_with_credentials_from_the_existing_secret() -> None:
    rendered = render(CHART / "ci" / "external-sentinel-values.yaml")
    assert not rendered.all("StatefulSet")
    env = env_of(rendered, "engram-chat")
    assert env["ENGRAM_REDIS_MODE"]["value"] == "sentinel"
    assert env["ENGRAM_REDIS_SENTINELS"]["value"].split(",") == [
        f"sentinel-{i}.sentinel.redis.svc:26379" for i in range(3)
    ]
    assert env["ENGRAM_REDIS_SENTINEL_PASSWORD"]["valueFrom"]["secretKeyRef"] == {
        "name": "engram-redis-credentials",
        "key": "sentinel-password",
    }
    assert "ENGRAM_REDIS_SENTINEL_USERNAME" not in env


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--set", "redis.mode=sentinel"], "redis.mode=sentinel needs redis.replicas >= 2"),
        (
            ["--set", "redis.enabled=false", "--set", "redis.mode=sentinel", "--set", "externalRedis.url=redis://x/0"],
            "needs externalRedis.sentinel.hosts",
        ),
        (["--set", "redis.mode=replicated"], "/redis/mode"),
    ],
)
def test_unsupported_topologies_are_refused_with_a_clear_message(args: list[str], message: str) -> None:
    result = helm("template", RELEASE, str(CHART), *args, check=False)
    assert result.returncode != 0
    assert message in result.stderr


def test_network_policies_open_26379_to_chat_operator_redis_and_sentinels_only() -> None:
    rendered = render(CHART / "ci" / "sentinel-values.yaml")
    policies = {p["metadata"]["name"]: p["spec"] for p in rendered.all("NetworkPolicy")}
    for name, port, component in (("engram-sentinel", "sentinel", "sentinel"), ("engram-redis", "redis", "redis")):
        spec = policies[name]
        assert spec["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == component
        (rule,) = [r for r in spec["ingress"] if any(p["port"] == port for p in r.get("ports", []))]
        peers = sorted(peer["podSelector"]["matchLabels"]["app.kubernetes.io/component"] for peer in rule["from"])
        assert peers == ["chat", "operator", "redis", "sentinel"]


# --- the rendered scripts against real redis-server and redis-sentinel processes ---------------------------


def known_commands(root: Path) -> set[str]:
    """The allow-list commands this redis-server knows (ACL SETUSER rejects unknown ones)."""
    values = yaml.safe_load((CHART / "values.yaml").read_text())["redis"]["acl"]
    return commands_known(root, {*values["serviceCommands"], *values["adminCommands"]})


def render_config(conf: Path, redis_port: int, sentinel_port: int, known: set[str]) -> None:
    render_redis_config(
        conf,
        known,
        'redis.mode="sentinel"',
        "redis.replicas=2",
        f"redis.service.port={redis_port}",
        f"redis.sentinel.port={sentinel_port}",
        "redis.sentinel.downAfterMilliseconds=1000",
        "redis.sentinel.failoverTimeout=10000",
    )


@dataclass
class Pod:
    """One Redis or Sentinel pod of the chart, run as a local process group from its rendered script."""

    name: str
    host: str
    port: int
    root: Path
    conf_source: Path
    script: str
    extra_env: dict[str, str]
    process: subprocess.Popen[bytes] | None = None
    conf: Path = field(init=False)

    def __post_init__(self) -> None:
        self.conf = self.root / "conf"
        for folder in (self.root / "auth", self.conf, self.root / "run", self.root / "data"):
            folder.mkdir(parents=True, exist_ok=True)
        for key, value in SECRET.items():
            (self.root / "auth" / key).write_text(value)
        for source in self.conf_source.iterdir():
            # The pod listens on its own IP; here that is one loopback address per pod.
            (self.conf / source.name).write_text(source.read_text().replace("bind * -::*", f"bind {self.host}"))

    def start(self) -> Pod:
        env = {
            "PATH": os.environ["PATH"],
            "POD_NAME": self.name,
            "REDIS_AUTH_DIR": str(self.root / "auth"),
            "REDIS_CONF_DIR": str(self.conf),
            "REDIS_RUN_DIR": str(self.root / "run"),
            "REDIS_DATA_DIR": str(self.root / "data"),
            "REDIS_PRIMARY_HOST": REDIS_HOSTS[0],
            "SENTINEL_HOSTS": " ".join(SENTINEL_HOSTS),
            "REDIS_POD_HOSTS": " ".join(REDIS_HOSTS),
            **self.extra_env,
        }
        if LEAK_MARKER in os.environ:  # so that a leftover process is found by the suite's leak check
            env[LEAK_MARKER] = os.environ[LEAK_MARKER]
        log = (self.root / "log").open("ab")
        self.process = subprocess.Popen(
            ["sh", str(self.conf / self.script)], env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        return self

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process)
            self.process = None

    def log(self) -> str:
        return (self.root / "log").read_text(errors="replace")

    def client(self, username: str | None, password: str) -> redis.Redis:
        return strict_client(self.host, self.port, username, password)

    def admin(self) -> redis.Redis:
        return self.client(ADMIN, ADMIN_PASSWORD)

    def sentinel(self) -> redis.Redis:
        return self.client(None, SENTINEL_PASSWORD)


@dataclass
class Topology:
    redis: list[Pod]
    sentinels: list[Pod]
    redis_port: int
    sentinel_port: int

    def node(self, host: str) -> Pod:
        return next(pod for pod in self.redis if pod.host == host)

    def primary(self) -> Pod:
        """The pod the Sentinels agree is the primary."""
        ((host, _port),) = self.primaries()
        return self.node(host)

    def primaries(self) -> set[tuple[str, int]]:
        """What every Sentinel answers for the primary (one element once they agree)."""
        answers = set()
        for pod in self.sentinels:
            host, port = pod.sentinel().execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", MASTER)
            answers.add((host, int(port)))
        return answers

    def settled(self, primary_host: str) -> bool:
        """Every Sentinel names primary_host, sees both replicas up and the two other Sentinels."""
        if self.primaries() != {(primary_host, self.redis_port)}:
            return False
        for pod in self.sentinels:
            state = pod.sentinel().execute_command("SENTINEL", "MASTER", MASTER)
            info = as_dict(state)
            if str(info["num-slaves"]) != "2" or str(info["num-other-sentinels"]) != "2" or "down" in info["flags"]:
                return False
            replicas = pod.sentinel().execute_command("SENTINEL", "REPLICAS", MASTER)
            if any("down" in as_dict(replica)["flags"] for replica in replicas):
                return False
        return True

    def logs(self) -> str:
        return "\n".join(f"--- {pod.name}\n{pod.log()[-3000:]}" for pod in [*self.redis, *self.sentinels])


def as_dict(reply: Any) -> dict[str, Any]:
    """A Sentinel state reply (redis-py parses some into dicts; the rest are flat field/value lists)."""
    return dict(reply) if isinstance(reply, dict) else dict(zip(reply[::2], reply[1::2], strict=True))


def replication(pod: Pod) -> dict[str, str]:
    info = pod.client("sentinel", MONITOR_PASSWORD).info("replication")  # the admin user has no INFO
    return {key: str(value) for key, value in info.items()}


@pytest.fixture(scope="module")
def topology(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Topology]:
    for binary in ("redis-server", "redis-sentinel", "redis-cli", "timeout"):
        if shutil.which(binary) is None:
            pytest.fail(f"{binary} is not installed: run `make install` (Debian packages redis-server, redis-sentinel)")
    root = tmp_path_factory.mktemp("sentinel-mode")
    redis_port, sentinel_port = free_port(), free_port()
    render_config(root / "rendered", redis_port, sentinel_port, known_commands(root / "scratch"))
    redis_pods = [
        Pod(f"engram-redis-{i}", host, redis_port, root / f"redis-{i}", root / "rendered", "start.sh", {})
        for i, host in enumerate(REDIS_HOSTS)
    ]
    for pod in redis_pods:
        pod.extra_env["REDIS_ANNOUNCE_HOST"] = pod.host
    sentinel_pods = [
        Pod(f"engram-sentinel-{i}", host, sentinel_port, root / f"sentinel-{i}", root / "rendered", "sentinel.sh", {})
        for i, host in enumerate(SENTINEL_HOSTS)
    ]
    for pod in sentinel_pods:
        pod.extra_env["SENTINEL_ANNOUNCE_HOST"] = pod.host
    topology = Topology(redis_pods, sentinel_pods, redis_port, sentinel_port)
    try:
        # A fresh install: the Redis pods come first (no Sentinel answers: pod 0 is the primary), then the
        # Sentinels (none knows a primary yet: they monitor pod 0).
        for pod in redis_pods:
            pod.start()
            wait_until(lambda pod=pod: pod.admin().ping(), 15, f"{pod.name} answers")  # type: ignore[misc]
        for pod in sentinel_pods:
            pod.start()
        try:
            wait_until(lambda: topology.settled(REDIS_HOSTS[0]), 60, "the Sentinels to agree on pod 0 and see all")
        except TimeoutError as error:
            raise AssertionError(f"{error}\n{topology.logs()}") from error
        yield topology
    finally:
        for pod in [*sentinel_pods, *redis_pods]:
            pod.stop()


def test_fresh_install_makes_pod_0_the_primary_that_every_sentinel_agrees_on(topology: Topology) -> None:
    assert topology.primaries() == {(REDIS_HOSTS[0], topology.redis_port)}
    assert replication(topology.redis[0])["role"] == "master"
    for pod in topology.redis[1:]:
        info = replication(pod)
        assert info["role"] == "slave" and info["master_host"] == REDIS_HOSTS[0], info
    # Sentinels know the replicas by their announced names, not by the address the connection came from.
    replicas = topology.sentinels[0].sentinel().execute_command("SENTINEL", "REPLICAS", MASTER)
    assert sorted(as_dict(replica)["ip"] for replica in replicas) == list(REDIS_HOSTS[1:])


def test_chart_users_work_on_every_node_and_the_sentinel_user_only_does_sentinel_work(topology: Topology) -> None:
    topology.primary().admin().hset("engram:_sys:tenant:acme", "policy", "p1")
    for pod in topology.redis:
        assert pod.client(SERVICE, SERVICE_PASSWORD).ping()
        wait_until(lambda pod=pod: pod.admin().hget("engram:_sys:tenant:acme", "policy") == "p1", 10, "replication")  # type: ignore[misc]
        monitor = pod.client("sentinel", MONITOR_PASSWORD)
        assert monitor.info("replication")["role"] in ("master", "slave")
        for command in (
            ("GET", "engram:x"),
            ("HGET", "engram:_sys:tenant:acme", "policy"),
            ("KEYS", "*"),
            ("FLUSHALL",),
            ("CONFIG", "SET", "appendonly", "no"),
            ("ACL", "LIST"),
            ("SHUTDOWN",),
        ):
            with pytest.raises(redis.exceptions.NoPermissionError):
                monitor.execute_command(*command)
        with pytest.raises(redis.ResponseError):
            monitor.publish("engram:other-channel", "x")
    # Sentinels require their password.
    with pytest.raises(redis.AuthenticationError):
        topology.sentinels[0].client(None, "wrong").ping()
    anonymous = redis.Redis(host=SENTINEL_HOSTS[0], port=topology.sentinel_port, socket_timeout=2)
    with pytest.raises((redis.AuthenticationError, redis.ResponseError)):  # NOAUTH (or HELLO refused)
        anonymous.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", MASTER)
    anonymous.close()


def test_failover_then_restarted_pods_find_the_current_primary_from_the_sentinels(topology: Topology) -> None:
    old = topology.primary()  # pod 0 when the tests run in order
    # A failover run by the Sentinels with the chart's "sentinel" user (MULTI, REPLICAOF, CONFIG REWRITE, ...).
    assert topology.sentinels[0].sentinel().execute_command("SENTINEL", "FAILOVER", MASTER) in (True, "OK")

    def new_primary() -> str | None:
        answers = topology.primaries()
        (host, _port), *rest = answers
        return host if not rest and host != old.host else None

    try:
        promoted = wait_until(new_primary, 60, "the Sentinels to agree on a promoted replica")
        assert replication(topology.node(promoted))["role"] == "master"
        # The Sentinels' CONFIG REWRITE reached the promoted pod's redis.conf (no replicaof left in it).
        promoted_conf = (topology.node(promoted).root / "run" / "redis.conf").read_text()
        assert "# Generated by CONFIG REWRITE" in promoted_conf
        assert not [line for line in promoted_conf.splitlines() if line.startswith("replicaof")]
        # The old primary is turned into a replica by the Sentinels and syncs with the replication user
        # that start.sh gave every pod.
        wait_until(
            lambda: replication(old).get("master_link_status") == "up" and replication(old)["master_host"] == promoted,
            60,
            "the old primary to replicate from the promoted one",
        )
    except TimeoutError as error:
        raise AssertionError(f"{error}\n{topology.logs()}") from error

    # The old primary restarts (for pod 0 the fallback is "pod 0 is the primary"): start.sh asks the Sentinels.
    old.stop()
    old.start()
    wait_until(lambda: old.admin().ping(), 15, "the old primary answers again")
    run_conf = (old.root / "run" / "redis.conf").read_text().splitlines()
    assert f"replicaof {promoted} {topology.redis_port}" in run_conf, old.log()
    topology.node(promoted).admin().hset("engram:_sys:tenant:acme", "policy", "after-restart")
    wait_until(
        lambda: old.admin().hget("engram:_sys:tenant:acme", "policy") == "after-restart",
        30,
        "the old primary follows it",
    )
    with pytest.raises(redis.ResponseError, match="read only replica"):
        old.admin().hset("engram:x", "f", "v")

    # A restarted Sentinel monitors the current primary too (asked of the other Sentinels), not pod 0.
    restarted = topology.sentinels[2]
    restarted.stop()
    restarted.start()
    wait_until(lambda: restarted.sentinel().ping(), 15, "the restarted Sentinel answers")
    assert (
        f"sentinel monitor {MASTER} {promoted} {topology.redis_port} 2"
        in (restarted.root / "run" / "sentinel.conf").read_text()
    )
    try:
        wait_until(lambda: topology.settled(promoted), 60, "all Sentinels to agree again")
    except TimeoutError as error:
        raise AssertionError(f"{error}\n{topology.logs()}") from error

    # The chat service's own client, configured as the chart configures it, commits on the promoted primary.
    connections = pytest.importorskip("engram.connections")
    from engram.settings import Settings

    async def write_as_service() -> str | None:
        settings = Settings(
            redis_mode="sentinel",
            redis_sentinels=",".join(f"{host}:{topology.sentinel_port}" for host in SENTINEL_HOSTS),
            redis_sentinel_service=MASTER,
            redis_sentinel_password=SENTINEL_PASSWORD,
            redis_username=SERVICE,
            redis_password=SERVICE_PASSWORD,
        )
        client = connections.create_redis(settings)
        try:
            await client.hset("engram:acme:{acme:s1}:meta", "epoch", "1")
            return await client.hget("engram:acme:{acme:s1}:meta", "epoch")  # type: ignore[no-any-return]
        finally:
            await client.aclose()

    assert asyncio.run(write_as_service()) == "1"
    assert topology.node(promoted).admin().exists("engram:acme:{acme:s1}:meta") == 1


def test_with_every_sentinel_down_restarted_pods_and_sentinels_find_the_primary_by_role(topology: Topology) -> None:
    primary = topology.primary()
    replica = next(pod for pod in topology.redis if pod is not primary)
    for sentinel in topology.sentinels:
        sentinel.stop()
    # No Sentinel answers: the restarted replica asks the other pods for their ROLE, not "pod 0 is primary".
    replica.stop()
    replica.start()
    wait_until(lambda: replica.admin().ping(), 15, "the replica answers again")
    assert f"replicaof {primary.host} {topology.redis_port}" in (replica.root / "run" / "redis.conf").read_text()
    assert "says it is the primary" in replica.log()
    primary.admin().hset("engram:_sys:tenant:acme", "policy", "no-sentinels")
    wait_until(lambda: replica.admin().hget("engram:_sys:tenant:acme", "policy") == "no-sentinels", 30, "replication")
    # The Sentinels come back one by one; the first finds no other Sentinel and asks the pods as well.
    for sentinel in topology.sentinels:
        sentinel.start()
    try:
        wait_until(lambda: topology.settled(primary.host), 60, "the restarted Sentinels to agree on the primary")
    except TimeoutError as error:
        raise AssertionError(f"{error}\n{topology.logs()}") from error
    for sentinel in topology.sentinels:
        monitor = f"sentinel monitor {MASTER} {primary.host} {topology.redis_port} 2"
        assert monitor in (sentinel.root / "run" / "sentinel.conf").read_text()
