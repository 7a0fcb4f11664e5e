"""Real processes for the reliability scenarios: redis-server, N ``engram serve`` replicas and HAProxy
(rendered from ``deploy/local/haproxy.cfg.template``, the config ``make run`` uses: round-robin, no
affinity), a load driver whose clients retry with the same ``turn_id``, and the checks that read
Redis directly (XRANGE on each session's log) to count lost, duplicated and interleaved turns.

Every scenario records its figures with :func:`record`; ``python -m tests.reliability.report`` turns
them into the table of ``docs/reliability.md``.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import statistics
import subprocess
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import redis

from engram.redis_keys import KeySpace
from testkit.processes import stop_process
from testkit.redis_server import RedisServer, free_port
from tests.server.support import REPO, ServiceProcess, service_env, start_all

TENANT = "default"  # ENGRAM_AUTH=disabled serves everything as this tenant
RESULTS = REPO / "tests" / "artifacts" / "reliability"
TEMPLATE = REPO / "deploy" / "local" / "haproxy.cfg.template"
KEYS = KeySpace()


# --- processes ----------------------------------------------------------------------------------------
def haproxy_binary() -> str | None:
    found = shutil.which("haproxy")
    if found is None and os.access("/usr/sbin/haproxy", os.X_OK):
        found = "/usr/sbin/haproxy"
    return found


class HAProxy:
    """HAProxy in front of ``backends``, from the template ``make run`` renders (round-robin, no affinity)."""

    def __init__(self, backends: Sequence[int], run_dir: Path) -> None:
        binary = haproxy_binary()
        if binary is None:
            raise RuntimeError("haproxy is not installed: run `make install`")
        self.binary = binary
        self.port = free_port()
        self.run_dir = run_dir
        servers = "".join(f"    server replica-{i} 127.0.0.1:{p} check\n" for i, p in enumerate(backends, 1))
        text = TEMPLATE.read_text()
        text = text.replace("{{BIND}}", "127.0.0.1").replace("{{PORT}}", str(self.port))
        text = text.replace("{{BALANCE}}", "balance roundrobin").replace("{{SERVERS}}\n", servers)
        run_dir.mkdir(parents=True, exist_ok=True)
        self.config = run_dir / "haproxy.cfg"
        self.config.write_text(text)
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 15.0) -> HAProxy:
        with (self.run_dir / "haproxy.log").open("ab") as log:
            self.process = subprocess.Popen(
                [self.binary, "-db", "-f", str(self.config)], stdout=log, stderr=subprocess.STDOUT
            )
        poll_until(lambda: _answers(self.url + "/healthz"), timeout, "haproxy /healthz")
        return self

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process)


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1.0).status_code == 200
    except httpx.HTTPError:
        return False


def poll_until(condition: Callable[[], bool], timeout: float, what: str, interval: float = 0.05) -> float:
    """Poll ``condition`` until true; return the seconds it took. Raises after ``timeout``."""
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"{what}: not true after {timeout} s")
        time.sleep(interval)
    return time.monotonic() - started


def holds_for(condition: Callable[[], bool], seconds: float, interval: float = 0.05) -> bool:
    """True if ``condition`` stays true, polled, for ``seconds`` (for "nothing appears" checks)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not condition():
            return False
        time.sleep(interval)
    return condition()


@dataclass
class Stack:
    """redis-server + replicas + HAProxy, all real processes on loopback."""

    redis: RedisServer
    replicas: list[ServiceProcess]
    lb: HAProxy

    @property
    def url(self) -> str:
        return self.lb.url

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.redis.port, decode_responses=True, socket_timeout=5)

    def stop(self) -> None:
        self.lb.stop()
        for replica in self.replicas:
            replica.stop()
        self.redis.stop()


def start_stack(tmp_path: Path, *, replicas: int = 3, redis_args: Sequence[str] = (), **env: str) -> Stack:
    server = RedisServer(tmp_path / "redis", None, *redis_args).start()
    services = [
        ServiceProcess(service_env(server.url, **env), tmp_path / f"replica-{i}.log") for i in range(1, replicas + 1)
    ]
    try:
        start_all(services)
        lb = HAProxy([s.port for s in services], tmp_path / "haproxy").start()
    except BaseException:
        for service in services:
            service.stop()
        server.stop()
        raise
    return Stack(server, services, lb)


