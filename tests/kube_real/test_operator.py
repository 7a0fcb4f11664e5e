"""The operator against the real API server, as it runs in the cluster: ``kopf run`` with the chart's arguments,
holding only a TokenRequest token of the chart's operator ServiceAccount (RBAC exactly as rendered), and the
chart's admin Redis user on a real redis-server.

What KMock (tests/kube_operator) cannot show and these tests do: RBAC, the CRD's schema enforced by the API
server, the status subresource, garbage collection by kube-controller-manager, finalizers honoured by the real
deletion machinery, and writes racing other writers.
"""

from __future__ import annotations

import asyncio
import base64
import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import redis as redis_sync
import redis.asyncio as aioredis

from engram.history import HistoryStore
from engram.policy import TOKEN_LIMIT
from engram.redis_keys import KeySpace
from engram.tenancy.apikeys import hash_secret
from tests.kube_real.conftest import ControlPlane, LocalOperator, OperatorRedis, wait_until
from tests.server.support import ServiceProcess, chat, service_env

pytestmark = pytest.mark.kube_real

KEYS = KeySpace()
NAMESPACE = "tenants"
FINALIZER = "engram.dev/memory-namespace"


@pytest.fixture(scope="module")
def tenants(plane: ControlPlane, local_operator: LocalOperator) -> Iterator[str]:
    """A namespace for this module's MemoryNamespaces, emptied while the operator still runs (their finalizers
    need it)."""
    plane.kubectl("create", "namespace", NAMESPACE)
    yield NAMESPACE
    plane.kubectl("delete", "memorynamespaces", "--all", "-n", NAMESPACE, "--wait", "--timeout=60s", check=False)
    forbidden = [line for line in local_operator.log_text().splitlines() if "forbidden" in line.lower()]
    assert not forbidden, "the operator was refused something by RBAC:\n" + "\n".join(forbidden)


def create(plane: ControlPlane, name: str, **spec: Any) -> dict[str, Any]:
    body = {
        "apiVersion": "engram.dev/v1alpha1",
        "kind": "MemoryNamespace",
        "metadata": {"name": name, "namespace": NAMESPACE},
        "spec": spec,
    }
    return json.loads(plane.kubectl("create", "-o", "json", "-f", "-", input=json.dumps(body)).stdout)


def get(plane: ControlPlane, name: str) -> dict[str, Any]:
    return plane.get("memorynamespace", name, "-n", NAMESPACE)


def wait_ready(plane: ControlPlane, name: str, generation: int = 1) -> dict[str, Any]:
    def ready() -> dict[str, Any] | None:
        body = get(plane, name)
        status = body.get("status") or {}
        return body if status.get("phase") == "Ready" and status.get("observedGeneration") == generation else None

    return wait_until(f"MemoryNamespace {name} Ready at generation {generation}", ready, timeout=60)


def secret(plane: ControlPlane, name: str) -> dict[str, Any]:
    return plane.get("secret", f"{name}-engram", "-n", NAMESPACE)


def secret_values(body: dict[str, Any]) -> dict[str, str]:
    return {k: base64.b64decode(v).decode() for k, v in body["data"].items()}


def add_sessions(redis: OperatorRedis, tenant: str, count: int) -> None:
    async def add() -> None:
        client = aioredis.Redis(port=redis.server.port, decode_responses=True)
        try:
            store = HistoryStore(client, KEYS, cache_sessions=0, tokenizer=lambda text: 1)
            for i in range(count):
                await store.commit_turn(tenant, f"s{i}", "t1", "hello", "hi")
        finally:
            await client.aclose()

    asyncio.run(add())


