"""``ENGRAM_MEMORY=summary`` on real replicas over HTTP and a real redis-server: what falls out of the window
is folded into the session's rolling summary by the replicas in the background, each message exactly once
while two replicas alternate; the model is given the summary; a turn still costs 2 Redis commands; and
``GET /v1/sessions/{id}/summary`` answers its contract."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Sequence

import httpx
from prometheus_client import REGISTRY

from engram.echo import echo_summary
from engram.history.summary import SummaryBudget, advance_summary
from engram.messages import SUMMARY_PREFIX, StoredMessage
from engram.policy import Policy, Tenant
from engram.server.auth import Authenticator
from engram.server.deps import Resources, get_turn_context
from engram.server.model import EchoModel
from engram.server.summaries import BackgroundSummaries, SummaryMemory
from engram.server.turn import NullMemory, SessionMemory, TurnContext, TurnRequest, load, prompt, validate
from engram.settings import Settings
from engram.tokens import default_tokenizer
from testkit.monitor import commands_run
from testkit.redis_server import RedisServer
from tests.history.conftest import make_store
from tests.reliability.fake_model import FakeModel
from tests.server.conftest import MakeService
from tests.server.support import chat, metric, scrape, start_all
from tests.server.test_errors import assert_error

TOKEN_LIMIT, SUMMARY_TOKENS, BATCH = 6000, 3000, 32
SUMMARY_ENV = {
    "ENGRAM_MEMORY": "summary",
    "ENGRAM_TOKEN_LIMIT": str(TOKEN_LIMIT),
    "ENGRAM_SUMMARY_MAX_TOKENS": str(SUMMARY_TOKENS),
    "ENGRAM_SUMMARY_BATCH": str(BATCH),
}
BUDGET = SummaryBudget.of(TOKEN_LIMIT, SUMMARY_TOKENS)
FOLD = re.compile(r"(\S+)\.\.(\S+) \((\d+)\): (.*)")
HEADER = re.compile(r"\[summary of (\d+) messages through (\S+)\]")


async def echo(previous: str, messages: Sequence[StoredMessage], max_tokens: int) -> str:
    return echo_summary(previous, messages, max_tokens, default_tokenizer())


async def catch_up(redis_url: str, session: str) -> tuple[list[StoredMessage], list[StoredMessage], int]:
    """Fold what the last turns pushed out of the window (a replica summarizes on the next turn), racing
    whatever a replica may still be folding; then (log, window, messages this call folded)."""
    store = make_store(redis_url)
    try:
        folded = 0
        for _ in range(50):  # a conflict means a replica advanced meanwhile: progress, so this ends
            advance = await advance_summary(store, "default", session, echo, BUDGET)
            folded += advance.messages
            if advance.outcome == "nothing":
                break
        log = await store.all_messages("default", session)
        window = await store.load_window("default", session, BUDGET.window_tokens)
        return log, window.messages, folded
    finally:
        await store.client.aclose()


def test_two_replicas_alternating_for_300_turns_summarize_every_message_exactly_once(
    make_service: MakeService, redis_server: RedisServer
) -> None:
    replicas = start_all([make_service(redis_server.url, **SUMMARY_ENV) for _ in range(2)])
    session, replies = "long-1", []
    with httpx.Client(timeout=15.0) as client:
        for n in range(300):
            body = {"session_id": session, "message": f"note {n}", "turn_id": f"t{n}"}
            response = client.post(replicas[n % 2].url + "/v1/chat", json=body)
            assert response.status_code == 200, response.text
            replies.append(response.json()["reply"])
    by_replicas = sum(metric(scrape(r.url), "engram_summary_messages_total") for r in replicas)
    assert by_replicas > 0  # the replicas summarized in the background, not only the catch-up below
    assert all(metric(scrape(r.url), "engram_summary_runs_total", outcome="error") == 0 for r in replicas)

    log, window, folded = asyncio.run(catch_up(redis_server.url, session))
    assert len(log) == 600
    summary = httpx.get(f"{replicas[0].url}/v1/sessions/{session}/summary").json()
    ids = [m.id for m in log]
    covered = log[: ids.index(summary["covers_through"]) + 1]
    # none lost, none counted twice: the summary covers exactly the messages before the window, once each
    assert covered + window == log
    assert summary["messages_covered"] == len(covered) == by_replicas + folded
    assert len(covered) > 400  # a small token limit: most messages fell out of the window
    lines = summary["text"].splitlines()
    assert HEADER.fullmatch(lines[0]) and HEADER.fullmatch(lines[0])[1] == str(len(covered))  # type: ignore[index]
    folds = [FOLD.fullmatch(line) for line in lines[1:]]
    assert all(folds), lines  # every fold kept: nothing dropped for size
    spans = [(ids.index(f[1]), ids.index(f[2]), int(f[3]), f[4]) for f in folds if f]
    assert spans[0][0] == 0 and spans[-1][1] == len(covered) - 1
    assert all(spans[i + 1][0] == spans[i][1] + 1 for i in range(len(spans) - 1))  # adjacent, no overlap
    assert all(count == last - first + 1 for first, last, count, _ in spans)
    assert " | ".join(s[3] for s in spans) == " | ".join(m.content for m in covered if m.role == "user")

    # the model was given summary + window: the echo model quotes the summary's first line it was given
    quoted = [HEADER.search(reply) for reply in replies]
    assert all(q is None for q in quoted[:20])  # the start of the conversation fits the window
    assert quoted[-1] is not None and int(quoted[-1][1]) >= len(covered) - 4 * BATCH  # a recent summary
    given = [int(q[1]) for q in quoted if q is not None]
    assert given == sorted(given) and len(set(given)) > 5  # it grew as the conversation went on


def test_a_turn_in_summary_mode_costs_two_redis_commands(make_service: MakeService, redis_server: RedisServer) -> None:
    service = make_service(redis_server.url, **SUMMARY_ENV).start()
    for n in range(3):  # warm up: connections, function library
        assert chat(service.url, "count-1", f"warm {n}").status_code == 200
    with commands_run(redis_server.port) as seen:
        assert chat(service.url, "count-1", "counted").status_code == 200
    assert seen == ["FCALL", "FCALL"]  # the load (with the summary), the commit


def test_the_summary_endpoint_answers_its_contract(make_service: MakeService, redis_server: RedisServer) -> None:
    service = make_service(redis_server.url, **SUMMARY_ENV).start()
    url = service.url + "/v1/sessions/{}/summary"
    assert_error(httpx.get(url.format("nobody")), 404, "not_found")
    assert_error(httpx.get(url.format("bad%20id")), 422, "invalid_session_id")
    assert_error(httpx.get(url.format("x" * 129)), 422, "invalid_session_id")
    assert chat(service.url, "short-1", "hello").status_code == 200
    empty = httpx.get(url.format("short-1"))
    assert empty.status_code == 200 and empty.json() == {"text": "", "covers_through": None, "messages_covered": 0}
    assert httpx.delete(service.url + "/v1/sessions/short-1").status_code == 204
    assert_error(httpx.get(url.format("short-1")), 404, "not_found")


async def test_a_tenants_memory_mode_overrides_the_services_default(redis_url: str) -> None:
    """The tenant's policy (MemoryNamespace spec.memory, `engram tenant create --memory`) decides; unset, the
    service's ENGRAM_MEMORY does; ENGRAM_MEMORY=off turns memory off for everyone (a benchmark baseline)."""
    store = make_store(redis_url)
    try:
        for default, tenant_mode, expected in [
            ("on", None, SessionMemory),
            ("on", "summary", SummaryMemory),
            ("window", "summary", SummaryMemory),
            ("summary", None, SummaryMemory),
            ("summary", "window", SessionMemory),
            ("off", "summary", NullMemory),
        ]:
            settings = Settings(memory=default, auth="disabled")  # type: ignore[arg-type]
            model = EchoModel()
            summaries = (
                None if default == "off" else BackgroundSummaries(store, model, max_tokens=64, batch=4, concurrency=1)
            )
            resources = Resources(
                settings, store.client, store, model, Authenticator(settings, None), "test", summaries
            )
            tenant = Tenant("acme", Policy(memory=tenant_mode))  # type: ignore[arg-type]
            ctx = await get_turn_context(resources, tenant)
            assert type(ctx.memory) is expected, (default, tenant_mode)
    finally:
        await store.client.aclose()


