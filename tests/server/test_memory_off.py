"""``ENGRAM_MEMORY=off``, the benchmark's stateless baseline, on a real process and a real redis-server:
it answers every turn as if it were the first (JSON and streamed), stores nothing in Redis, and says
so at start-up."""

from __future__ import annotations

import subprocess
import sys

import httpx
import redis

from engram.echo import FIRST_TURN
from testkit.redis_server import RedisServer
from tests.server.conftest import MakeService
from tests.server.support import REPO, chat, metric, scrape, service_env
from tests.server.test_api import sse_events

START = f"{FIRST_TURN} I was given 0 earlier messages."


def test_memory_off_answers_without_history_and_stores_nothing(
    make_service: MakeService, redis_server: RedisServer
) -> None:
    service = make_service(redis_server.url, ENGRAM_MEMORY="off").start()
    for turn, message in enumerate(["my cat is called Miso", "what is my cat called?", "and before that?"]):
        response = chat(service.url, "baseline-1", message, turn_id=f"t{turn}")
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["reply"] == START  # the model was given only the new message, every time
        assert body["history"] == {"cache": "off", "messages": 0}
        assert body["turn_id"] == f"t{turn}" and body["served_by"] == response.headers["X-Served-By"]

    streamed = chat(service.url, "baseline-1", "streamed, too?", stream=True)
    assert streamed.status_code == 200
    events = sse_events(streamed.text)
    assert [kind for kind, _ in events][-1] == "done" and len(events) > 2
    done = events[-1][1]
    assert "".join(str(data["text"]) for _, data in events[:-1]) == done["reply"] == START
    assert done["history"] == {"cache": "off", "messages": 0}

    client = redis.Redis.from_url(redis_server.url)
    assert client.dbsize() == 0, sorted(client.keys("*"))  # nothing stored: no stream, no index, no turn id
    assert httpx.get(service.url + "/v1/sessions/baseline-1/messages").json()["messages"] == []
    assert httpx.get(service.url + "/v1/sessions").json()["sessions"] == []

    samples = scrape(service.url)
    assert metric(samples, "engram_turns_total", outcome="ok") == 4
    assert metric(samples, "engram_history_loads_total") == 0
    assert "ENGRAM_MEMORY=off" in service.log() and "memory off" in service.log()


def test_memory_on_is_the_default_and_other_values_are_refused(
    make_service: MakeService, redis_server: RedisServer
) -> None:
    service = make_service(redis_server.url).start()
    chat(service.url, "default-1", "my cat is called Miso")
    second = chat(service.url, "default-1", "what is my cat called?").json()
    assert second["history"] == {"cache": "hit", "messages": 2}
    assert '"my cat is called Miso"' in second["reply"]
    assert "memory on" in service.log() and "ENGRAM_MEMORY=off" not in service.log()

    run = subprocess.run(
        [sys.executable, "-m", "engram.server", "serve", "--port", "1"],
        env=service_env(redis_server.url, ENGRAM_MEMORY="sometimes"),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert run.returncode == 2
    assert "ENGRAM_MEMORY: Input should be 'on', 'window', 'summary' or 'off'" in run.stderr
