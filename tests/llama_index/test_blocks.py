"""Durable memory blocks: LlamaIndex ``Memory`` blocks whose state lives in Redis per session, on a real
redis-server, across OS processes and against LlamaIndex's own in-process blocks."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from llama_index.core.base.llms.types import ChatMessage, TextBlock
from llama_index.core.memory import Memory
from llama_index.core.memory.memory_blocks import FactExtractionMemoryBlock, StaticMemoryBlock
from redis.exceptions import NoPermissionError

from engram.connections import create_redis
from engram.history import HistoryStore
from engram.history.blocks import BlockState
from engram.llama_index import (
    EngramDBChatStore,
    EngramFactExtractionMemoryBlock,
    EngramStaticMemoryBlock,
    durable_memory,
    store_from_url,
)
from engram.policy import Policy
from engram.redis_keys import KeySpace
from engram.settings import Settings
from engram.tenancy.nodes import RedisNodes
from engram.tenancy.provision import Credentials, TenantSpec, ensure_tenant, record_for
from engram.tenancy.records import CLI_OWNER
from tests.llama_index.fact_llm import FactLLM, pieces

ROOT = Path(__file__).resolve().parents[2]
KEYS = KeySpace()
WORKER = [sys.executable, "-m", "tests.llama_index.blocks_worker"]


def run_app(*args: str) -> str:
    done = subprocess.run([*WORKER, *args], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.strip()


def run_at_once(commands: list[list[str]]) -> None:
    """Start every worker, wait until all are ready, then let them go together."""
    procs = [
        subprocess.Popen([*WORKER, *c], cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        for c in commands
    ]
    try:
        for proc in procs:
            assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
        for proc in procs:
            out, _ = proc.communicate(timeout=120)
            assert proc.returncode == 0 and out.strip() == "done"
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


@pytest.fixture
async def store(redis_url: str) -> AsyncIterator[HistoryStore]:
    store = store_from_url(redis_url)
    yield store
    await store.client.aclose()


def fact_block(store: HistoryStore, **fields: Any) -> EngramFactExtractionMemoryBlock:
    return EngramFactExtractionMemoryBlock(store=store, llm=fields.pop("llm", FactLLM()), **fields)


def words(text: str) -> list[str]:
    return text.split()


# --- shared by every process -------------------------------------------------------------------------------
def test_facts_learnt_through_one_memory_are_in_a_fresh_memory_in_another_process(redis_url: str) -> None:
    turns = ["I live in Lyon", "my cat is called Miso", "I am allergic to nuts", "I work nights", "bye"]
    learnt = json.loads(run_app("learn", redis_url, "user:42", *turns))
    assert learnt and set(learnt) <= set(turns[:-1])  # older turns were flushed into facts, in order
    assert learnt == [t for t in turns if t in learnt]
    memory = json.loads(run_app("recall", redis_url, "user:42"))
    assert all(f"<fact>{fact}</fact>" in memory for fact in learnt)
    assert "<fact>" not in json.loads(run_app("recall", redis_url, "user:43"))  # another session knows nothing


def test_four_processes_extracting_facts_on_one_session_lose_none(redis_url: str) -> None:
    names, count = ["p0", "p1", "p2", "p3"], 25
    run_at_once([["extract", redis_url, "s1", name, str(count), "1000"] for name in names])
    block = EngramFactExtractionMemoryBlock(redis_url=redis_url, llm=FactLLM())
    facts = block.get_facts("s1")  # the sync API
    block.runtime.call_sync(lambda store: store.client.aclose())
    assert len(facts) == len(names) * count
    for name in names:  # each process's facts are there, in the order it learnt them
        assert [f for f in facts if f.startswith(f"{name} ")] == [f"{name} fact {n}" for n in range(count)]


async def test_four_processes_chatting_on_one_session_lose_no_fact_when_memory_flushes_concurrently(
    redis_url: str, store: HistoryStore
) -> None:
    names, count = ["p0", "p1", "p2", "p3"], 15
    run_at_once([["converse", redis_url, "s1", name, str(count)] for name in names])
    facts = await fact_block(store).aget_facts("s1")
    active = [m.content for m in await EngramDBChatStore(store=store).get_messages("s1")]
    said = {f"{name} says {n}" for name in names for n in range(count)}
    assert set(facts) | set(active) >= said  # every user message was either extracted or is still in the window
    assert len(facts) == len(set(facts)) and set(facts) <= said


async def test_four_processes_extracting_past_max_facts_condense_within_the_bound_and_lose_nothing(
    redis_url: str, store: HistoryStore
) -> None:
    names, count, max_facts = ["p0", "p1", "p2", "p3"], 12, 6
    run_at_once([["extract", redis_url, "s1", name, str(count), str(max_facts)] for name in names])
    block = fact_block(store, max_facts=max_facts)
    expected = sorted(f"{name} fact {n}" for name in names for n in range(count))
    assert sorted(pieces(await block.aget_facts("s1"))) == expected  # each fact once: none lost, none doubled
    await block.aadd_facts([], "s1")  # a put condenses what in-flight puts left over the bound
    facts = await block.aget_facts("s1")
    assert len(facts) <= max_facts and sorted(pieces(facts)) == expected


# --- bounded, compare-and-set ----------------------------------------------------------------------------
async def test_condensation_keeps_at_most_max_facts_and_every_fact_inside(store: HistoryStore) -> None:
    block = fact_block(store, max_facts=4)
    learnt = [f"fact {n}" for n in range(9)]
    for fact in learnt:
        await block.aadd_facts([fact], "s1")
        assert len(await block.aget_facts("s1")) <= 4
    assert sorted(pieces(await block.aget_facts("s1"))) == sorted(learnt)


async def test_a_condensation_keeps_the_facts_another_replica_added_meanwhile(redis_url: str) -> None:
    here, there = store_from_url(redis_url), store_from_url(redis_url)
    other = fact_block(there)  # its put adds a fact and is still below its (default) bound: it only adds

    async def replica_learns() -> None:  # between this block's read of the facts and its write
        await other.aadd_facts(["added meanwhile"], "s1")

    block = fact_block(here, max_facts=4, llm=FactLLM().hook(replica_learns))
    await block.aadd_facts(["a", "b", "c", "d"], "s1")
    await block.aadd_facts(["e"], "s1")  # 5 > 4: condenses, while the other replica adds a fact
    assert await block.aget_facts("s1") == ["a; b", "c; d", "e", "added meanwhile"]
    await here.client.aclose()
    await there.client.aclose()


async def test_a_condensation_that_lost_the_race_retries_on_what_is_there_and_doubles_nothing(
    redis_url: str,
) -> None:
    here, there = store_from_url(redis_url), store_from_url(redis_url)
    other = fact_block(there, max_facts=3)

    async def replica_condenses() -> None:  # another replica adds two facts and condenses first
        await other.aadd_facts(["x", "y"], "s1")

    block = fact_block(here, max_facts=3, llm=FactLLM().hook(replica_condenses))
    await block.aadd_facts(["a", "b", "c"], "s1")
    await block.aadd_facts(["d"], "s1")
    facts = await block.aget_facts("s1")
    assert len(facts) <= 3 and sorted(pieces(facts)) == ["a", "b", "c", "d", "x", "y"]
    await here.client.aclose()
    await there.client.aclose()


async def test_an_empty_condensation_answer_wipes_nothing(store: HistoryStore) -> None:
    class Silent(FactLLM):
        def _answer(self, messages: Any) -> str:
            return "<facts></facts>" if "condensing" in (messages[-1].content or "") else super()._answer(messages)

    block = fact_block(store, max_facts=2, llm=Silent())
    await block.aadd_facts(["a", "b", "c"], "s1")
    assert await block.aget_facts("s1") == ["a", "b", "c"]  # over the bound, as LlamaIndex's block keeps them


async def test_adding_a_known_fact_again_keeps_one_copy_in_its_first_place(store: HistoryStore) -> None:
    block = fact_block(store)
    await block.aadd_facts(["a", "b"], "s1")
    await block.aadd_facts(["c", "a", "c"], "s1")
    assert await block.aget_facts("s1") == ["a", "b", "c"]


# --- static block ----------------------------------------------------------------------------------------
def test_static_content_set_in_one_process_is_seen_by_another(redis_url: str) -> None:
    assert "default" in json.loads(run_app("get-static", redis_url, "s1"))
    run_app("set-static", redis_url, "s1", "the user prefers French")
    seen, other = json.loads(run_app("get-static", redis_url, "s1", "s2"))
    assert "the user prefers French" in seen and "default" not in seen
    assert "default" in other  # another session still has the block's default


async def test_static_content_round_trips_content_blocks_and_resets(store: HistoryStore) -> None:
    block = EngramStaticMemoryBlock(store=store, static_content="default")
    await block.aset_content([TextBlock(text="one"), TextBlock(text="two")], "s1")
    assert [b.text for b in await block.aget_content("s1")] == ["one", "two"]  # type: ignore[union-attr]
    await block.aset_content(None, "s1")
    assert [b.text for b in await block.aget_content("s1")] == ["default"]  # type: ignore[union-attr]


# --- isolation -------------------------------------------------------------------------------------------
async def test_blocks_are_isolated_per_session_per_tenant_and_per_block(redis_url: str, store: HistoryStore) -> None:
    acme = fact_block(store, tenant="acme")
    await acme.aadd_facts(["acme s1"], "s1")
    await acme.aadd_facts(["acme s2"], "s2")
    await fact_block(store, tenant="globex").aadd_facts(["globex s1"], "s1")
    await fact_block(store, tenant="acme", name="Other").aadd_facts(["other block"], "s1")
    await EngramStaticMemoryBlock(store=store, tenant="acme").aset_content("acme static", "s1")
    assert await acme.aget_facts("s1") == ["acme s1"]
    assert await acme.aget_facts("s2") == ["acme s2"]
    assert await fact_block(store, tenant="globex").aget_facts("s1") == ["globex s1"]
    assert await EngramStaticMemoryBlock(store=store, tenant="globex").aget_content("s1") == []
    await acme.aclear_facts("s1")
    assert await fact_block(store, tenant="acme", name="Other").aget_facts("s1") == ["other block"]


async def test_a_block_bound_to_a_session_refuses_another_and_one_without_a_session_says_so(
    store: HistoryStore,
) -> None:
    bound = fact_block(store, session_key="user:42")
    await bound.aadd_facts(["bound"])
    assert await fact_block(store).aget_facts("user:42") == ["bound"]
    with pytest.raises(ValueError, match="bound to session"):
        await bound.aget(session_id="user:43")
    with pytest.raises(ValueError, match="no session"):
        await fact_block(store).aget()
    with pytest.raises(ValueError, match="facts live in Redis"):
        fact_block(store, facts=["in the process"])


async def test_block_keys_share_the_session_slot_and_follow_its_ttl(store: HistoryStore) -> None:
    memory = durable_memory(
        "s1", store=store, ttl=3600, tokenizer_fn=words,
        memory_blocks=[FactExtractionMemoryBlock(llm=FactLLM()), StaticMemoryBlock(static_content="x")],
    )  # fmt: skip
    facts, static = memory.memory_blocks
    assert isinstance(facts, EngramFactExtractionMemoryBlock) and isinstance(static, EngramStaticMemoryBlock)
    await memory.aput(ChatMessage(role="user", content="hello"))
    await facts.aadd_facts(["a"], "s1")
    await static.aset_content("y", "s1")
    keys = KEYS.memory_blocks("default", "s1")
    assert (keys.facts, keys.blocks) == ("engram:default:{default:s1}:facts", "engram:default:{default:s1}:blocks")
    assert set(await store.client.keys("*{default:s1}*")) == {
        *KEYS.session("default", "s1").session_keys()[:2],
        keys.facts,
        keys.blocks,
    }
    assert {KEYS.session_id_of("default", key) for key in keys.all()} == {"s1"}
    for key in keys.all():
        assert 3590 <= await store.client.ttl(key) <= 3600
        await store.client.expire(key, 100)  # a read gives the session's TTL back once it runs low
    await memory.aget()
    for key in keys.all():
        assert await store.client.ttl(key) > 3000
    await store.client.persist(keys.facts)
    await memory.aget()
    assert await store.client.ttl(keys.facts) > 3000
    assert await BlockState(store.client, KEYS).delete("default", "s1") == 2  # what erasing the session must add
    assert await facts.aget_facts("s1") == [] and [b.text for b in await static.aget_content("s1")] == ["x"]


# --- same as LlamaIndex's blocks -------------------------------------------------------------------------
async def test_memory_get_is_what_llama_index_memory_gives_for_the_same_conversation(store: HistoryStore) -> None:
    def blocks() -> list[Any]:
        return [
            StaticMemoryBlock(name="core", static_content="You help with travel."),
            FactExtractionMemoryBlock(llm=FactLLM(), max_facts=3, priority=1),
        ]

    common: dict[str, Any] = {"token_limit": 60, "token_flush_size": 8, "tokenizer_fn": words}
    reference = Memory.from_defaults(session_id="trip", memory_blocks=blocks(), **common)
    engram = durable_memory("trip", store=store, memory_blocks=blocks(), **common)
    seen_facts = False
    for n in range(12):
        for message in (ChatMessage(role="user", content=f"I want to visit city {n}"), ChatMessage(content=f"ok {n}")):
            await reference.aput(message.model_copy())
            await engram.aput(message.model_copy())
        want, got = await reference.aget(), await engram.aget()
        assert [(m.role, m.content) for m in got] == [(m.role, m.content) for m in want], f"after turn {n}"
        seen_facts = seen_facts or "<fact>" in (got[0].content or "")
    condensed = reference.memory_blocks[1].facts
    assert seen_facts and any("; " in fact for fact in condensed)  # the comparison covered extraction + condensing
    assert await engram.memory_blocks[1].aget_facts("trip") == condensed  # type: ignore[attr-defined]


# --- serialization ---------------------------------------------------------------------------------------
async def test_a_pickled_block_reconnects_by_url_and_sees_the_same_state(redis_url: str, store: HistoryStore) -> None:
    facts, static = fact_block(store, max_facts=7), EngramStaticMemoryBlock(store=store, static_content="d")
    await facts.aadd_facts(["a"], "s1")
    await static.aset_content("set", "s1")
    facts_copy, static_copy = pickle.loads(pickle.dumps(facts)), pickle.loads(pickle.dumps(static))
    assert (facts_copy.redis_url, facts_copy.max_facts, facts_copy.facts) == (redis_url, 7, [])
    assert await facts_copy.aget_facts("s1") == ["a"]
    assert [b.text for b in await static_copy.aget_content("s1")] == ["set"]
    rebuilt = EngramStaticMemoryBlock.model_validate(static.model_dump())
    assert [b.text for b in await rebuilt.aget_content("s1")] == ["set"]
    await facts_copy.runtime.home.client.aclose()
    await static_copy.runtime.home.client.aclose()
    await rebuilt.runtime.home.client.aclose()


async def test_a_pickled_memory_with_durable_blocks_works_again(redis_url: str, store: HistoryStore) -> None:
    blocks = [FactExtractionMemoryBlock(llm=FactLLM()), StaticMemoryBlock(static_content="be brief")]
    memory = durable_memory("user:42", store=store, tokenizer_fn=words, memory_blocks=blocks)
    await memory.memory_blocks[0].aadd_facts(["likes tea"], "user:42")  # type: ignore[attr-defined]
    await memory.aput(ChatMessage(role="user", content="hello"))
    copy = pickle.loads(pickle.dumps(memory))
    got = [(m.role, m.content) for m in await copy.aget()]
    assert got == [(m.role, m.content) for m in await memory.aget()]
    assert "<fact>likes tea</fact>" in (got[0][1] or "") and "be brief" in (got[0][1] or "")
    for adapter in (copy.sql_store, *copy.memory_blocks):
        await adapter.runtime.home.client.aclose()


def test_durable_memory_refuses_blocks_of_another_tenant_and_in_process_facts(store: HistoryStore) -> None:
    with pytest.raises(ValueError, match="another namespace or tenant"):
        durable_memory("s1", store=store, memory_blocks=[fact_block(store, tenant="acme")])
    with pytest.raises(ValueError, match="facts in the process"):
        durable_memory("s1", store=store, memory_blocks=[FactExtractionMemoryBlock(llm=FactLLM(), facts=["x"])])
    with pytest.raises(TypeError, match="one of"):
        durable_memory("s1", store=store, chat_store=EngramDBChatStore(store=store))


# --- a tenant's ACL user ---------------------------------------------------------------------------------
async def test_a_tenant_acl_user_can_run_the_blocks_including_a_condensation(redis_url: str) -> None:
    nodes = RedisNodes.from_settings(Settings(redis_url=redis_url))
    credentials = Credentials.generate("acme")
    await ensure_tenant(nodes, KEYS, record_for(KEYS, TenantSpec("acme", Policy()), credentials, CLI_OWNER))
    await nodes.aclose()
    tenant = create_redis(
        Settings(redis_url=redis_url, redis_username="engram.acme", redis_password=credentials.redis_password)
    )
    store = HistoryStore(tenant, KEYS, cache_sessions=0, tokenizer=words)
    block = fact_block(store, tenant="acme", max_facts=2)
    await block.aadd_facts(["a", "b", "c"], "s1")
    assert await block.aget_facts("s1") == ["a; b; c"]  # condensed under WATCH/MULTI/EXEC
    static = EngramStaticMemoryBlock(store=store, tenant="acme")
    await static.aset_content("hello", "s1")
    assert [b.text for b in await static.aget_content("s1")] == ["hello"]
    with pytest.raises(NoPermissionError):
        await fact_block(store, tenant="globex").aget_facts("s1")
    async with tenant.pipeline(transaction=True) as pipe:  # transactions reach no other tenant's key either
        with pytest.raises(NoPermissionError):
            await pipe.watch(KEYS.memory_blocks("globex", "s1").facts)
    async with tenant.pipeline(transaction=True) as pipe:
        pipe.zadd(KEYS.memory_blocks("globex", "s1").facts, {"x": 1})
        with pytest.raises(NoPermissionError):
            await pipe.execute()
    await tenant.aclose()
