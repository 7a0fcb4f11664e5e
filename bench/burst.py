"""Bursts on one replica: N first turns of N new sessions sent at once to a single `engram serve` (one
worker, echo model) on a healthy redis-server, at each concurrency in turn. Every turn must succeed:
a burst above the Redis connection pool waits for a connection instead of failing (it used to answer
most of them 503). Reported: statuses, p50 and p99, and p99 against one turn sent alone (measured in
the same run, just before each burst).

    python -m bench.burst                                   # concurrency 100 and 200 (make bench)
    python -m bench.burst --concurrency 20,40 --rounds 1     # a smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from testkit.local_stack import clean_env
from testkit.processes import stop_process
from testkit.redis_server import RedisServer, free_port

ROOT = Path(__file__).resolve().parents[1]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def start_replica(redis_url: str, log: Path, max_connections: int) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    env = clean_env(
        ENGRAM_REDIS_URL=redis_url, ENGRAM_AUTH="disabled", ENGRAM_REDIS_MAX_CONNECTIONS=str(max_connections)
    )
    with log.open("ab") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "engram.server", "serve", "--port", str(port)],
            env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(url + "/readyz", timeout=1).status_code == 200:
                return process, url
        except httpx.HTTPError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            stop_process(process)
            raise RuntimeError(f"engram serve did not become ready; see {log}")
        time.sleep(0.05)


async def burst(url: str, concurrency: int, label: str) -> dict[str, Any]:
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=120.0, limits=limits) as client:

        async def turn(session: str) -> tuple[str, float]:
            started = time.perf_counter()
            try:
                response = await client.post("/v1/chat", json={"session_id": session, "message": "hello there"})
                status = str(response.status_code)
            except httpx.HTTPError as error:
                status = type(error).__name__
            return status, time.perf_counter() - started

        alone = [(await turn(f"{label}-alone-{n}"))[1] for n in range(5)]
        started = time.perf_counter()
        results = await asyncio.gather(*(turn(f"{label}-{n}") for n in range(concurrency)))
        seconds = time.perf_counter() - started
    statuses: dict[str, int] = {}
    for status, _ in results:
        statuses[status] = statuses.get(status, 0) + 1
    latencies = [s for _, s in results]
    alone_p50 = statistics.median(alone)
    p99 = percentile(latencies, 0.99)
    return {
        "concurrency": concurrency,
        "statuses": statuses,
        "errors": sum(count for status, count in statuses.items() if status != "200"),
        "seconds": round(seconds, 3),
        "p50_ms": round(statistics.median(latencies) * 1000, 1),
        "p99_ms": round(p99 * 1000, 1),
        "alone_p50_ms": round(alone_p50 * 1000, 2),
        "p99_over_alone": round(p99 / alone_p50, 1),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    levels = [int(c) for c in args.concurrency.split(",")]
    bursts: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="engram-burst-") as tmp:
        server = RedisServer(Path(tmp) / "redis").start()
        replica: subprocess.Popen[bytes] | None = None
        try:
            replica, url = start_replica(server.url, Path(tmp) / "replica.log", args.max_connections)
            for round_ in range(args.rounds):
                for level in levels:
                    result = asyncio.run(burst(url, level, f"r{round_}-c{level}"))
                    result["round"] = round_ + 1
                    bursts.append(result)
                    print(
                        f"[burst] round {round_ + 1} concurrency {level:4d}: {result['statuses']}  "
                        f"p50 {result['p50_ms']:7.1f} ms  p99 {result['p99_ms']:7.1f} ms  "
                        f"({result['p99_over_alone']}x one turn alone, {result['alone_p50_ms']} ms)",
                        flush=True,
                    )
        finally:
            if replica is not None:
                stop_process(replica)
            server.stop()
    return {
        "setup": (
            f"one `engram serve` (1 worker, echo model, ENGRAM_REDIS_MAX_CONNECTIONS={args.max_connections}) "
            f"on a local redis-server (AOF, fsync always); each burst sends N first turns of N new sessions at "
            f"once over N connections; {args.rounds} round(s); client and server share {os.cpu_count()} cores"
        ),
        "max_connections": args.max_connections,
        "bursts": bursts,
        "errors": sum(b["errors"] for b in bursts),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", default="100,200", help="burst sizes, comma separated")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-connections", type=int, default=64, help="the replica's Redis pool (the default)")
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "burst.json")
    args = parser.parse_args(argv)
    result = run(args)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1))
    print(f"[burst] {result['errors']} errors; wrote {args.json}")
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