@contextmanager
def seen_command(redis: OperatorRedis, command: str) -> Iterator[threading.Event]:
    """An event set when the server runs ``command`` (watched with MONITOR from a thread while the block runs)."""
    seen, stop = threading.Event(), threading.Event()
    client = redis_sync.Redis(port=redis.server.port, socket_timeout=0.2)

    def watch(monitor: Any) -> None:
        while not stop.is_set() and not seen.is_set():
            try:
                if monitor.next_command()["command"].startswith(command):
                    seen.set()
            except redis_sync.TimeoutError:
                continue

    with client.monitor() as monitor:
        watcher = threading.Thread(target=watch, args=(monitor,), daemon=True)
        watcher.start()
        try:
            yield seen
        finally:
            stop.set()
            watcher.join(timeout=5)
    client.close()


def reconciled_events(plane: ControlPlane, name: str) -> list[dict[str, Any]]:
    events = plane.get("events", "-n", NAMESPACE, "--field-selector", f"involvedObject.name={name}")["items"]
    return [e for e in events if e["reason"] == "Reconciled"]


def test_a_created_memorynamespace_becomes_ready_with_its_status_written_through_the_status_subresource(
    plane: ControlPlane, tenants: str, operator_redis: OperatorRedis
) -> None:
    created = create(plane, "acme", tokenLimit=500, retentionPolicy="Delete")
    body = wait_ready(plane, "acme")
    status = body["status"]
    assert (status["tenant"], status["keyPrefix"], status["secretName"]) == ("acme", "engram:acme:", "acme-engram")
    assert status["conditions"][0]["type"] == "Ready" and status["conditions"][0]["status"] == "True"
    # The CRD has a status subresource: the API server drops status from writes to the main resource, so a
    # status is there only if the operator wrote it through /status; managedFields names that subresource.
    fields = plane.get("memorynamespace", "acme", "-n", NAMESPACE, "--show-managed-fields")["metadata"]
    writers = [m for m in fields["managedFields"] if "f:status" in json.dumps(m.get("fieldsV1", {}))]
    assert writers and all(m.get("subresource") == "status" for m in writers), writers
    assert body["metadata"]["generation"] == 1, "status writes do not bump the generation"
    assert FINALIZER in body["metadata"]["finalizers"]

    owned = secret(plane, "acme")
    [owner] = owned["metadata"]["ownerReferences"]
    assert (owner["kind"], owner["name"], owner["uid"]) == ("MemoryNamespace", "acme", created["metadata"]["uid"])
    assert owner["apiVersion"] == "engram.dev/v1alpha1" and owner["controller"] is True
    values = secret_values(owned)
    record = operator_redis.client().hgetall(KEYS.tenant_record("acme"))
    assert record["api_key_sha256"] == hash_secret(values["api-key"])
    assert (record["token_limit"], record["retention"], record["owner"]) == (
        "500",
        "Delete",
        "MemoryNamespace/tenants/acme",
    )
    assert reconciled_events(plane, "acme"), "an Event says what was set up (events: create is granted)"


def test_the_tenant_secret_is_garbage_collected_by_kube_controller_manager_when_its_memorynamespace_goes(
    plane: ControlPlane, tenants: str, local_operator: LocalOperator
) -> None:
    """The operator deletes the Secret itself when it finalizes; to see that the ownerReference alone is
    enough (right uid, apiVersion and kind), the operator is stopped and the finalizer removed by hand."""
    create(plane, "orphan")
    wait_ready(plane, "orphan")
    assert plane.exists("secret", "orphan-engram", "-n", NAMESPACE)
    started = time.monotonic()
    local_operator.stop()
    print(f"operator stopped in {time.monotonic() - started:.1f} s")
    try:
        plane.kubectl("delete", "memorynamespace", "orphan", "-n", NAMESPACE, "--wait=false")
        held = get(plane, "orphan")
        assert held["metadata"].get("deletionTimestamp"), "the operator's finalizer holds the resource"
        patch = json.dumps({"metadata": {"finalizers": None}})
        plane.kubectl("patch", "memorynamespace", "orphan", "-n", NAMESPACE, "--type=merge", "-p", patch)
        wait_until("the MemoryNamespace to go", lambda: not plane.exists("memorynamespace", "orphan", "-n", NAMESPACE))
        started = time.monotonic()
        wait_until(
            "kube-controller-manager to collect the Secret",
            lambda: not plane.exists("secret", "orphan-engram", "-n", NAMESPACE),
            # The collector notices a new custom resource kind on its next discovery pass (every 30 s): when this
            # test runs first in a session, the CRD is that new.
            timeout=90,
        )
        print(f"Secret collected in {time.monotonic() - started:.1f} s")
    finally:
        started = time.monotonic()
        local_operator.start()
        print(f"operator restarted in {time.monotonic() - started:.1f} s")


