"""Two workers in one replica: /metrics of the replica counts the work of both (multiprocess mode)."""

from __future__ import annotations

import uuid

import httpx

from tests.server.conftest import MakeService
from tests.server.support import chat, metric, scrape


def test_metrics_of_a_two_worker_replica_sum_both_workers(redis_url: str, make_service: MakeService) -> None:
    replica = make_service(redis_url, workers=2).start()
    session = f"workers-{uuid.uuid4().hex[:6]}"
    served_by: list[str] = []
    previous: str | None = None
    # each request on a new connection: the kernel hands connections to either worker
    for turn in range(80):
        message = f"turn {turn} {uuid.uuid4().hex[:6]}"
        response = chat(replica.url, session, message)
        assert response.status_code == 200, response.text
        if previous is not None:  # the workers share nothing but Redis, and still remember
            assert f'"{previous}"' in response.json()["reply"]
        previous = message
        served_by.append(response.headers["X-Served-By"])
        if turn >= 9 and len(set(served_by)) == 2:
            break
    assert len(set(served_by)) == 2, "the kernel never handed a connection to the second worker"

    turns = len(served_by)
    samples = scrape(replica.url)
    assert metric(samples, "engram_turns_total", outcome="ok") == turns
    assert metric(samples, "engram_history_loads_total") == turns
    assert metric(samples, "engram_http_requests_total", route="/v1/chat", method="POST", status="200") == turns
    assert metric(samples, "engram_turn_duration_seconds_count", outcome="ok") == turns
    # and a second scrape (perhaps served by the other worker) sees the same sums
    assert metric(scrape(replica.url), "engram_turns_total", outcome="ok") == turns
    assert httpx.get(replica.url + "/readyz").status_code == 200
