"""The chart's cluster mode: what it renders, and its scripts run for real. start.sh, cluster-rejoin.sh (the
pods' postStart) and cluster-bootstrap.sh (the bootstrap Job) from the rendered ConfigMap drive six real
redis-server processes (pods engram-redis-0..5), each on a loopback address of its own (the pod IP) and the
chart's ports; the chat service's client is redis-py's own RedisCluster with the service user.

What differs from the containers: Debian's redis-server/redis-cli (7.0) instead of the image's, loopback
addresses instead of the pods' DNS names (so a pod's announced name is its address here), allow-lists
filtered to the commands this server knows, and no AOF (a replica refuses SIGTERM while it writes its first
AOF; durability on disk is not what this checks).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml
from redis.cluster import RedisCluster

from testkit.processes import LEAK_MARKER, stop_process
from testkit.redis_server import commands_known, free_port, strict_client
from testkit.sentinel import wait_until
from tests.deploy.conftest import CHART, RELEASE, helm, render, render_redis_config

ADMIN, ADMIN_PASSWORD = "engram-admin", "admin-secret-c1"
SERVICE, SERVICE_PASSWORD = "engram-service", "service-secret-c1"
REPLICATION_PASSWORD = "replication-secret-c1"
EXPORTER_PASSWORD = "exporter-secret-c1"
SECRET = {
    "admin-username": ADMIN,
    "admin-password": ADMIN_PASSWORD,
    "service-username": SERVICE,
    "service-password": SERVICE_PASSWORD,
    "replication-password": REPLICATION_PASSWORD,
    "exporter-password": EXPORTER_PASSWORD,
}
# The pod IPs of a fresh install, the new ones after a restart of every pod, and more for single restarts.
FIRST_HOSTS = tuple(f"127.0.0.{41 + i}" for i in range(6))
SECOND_HOSTS = tuple(f"127.0.0.{51 + i}" for i in range(6))
SPARE_HOSTS = tuple(f"127.0.0.{57 + i}" for i in range(3))
CLUSTER_VALUES = CHART / "ci" / "cluster-values.yaml"
EXTERNAL_CLUSTER_VALUES = CHART / "ci" / "external-cluster-values.yaml"


# --- rendering ---------------------------------------------------------------------------------------------


def env_of(rendered: Any, name: str) -> dict[str, Any]:
    (container,) = rendered.one("Deployment", name)["spec"]["template"]["spec"]["containers"]
    return {item["name"]: item for item in container["env"]}


def test_cluster_mode_renders_six_peer_pods_with_the_bus_port_a_pdb_and_no_pod_0_service() -> None:
    rendered = render(CLUSTER_VALUES)
    redis_set = rendered.one("StatefulSet", "engram-redis")
    assert redis_set["spec"]["replicas"] == 6
    assert redis_set["spec"]["podManagementPolicy"] == "Parallel"
    (container,) = redis_set["spec"]["template"]["spec"]["containers"]
    assert {"name": "cluster-bus", "containerPort": 16379, "protocol": "TCP"} in container["ports"]
    assert container["lifecycle"]["postStart"]["exec"]["command"] == ["sh", "/opt/engram/redis/cluster-rejoin.sh"]
    env = {item["name"]: item for item in container["env"]}
    assert env["POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    assert env["REDIS_ANNOUNCE_HOST"]["value"] == "$(POD_NAME).engram-redis-headless.engram.svc"
    assert env["REDIS_POD_HOSTS"]["value"].split() == [
        f"engram-redis-{i}.engram-redis-headless.engram.svc" for i in range(6)
    ]
    # No Service pinned to pod 0 (any node may be a primary), no Sentinels.
    assert [s["metadata"]["name"] for s in rendered.all("Service") if "redis" in s["metadata"]["name"]] == [
        "engram-redis-headless"
    ]
    assert not [s for s in rendered.all("StatefulSet") if "sentinel" in s["metadata"]["name"]]
    budget = rendered.one("PodDisruptionBudget", "engram-redis")["spec"]
    assert budget["maxUnavailable"] == 1
    assert budget["selector"]["matchLabels"]["app.kubernetes.io/component"] == "redis"
    # The same Secret keys as standalone mode: nothing cluster-specific to generate.
    assert set(rendered.one("Secret", "engram-redis-auth")["data"]) == set(SECRET)
    start = rendered.one("ConfigMap", "engram-redis")["data"]["start.sh"]
    for line in ("cluster-enabled yes", "cluster-config-file $DATA_DIR/nodes.conf", "cluster-node-timeout 3000"):
        assert f'echo "{line}"' in start


def test_chat_service_and_operator_seed_from_the_headless_service_with_replicated_commits() -> None:
    rendered = render(CLUSTER_VALUES)
    for name, user_key in (("engram-chat", "service"), ("engram-operator", "admin")):
        env = env_of(rendered, name)
        assert env["ENGRAM_REDIS_MODE"]["value"] == "cluster"
        assert env["ENGRAM_REDIS_URL"]["value"] == "redis://engram-redis-headless.engram.svc:6379"
        assert env["ENGRAM_REDIS_USERNAME"]["valueFrom"]["secretKeyRef"]["key"] == f"{user_key}-username"
        assert env["ENGRAM_REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"]["key"] == f"{user_key}-password"
        assert env["ENGRAM_COMMIT_DURABILITY"]["value"] == "replicated"
        assert not {"ENGRAM_REDIS_SENTINELS", "ENGRAM_REDIS_SENTINEL_SERVICE"} & set(env)
    # The operator finds every node in the cluster's slot map: no fixed replica list.
    assert env_of(rendered, "engram-operator")["ENGRAM_REDIS_REPLICA_URLS"]["value"] == ""


def test_commit_durability_defaults_to_replicated_in_cluster_mode_and_can_be_set_to_local() -> None:
    def durability(*sets: str) -> str:
        return str(env_of(render(CLUSTER_VALUES, set_json=sets), "engram-chat")["ENGRAM_COMMIT_DURABILITY"]["value"])

    assert durability() == "replicated"
    assert durability('config.commitDurability="local"') == "local"


def test_network_policy_opens_the_cluster_bus_to_redis_pods_only_and_redis_to_the_bootstrap_job() -> None:
    rendered = render(CLUSTER_VALUES)
    (policy,) = rendered.all("NetworkPolicy")

    def peers(port: str) -> list[str]:
        (rule,) = [r for r in policy["spec"]["ingress"] if any(p["port"] == port for p in r.get("ports", []))]
        return sorted(peer["podSelector"]["matchLabels"]["app.kubernetes.io/component"] for peer in rule["from"])

    assert peers("cluster-bus") == ["redis"]
    assert peers("redis") == ["chat", "cluster-bootstrap", "operator", "redis"]
    job = rendered.one("Job", "engram-redis-cluster-bootstrap")
    assert job["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"] == "cluster-bootstrap"


def test_bootstrap_job_is_a_rerunnable_hook_that_runs_the_script_as_non_root_without_a_token() -> None:
    rendered = render(CLUSTER_VALUES)
    job = rendered.one("Job", "engram-redis-cluster-bootstrap")
    annotations = job["metadata"]["annotations"]
    assert annotations["helm.sh/hook"] == "post-install,post-upgrade"
    assert annotations["helm.sh/hook-delete-policy"] == "before-hook-creation,hook-succeeded"
    spec = job["spec"]["template"]["spec"]
    assert spec["automountServiceAccountToken"] is False
    assert spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["runAsUser"] == 999
    assert job["spec"]["activeDeadlineSeconds"] > 0 and job["spec"]["backoffLimit"] <= 3
    (container,) = spec["containers"]
    assert container["command"] == ["sh", "/opt/engram/redis/cluster-bootstrap.sh"]
    assert (
        container["image"]
        == rendered.one("StatefulSet", "engram-redis")["spec"]["template"]["spec"]["containers"][0]["image"]
    )
    # Credentials come from the mounted Secret, never from the environment or the command line.
    assert [item["name"] for item in container["env"]] == ["REDIS_POD_HOSTS"]
    assert {"name": "auth", "mountPath": "/etc/redis-auth", "readOnly": True} in container["volumeMounts"]
    assert "cluster-bootstrap.sh" in rendered.one("ConfigMap", "engram-redis")["data"]


def test_cluster_only_commands_are_granted_in_cluster_mode_only_and_by_name() -> None:
    def rules(values: tuple[Any, ...], user: str) -> set[str]:
        script = render(*values).one("ConfigMap", "engram-redis")["data"]["start.sh"]
        with_cluster = {"SERVICE": "", "ADMIN": ""}
        for line in script.splitlines():
            line = line.strip()
            if line.startswith("CLUSTER_CLIENT_COMMANDS="):
                with_cluster["SERVICE"] = with_cluster["ADMIN"] = line.split("=", 1)[1].strip("'")
            if line.startswith("CLUSTER_ADMIN_COMMANDS="):
                with_cluster["ADMIN"] += " " + line.split("=", 1)[1].strip("'")
        return set(with_cluster[user].split())

    assert rules((), "SERVICE") == set() and rules((), "ADMIN") == set()
    service, admin = rules((CLUSTER_VALUES,), "SERVICE"), rules((CLUSTER_VALUES,), "ADMIN")
    assert service == {"+cluster|slots", "+command", "+asking"}
    assert service < admin
    assert all(rule.startswith("+") and "@" not in rule for rule in admin)
    # Nothing that moves slots, forgets nodes, resets a node or fails over: those stay manual.
    for dangerous in ("setslot", "delslots", "forget", "reset", "failover", "flushslots", "migrate"):
        assert not [rule for rule in admin if dangerous in rule], dangerous


def test_external_cluster_passes_the_seed_url_and_renders_no_redis_objects() -> None:
    rendered = render(EXTERNAL_CLUSTER_VALUES)
    assert not rendered.all("StatefulSet") and not rendered.all("Job") and not rendered.all("NetworkPolicy")
    for name in ("engram-chat", "engram-operator"):
        env = env_of(rendered, name)
        assert env["ENGRAM_REDIS_MODE"]["value"] == "cluster"
        assert env["ENGRAM_REDIS_URL"]["value"] == "redis://redis-cluster.redis.svc:6379"
        assert env["ENGRAM_REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == "engram-redis-credentials"
        assert env["ENGRAM_COMMIT_DURABILITY"]["value"] == "replicated"
    assert env_of(rendered, "engram-operator")["ENGRAM_REDIS_REPLICA_URLS"]["value"] == ""


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--set", "redis.cluster.nodes=4"], "redis.mode=cluster needs redis.cluster.nodes to be a multiple"),
        (["--set", "redis.cluster.nodes=7"], "redis.mode=cluster needs redis.cluster.nodes to be a multiple"),
        (["--set", "redis.cluster.replicasPerPrimary=2"], "at least 3 primaries' worth (9); got 6"),
        (["--set", "redis.cluster.nodes=2"], "/redis/cluster/nodes"),
        (
            ["--set", "redis.enabled=false", "--set", "externalRedis.existingSecret=s"],
            "externalRedis.url is required",
        ),
    ],
)
def test_impossible_cluster_shapes_are_refused_with_a_clear_message(args: list[str], message: str) -> None:
    result = helm("template", RELEASE, str(CHART), "--set", "redis.mode=cluster", *args, check=False)
    assert result.returncode != 0
    assert message in result.stderr


def test_three_primaries_without_replicas_render() -> None:
    rendered = render(set_json=('redis.mode="cluster"', "redis.cluster.nodes=3", "redis.cluster.replicasPerPrimary=0"))
    assert rendered.one("StatefulSet", "engram-redis")["spec"]["replicas"] == 3


# --- the rendered scripts against six real redis-server processes ----------------------------------------


def render_config(conf: Path, port: int, bus_port: int, known: set[str]) -> None:
    settings = [f"redis.service.port={port}", f"redis.cluster.busPort={bus_port}", "redis.cluster.nodeTimeout=2000"]
    render_redis_config(conf, known, 'redis.mode="cluster"', *settings)


@dataclass
class Pod:
    """One Redis pod of the chart in cluster mode, run as a local process group from its rendered start.sh."""

    name: str
    host: str
    port: int
    root: Path
    conf_source: Path
    peers: tuple[str, ...]
    process: subprocess.Popen[bytes] | None = None
    conf: Path = field(init=False)

    def __post_init__(self) -> None:
        self.conf = self.root / "conf"
        for folder in (self.root / "auth", self.conf, self.root / "run", self.root / "data"):
            folder.mkdir(parents=True, exist_ok=True)
        for key, value in SECRET.items():
            (self.root / "auth" / key).write_text(value)
        self.move(self.host, self.peers)

    def move(self, host: str, peers: tuple[str, ...]) -> None:
        """The pod's IP (and so, here, its name) and its peers' as the next start sees them."""
        self.host, self.peers = host, peers
        for source in self.conf_source.iterdir():
            # The pod listens on its own IP; here that is one loopback address per pod.
            (self.conf / source.name).write_text(source.read_text().replace("bind * -::*", f"bind {host}"))

    def env(self) -> dict[str, str]:
        env = {
            "PATH": os.environ["PATH"],
            "POD_NAME": self.name,
            "POD_IP": self.host,
            "REDIS_ANNOUNCE_HOST": self.host,
            "REDIS_POD_HOSTS": " ".join(self.peers),
            "REDIS_AUTH_DIR": str(self.root / "auth"),
            "REDIS_CONF_DIR": str(self.conf),
            "REDIS_RUN_DIR": str(self.root / "run"),
            "REDIS_DATA_DIR": str(self.root / "data"),
        }
        if LEAK_MARKER in os.environ:  # so that a leftover process is found by the suite's leak check
            env[LEAK_MARKER] = os.environ[LEAK_MARKER]
        return env

    def start(self) -> Pod:
        log = (self.root / "log").open("ab")
        self.process = subprocess.Popen(
            ["sh", str(self.conf / "start.sh")], env=self.env(), stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        wait_until(lambda: self.admin().ping(), 15, f"{self.name} to answer at {self.host}")
        return self

    def post_start(self) -> str:
        """What the kubelet runs once the container started (cluster-rejoin.sh); returns its log."""
        result = subprocess.run(
            ["sh", str(self.conf / "cluster-rejoin.sh")], env=self.env(), capture_output=True, text=True,
            timeout=120, check=False,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        return result.stderr

    def probe(self, mode: str) -> subprocess.CompletedProcess[str]:
        """The kubelet's exec probe (probe.sh ready|live)."""
        env = {**self.env(), "REDIS_PROBE_HOST": self.host}
        return subprocess.run(
            ["sh", str(self.conf / "probe.sh"), mode], env=env, capture_output=True, text=True, timeout=20,
            check=False,
        )  # fmt: skip

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process)
            self.process = None

    def kill(self) -> None:
        """kill -9 of the pod's processes, as a node crash would."""
        assert self.process is not None
        os.killpg(self.process.pid, signal.SIGKILL)
        self.stop()  # reaps it

    def log(self) -> str:
        return (self.root / "log").read_text(errors="replace")

    def client(self, username: str | None, password: str) -> redis.Redis:
        return strict_client(self.host, self.port, username, password)

    def admin(self) -> redis.Redis:
        return self.client(ADMIN, ADMIN_PASSWORD)

    def cluster_info(self) -> dict[str, str]:
        text = self.admin().execute_command("CLUSTER", "INFO")  # two arguments: the raw reply, unparsed
        return dict(line.split(":", 1) for line in str(text).strip().splitlines())


