"""The operator, run by kopf against KMock (the only stand-in: the Kubernetes API) and a real redis-server."""

from __future__ import annotations

import base64
from typing import Any

import redis.asyncio as aioredis

from engram.history import HistoryStore
from engram.redis_keys import KeySpace
from engram.tenancy.apikeys import hash_secret
from testkit.redis_server import RedisServer
from tests.kube_operator.conftest import Cluster, OperatorFactory, eventually, memory_namespace

KEYS = KeySpace()


def secret_values(secret: dict[str, Any] | None) -> dict[str, str]:
    assert secret is not None
    return {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}


async def acl_user(client: aioredis.Redis, name: str) -> Any:
    return await client.execute_command("ACL", "GETUSER", name)


def ready(cluster: Cluster, name: str) -> bool:
    return cluster.status(name).get("phase") == "Ready"


async def add_sessions(client: aioredis.Redis, tenant: str, count: int) -> None:
    store = HistoryStore(client, KEYS, cache_sessions=0, tokenizer=lambda text: 1)
    for i in range(count):
        await store.commit_turn(tenant, f"s{i}", "t1", "hello", "hi")


async def test_created_resource_gets_secret_acl_user_registry_record_and_ready_status(
    cluster: Cluster, run_operator: OperatorFactory, redis_client: aioredis.Redis, redis_url: str
) -> None:
    with run_operator():
        await cluster.create(memory_namespace("acme", tokenLimit=500, retentionPolicy="Delete"))
        await eventually(lambda: ready(cluster, "acme"))

    status = cluster.status("acme")
    assert (status["tenant"], status["keyPrefix"], status["secretName"]) == ("acme", "engram:acme:", "acme-engram")
    assert status["conditions"][0]["type"] == "Ready" and status["conditions"][0]["status"] == "True"
    assert status["sessions"] == 0

    secret = cluster.secret("acme-engram")
    assert secret is not None and secret["metadata"]["ownerReferences"][0]["kind"] == "MemoryNamespace"
    values = secret_values(secret)
    assert (values["tenant"], values["key-prefix"], values["redis-username"]) == ("acme", "engram:acme:", "engram.acme")

    record = await redis_client.hgetall(KEYS.tenant_record("acme"))
    assert record["api_key_sha256"] == hash_secret(values["api-key"])
    assert (record["token_limit"], record["retention"]) == ("500", "Delete")
    assert record["owner"] == "MemoryNamespace/team-a/acme"
    assert await redis_client.sismember(KEYS.tenant_set(), "acme")

    # The Secret's Redis credentials log in, and reach the tenant's keys only.
    tenant = aioredis.Redis.from_url(redis_url, username="engram.acme", password=values["redis-password"])
    try:
        assert await tenant.xlen(KEYS.session("acme", "s1").log) == 0
    finally:
        await tenant.aclose()
    assert cluster.events("Reconciled"), "an Event says what was set up"


async def test_a_spec_change_changes_the_policy_and_keeps_the_credentials(
    cluster: Cluster, run_operator: OperatorFactory, redis_client: aioredis.Redis
) -> None:
    with run_operator():
        await cluster.create(memory_namespace("acme"))
        await eventually(lambda: ready(cluster, "acme"))
        key_hash = await redis_client.hget(KEYS.tenant_record("acme"), "api_key_sha256")

        await cluster.patch_spec("acme", {"tokenLimit": 900, "sessionTTLSeconds": 0, "maxMessagesPerSession": 20})

        async def policy() -> bool:
            record = await redis_client.hgetall(KEYS.tenant_record("acme"))
            return (record["token_limit"], record["session_ttl_seconds"], record["max_messages_per_session"]) == (
                "900",
                "0",
                "20",
            )

        await eventually(policy)
    assert await redis_client.hget(KEYS.tenant_record("acme"), "api_key_sha256") == key_hash
    assert ready(cluster, "acme")


