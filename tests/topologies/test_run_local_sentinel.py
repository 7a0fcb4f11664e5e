"""``make run REDIS_MODE=sentinel``: the local stack on a primary, 2 replicas and 3 Sentinels; a killed primary
costs a short run of 503s and the conversation goes on, remembered, on the promoted replica."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import httpx
import redis

from testkit.local_stack import LocalStack, stack_env
from testkit.redis_server import port_is_free, quiet_ports
from testkit.sentinel import wait_until


def test_make_run_with_sentinels_survives_a_killed_primary(tmp_path: Path) -> None:
    ports = quiet_ports(9)
    lb, redis_port, base, sentinel_base = ports[0], ports[1], ports[4], ports[6]  # redis: 3 ports, replicas: 2
    env = stack_env(
        tmp_path / "run",
        [lb, redis_port, base],
        replicas=2,
        REDIS_MODE="sentinel",
        SENTINEL_BASE_PORT=str(sentinel_base),
        ENGRAM_AUTH="disabled",
        PYTHON=sys.executable,
    )
    stack = LocalStack(env, log=tmp_path / "run-local.out")
    with stack, httpx.Client(base_url=f"http://127.0.0.1:{lb}", timeout=10) as client:
        assert f"Sentinels 127.0.0.1:{sentinel_base}" in stack.output, stack.output

        def say(n: int) -> httpx.Response:
            body = {"session_id": "s", "message": f"message {n}", "turn_id": f"t{n}"}
            while (answer := client.post("/v1/chat", json=body)).status_code == 503:
                time.sleep(0.2)  # (a test may retry sooner than Retry-After)
            return answer

        assert say(0).status_code == 200  # acknowledged once a replica has it (sentinel mode's default)
        with redis.Redis(port=redis_port, decode_responses=True) as primary:
            # Both replicas have it too, so whichever the Sentinels promote holds the turn (with one
            # replica confirming, a failover could pick the other: docs/design.md).
            def caught_up() -> bool:
                info = primary.info("replication")
                offsets = [int(info[f"slave{i}"]["offset"]) for i in range(2)]
                return all(offset >= int(info["master_repl_offset"]) for offset in offsets)

            wait_until(caught_up, 10, "both replicas to have the turn")
            pid = int(primary.info("server")["process_id"])
        os.kill(pid, signal.SIGKILL)
        killed = time.monotonic()
        answer = wait_until(lambda: say(1), 30, "a turn after the failover")
        assert answer.status_code == 200 and '"message 0"' in answer.json()["reply"], answer.text
        print(f"make run REDIS_MODE=sentinel: a turn answered {time.monotonic() - killed:.1f} s after kill -9")
        returncode = stack.stop(signal.SIGTERM)
    assert returncode == 143, stack.output
    assert stack.leftovers == [], stack.leftovers
    for port in (lb, redis_port + 1, redis_port + 2, base, base + 1, sentinel_base, sentinel_base + 1):
        assert port_is_free(port), f"port {port} still open after SIGTERM"
