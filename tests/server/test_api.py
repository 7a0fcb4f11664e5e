"""The HTTP contract of the chat service, on one real process: chat, retries, streaming, sessions."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import uuid

import httpx

from testkit.redis_server import RedisServer
from tests.server.support import ServiceProcess, chat, metric, scrape


def new_session(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def messages_of(service: ServiceProcess, session: str) -> list[dict[str, str]]:
    response = httpx.get(f"{service.url}/v1/sessions/{session}/messages?limit=1000")
    assert response.status_code == 200, response.text
    return response.json()["messages"]  # type: ignore[no-any-return]


def sse_events(text: str) -> list[tuple[str, dict[str, object]]]:
    events = []
    for block in text.strip().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines())
        events.append((fields["event"], json.loads(fields["data"])))
    return events


def test_chat_reply_has_the_contract_fields_and_served_by_header(
    service: ServiceProcess, module_redis: RedisServer
) -> None:
    session = new_session("contract")
    response = chat(service.url, session, "hello")
    assert response.status_code == 200
    body = response.json()
    assert set(body) == {"session_id", "turn_id", "reply", "served_by", "redis_node", "history"}
    assert body["redis_node"] == f"127.0.0.1:{module_redis.port}"  # the Redis that took the commit
    assert body["session_id"] == session and body["turn_id"]
    assert body["history"] == {"cache": "miss", "messages": 0}
    assert re.fullmatch(r".+:\d+", body["served_by"])
    assert response.headers["X-Served-By"] == body["served_by"]


def test_retry_with_the_same_turn_id_returns_the_first_result_and_stores_once(service: ServiceProcess) -> None:
    session = new_session("retry")
    chat(service.url, session, "first")
    one = chat(service.url, session, "second", turn_id="turn-2")
    again = chat(service.url, session, "second", turn_id="turn-2")  # another message: 409 (test_hardening.py)
    assert one.status_code == again.status_code == 200
    assert again.json()["reply"] == one.json()["reply"]
    assert again.json()["turn_id"] == "turn-2"
    assert again.json()["history"]["messages"] == one.json()["history"]["messages"] == 2
    assert [m["content"] for m in messages_of(service, session)][2:] == ["second", one.json()["reply"]]


async def test_concurrent_requests_with_one_turn_id_store_one_turn_and_agree(service: ServiceProcess) -> None:
    session = new_session("race")
    chat(service.url, session, "opening")
    async with httpx.AsyncClient(base_url=service.url, timeout=15) as http:
        body = {"session_id": session, "message": "same turn", "turn_id": "race-1"}
        replies = await asyncio.gather(*(http.post("/v1/chat", json=body) for _ in range(6)))
    assert {r.status_code for r in replies} == {200}
    assert len({r.json()["reply"] for r in replies}) == 1
    stored = messages_of(service, session)
    assert [m["turn_id"] for m in stored].count("race-1") == 2  # one user message, one reply


def test_stream_sends_tokens_then_a_done_event_with_the_stored_reply(service: ServiceProcess) -> None:
    session = new_session("stream")
    chat(service.url, session, "remember: streaming works")
    response = chat(service.url, session, "what did I say?", stream=True, turn_id="s-2")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    events = sse_events(response.text)
    kinds = [kind for kind, _ in events]
    assert kinds[-1] == "done" and set(kinds[:-1]) == {"token"} and len(kinds) > 3
    done = events[-1][1]
    assert "".join(str(data["text"]) for _, data in events[:-1]) == done["reply"]
    assert '"remember: streaming works"' in str(done["reply"])
    assert done["served_by"] == response.headers["X-Served-By"]
    assert done["history"] == {"cache": "hit", "messages": 2}  # this process committed the first turn
    assert messages_of(service, session)[-1]["content"] == done["reply"]

    retried = sse_events(chat(service.url, session, "what did I say?", stream=True, turn_id="s-2").text)
    assert [kind for kind, _ in retried] == ["token", "done"]
    again = retried[-1][1]
    assert (again["reply"], again["turn_id"], again["history"]["messages"]) == (done["reply"], "s-2", 2)  # type: ignore[index]
    assert len(messages_of(service, session)) == 4


def test_sessions_are_listed_with_counts_and_paged_by_cursor(service: ServiceProcess) -> None:
    prefix = new_session("list")
    mine = {f"{prefix}-{i}": i + 1 for i in range(3)}
    for session, turns in mine.items():
        for turn in range(turns):
            assert chat(service.url, session, f"message {turn}").status_code == 200
    found: dict[str, int] = {}
    cursor: str | None = None
    pages = 0
    while True:
        params = {"limit": "2", **({"cursor": cursor} if cursor else {})}
        page = httpx.get(service.url + "/v1/sessions", params=params).json()
        assert len(page["sessions"]) <= 2
        for entry in page["sessions"]:
            assert set(entry) == {"session_id", "messages", "updated_at"}
            assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", entry["updated_at"])
            found[entry["session_id"]] = entry["messages"]
        pages += 1
        cursor = page["next"]
        if cursor is None:
            break
    assert pages >= 2
    assert {s: found.get(s) for s in mine} == {s: 2 * turns for s, turns in mine.items()}


def test_messages_are_oldest_first_and_paged_by_cursor(service: ServiceProcess) -> None:
    session = new_session("pages")
    for turn in range(3):
        chat(service.url, session, f"message {turn}", turn_id=f"t{turn}")
    seen: list[dict[str, str]] = []
    cursor: str | None = None
    while True:
        params = {"limit": "4", **({"cursor": cursor} if cursor else {})}
        page = httpx.get(f"{service.url}/v1/sessions/{session}/messages", params=params).json()
        seen += page["messages"]
        cursor = page["next"]
        if cursor is None:
            break
    assert [m["role"] for m in seen] == ["user", "assistant"] * 3
    assert [m["content"] for m in seen if m["role"] == "user"] == ["message 0", "message 1", "message 2"]
    assert [m["turn_id"] for m in seen] == ["t0", "t0", "t1", "t1", "t2", "t2"]
    assert set(seen[0]) == {"id", "role", "content", "turn_id", "created_at"}
    assert [m["id"] for m in seen] == sorted({m["id"] for m in seen}, key=lambda i: tuple(map(int, i.split("-"))))


def test_deleting_a_session_answers_204_then_404_and_forgets_it(service: ServiceProcess) -> None:
    session = new_session("delete")
    chat(service.url, session, "forget me")
    assert httpx.delete(f"{service.url}/v1/sessions/{session}").status_code == 204
    assert httpx.delete(f"{service.url}/v1/sessions/{session}").status_code == 404
    assert messages_of(service, session) == []
    after = chat(service.url, session, "do you remember?").json()
    assert after["history"]["messages"] == 0 and "forget me" not in after["reply"]


def test_health_readiness_openapi_and_page_are_served(service: ServiceProcess) -> None:
    assert httpx.get(service.url + "/healthz").json()["status"] == "ok"
    assert httpx.get(service.url + "/readyz").json()["status"] == "ok"
    spec = httpx.get(service.url + "/openapi.json").json()
    assert {"/v1/chat", "/v1/sessions", "/v1/sessions/{session_id}/messages", "/v1/sessions/{session_id}"} <= set(
        spec["paths"]
    )
    page = httpx.get(service.url + "/")
    assert page.status_code == 200 and "/static/app.js" in page.text
    assert httpx.get(service.url + "/static/app.js").headers["content-type"].startswith("text/javascript")


def test_metrics_label_routes_by_template_not_by_path(service: ServiceProcess) -> None:
    session = new_session("labels")
    httpx.get(f"{service.url}/v1/sessions/{session}/messages")
    text = httpx.get(service.url + "/metrics").text
    assert session not in text
    samples = scrape(service.url)
    assert metric(samples, "engram_http_requests_total", route="/v1/sessions/{session_id}/messages") >= 1
    assert metric(samples, "engram_history_load_duration_seconds_count") >= 1
    for name in ("engram_history_loads_total", "engram_turns_total", "engram_model_duration_seconds_bucket"):
        assert f"# TYPE {name.removesuffix('_bucket').removesuffix('_total')}" in text


def test_each_step_of_a_turn_is_timed_once_and_a_retry_runs_only_the_load(service: ServiceProcess) -> None:
    session = new_session("steps")

    def steps() -> dict[str, float]:
        samples = scrape(service.url)
        return {
            s: metric(samples, "engram_turn_step_duration_seconds_count", step=s) for s in ("load", "model", "commit")
        }

    before = steps()
    assert chat(service.url, session, "hello", turn_id="t-1").status_code == 200
    after_turn = steps()
    assert {s: after_turn[s] - before[s] for s in before} == {"load": 1, "model": 1, "commit": 1}
    assert chat(service.url, session, "hello", turn_id="t-1").status_code == 200  # answered from the store
    after_retry = steps()
    assert {s: after_retry[s] - after_turn[s] for s in before} == {"load": 1, "model": 0, "commit": 0}


def test_the_service_imports_no_llama_index_code() -> None:
    """A replica talks to models through engram.server.model: LlamaIndex's import time and memory are the
    library users' choice, not a cost every replica pays at start-up."""
    code = (
        "import sys, engram.server.app, engram.server.cli, engram.server.model; "
        "print(sorted({m.split('.')[0] for m in sys.modules if m.startswith('llama_index')}))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert result.stdout.strip() == "[]"