async def test_the_repair_timer_restores_an_acl_user_a_registry_record_and_a_secret_deleted_behind_its_back(
    cluster: Cluster, run_operator: OperatorFactory, redis_client: aioredis.Redis
) -> None:
    with run_operator():
        await cluster.create(memory_namespace("acme"))
        await eventually(lambda: ready(cluster, "acme"))
        first_key = secret_values(cluster.secret("acme-engram"))["api-key"]

        await redis_client.execute_command("ACL", "DELUSER", "engram.acme")  # e.g. Redis restarted
        await eventually(lambda: acl_user(redis_client, "engram.acme"))

        await redis_client.delete(KEYS.tenant_record("acme"))
        await eventually(lambda: redis_client.exists(KEYS.tenant_record("acme")))

        # A deleted Secret cannot be restored (Redis keeps only hashes): new credentials replace it.
        await cluster.delete_secret("acme-engram")
        await eventually(lambda: cluster.secret("acme-engram"))
        new_key = secret_values(cluster.secret("acme-engram"))["api-key"]

        async def record_matches_new_key() -> bool:
            return await redis_client.hget(KEYS.tenant_record("acme"), "api_key_sha256") == hash_secret(new_key)

        await eventually(record_matches_new_key)

        await add_sessions(redis_client, "acme", 3)
        await eventually(lambda: cluster.status("acme").get("sessions") == 3)
    assert new_key != first_key
    repairs = [event["message"] for event in cluster.events("Reconciled")]
    assert any("set ACL user engram.acme" in message for message in repairs[1:]), repairs
    assert any("created Secret acme-engram" in message for message in repairs[1:]), repairs


async def test_a_restarted_operator_changes_nothing(
    cluster: Cluster, run_operator: OperatorFactory, redis_client: aioredis.Redis
) -> None:
    with run_operator():
        await cluster.create(memory_namespace("acme"))
        await eventually(lambda: ready(cluster, "acme"))
    secret_before = cluster.secret("acme-engram")
    record_before = await redis_client.hgetall(KEYS.tenant_record("acme"))
    acl_before = await acl_user(redis_client, "engram.acme")
    events_before = len(cluster.events("Reconciled"))
    await add_sessions(redis_client, "acme", 2)

    with run_operator():
        # The restarted operator has looked at the resource once its status shows the new session count.
        await eventually(lambda: cluster.status("acme").get("sessions") == 2)

    assert cluster.secret("acme-engram") == secret_before, "API key not rotated, Secret untouched"
    assert len(cluster.k.objects["v1/secrets", "team-a", "acme-engram"].history) == 1, "never re-created or patched"
    assert await redis_client.hgetall(KEYS.tenant_record("acme")) == record_before  # updated_at too: no rewrite
    assert await acl_user(redis_client, "engram.acme") == acl_before
    assert len(cluster.events("Reconciled")) == events_before, "nothing changed, so nothing to report"
    assert ready(cluster, "acme")


async def test_deleting_with_retention_delete_purges_the_sessions_and_revokes_everything(
    cluster: Cluster, run_operator: OperatorFactory, redis_client: aioredis.Redis
) -> None:
    with run_operator():
        await cluster.create(memory_namespace("acme", retentionPolicy="Delete"))
        await cluster.create(memory_namespace("bystander"))
        await eventually(lambda: ready(cluster, "acme") and ready(cluster, "bystander"))
        await add_sessions(redis_client, "acme", 5)
        await add_sessions(redis_client, "bystander", 1)

        await cluster.delete("acme")
        await eventually(lambda: cluster.get("acme") is None)  # the finalizer was released

    assert [key async for key in redis_client.scan_iter(match="engram:acme:*")] == []
    assert not await redis_client.exists(KEYS.tenant_record("acme"))
    assert not await redis_client.sismember(KEYS.tenant_set(), "acme")
    assert await acl_user(redis_client, "engram.acme") is None
    assert cluster.secret("acme-engram") is None
    assert await redis_client.zcard(KEYS.session_index("bystander")) == 1
    assert await acl_user(redis_client, "engram.bystander") is not None


