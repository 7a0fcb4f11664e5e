"""Memory survives the process: a conversation continues on a new process, and on whichever replica
answers next. Every reply comes from a real ``engram serve`` over real HTTP, with the echo model quoting
the previous message."""

from __future__ import annotations

import uuid
from collections import Counter

from tests.server.conftest import MakeService
from tests.server.support import chat, metric, scrape, start_all


def test_new_process_recalls_message_one_after_the_first_was_killed_with_sigkill(
    redis_url: str, make_service: MakeService
) -> None:
    first = make_service(redis_url).start()
    one = chat(first.url, "seed", "my favourite colour is teal")
    assert one.status_code == 200, one.text
    first.kill()

    second = make_service(redis_url).start()
    two = chat(second.url, "seed", "what is my favourite colour?")

    assert two.status_code == 200, two.text
    body = two.json()
    assert '"my favourite colour is teal"' in body["reply"]
    assert body["history"] == {"cache": "miss", "messages": 2}
    assert body["served_by"] != one.json()["served_by"]
    assert two.headers["X-Served-By"] == body["served_by"]


def expected_outcome(holds_tail: bool, wrote_last: bool) -> str:
    """The cache outcome a replica should report: no usable tail -> miss; a tail and another replica
    wrote since -> delta; a tail and this replica wrote the last turn -> hit."""
    if not holds_tail:
        return "miss"
    return "hit" if wrote_last else "delta"


def test_turns_rotating_over_three_processes_each_recall_the_previous_and_metrics_show_the_outcomes(
    redis_url: str, make_service: MakeService
) -> None:
    replicas = start_all([make_service(redis_url) for _ in range(3)])
    # rotate a, b, c, a, b, c, a, b, c, then c again: the same replica twice in a row (a hit)
    order = [replicas[i % 3] for i in range(9)] + [replicas[2]]
    session = f"rotate-{uuid.uuid4().hex[:6]}"
    holds_tail: dict[str, bool] = {}
    last_writer: str | None = None
    seen: Counter[tuple[str, str]] = Counter()
    previous: str | None = None
    for turn, replica in enumerate(order):
        message = f"turn {turn} says {uuid.uuid4().hex[:8]}"
        response = chat(replica.url, session, message)
        assert response.status_code == 200, response.text
        body = response.json()

        if previous is None:
            assert body["reply"].startswith("This is the start of our conversation.")
        else:
            assert f'"{previous}"' in body["reply"], f"turn {turn} on {replica.url} forgot the previous turn"
        assert body["history"]["messages"] == 2 * turn
        want = expected_outcome(holds_tail.get(replica.url, False), last_writer == replica.url)
        assert body["history"]["cache"] == want, f"turn {turn} on {replica.url}"

        seen[(replica.url, body["history"]["cache"])] += 1
        # after serving a turn a replica holds the session's tail: it loaded it, or its commit opened it
        holds_tail[replica.url] = True
        last_writer, previous = replica.url, message

    assert len({chat(r.url, "probe", "who are you?").json()["served_by"] for r in replicas}) == 3
    for replica in replicas:
        samples = scrape(replica.url)
        for outcome in ("hit", "delta", "miss"):
            assert metric(samples, "engram_history_loads_total", outcome=outcome) == seen[(replica.url, outcome)] + (
                outcome == "miss"  # the probe of a new session
            ), f"{outcome} on {replica.url}"
    a, c = scrape(replicas[0].url), scrape(replicas[2].url)
    assert metric(a, "engram_history_loads_total", outcome="delta") >= 1
    assert metric(c, "engram_history_loads_total", outcome="hit") == 1
    assert metric(a, "engram_turns_total", outcome="ok") == 3 + 1  # turns 0, 3, 6 and the probe
    assert metric(a, "engram_history_loaded_messages_total") == sum(2 * t for t in (0, 3, 6))
    assert metric(a, "engram_http_requests_total", route="/v1/chat", method="POST", status="200") == 4