def test_deleting_with_retain_keeps_the_redis_data_and_with_delete_purges_it(
    plane: ControlPlane, tenants: str, operator_redis: OperatorRedis
) -> None:
    create(plane, "keeper", retentionPolicy="Retain")
    create(plane, "purged", retentionPolicy="Delete")
    wait_ready(plane, "keeper")
    wait_ready(plane, "purged")
    add_sessions(operator_redis, "keeper", 2)
    add_sessions(operator_redis, "purged", 2)
    redis = operator_redis.client()
    assert redis.exists(KEYS.session("keeper", "s0").log) and redis.exists(KEYS.session("purged", "s0").log)

    # kubectl returns once the API server has removed them, i.e. once the operator's finalizer let go.
    plane.kubectl("delete", "memorynamespace", "keeper", "purged", "-n", NAMESPACE, "--wait", "--timeout=60s")

    assert redis.exists(KEYS.session("keeper", "s0").log) and redis.exists(KEYS.session("keeper", "s1").log)
    assert not redis.scan(match=f"{KEYS.tenant_prefix('purged')}*", count=1000)[1]
    for tenant in ("keeper", "purged"):
        assert not redis.exists(KEYS.tenant_record(tenant)), f"{tenant}: API key revoked"
        assert f"engram.{tenant}" not in redis.execute_command("ACL", "USERS"), f"{tenant}: Redis user revoked"
        assert not plane.exists("secret", f"{tenant}-engram", "-n", NAMESPACE)


def test_a_spec_change_applies_and_keeps_the_credentials(
    plane: ControlPlane, tenants: str, operator_redis: OperatorRedis
) -> None:
    create(plane, "policy")
    wait_ready(plane, "policy")
    redis = operator_redis.client()
    key_hash = redis.hget(KEYS.tenant_record("policy"), "api_key_sha256")
    patch = json.dumps({"spec": {"tokenLimit": 900, "maxMessagesPerSession": 20}})
    plane.kubectl("patch", "memorynamespace", "policy", "-n", NAMESPACE, "--type=merge", "-p", patch)
    wait_ready(plane, "policy", generation=2)
    record = redis.hgetall(KEYS.tenant_record("policy"))
    assert (record["token_limit"], record["max_messages_per_session"]) == ("900", "20")
    assert record["api_key_sha256"] == key_hash


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (
            {"tokenLimit": TOKEN_LIMIT.minimum - 1},
            f"spec.tokenLimit: Invalid value: {TOKEN_LIMIT.minimum - 1}: "
            f"spec.tokenLimit in body should be greater than or equal to {TOKEN_LIMIT.minimum}",
        ),
        ({"retentionPolicy": "Sometimes"}, 'spec.retentionPolicy: Unsupported value: "Sometimes"'),
        ({"tenant": "Not_A_Label"}, 'spec.tenant: Invalid value: "Not_A_Label": spec.tenant in body should match'),
        ({"tokenLimit": "many"}, 'spec.tokenLimit: Invalid value: "string": spec.tokenLimit in body must be of type'),
    ],
    ids=["below-minimum", "unknown-retention", "tenant-not-a-label", "wrong-type"],
)
def test_an_invalid_spec_is_refused_by_the_api_server_with_the_schemas_message(
    plane: ControlPlane, tenants: str, operator_redis: OperatorRedis, spec: dict[str, Any], message: str
) -> None:
    body = {
        "apiVersion": "engram.dev/v1alpha1",
        "kind": "MemoryNamespace",
        "metadata": {"name": "invalid", "namespace": NAMESPACE},
        "spec": spec,
    }
    refused = plane.kubectl("create", "-f", "-", input=json.dumps(body), check=False)
    assert refused.returncode != 0
    assert message in refused.stderr, refused.stderr
    assert not plane.exists("memorynamespace", "invalid", "-n", NAMESPACE)