async def test_deleting_with_retention_retain_keeps_the_sessions_but_revokes_access(
    cluster: Cluster, run_operator: OperatorFactory, redis_client: aioredis.Redis
) -> None:
    with run_operator():
        await cluster.create(memory_namespace("acme"))  # Retain is the default
        await eventually(lambda: ready(cluster, "acme"))
        await add_sessions(redis_client, "acme", 2)
        await cluster.delete("acme")
        await eventually(lambda: cluster.get("acme") is None)

    assert await redis_client.zcard(KEYS.session_index("acme")) == 2
    assert not await redis_client.exists(KEYS.tenant_record("acme"))
    assert await acl_user(redis_client, "engram.acme") is None


async def test_a_second_resource_claiming_a_taken_tenant_fails_and_its_deletion_leaves_the_tenant_alone(
    cluster: Cluster, run_operator: OperatorFactory, redis_client: aioredis.Redis
) -> None:
    with run_operator():
        await cluster.create(memory_namespace("acme"))
        await eventually(lambda: ready(cluster, "acme"))
        await cluster.create(memory_namespace("imposter", namespace="team-b", tenant="acme", retentionPolicy="Delete"))
        await eventually(lambda: cluster.status("imposter", "team-b").get("phase") == "Failed")
        assert cluster.status("imposter", "team-b")["conditions"][0]["reason"] == "TenantConflict"
        assert cluster.events("TenantConflict")
        await add_sessions(redis_client, "acme", 1)

        await cluster.delete("imposter", namespace="team-b")
        await eventually(lambda: cluster.get("imposter", "team-b") is None)

    record = await redis_client.hgetall(KEYS.tenant_record("acme"))
    assert record["owner"] == "MemoryNamespace/team-a/acme"
    assert record["api_key_sha256"] == hash_secret(secret_values(cluster.secret("acme-engram"))["api-key"])
    assert await redis_client.zcard(KEYS.session_index("acme")) == 1


async def test_an_invalid_spec_is_reported_and_touches_nothing(
    cluster: Cluster, run_operator: OperatorFactory, redis_client: aioredis.Redis
) -> None:
    # KMock does not validate against the CRD schema; the operator must not trust that the API server did.
    with run_operator():
        await cluster.create(memory_namespace("bad", tenant="Not_A_Label"))
        await cluster.create(memory_namespace("worse", tokenLimit=-1))
        await eventually(lambda: cluster.status("bad").get("phase") == "Failed")
        await eventually(lambda: cluster.status("worse").get("phase") == "Failed")
    assert "spec.tenant" in cluster.status("bad")["conditions"][0]["message"]
    assert "spec.tokenLimit" in cluster.status("worse")["conditions"][0]["message"]
    assert await redis_client.scard(KEYS.tenant_set()) == 0
    assert cluster.secret("bad-engram") is None


async def test_a_resource_created_while_redis_is_down_becomes_ready_when_it_is_back(
    cluster: Cluster, run_operator: OperatorFactory, redis_server: RedisServer
) -> None:
    redis_server.kill()
    with run_operator():
        await cluster.create(memory_namespace("acme"))
        await eventually(lambda: cluster.status("acme").get("phase") == "Pending")
        assert cluster.status("acme")["conditions"][0]["reason"] == "RedisUnavailable"
        redis_server.start()
        await eventually(lambda: ready(cluster, "acme"))


async def test_changing_the_tenant_of_a_resource_is_refused_and_deletion_still_cleans_the_original(
    cluster: Cluster, run_operator: OperatorFactory, redis_client: aioredis.Redis
) -> None:
    with run_operator():
        await cluster.create(memory_namespace("acme"))
        await eventually(lambda: ready(cluster, "acme"))
        await cluster.patch_spec("acme", {"tenant": "other"})
        await eventually(lambda: cluster.status("acme").get("phase") == "Failed")
        assert cluster.status("acme")["conditions"][0]["reason"] == "TenantImmutable"
        assert await redis_client.smembers(KEYS.tenant_set()) == {"acme"}

        await cluster.delete("acme")
        await eventually(lambda: cluster.get("acme") is None)
    assert not await redis_client.exists(KEYS.tenant_record("acme"))
    assert await acl_user(redis_client, "engram.acme") is None