def test_the_configured_model_writes_the_summary(make_service: MakeService, redis_server: RedisServer) -> None:
    """ENGRAM_LLM=openai-like: the summary is what the model answered to the summarizing request (a local
    OpenAI-compatible server), made in the background while the conversation goes on."""
    with FakeModel() as model:
        env = {**SUMMARY_ENV, **model.service_env(10.0), "ENGRAM_TOKEN_LIMIT": "200"}
        env.update(ENGRAM_SUMMARY_MAX_TOKENS="64", ENGRAM_SUMMARY_BATCH="4")
        service = make_service(redis_server.url, **env).start()
        for n in range(12):
            assert chat(service.url, "model-1", f"note {n}: " + "remember this detail " * 5).status_code == 200
        deadline = time.monotonic() + 20
        while (summary := httpx.get(service.url + "/v1/sessions/model-1/summary").json())["messages_covered"] == 0:
            assert time.monotonic() < deadline, "no summary was made"
            time.sleep(0.05)
        summarizing = [r for r in model.requests_seen if not r.get("stream")]  # turns stream; summaries do not
        assert summarizing and "running summary" in summarizing[0]["messages"][0]["content"]
        first = summarizing[0]["messages"][1]["content"]
        assert first.startswith("Summary so far:\n(none)\n\nNew messages:\nuser: note 0: remember this detail")
        assert summarizing[0]["max_tokens"] == 64
        # the stored text is the model's answer to the newest summarizing request (which folded in the last one)
        assert summary["text"].startswith("fake reply to ") and "Summary so far:" in summary["text"]