def rss_kib(pid: int) -> int:
    """Resident set size of ``pid`` (VmRSS in /proc/PID/status), KiB."""
    status = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE)
    assert match, status
    return int(match[1])


# --- load with retries ----------------------------------------------------------------------------------
RETRYABLE = {502, 503, 504}


@dataclass
class LoadResult:
    """What the clients saw. ``acked`` maps (session, turn_id) to the time the 200 arrived."""

    acked: dict[tuple[str, str], float] = field(default_factory=dict)
    failed: list[tuple[str, str, str]] = field(default_factory=list)  # turns given up on, with the last error
    attempts: int = 0
    retries: int = 0
    errors: dict[str, int] = field(default_factory=dict)  # status (or exception name) -> count
    latencies: list[tuple[float, float]] = field(default_factory=list)  # (start time, seconds) of 200s
    served_by: dict[str, int] = field(default_factory=dict)
    error_latencies: list[float] = field(default_factory=list)  # seconds to each 503 answer
    non_json_errors: int = 0

    def note_error(self, key: str) -> None:
        self.errors[key] = self.errors.get(key, 0) + 1

    @property
    def turns_per_second(self) -> float:
        if not self.latencies:
            return 0.0
        first = min(start for start, _ in self.latencies)
        last = max(start + seconds for start, seconds in self.latencies)
        return len(self.latencies) / max(last - first, 1e-9)


def turn_id(session: str, index: int) -> str:
    return f"{session}.t{index:04d}"


def message_for(session: str, index: int) -> str:
    return f"message {index} of {session}"


async def send_turn(
    client: httpx.AsyncClient,
    url: str,
    session: str,
    tid: str,
    message: str,
    result: LoadResult,
    *,
    give_up_after: float = 30.0,
    stop: asyncio.Event | None = None,
) -> dict[str, Any] | None:
    """POST one turn; on a connection error or a 502/503/504, retry with the same ``turn_id`` until it
    is acknowledged or ``give_up_after`` seconds pass (or ``stop`` is set); 0 means a single attempt.
    Returns the 200's body, or None when it gave up."""
    deadline = time.monotonic() + give_up_after
    last = ""
    first_attempt = True
    while first_attempt or (time.monotonic() < deadline and not (stop is not None and stop.is_set())):
        if not first_attempt:
            result.retries += 1
        first_attempt = False
        result.attempts += 1
        started = time.monotonic()
        try:
            response = await client.post(
                url + "/v1/chat", json={"session_id": session, "message": message, "turn_id": tid}
            )
        except httpx.HTTPError as error:
            last = type(error).__name__
            result.note_error(last)
            await asyncio.sleep(0.05)
            continue
        elapsed = time.monotonic() - started
        if response.status_code == 200:
            body: dict[str, Any] = response.json()
            result.acked[(session, tid)] = time.monotonic()
            result.latencies.append((started, elapsed))
            result.served_by[body["served_by"]] = result.served_by.get(body["served_by"], 0) + 1
            return body
        last = str(response.status_code)
        result.note_error(last)
        if response.status_code == 503:
            result.error_latencies.append(elapsed)
        if not response.headers.get("content-type", "").startswith("application/json"):
            result.non_json_errors += 1
        if response.status_code not in RETRYABLE:
            break
        await asyncio.sleep(0.05)
    result.failed.append((session, tid, last))
    return None


async def run_sessions(
    url: str | Sequence[str],
    sessions: Sequence[str],
    turns: int,
    concurrency: int,
    result: LoadResult,
    *,
    give_up_after: float = 30.0,
    on_turn: Callable[[int], None] | None = None,
) -> LoadResult:
    """Each session sends ``turns`` turns in order (turn k after turn k-1 was acknowledged); at most
    ``concurrency`` sessions run at once. ``url`` may be a list: turns then rotate over it."""
    urls = [url] if isinstance(url, str) else list(url)
    queue: asyncio.Queue[str] = asyncio.Queue()
    for session in sessions:
        queue.put_nowait(session)
    done = 0
    limits = httpx.Limits(max_connections=concurrency * 2, max_keepalive_connections=concurrency)

    async with httpx.AsyncClient(timeout=10.0, limits=limits) as client:

        async def worker() -> None:
            nonlocal done
            while True:
                try:
                    session = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                for index in range(turns):
                    target = urls[(done + index) % len(urls)]
                    body = await send_turn(
                        client, target, session, turn_id(session, index), message_for(session, index), result,
                        give_up_after=give_up_after,
                    )  # fmt: skip
                    if body is None:
                        break  # the session stops at its first lost turn: later ones would not be "in order"
                    done += 1
                    if on_turn is not None:
                        on_turn(done)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return result