def test_a_restarted_operator_changes_nothing(
    plane: ControlPlane, tenants: str, local_operator: LocalOperator, operator_redis: OperatorRedis
) -> None:
    create(plane, "steady")
    wait_ready(plane, "steady")
    redis = operator_redis.client()
    before = (secret(plane, "steady"), redis.hgetall(KEYS.tenant_record("steady")))
    acl_before = redis.execute_command("ACL", "GETUSER", "engram.steady")
    events_before = len(reconciled_events(plane, "steady"))

    local_operator.stop()
    add_sessions(operator_redis, "steady", 2)  # so the restarted operator's look at it shows in the status
    local_operator.start()
    wait_until(
        "the restarted operator to count 2 sessions", lambda: get(plane, "steady")["status"].get("sessions") == 2
    )

    after = (secret(plane, "steady"), redis.hgetall(KEYS.tenant_record("steady")))
    assert after[0]["metadata"]["resourceVersion"] == before[0]["metadata"]["resourceVersion"], "Secret untouched"
    assert after == before, "API key not rotated, registry record not rewritten (updated_at too)"
    assert redis.execute_command("ACL", "GETUSER", "engram.steady") == acl_before
    assert len(reconciled_events(plane, "steady")) == events_before, "nothing changed, so nothing reported"


def test_an_operator_killed_midway_leaves_no_duplicate_when_it_comes_back(
    plane: ControlPlane, tenants: str, local_operator: LocalOperator, operator_redis: OperatorRedis
) -> None:
    """SIGKILL right after the first effect (the Secret) is visible: the restarted operator finishes the job
    with the same Secret and credentials, one Redis user, one registry record."""
    create(plane, "midway")
    wait_until(
        "the operator's first effect",
        lambda: plane.exists("secret", "midway-engram", "-n", NAMESPACE),
        interval=0.02,
    )
    local_operator.kill()
    first = secret(plane, "midway")
    local_operator.start()
    wait_ready(plane, "midway")

    now = secret(plane, "midway")
    assert now["metadata"]["uid"] == first["metadata"]["uid"], "the Secret was not re-created"
    assert secret_values(now)["api-key"] == secret_values(first)["api-key"], "the API key was not rotated"
    labelled = plane.get("secrets", "-n", NAMESPACE, "-l", "engram.dev/memorynamespace=midway")["items"]
    assert len(labelled) == 1
    redis = operator_redis.client()
    record = redis.hgetall(KEYS.tenant_record("midway"))
    assert record["api_key_sha256"] == hash_secret(secret_values(now)["api-key"])
    assert [u for u in redis.execute_command("ACL", "USERS") if u == "engram.midway"] == ["engram.midway"]