@dataclass(frozen=True)
class Node:
    """One line of CLUSTER NODES."""

    id: str
    address: str
    flags: frozenset[str]
    primary_id: str
    slots: tuple[str, ...]

    @property
    def is_primary(self) -> bool:
        return "master" in self.flags


def cluster_nodes(pod: Pod) -> dict[str, Node]:
    text = str(pod.admin().execute_command("CLUSTER", "NODES"))  # two arguments: the raw reply, unparsed
    nodes = {}
    for line in text.strip().splitlines():
        parts = line.split()
        node = Node(parts[0], parts[1], frozenset(parts[2].split(",")) - {"myself"}, parts[3], tuple(parts[8:]))
        nodes[node.id] = node
    return nodes


def run_bootstrap(pods: list[Pod], timeout: int = 60) -> subprocess.CompletedProcess[str]:
    """The bootstrap Job: cluster-bootstrap.sh with the Secret mounted and every pod's name."""
    env = {
        "PATH": os.environ["PATH"],
        "REDIS_AUTH_DIR": str(pods[0].root / "auth"),
        "REDIS_POD_HOSTS": " ".join(pod.host for pod in pods),
        "BOOTSTRAP_TIMEOUT": str(timeout),
    }
    if LEAK_MARKER in os.environ:
        env[LEAK_MARKER] = os.environ[LEAK_MARKER]
    return subprocess.run(
        ["sh", str(pods[0].conf / "cluster-bootstrap.sh")], env=env, capture_output=True, text=True,
        timeout=timeout * 3 + 30, check=False, start_new_session=True,
    )  # fmt: skip


