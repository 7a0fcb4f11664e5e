"""The chat page at / in real headless Chromium: two messages, the replica and cache outcome of each
turn, and a session id that survives a reload. The screenshot is kept in tests/artifacts/."""

from __future__ import annotations

import json
import re

from testkit.redis_server import RedisServer
from tests.server.browser import Page
from tests.server.support import REPO, ServiceProcess

ARTIFACTS = REPO / "tests" / "artifacts"


def replies(page: Page) -> list[dict[str, str]]:
    script = """Array.from(document.querySelectorAll('#messages .msg.assistant')).map(li => ({
        text: li.firstChild.textContent,
        served_by: li.querySelector('.meta')?.dataset.servedBy ?? null,
        redis_node: li.querySelector('.meta')?.dataset.redisNode ?? null,
        cache: li.querySelector('.meta')?.dataset.cache ?? null,
        messages: li.querySelector('.meta')?.dataset.messages ?? null,
    }))"""
    return page.evaluate(script)  # type: ignore[no-any-return]


def send(page: Page, text: str, replies_before: int) -> None:
    page.type_into("#message", text)
    page.press_enter()
    page.wait_for(f"document.querySelectorAll('#messages .msg.assistant').length > {replies_before}")


def test_page_chats_shows_replica_redis_node_and_cache_per_turn_and_keeps_the_session(
    service: ServiceProcess, module_redis: RedisServer, page: Page
) -> None:
    page.navigate(service.url + "/")
    session_id = page.wait_for(
        "document.getElementById('session-id').textContent.startsWith('web-') && "
        "document.getElementById('session-id').textContent"
    )
    assert page.evaluate("localStorage.getItem('engram.session_id')") == session_id

    send(page, "the password is swordfish", 0)
    send(page, "what is the password?", 1)

    first, second = replies(page)
    assert first["text"].startswith("This is the start of our conversation.")
    assert '"the password is swordfish"' in second["text"]
    for reply in (first, second):
        assert re.fullmatch(r".+:\d+", reply["served_by"])
        assert reply["cache"] in {"hit", "delta", "miss"}
    assert (first["cache"], first["messages"]) == ("miss", "0")
    assert second["messages"] == "2"
    meta = page.evaluate("document.querySelectorAll('#messages .meta')[1].textContent")
    assert second["served_by"] in meta and second["cache"] in meta
    assert second["redis_node"] == f"127.0.0.1:{module_redis.port}" and f"redis {second['redis_node']}" in meta
    page.screenshot(ARTIFACTS / "web-page.png")

    page.navigate(service.url + "/")  # a reload keeps the session and shows the stored conversation
    page.wait_for("document.querySelectorAll('#messages .msg').length === 4")
    assert page.evaluate("document.getElementById('session-id').textContent") == session_id
    restored = page.evaluate("Array.from(document.querySelectorAll('#messages .msg')).map(li => li.textContent)")
    assert restored[0] == "the password is swordfish" and restored[3] == second["text"]

    page.evaluate("document.getElementById('new-session').click()")
    page.wait_for(f"document.getElementById('session-id').textContent !== {json.dumps(session_id)}")
    page.wait_for("document.querySelectorAll('#messages .msg').length === 0")


def test_page_sends_through_the_openai_api_when_chosen_and_says_which_api_served_each_turn(
    service: ServiceProcess, page: Page
) -> None:
    page.navigate(service.url + "/")
    page.wait_for("document.getElementById('session-id').textContent.startsWith('web-')")
    page.evaluate("document.getElementById('new-session').click()")
    send(page, "my cat is called Miso", 0)  # through /v1/chat (the default)
    page.evaluate(
        "const api = document.getElementById('api'); api.value = 'openai'; api.dispatchEvent(new Event('change'))"
    )
    send(page, "what is my cat called?", 1)  # through /v1/chat/completions, same session, same memory
    apis = page.evaluate("Array.from(document.querySelectorAll('#messages .meta')).map(m => m.dataset.api)")
    assert apis == ["/v1/chat", "/v1/chat/completions"]
    second = replies(page)[1]
    assert '"my cat is called Miso"' in second["text"] and second["messages"] == "2"
    assert re.fullmatch(r".+:\d+", second["served_by"]) and second["cache"] in {"hit", "delta", "miss"}
    page.navigate(service.url + "/")  # the choice is kept across a reload
    assert page.wait_for("document.getElementById('api').value") == "openai"
    page.evaluate("localStorage.removeItem('engram.api')")
