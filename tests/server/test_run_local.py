"""``make run``'s script: redis-server, two replicas and HAProxy round-robin, driven through the load
balancer by headless Chromium; Ctrl-C stops everything, and a second run finds the first's conversation."""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

import httpx
import redis

from testkit.local_stack import LocalStack, stack_env
from testkit.processes import group_members
from testkit.redis_server import port_is_free, quiet_ports
from tests.server.browser import Page
from tests.server.test_web_page import ARTIFACTS, replies, send


def test_make_run_stack_rotates_replicas_stops_on_ctrl_c_and_remembers_across_runs(tmp_path: Path, page: Page) -> None:
    ports = quiet_ports(4)  # load balancer, redis, replicas base and base + 1
    lb, redis_port, base, _ = ports
    env = stack_env(tmp_path / "run", ports, replicas=2)
    url = f"http://127.0.0.1:{lb}"
    output = tmp_path / "run-local.out"

    stack = LocalStack(env, log=output)
    # As under a CI runner: the test run started in the background inherits SIGINT ignored (bash cannot
    # trap a signal ignored on entry). The harness must still hand the script a working Ctrl-C.
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        stack.spawn()
    finally:
        signal.signal(signal.SIGINT, previous)
    with stack:
        printed = stack.output
        assert re.search(r"ready in \d+\.\d+s\. Press Ctrl-C", printed), printed
        # Auth is on by default: the printed page URL carries the demo tenant's key in its fragment.
        found = re.search(rf"chat page   ({re.escape(url)}/#key=(egk_demo\.\S+))", printed)
        assert found, printed
        page_url, demo_key = found.groups()
        assert (tmp_path / "run" / "demo-api-key").read_text().strip() == demo_key
        assert httpx.post(f"{url}/v1/chat", json={"session_id": "x", "message": "hi"}).status_code == 401
        assert f"http://127.0.0.1:{base}/metrics" in printed and f"http://127.0.0.1:{base + 1}/metrics" in printed

        page.navigate(page_url)
        page.wait_for("document.getElementById('session-id').textContent.startsWith('web-')")
        assert page.evaluate("location.hash") == ""  # the page keeps the key and drops it from the address bar
        said = ["my cat is called Miso", "what is my cat called?", "and my dog is Rex", "who is Rex?"]
        for n, message in enumerate(said):
            send(page, message, n)
        answers = replies(page)
        for n in range(1, len(said)):  # every turn recalls the previous one, whichever replica served it
            assert f'"{said[n - 1]}"' in answers[n]["text"], f"turn {n} forgot the previous turn"
        # Round-robin per request: the browser's own requests (page, script, favicon) shift the rotation,
        # but four POSTs cannot all land on one of two replicas.
        assert len({a["served_by"] for a in answers}) == 2, "HAProxy must spread turns over the replicas"
        assert answers[0]["cache"] == "miss"
        page.screenshot(ARTIFACTS / "make-run-page.png")

        turns_per_replica = []
        for port in (base, base + 1):  # each replica's own metrics count only its own turns
            text = httpx.get(f"http://127.0.0.1:{port}/metrics").text
            found = re.search(r'^engram_turns_total\{outcome="ok"\} (\d+)\.0$', text, re.M)
            turns_per_replica.append(int(found.group(1)) if found else 0)
        assert sorted(turns_per_replica)[0] >= 1 and sum(turns_per_replica) == len(said)
        assert stack.process is not None and stack.process.poll() is None

    # the script exited on its own after Ctrl-C...
    assert stack.process.returncode == 130, f"still running: {stack.stuck}\n{stack.output}"
    assert stack.leftovers == []  # ...having stopped everything it started
    assert "stopped; conversations are kept in" in stack.output
    assert "killing it" not in stack.output
    for port in (lb, base, base + 1, redis_port):
        assert port_is_free(port), f"port {port} still open after Ctrl-C"

    with LocalStack({**env, "REPLICAS": "1"}, log=output) as again:
        assert demo_key in again.output
        # the demo tenant's Redis ACL user survived the restart (make run's Redis keeps an aclfile)
        with redis.Redis(port=redis_port) as admin:
            assert admin.acl_getuser("engram.demo") is not None  # the second run reuses the demo tenant and its key
        page.navigate(url + "/")  # same browser profile: same session id and key, history from Redis's AOF
        page.wait_for("document.querySelectorAll('#messages .msg').length === 8")
        send(page, "and what did I ask you?", len(said))
        last = replies(page)[-1]
        assert f'"{said[-1]}"' in last["text"]
        assert last["messages"] == str(2 * len(said))


def test_stop_is_bounded_when_a_replica_hangs_and_a_client_holds_a_keep_alive_connection(tmp_path: Path) -> None:
    ports = quiet_ports(4)
    lb, redis_port, base, _ = ports
    grace = 2
    stack = LocalStack(stack_env(tmp_path / "run", ports, replicas=2, ENGRAM_AUTH="disabled", STOP_GRACE=str(grace)))
    with stack, httpx.Client(base_url=f"http://127.0.0.1:{lb}") as client:
        assert client.post("/v1/chat", json={"session_id": "s", "message": "hi"}).status_code == 200
        assert stack.process is not None
        [hung] = [
            p
            for p in group_members(stack.process.pid)
            if "engram.server serve" in p.command and f"--port {base} " in p.command + " "
        ]
        os.kill(hung.pid, signal.SIGSTOP)  # a replica that will never act on SIGTERM
        stopping = time.monotonic()
        returncode = stack.stop(signal.SIGTERM)  # what `kill`, systemd or a CI runner sends
        took = time.monotonic() - stopping
        # the keep-alive client connection is still open here: it must not hold the stop up either

    assert returncode == 143, stack.output  # the script stopped itself (the harness kills only at 40 s)
    assert f"replica-1 (pid {hung.pid}) did not stop within {grace}s of SIGTERM: killing it" in stack.output
    assert stack.leftovers == [], stack.leftovers
    assert "stopped; conversations are kept in" in stack.output
    for port in (lb, redis_port, base, base + 1):
        assert port_is_free(port), f"port {port} still open after SIGTERM"
    print(f"run-local.sh stopped in {took:.1f} s with one replica hung (STOP_GRACE={grace})")
