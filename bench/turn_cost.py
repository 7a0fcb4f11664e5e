"""Per-turn memory cost: Engram vs what users pick instead, measured interleaved in one run.

Every contender runs on the same redis-server (started here, AOF everysec), at each history length,
with all sizes and contenders interleaved turn by turn so machine noise hits them alike. A contender
whose single turn at a size takes longer than --probe-timeout (checked first in a child process, at
sizes from --probe-min-size: below, a turn takes milliseconds) is stopped there and reported as such.
Then each measured contender's Redis work per turn is counted: round trips (commands the client
sent, from MONITOR) and bytes to and from Redis (INFO stats).

    python -m bench.turn_cost                     # the full run (make bench)
    python -m bench.turn_cost --sizes 10,100 --turns 3 --json /tmp/turn_cost.json   # a smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import redis

from bench.contenders import ALL_CONTENDERS, ALTERNATIVES, Contenders, Turn
from testkit.redis_server import RedisServer

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Result:
    size: int
    contender: str
    turns: int = 0
    median_ms: float | None = None
    p99_ms: float | None = None
    round_trips: float | None = None
    bytes_to_redis: float | None = None
    bytes_from_redis: float | None = None
    window_messages: int | None = None  # Engram's: messages one load hands the model (full when < size)
    stopped: str | None = None  # why it was not measured at this size
    samples_ms: list[float] = field(default_factory=list, repr=False)


def p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]


def probe_one_turn(name: str, size: int, url: str, timeout_s: float) -> float | None:
    """Seconds one turn takes, in a child process killed at `timeout_s` (None when it was)."""
    command = [sys.executable, "-m", "bench.turn_cost", "--probe", name, str(size), url]
    try:
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout_s + 30, check=True)
    except subprocess.TimeoutExpired:
        return None
    return float(done.stdout.strip())


async def run_probe(name: str, size: int, url: str) -> None:
    turn = await Contenders(url, prefix="probe-").build(name, size)
    started = time.perf_counter()
    await turn.run(0)
    print(time.perf_counter() - started)


async def measure(
    turns: dict[tuple[int, str], Turn], count: int, budget_s: float
) -> dict[tuple[int, str], list[float]]:
    """Turn i of every contender at every size, then turn i+1, ... A contender that has spent `budget_s`
    at a size stops there (its sample is then smaller; the report says how many turns it ran)."""
    samples: dict[tuple[int, str], list[float]] = {key: [] for key in turns}
    spent = dict.fromkeys(turns, 0.0)
    for i in range(count):
        for key, turn in turns.items():
            if spent[key] > budget_s:
                continue
            started = time.perf_counter()
            await turn.run(i)
            elapsed = time.perf_counter() - started
            turn.settle()
            samples[key].append(elapsed * 1000)
            spent[key] += elapsed
    return samples


async def redis_work(turn: Turn, port: int, first_n: int, turns: int = 3) -> tuple[float, float, float]:
    """(round trips, bytes to Redis, bytes from Redis) per turn, averaged over `turns` turns."""
    admin = redis.Redis(port=port)
    admin.ping()

    def net() -> tuple[int, int]:
        stats = admin.info("stats")
        return int(stats["total_net_input_bytes"]), int(stats["total_net_output_bytes"])

    baseline_in, baseline_out = net()
    empty_in, empty_out = net()  # what the INFO call itself adds
    overhead_in, overhead_out = empty_in - baseline_in, empty_out - baseline_out
    before_in, before_out = net()
    for n in range(turns):
        await turn.run(first_n + n)
        turn.settle()
    after_in, after_out = net()
    # settle() is outside the timed turn but reaches Redis; it is an LTRIM of a few bytes at most.
    bytes_in = (after_in - before_in - overhead_in) / turns
    bytes_out = (after_out - before_out - overhead_out) / turns

    round_trips = await count_commands(turn.run, port, first_n + turns, turns)
    turn.settle()  # after the count: not counted
    return round_trips, bytes_in, bytes_out


async def monitored_commands(
    run: Callable[[int], Awaitable[None]], port: int, first_n: int, turns: int = 3
) -> list[tuple[str, str]]:
    """(client address, command name) of every command clients sent while ``run`` ran ``turns`` turns
    (MONITOR, read by a thread as they come: a long run must not pile up in the server's output buffer);
    Lua's own calls excluded."""
    admin, marker = redis.Redis(port=port, decode_responses=True), redis.Redis(port=port)
    marker.ping()
    seen: list[tuple[str, str]] = []
    with admin.monitor() as monitor:
        done = threading.Event()

        def collect() -> None:
            while True:  # a slow contender's turn can outlast a socket read timeout: keep listening
                try:
                    for event in monitor.listen():
                        if event["command"].startswith("ECHO engram-bench-end"):
                            done.set()
                            return
                        if event.get("client_type") != "lua":
                            address = f"{event['client_address']}:{event['client_port']}"
                            seen.append((address, event["command"].split()[0].upper()))
                except redis.TimeoutError:
                    continue

        reader = threading.Thread(target=collect, daemon=True)
        reader.start()
        await asyncio.sleep(0.2)  # let MONITOR attach
        for n in range(turns):
            await run(first_n + n)
        marker.echo("engram-bench-end")
        done.wait(timeout=60)
    marker.close()
    return seen


async def count_commands(run: Callable[[int], Awaitable[None]], port: int, first_n: int, turns: int = 3) -> float:
    """Commands the client sent per turn (MONITOR), Lua's own calls excluded."""
    return len(await monitored_commands(run, port, first_n, turns)) / turns


async def run(
    sizes: list[int],
    count: int,
    budget_s: float,
    probe_timeout_s: float,
    only: tuple[str, ...],
    probe_min_size: int = 1000,
) -> list[Result]:
    results: dict[tuple[int, str], Result] = {}
    with tempfile.TemporaryDirectory() as tmp:
        server = RedisServer(Path(tmp), None, "--appendfsync", "everysec").start()
        try:
            contenders = Contenders(server.url)
            turns: dict[tuple[int, str], Turn] = {}
            for size in sizes:
                for name in only:
                    results[(size, name)] = Result(size, name)
                    if name in ALTERNATIVES and size >= probe_min_size:
                        seconds = probe_one_turn(name, size, server.url, probe_timeout_s)
                        if seconds is None or seconds > probe_timeout_s:
                            results[(size, name)].stopped = f"one turn took over {probe_timeout_s:.0f} s"
                            print(f"{size:>6} {name:<13} stopped: one turn > {probe_timeout_s:.0f} s", flush=True)
                            continue
                    turns[(size, name)] = await contenders.build(name, size)
                    results[(size, name)].window_messages = turns[(size, name)].window_messages
            samples = await measure(turns, count, budget_s)
            for key, values in samples.items():
                result = results[key]
                result.turns, result.samples_ms = len(values), values
                result.median_ms, result.p99_ms = statistics.median(values), p99(values)
                result.round_trips, result.bytes_to_redis, result.bytes_from_redis = await redis_work(
                    turns[key], server.port, first_n=count + 10
                )
                print(
                    f"{key[0]:>6} {key[1]:<13} n={result.turns:<4} median {result.median_ms:10.3f} ms"
                    f"  p99 {result.p99_ms:10.3f} ms  round trips {result.round_trips:5.1f}"
                    f"  bytes {result.bytes_to_redis:9.0f} to / {result.bytes_from_redis:9.0f} from Redis",
                    flush=True,
                )
        finally:
            server.stop()
    return list(results.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10,100,1000,10000", help="history lengths (messages)")
    parser.add_argument("--turns", type=int, default=200, help="turns per contender and size")
    parser.add_argument("--budget", type=float, default=30.0, help="seconds a contender may spend per size")
    parser.add_argument("--probe-timeout", type=float, default=60.0, help="longest single turn allowed")
    parser.add_argument("--probe-min-size", type=int, default=1000, help="probe alternatives from this size")
    parser.add_argument("--only", default=",".join(ALL_CONTENDERS), help="contenders to run")
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "turn_cost.json")
    parser.add_argument("--probe", nargs=3, metavar=("NAME", "SIZE", "URL"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.probe:
        asyncio.run(run_probe(args.probe[0], int(args.probe[1]), args.probe[2]))
        return
    sizes = [int(s) for s in args.sizes.split(",")]
    only = tuple(args.only.split(","))
    results = asyncio.run(run(sizes, args.turns, args.budget, args.probe_timeout, only, args.probe_min_size))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps([asdict(r) for r in results], indent=1))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
