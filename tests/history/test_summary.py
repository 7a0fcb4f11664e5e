"""The rolling summary in the store, against a real redis-server: loaded with the window in one round trip,
advanced by compare-and-set (racing summarizers never lose or double-count a message), void after a
rewrite, deleted and expired with its session."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Sequence

from engram.echo import echo_summary
from engram.history import HistoryStore
from engram.history.summary import SummaryBudget, advance_summary
from engram.messages import NewMessage, StoredMessage
from engram.policy import Policy
from engram.tokens import default_tokenizer
from testkit.monitor import commands_run
from testkit.redis_server import RedisServer

BUDGET = SummaryBudget(summary_tokens=4000, window_tokens=60)  # ~10 short messages in the window
FOLD = re.compile(r"(\S+)\.\.(\S+) \((\d+)\): (.*)")


async def echo(previous: str, messages: Sequence[StoredMessage], max_tokens: int) -> str:
    return echo_summary(previous, messages, max_tokens, default_tokenizer())


async def fill(store: HistoryStore, session: str, turns: int, start: int = 0) -> None:
    for n in range(start, start + turns):
        await store.commit_turn("acme", session, f"t{n}", f"question {n}", f"answer {n}")


def folds(text: str) -> list[tuple[str, str, int, str]]:
    return [(m[1], m[2], int(m[3]), m[4]) for line in text.splitlines()[1:] if (m := FOLD.fullmatch(line))]


async def test_the_summary_covers_what_fell_out_of_the_window_each_message_once(store: HistoryStore) -> None:
    await fill(store, "s1", 30)
    advance = await advance_summary(store, "acme", "s1", echo, BUDGET)
    assert advance.outcome == "advanced"
    log = await store.all_messages("acme", "s1")
    window = await store.load_window("acme", "s1", BUDGET.window_tokens, summary_batch=4)
    summary = window.summary
    assert summary is not None and summary.covers_through is not None
    covered = log[: [m.id for m in log].index(summary.covers_through) + 1]
    assert summary.messages_covered == len(covered) == advance.messages
    assert covered + window.messages == log  # nothing lost in between, nothing in both
    assert summary.text.startswith(f"[summary of {len(covered)} messages through {summary.covers_through}]")
    listed = folds(summary.text)
    assert sum(count for _, _, count, _ in listed) == len(covered)
    assert " | ".join(extract for *_, extract in listed) == " | ".join(m.content for m in covered if m.role == "user")


async def test_the_load_returns_the_summary_in_its_one_round_trip(
    redis_server: RedisServer, store: HistoryStore
) -> None:
    await fill(store, "s1", 30)
    await advance_summary(store, "acme", "s1", echo, BUDGET)
    for n in range(3):  # warm up
        await store.load_window("acme", "s1", BUDGET.window_tokens, summary_batch=4)
        await store.commit_turn("acme", "s1", f"warm{n}", "q", "a")
    with commands_run(redis_server.port) as seen:
        window = await store.load_window("acme", "s1", BUDGET.window_tokens, summary_batch=4)
        await store.commit_turn("acme", "s1", "counted", "q", "a")
    assert seen == ["FCALL", "FCALL"]
    assert window.summary is not None and window.summary.messages_covered > 0
    assert window.summary.text.startswith("[summary of ")


async def test_the_load_says_when_a_batch_has_fallen_out_of_the_window_unsummarized(store: HistoryStore) -> None:
    await fill(store, "s1", 3)  # 6 short messages: all fit
    window = await store.load_window("acme", "s1", BUDGET.window_tokens, summary_batch=4)
    assert window.summary is not None and not window.summary.due and window.summary.covers_through is None
    await fill(store, "s1", 20, start=3)
    window = await store.load_window("acme", "s1", BUDGET.window_tokens, summary_batch=4)
    assert window.summary is not None and window.summary.due
    await advance_summary(store, "acme", "s1", echo, BUDGET)
    window = await store.load_window("acme", "s1", BUDGET.window_tokens, summary_batch=4)
    assert window.summary is not None and not window.summary.due
    plain = await store.load_window("acme", "s1", BUDGET.window_tokens)  # window mode: no summary read
    assert plain.summary is None


async def test_racing_summarizers_never_count_a_message_twice(store: HistoryStore, other_store: HistoryStore) -> None:
    await fill(store, "s1", 40)
    both_read = asyncio.Barrier(2)

    async def slow_echo(previous: str, messages: Sequence[StoredMessage], max_tokens: int) -> str:
        await both_read.wait()  # both summarizers hold the same covers_through before either writes
        return await echo(previous, messages, max_tokens)

    first, second = await asyncio.gather(
        advance_summary(store, "acme", "s1", slow_echo, BUDGET, max_rounds=1),
        advance_summary(other_store, "acme", "s1", slow_echo, BUDGET, max_rounds=1),
    )
    assert sorted([first.outcome, second.outcome]) == ["advanced", "conflict"]
    found = await store.read_summary("acme", "s1")
    assert found is not None
    summary = found[1]
    assert summary.messages_covered == max(first.messages, second.messages)
    assert len(folds(summary.text)) == 1


async def test_many_concurrent_summarizers_and_writers_lose_and_double_count_nothing(
    store: HistoryStore, other_store: HistoryStore
) -> None:
    await fill(store, "s1", 10)

    async def writer(replica: HistoryStore, name: str) -> None:
        for n in range(40):
            await replica.commit_turn("acme", "s1", f"{name}{n}", f"{name} question {n}", f"{name} answer {n}")
            await advance_summary(replica, "acme", "s1", echo, BUDGET, max_fold=5)

    await asyncio.gather(writer(store, "a"), writer(other_store, "b"))
    await advance_summary(store, "acme", "s1", echo, BUDGET)
    log = await store.all_messages("acme", "s1")
    found = await store.read_summary("acme", "s1")
    assert found is not None
    summary = found[1]
    ids = [m.id for m in log]
    covered = log[: ids.index(summary.covers_through or "") + 1]
    window = await store.load_window("acme", "s1", BUDGET.window_tokens)
    assert summary.messages_covered == len(covered)
    assert covered + window.messages == log
    listed = folds(summary.text)
    starts = [ids.index(first) for first, _, _, _ in listed]
    ends = [ids.index(last) for _, last, _, _ in listed]
    assert starts[0] == 0 and all(starts[i + 1] == ends[i] + 1 for i in range(len(listed) - 1))  # contiguous
    assert [count for _, _, count, _ in listed] == [e - s + 1 for s, e in zip(starts, ends, strict=True)]


async def test_a_rewrite_voids_the_summary_and_it_starts_over(store: HistoryStore) -> None:
    await fill(store, "s1", 30)
    await advance_summary(store, "acme", "s1", echo, BUDGET)
    await store.replace("acme", "s1", [NewMessage("user", f"new {n}") for n in range(40)])
    found = await store.read_summary("acme", "s1")
    assert found is not None and found[1].messages_covered == 0 and found[1].text == ""
    window = await store.load_window("acme", "s1", BUDGET.window_tokens, summary_batch=4)
    assert window.summary is not None and window.summary.covers_through is None and window.summary.due
    await advance_summary(store, "acme", "s1", echo, BUDGET)
    found = await store.read_summary("acme", "s1")
    assert found is not None
    assert "new 0" in found[1].text and "question" not in found[1].text
    assert found[1].messages_covered == 40 - len(window.messages)


async def test_a_summary_computed_before_a_rewrite_is_dropped(store: HistoryStore) -> None:
    await fill(store, "s1", 30)

    async def rewritten_meanwhile(previous: str, messages: Sequence[StoredMessage], max_tokens: int) -> str:
        await store.delete_message_at("acme", "s1", 0)  # a new epoch while the summarizer works
        return await echo(previous, messages, max_tokens)

    advance = await advance_summary(store, "acme", "s1", rewritten_meanwhile, BUDGET)
    assert advance.outcome == "conflict" and advance.messages == 0
    found = await store.read_summary("acme", "s1")
    assert found is not None and found[1].messages_covered == 0


async def test_the_summary_is_deleted_and_expires_with_its_session(store: HistoryStore) -> None:
    policy = Policy(session_ttl_seconds=600)
    for n in range(30):
        await store.commit_turn("acme", "s1", f"t{n}", f"question {n}", f"answer {n}", policy)
    await advance_summary(store, "acme", "s1", echo, BUDGET)
    keys = store.keys.session("acme", "s1")
    assert 0 < await store.client.ttl(keys.summary) <= 600
    await store.commit_turn("acme", "s1", "later", "q", "a", Policy(session_ttl_seconds=0))
    assert await store.client.ttl(keys.summary) == -1  # the commit's TTL refresh covers the summary too
    assert await store.delete_session("acme", "s1")
    assert not await store.client.exists(keys.summary)
    assert await store.read_summary("acme", "s1") is None
    await fill(store, "s2", 30)
    await advance_summary(store, "acme", "s2", echo, BUDGET)
    await store.replace("acme", "s2", [])  # LlamaIndex's set_messages(key, []): the session is deleted
    assert not await store.client.exists(store.keys.session("acme", "s2").summary)


async def test_messages_trimmed_by_retention_before_being_summarized_are_not_counted(store: HistoryStore) -> None:
    policy = Policy(max_messages_per_session=30)
    for n in range(30):
        await store.commit_turn("acme", "s1", f"t{n}", f"question {n}", f"answer {n}", policy)
    await advance_summary(store, "acme", "s1", echo, BUDGET)
    log = await store.all_messages("acme", "s1")
    found = await store.read_summary("acme", "s1")
    assert found is not None
    window = await store.load_window("acme", "s1", BUDGET.window_tokens)
    # the 30 trimmed unsummarized are lost to retention: the summary starts at the oldest message kept
    assert 0 < found[1].messages_covered == len(log) - len(window.messages)
    assert "question 14 " not in found[1].text and "question 15 " in found[1].text