# --- what Redis holds -------------------------------------------------------------------------------------
@dataclass
class Audit:
    """Turns as Redis stores them, compared with what the clients sent and were told."""

    sessions: int = 0
    stored_turns: int = 0
    lost: int = 0  # acknowledged but not stored
    duplicated: int = 0  # one turn_id stored more than once
    interleaved: int = 0  # a user message not immediately followed by its own reply (or a lone message)
    out_of_order: int = 0  # a session whose turns are not stored in the order they were sent
    unexpected: int = 0  # stored content that is not what was sent
    problems: list[str] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return not (self.lost or self.duplicated or self.interleaved or self.out_of_order or self.unexpected)


def session_log(client: redis.Redis, session: str) -> list[tuple[str, dict[str, str]]]:
    entries: Any = client.xrange(KEYS.session(TENANT, session).log)
    return list(entries)


def stored_pairs(entries: Iterable[tuple[str, dict[str, str]]], audit: Audit, session: str) -> list[tuple[str, str]]:
    """(turn_id, user content) of each stored turn, in log order; counts interleaving on the way."""
    pairs: list[tuple[str, str]] = []
    items = list(entries)
    index = 0
    while index < len(items):
        _, user = items[index]
        following = items[index + 1][1] if index + 1 < len(items) else None
        if (
            user.get("role") != "user"
            or following is None
            or following.get("role") != "assistant"
            or following.get("turn") != user.get("turn")
        ):
            audit.interleaved += 1
            audit.problems.append(f"{session}: entry {index} {user.get('role')}/{user.get('turn')} not paired")
            index += 1
            continue
        pairs.append((user.get("turn", ""), user.get("content", "")))
        index += 2
    return pairs


def audit_sessions(
    client: redis.Redis,
    sessions: Sequence[str],
    turns: int,
    acked: Iterable[tuple[str, str]],
    *,
    ordered: bool = True,
) -> Audit:
    """Check that each session holds its turns (those sent, as ``turn_id``/``message_for``) exactly once,
    each pair adjacent, in the order sent; every acknowledged turn must be there."""
    audit = Audit(sessions=len(sessions))
    acknowledged = set(acked)
    for session in sessions:
        pairs = stored_pairs(session_log(client, session), audit, session)
        audit.stored_turns += len(pairs)
        ids = [tid for tid, _ in pairs]
        seen: set[str] = set()
        for tid, content in pairs:
            if tid in seen:
                audit.duplicated += 1
                audit.problems.append(f"{session}: {tid} stored twice")
            seen.add(tid)
            index = int(tid.rsplit(".t", 1)[1]) if ".t" in tid else -1
            if content != message_for(session, index):
                audit.unexpected += 1
                audit.problems.append(f"{session}: {tid} holds {content[:40]!r}")
        if ordered and ids != sorted(ids):
            audit.out_of_order += 1
            audit.problems.append(f"{session}: out of order {ids}")
        if ordered and ids and ids != [turn_id(session, i) for i in range(len(ids))]:
            audit.problems.append(f"{session}: a gap among {ids}")
            audit.out_of_order += 1
        for index in range(turns):
            tid = turn_id(session, index)
            if (session, tid) in acknowledged and tid not in seen:
                audit.lost += 1
                audit.problems.append(f"{session}: acknowledged {tid} missing")
    return audit


def p50(values: Sequence[float]) -> float:
    return statistics.median(values) if values else 0.0


def percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# --- figures for docs/reliability.md -----------------------------------------------------------------------
def record(scenario: str, **figures: Any) -> None:
    """Keep this run's figures of ``scenario`` (tests/artifacts/reliability/<scenario>.json)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    figures["recorded_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    path = RESULTS / f"{scenario}.json"
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(figures, indent=2, sort_keys=True, default=str))
    temporary.replace(path)