def formed(pods: list[Pod], primaries: int = 3) -> bool:
    """cluster_state:ok on every pod, all slots assigned, `primaries` primaries each with one replica, as every
    pod sees it (gossip has spread: each pod's view of each node's role and primary is the same)."""
    if any(pod.cluster_info().get("cluster_state") != "ok" for pod in pods):
        return False
    views = []
    for pod in pods:
        nodes = cluster_nodes(pod)
        primary_ids = {node.id for node in nodes.values() if node.is_primary and node.slots}
        replicas = [node for node in nodes.values() if "slave" in node.flags]
        if not (
            len(nodes) == len(pods)
            and len(primary_ids) == primaries
            and sorted(node.primary_id for node in replicas) == sorted(primary_ids)
            and not any(flag.startswith("fail") for node in nodes.values() for flag in node.flags)
        ):
            return False
        views.append({i: ("slave" in n.flags, n.primary_id, n.slots) for i, n in nodes.items()})
    return all(view == views[0] for view in views) and all(
        pod.cluster_info()["cluster_slots_assigned"] == "16384" for pod in pods
    )


@dataclass
class Cluster:
    pods: list[Pod]
    port: int
    bootstrap: subprocess.CompletedProcess[str]

    def logs(self) -> str:
        return "\n".join(f"--- {pod.name}\n{pod.log()[-3000:]}" for pod in self.pods)

    def restart_at(self, pod: Pod, host: str) -> str:
        """The pod restarted by Kubernetes with a new IP: start.sh, then its postStart (returns its log)."""
        pod.move(host, tuple(host if other is pod else other.host for other in self.pods))
        pod.start()
        return pod.post_start()

    def wait_formed(self, what: str, timeout: float = 60) -> None:
        try:
            wait_until(lambda: formed(self.pods), timeout, what)
        except TimeoutError as error:
            raise AssertionError(f"{error}\n{self.logs()}") from error

    def service_client(self) -> RedisCluster:
        return RedisCluster(
            host=self.pods[0].host, port=self.port, username=SERVICE, password=SERVICE_PASSWORD,
            decode_responses=True, socket_timeout=2,
        )  # fmt: skip


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    for binary in ("redis-server", "redis-cli", "timeout"):
        if shutil.which(binary) is None:
            pytest.fail(f"{binary} is not installed: run `make install` (Debian package redis-server)")
    root = tmp_path_factory.mktemp("cluster-mode")
    port, bus_port = free_port(), free_port()
    acl = yaml.safe_load((CHART / "values.yaml").read_text())["redis"]["acl"]
    known = commands_known(root / "scratch", {*acl["serviceCommands"], *acl["adminCommands"]})
    render_config(root / "rendered", port, bus_port, known)
    pods = [
        Pod(f"engram-redis-{i}", host, port, root / f"redis-{i}", root / "rendered", FIRST_HOSTS)
        for i, host in enumerate(FIRST_HOSTS)
    ]
    try:
        # A fresh install: every pod starts (Parallel), its postStart finds no cluster to rejoin; then the Job.
        for pod in pods:
            pod.start()
        for pod in pods:
            pod.post_start()
        # Fresh nodes are Ready before the Job runs (else `helm install --wait` would never run the hook).
        for pod in pods:
            assert pod.probe("ready").returncode == 0, pod.probe("ready").stderr
        bootstrap = run_bootstrap(pods)
        assert bootstrap.returncode == 0, f"{bootstrap.stdout}\n{bootstrap.stderr}"
        topology = Cluster(pods, port, bootstrap)
        try:
            wait_until(lambda: formed(pods), 30, "3 primaries with a replica each, cluster_state:ok everywhere")
        except TimeoutError as error:
            raise AssertionError(f"{error}\n{topology.logs()}") from error
        yield topology
    finally:
        for pod in pods:
            pod.stop()