def test_another_writer_between_the_operators_read_and_write_is_handled(
    plane: ControlPlane, tenants: str, local_operator: LocalOperator, operator_redis: OperatorRedis
) -> None:
    """The API server refuses a write based on a stale resourceVersion (409). The operator's writes are patches
    without a precondition, so they cannot conflict; what must hold is that a change landing while it works on
    an older version is not lost: Redis is paused for writes so the operator sits between reading generation 2
    and writing its result while someone else writes generation 3 (and a label)."""
    create(plane, "race")
    stale = wait_ready(plane, "race")

    # The real API server (unlike KMock) enforces optimistic concurrency.
    plane.kubectl("label", "memorynamespace", "race", "-n", NAMESPACE, "team=a")
    stale["spec"]["tokenLimit"] = 123
    refused = plane.kubectl("replace", "-f", "-", input=json.dumps(stale), check=False)
    assert refused.returncode != 0 and "the object has been modified" in refused.stderr, refused.stderr

    redis = operator_redis.client()
    redis.execute_command("CLIENT", "PAUSE", "20000", "WRITE")  # reads still answer; the operator's write waits
    try:
        with seen_command(operator_redis, f"HGETALL {KEYS.tenant_record('race')}") as read:
            patch = json.dumps({"spec": {"tokenLimit": 1000}})
            plane.kubectl("patch", "memorynamespace", "race", "-n", NAMESPACE, "--type=merge", "-p", patch)
            # the operator read the record for generation 2: its write of it is next, held by the pause
            assert read.wait(timeout=15), "the operator did not read the tenant record"
        patch = json.dumps({"spec": {"tokenLimit": 2000}, "metadata": {"labels": {"team": "b"}}})
        plane.kubectl("patch", "memorynamespace", "race", "-n", NAMESPACE, "--type=merge", "-p", patch)
        assert redis.hget(KEYS.tenant_record("race"), "token_limit") == str(TOKEN_LIMIT.default), (
            "Redis paused: nothing applied yet"
        )
    finally:
        # well within the operator's 5 s socket timeout, so its held write succeeds (no retry merges the two)
        redis.execute_command("CLIENT", "UNPAUSE")

    body = wait_ready(plane, "race", generation=3)
    handled = [line for line in local_operator.log_text().splitlines() if "[tenants/race] Handler" in line]
    spec_runs = [line for line in handled if "'reconcile_namespace/spec' succeeded" in line]
    assert len(spec_runs) == 2, "generation 2 was being handled when 3 came, then 3 was handled:\n" + "\n".join(handled)
    assert redis.hget(KEYS.tenant_record("race"), "token_limit") == "2000"
    assert body["metadata"]["labels"]["team"] == "b", "the other writer's change is kept"
    assert body["spec"]["tokenLimit"] == 2000


def test_quotas_set_on_a_memorynamespace_bind_every_replica_and_show_in_its_status(
    plane: ControlPlane, tenants: str, operator_redis: OperatorRedis, tmp_path: Path
) -> None:
    create(plane, "quota", maxSessions=2, maxStoredBytes=1_000_000)
    wait_ready(plane, "quota")
    api_key = secret_values(secret(plane, "quota"))["api-key"]
    env = service_env(operator_redis.url, ENGRAM_AUTH="required", ENGRAM_TENANT_CACHE_SECONDS="2")
    service = ServiceProcess(env, tmp_path / "service.log").start()
    headers = {"Authorization": f"Bearer {api_key}"}
    try:
        for session in ("first", "second"):
            assert chat(service.url, session, "hello", headers=headers).status_code == 200
        refused = chat(service.url, "third", "hello", headers=headers)
        assert refused.status_code == 403 and refused.json()["error"]["code"] == "session_quota_exceeded"

        patch = json.dumps({"spec": {"maxSessions": 3}})
        plane.kubectl("patch", "memorynamespace", "quota", "-n", NAMESPACE, "--type=merge", "-p", patch)
        applied = wait_ready(plane, "quota", generation=2)
        assert applied["status"]["usage"]["sessions"] == 2
        assert applied["status"]["usage"]["storedBytes"] > 0
        written = time.monotonic()
        while chat(service.url, "third", "hello", headers=headers).status_code != 200:
            # the replica re-reads the tenant when its cached entry (2 s) expires
            assert time.monotonic() - written < 2 + 10, "the raised quota did not reach the replica"
            time.sleep(0.2)
    finally:
        service.stop()

    def usage_counted() -> dict[str, Any] | None:  # the repair timer refreshes the status
        usage = (get(plane, "quota").get("status") or {}).get("usage") or {}
        return usage if usage.get("sessions") == 3 else None

    wait_until("status.usage to count the third session", usage_counted, timeout=60)