async def test_a_failing_summarizer_is_counted_writes_nothing_and_a_later_turn_retries(redis_url: str) -> None:
    class Unreachable(EchoModel):
        async def summarize(self, previous: str, messages: Sequence[StoredMessage], max_tokens: int) -> str:
            raise ConnectionError("model server unreachable")

    store = make_store(redis_url)
    try:
        for n in range(30):
            await store.commit_turn("default", "s1", f"t{n}", f"question {n}", f"answer {n}")
        window = await store.load_window("default", "s1", 60, summary_batch=4)
        assert window.summary is not None and window.summary.due
        summaries = BackgroundSummaries(store, Unreachable(), max_tokens=64, batch=4, concurrency=1)
        errors_before = REGISTRY.get_sample_value("engram_summary_runs_total", {"outcome": "error"}) or 0
        skipped_before = REGISTRY.get_sample_value("engram_summary_runs_total", {"outcome": "skipped"}) or 0
        budget = SummaryBudget(summary_tokens=64, window_tokens=60)
        assert summaries.schedule("default", "s1", budget, window.messages[0].id)
        assert not summaries.schedule("default", "s1", budget, window.messages[0].id)  # one per session
        assert not summaries.schedule("default", "s2", budget, window.messages[0].id)  # the cap of 1
        await summaries.drain()
        assert REGISTRY.get_sample_value("engram_summary_runs_total", {"outcome": "error"}) == errors_before + 1
        assert REGISTRY.get_sample_value("engram_summary_runs_total", {"outcome": "skipped"}) == skipped_before + 2
        found = await store.read_summary("default", "s1")
        assert found is not None and found[1].messages_covered == 0  # nothing written
        assert summaries.schedule("default", "s1", budget, window.messages[0].id)  # a later turn tries again
        await summaries.drain()
    finally:
        await store.client.aclose()


async def test_the_prompt_opens_with_the_summary_and_its_tokens_count_against_the_limit(redis_url: str) -> None:
    store = make_store(redis_url)
    try:
        for n in range(40):
            await store.commit_turn("default", "s1", f"t{n}", f"question {n} " * 4, f"answer {n} " * 4)
        tenant = Tenant("default", Policy(token_limit=200))
        summaries = BackgroundSummaries(store, EchoModel(), max_tokens=60, batch=4, concurrency=1)
        await advance_summary(store, "default", "s1", echo, summaries.budget(200))
        ctx = TurnContext(store, SummaryMemory(store, tenant, summaries), EchoModel(), tenant, "test")
        turn = validate(ctx, TurnRequest("s1", "and the next question? " * 10))
        window = await load(ctx, turn)
        given = prompt(ctx, window, turn)
        assert window.summary is not None and window.summary.tokens > 0
        first = given.messages[0]
        assert first.role == "system" and (first.content or "").startswith(SUMMARY_PREFIX + "\n[summary of ")
        counted = sum(store.count_tokens(m.content or "") for m in given.messages)
        assert counted <= given.tokens <= 200  # the summary, the window and the new message within the limit
        assert len(given.messages) - 2 < len(window.messages)  # the new message's room came out of the window
        history = given.messages[1:-1]
        assert [m.content for m in history] == [m.content for m in window.messages[-len(history) :]]
    finally:
        await store.client.aclose()