def test_bootstrap_forms_three_primaries_with_a_replica_each_as_the_admin_user(cluster: Cluster) -> None:
    assert formed(cluster.pods)
    nodes = cluster_nodes(cluster.pods[0])
    assert sorted(node.address.split(":")[0] for node in nodes.values()) == sorted(FIRST_HOSTS)
    # Clients are sent each node's announced name (here its address), not a bare IP they could not verify.
    assert all(node.address.endswith(f",{node.address.split(':')[0]}") for node in nodes.values())
    output = cluster.bootstrap.stdout + cluster.bootstrap.stderr
    assert "creating the cluster" in output and "cluster_state:ok on 6 node(s)" in output
    for secret in SECRET.values():
        if secret not in (ADMIN, SERVICE):
            assert secret not in output
    # Replicas replicate with the chart's replication user; every pod is Ready.
    for pod in cluster.pods:
        assert pod.probe("ready").returncode == 0, pod.probe("ready").stderr
        info = pod.admin().info("replication")
        if info["role"] == "slave":
            assert info["master_link_status"] == "up", info


def test_bootstrap_run_again_changes_nothing(cluster: Cluster) -> None:
    before = {pod.name: (cluster_nodes(pod), pod.cluster_info()["cluster_current_epoch"]) for pod in cluster.pods}
    again = run_bootstrap(cluster.pods)
    assert again.returncode == 0, again.stderr
    assert "the cluster is formed, nothing to create" in again.stdout
    assert "creating the cluster" not in again.stdout
    after = {pod.name: (cluster_nodes(pod), pod.cluster_info()["cluster_current_epoch"]) for pod in cluster.pods}

    def shape(state: dict[str, tuple[dict[str, Node], str]]) -> dict[str, Any]:
        return {
            name: ({i: (n.address, n.flags, n.primary_id, n.slots) for i, n in nodes.items()}, epoch)
            for name, (nodes, epoch) in state.items()
        }

    assert shape(after) == shape(before)


