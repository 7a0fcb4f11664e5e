"""``make run``'s script: redis-server, two replicas and HAProxy round-robin, driven through the load
balancer by headless Chromium; Ctrl-C stops everything, and a second run finds the first's conversation."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from tests.service.browser import Page
from tests.service.support import REPO
from tests.service.test_web_page import ARTIFACTS, replies, send
from tests.support.redis_server import port_is_free, quiet_ports

SCRIPT = REPO / "scripts" / "run-local.sh"


@contextmanager
def local_stack(env: dict[str, str], output: Path) -> Iterator[subprocess.Popen[str]]:
    with output.open("a") as log:
        process = subprocess.Popen(
            ["bash", str(SCRIPT)], env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        assert process.stdout is not None
        lines: list[str] = []
        deadline = time.monotonic() + 120
        try:
            for line in process.stdout:
                log.write(line)
                lines.append(line)
                if "ready. Press Ctrl-C" in line:
                    log.flush()
                    break
                if time.monotonic() > deadline:
                    break
            else:
                raise AssertionError("run-local.sh exited early:\n" + "".join(lines))
            yield process
        finally:
            if process.poll() is None:
                process.send_signal(signal.SIGINT)  # what Ctrl-C sends
                try:
                    rest, _ = process.communicate(timeout=30)
                except subprocess.TimeoutExpired:
                    process.kill()
                    rest, _ = process.communicate()
                log.write(rest)
                log.flush()


def test_make_run_stack_rotates_replicas_stops_on_ctrl_c_and_remembers_across_runs(tmp_path: Path, page: Page) -> None:
    lb, redis_port, base, _ = quiet_ports(4)  # the last two: replicas base and base + 1
    env = {k: v for k, v in os.environ.items() if not k.startswith("ENGRAM_") and k != "PROMETHEUS_MULTIPROC_DIR"}
    env.update(
        REPLICAS="2",
        PORT=str(lb),
        REPLICA_BASE_PORT=str(base),
        REDIS_PORT=str(redis_port),
        RUN_DIR=str(tmp_path / "run"),
    )
    url = f"http://127.0.0.1:{lb}"
    output = tmp_path / "run-local.out"

    with local_stack(env, output) as stack:
        printed = output.read_text()
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
        assert stack.poll() is None

    assert stack.returncode == 130
    assert "stopped; conversations are kept in" in output.read_text()
    for port in (lb, base, base + 1, redis_port):
        assert port_is_free(port), f"port {port} still open after Ctrl-C"

    with local_stack({**env, "REPLICAS": "1"}, output):
        assert demo_key in output.read_text()  # the second run reuses the demo tenant and its key
        page.navigate(url + "/")  # same browser profile: same session id and key, history from Redis's AOF
        page.wait_for("document.querySelectorAll('#messages .msg').length === 8")
        send(page, "and what did I ask you?", len(said))
        last = replies(page)[-1]
        assert f'"{said[-1]}"' in last["text"]
        assert last["messages"] == str(2 * len(said))