def test_service_user_works_across_slots_with_redis_pys_cluster_client_and_nothing_else(cluster: Cluster) -> None:
    client = cluster.service_client()
    try:
        keys = [f"engram:acme:{{acme:s{i}}}:meta" for i in range(30)]
        for i, key in enumerate(keys):
            client.hset(key, "epoch", str(i))
        assert [client.hget(key, "epoch") for key in keys] == [str(i) for i in range(30)]
        # The keys went to every primary (their slots are spread over the three).
        owners = {client.get_node_from_key(key).name for key in keys}
        assert len(owners) == 3
        with pytest.raises(redis.exceptions.NoPermissionError):
            client.hset("other:acme:x", "f", "v")
        with pytest.raises(redis.exceptions.NoPermissionError):
            client.flushall()
        with pytest.raises(redis.exceptions.NoPermissionError):
            client.execute_command("CLUSTER", "RESET", target_nodes=RedisCluster.RANDOM)
    finally:
        client.close()
    # Nothing was flushed anywhere.
    again = cluster.service_client()
    try:
        assert [again.hget(key, "epoch") for key in keys] == [str(i) for i in range(30)]
    finally:
        again.close()


def test_chart_users_exist_on_every_node_replicas_included(cluster: Cluster) -> None:
    for pod in cluster.pods:
        admin = pod.admin()
        assert pod.client(SERVICE, SERVICE_PASSWORD).ping()
        assert pod.client("exporter", EXPORTER_PASSWORD).info("cluster")["cluster_enabled"] == 1
        users = {line.split()[1] for line in admin.acl_list()}
        assert {"default", ADMIN, SERVICE, "replication", "exporter"} <= users
        assert "off" in admin.acl_getuser("default")["flags"]
        with pytest.raises(redis.AuthenticationError):
            pod.client(SERVICE, "wrong").ping()
        # The service user reads nothing outside its namespace and manages nothing, on replicas too.
        service = pod.client(SERVICE, SERVICE_PASSWORD)
        for command in (("KEYS", "*"), ("FLUSHALL",), ("CLUSTER", "NODES"), ("CLUSTER", "MEET", "127.0.0.1", "1")):
            with pytest.raises(redis.exceptions.NoPermissionError):
                service.execute_command(*command)
    roles = sorted(pod.admin().info("replication")["role"] for pod in cluster.pods)
    assert roles == ["master"] * 3 + ["slave"] * 3


def test_engrams_own_cluster_clients_commit_a_replicated_turn_with_the_chart_users(cluster: Cluster) -> None:
    """Engram's service and operator code (ENGRAM_REDIS_MODE=cluster, as the chart sets it) on the chart's
    cluster: the operator's user loads the library on every primary, the service's commits a turn that a
    replica confirms (FCALL + WAIT) and reads it back. Skipped where the service has no cluster mode yet."""
    connections = pytest.importorskip("engram.connections")
    functions = pytest.importorskip("engram.history.functions")
    history = pytest.importorskip("engram.history")
    from engram.settings import Settings

    def settings(username: str, password: str) -> Any:
        return Settings(
            redis_mode="cluster",
            redis_url=f"redis://{cluster.pods[0].host}:{cluster.port}",
            redis_username=username,
            redis_password=password,
            commit_durability="replicated",
        )

    try:
        service_settings = settings(SERVICE, SERVICE_PASSWORD)
    except ValueError as error:
        pytest.skip(f"the service has no cluster mode here: {error}")
    if not hasattr(connections, "key_space"):
        pytest.skip("the service has no cluster key layout here")

    async def turn() -> tuple[list[str], bool]:
        admin = connections.create_redis(settings(ADMIN, ADMIN_PASSWORD))
        service = connections.create_redis(service_settings)
        try:
            await functions.ensure_library(admin)
            if hasattr(connections, "cluster_nodes"):  # where the operator puts tenant users: every node
                assert len(await connections.cluster_nodes(admin)) == len(cluster.pods)
            store = history.HistoryStore(
                service, connections.key_space(service_settings), commit_durability="replicated"
            )
            committed = await store.commit_turn("acme", "chart-s1", "t1", "hello", "hi there")
            again = await store.commit_turn("acme", "chart-s1", "t1", "hello", "hi there")
            window = await store.load_window("acme", "chart-s1", 1000)
            assert [m.content for m in committed.messages] == ["hello", "hi there"]
            return [m.content for m in window.messages], again.duplicate
        finally:
            await service.aclose()
            await admin.aclose()

    contents, duplicate = asyncio.run(turn())
    assert contents == ["hello", "hi there"] and duplicate
    # The library is on every primary (the operator's user loaded it through the cluster client).
    for pod in cluster.pods:
        if pod.admin().info("replication")["role"] == "master":
            assert pod.admin().function_list(library="engram*"), pod.name


def test_a_restart_of_every_pod_with_new_ips_reassembles_the_same_cluster(cluster: Cluster) -> None:
    ids = set(cluster_nodes(cluster.pods[0]))
    for pod in cluster.pods:
        pod.stop()
    # Every pod comes back with a new IP, one after the other, each running its postStart before the next
    # starts: the first finds nobody to tell, the later ones exchange addresses with all that run.
    logs = []
    for pod, host in zip(cluster.pods, SECOND_HOSTS, strict=True):
        pod.move(host, SECOND_HOSTS)
        pod.start()
        logs.append(pod.post_start())
    assert "exchanged addresses" not in logs[0] and logs[-1].count("exchanged addresses") == 5
    try:
        wait_until(lambda: formed(cluster.pods), 60, "the cluster to reassemble at the new addresses")
    except TimeoutError as error:
        raise AssertionError(f"{error}\n{cluster.logs()}") from error
    for pod in cluster.pods:
        nodes = cluster_nodes(pod)
        assert set(nodes) == ids, "a node came back as a stranger"
        assert sorted(node.address.split(":")[0] for node in nodes.values()) == sorted(SECOND_HOSTS)
    # The bootstrap Job of the next upgrade finds the cluster formed and leaves it alone.
    again = run_bootstrap(cluster.pods)
    assert again.returncode == 0 and "nothing to create" in again.stdout, again.stderr
    assert_service_user_writes_and_reads(cluster, "after-restart")


def assert_service_user_writes_and_reads(cluster: Cluster, value: str) -> None:
    """The service user, through redis-py's cluster client, writes and reads back keys of ten sessions."""
    client = cluster.service_client()
    try:
        keys = [f"engram:acme:{{acme:{value}-{i}}}:meta" for i in range(10)]
        for key in keys:
            client.hset(key, "epoch", value)
        assert {client.hget(key, "epoch") for key in keys} == {value}
    finally:
        client.close()


def primary_and_replica(cluster: Cluster) -> tuple[Pod, Pod]:
    """A primary pod with slots and the pod replicating it."""
    nodes = cluster_nodes(cluster.pods[0])
    by_address = {node.address.split(":")[0]: node for node in nodes.values()}
    primary = next(pod for pod in cluster.pods if by_address[pod.host].is_primary and by_address[pod.host].slots)
    primary_id = by_address[primary.host].id
    replica = next(pod for pod in cluster.pods if by_address[pod.host].primary_id == primary_id)
    return primary, replica


def test_a_killed_primary_is_replaced_by_its_replica_and_comes_back_as_its_replica_at_a_new_ip(
    cluster: Cluster,
) -> None:
    primary, replica = primary_and_replica(cluster)
    primary_id = next(n.id for n in cluster_nodes(replica).values() if n.address.startswith(f"{primary.host}:"))
    primary.kill()
    others = [pod for pod in cluster.pods if pod is not primary]
    try:
        wait_until(
            lambda: (
                replica.admin().info("replication")["role"] == "master"
                and all(pod.cluster_info()["cluster_state"] == "ok" for pod in others)
            ),
            30,
            "the cluster to promote the replica (with the chart's replication user and nodes.conf)",
        )
    except TimeoutError as error:
        raise AssertionError(f"{error}\n{cluster.logs()}") from error
    # Kubernetes restarts the pod, with a new IP: it rejoins as the replica of the promoted one.
    cluster.restart_at(primary, SPARE_HOSTS[0])
    cluster.wait_formed("the old primary to rejoin as a replica")
    back = cluster_nodes(replica)[primary_id]
    assert "slave" in back.flags and back.address.startswith(f"{SPARE_HOSTS[0]}:")
    wait_until(lambda: primary.admin().info("replication")["master_link_status"] == "up", 30, "its sync")
    assert all(pod.probe("ready").returncode == 0 for pod in cluster.pods)
    assert_service_user_writes_and_reads(cluster, "after-failover")


def test_a_lost_shard_makes_every_pod_unready_until_it_is_back(cluster: Cluster) -> None:
    primary, replica = primary_and_replica(cluster)
    primary.kill()
    replica.kill()
    others = [pod for pod in cluster.pods if pod not in (primary, replica)]
    # A third of the slots has no node: no pod is Ready, so neither a rolling update nor a drain goes on.
    wait_until(lambda: all(pod.probe("ready").returncode != 0 for pod in others), 30, "every other pod to be unready")
    assert "cluster_state:fail" in others[0].probe("ready").stderr
    assert all(pod.probe("live").returncode == 0 for pod in others)  # unready, never restarted for it
    cluster.restart_at(primary, SPARE_HOSTS[1])
    cluster.restart_at(replica, SPARE_HOSTS[2])
    cluster.wait_formed("the shard to be back")
    wait_until(lambda: all(pod.probe("ready").returncode == 0 for pod in cluster.pods), 30, "every pod Ready again")
