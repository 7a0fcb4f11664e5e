"""End to end: turns/s, latency and the cache split through the `make run` stack, three stacks in one run.

Each stack is `scripts/run-local.sh` itself (what `make run` runs: its own redis-server, REPLICAS
replicas with the echo model, real HAProxy in front), on free ports with a temporary RUN_DIR:

- `engram`: as `make run` runs it, HAProxy round-robin per request, no affinity;
- `stateless`: the same with ENGRAM_MEMORY=off, the stateless baseline (no history loaded or stored);
- `sticky`: Engram with HAProxy sticky per session (LB_AFFINITY=session: a hash of X-Session-Id).

All three run at once and `engram loadgen --json` drives one at a time, in rounds whose order rotates
(a,b,c then b,c,a ...), so machine noise hits them alike; every run uses new sessions. loadgen keeps its
connections alive (as SDKs and browsers do); HAProxy in http mode still balances every request, which
the split shows (turns of one conversation served by several replicas are `delta`s, not `hit`s).
Footprint: VmRSS of every worker after the rounds, and the time from starting one `engram serve` to
its first `/readyz` 200 (separate processes, one at a time, against the idle `engram` stack's Redis).

    python -m bench.end_to_end                         # the full run (make bench)
    python -m bench.end_to_end --sessions 4 --turns 3 --rounds 1 --replicas 2 --ready-samples 1   # smoke
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from testkit.local_stack import LocalStack, clean_env, stack_env
from testkit.processes import stop_process
from testkit.redis_server import quiet_ports

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class StackSpec:
    name: str
    description: str
    env: dict[str, str]


STACKS = {
    spec.name: spec
    for spec in (
        StackSpec("engram", "Engram as `make run` runs it: HAProxy round-robin per request, no affinity", {}),
        StackSpec(
            "stateless",
            "the stateless baseline: the same stack with `ENGRAM_MEMORY=off` (nothing loaded or stored)",
            {"ENGRAM_MEMORY": "off"},
        ),
        StackSpec(
            "sticky",
            "Engram with HAProxy sticky per session (`LB_AFFINITY=session`: a hash of `X-Session-Id`)",
            {"LB_AFFINITY": "session"},
        ),
    )
}


class Stack:
    """One `scripts/run-local.sh` (redis-server + replicas + HAProxy) in its own process group; stopped
    with SIGINT, as Ctrl-C, and nothing it started can outlive it (testkit.local_stack)."""

    def __init__(self, spec: StackSpec, ports: list[int], run_dir: Path, replicas: int, workers: int) -> None:
        self.spec = spec
        self.port, self.redis_port, self.replica_base = ports[0], ports[1], ports[2]
        self.local = LocalStack(
            stack_env(
                run_dir,
                ports,
                replicas,
                WORKERS=str(workers),
                PYTHON=sys.executable,
                ENGRAM_AUTH="disabled",  # the same for every stack: the benchmark measures memory, not API keys
                **spec.env,
            )
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def redis_url(self) -> str:
        return f"redis://127.0.0.1:{self.redis_port}/0"

    def spawn(self) -> Stack:
        self.local.spawn()
        return self

    def wait_ready(self, timeout: float = 240.0) -> Stack:
        try:
            self.local.wait_ready(timeout)
        except RuntimeError as error:
            raise RuntimeError(f"stack {self.spec.name}: {error}") from None
        return self

    def stop(self) -> None:
        if self.local.process is not None:
            self.local.stop()


def loadgen(url: str, sessions: int, turns: int, concurrency: int, keepalive: bool) -> dict[str, Any]:
    """One `engram loadgen --json` run. Its exit status is ignored: the stateless stack fails its recall
    check by design; the caller checks errors and recall itself."""
    command = [sys.executable, "-m", "engram.server", "loadgen", "--url", url, "--json"]
    command += ["--sessions", str(sessions), "--turns", str(turns), "--concurrency", str(concurrency)]
    if not keepalive:
        command.append("--no-keepalive")
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600, env=clean_env())
    lines = done.stdout.strip().splitlines()
    if not lines:
        raise RuntimeError(f"engram loadgen printed nothing (exit {done.returncode}):\n{done.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(lines[-1])
    return result


def vm_rss_mib(pid: int) -> float | None:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return None


def time_to_ready(redis_url: str, log: Path, timeout: float = 120.0) -> float:
    """Seconds from starting one `engram serve` to its first /readyz 200 (polled every 10 ms)."""
    port = quiet_ports(1)[0]
    command = [sys.executable, "-m", "engram.server", "serve", "--port", str(port)]
    env = clean_env(ENGRAM_REDIS_URL=redis_url, ENGRAM_AUTH="disabled")
    with log.open("ab") as out:
        started = time.perf_counter()
        process = subprocess.Popen(
            command, env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        with httpx.Client(timeout=1.0) as client:
            while True:
                try:
                    if client.get(f"http://127.0.0.1:{port}/readyz").status_code == 200:
                        return time.perf_counter() - started
                except httpx.HTTPError:
                    pass
                if process.poll() is not None or time.perf_counter() - started > timeout:
                    raise RuntimeError(f"engram serve did not become ready; see {log}")
                time.sleep(0.01)
    finally:
        stop_process(process, timeout=15)


@dataclass
class StackRuns:
    spec: StackSpec
    rounds: list[dict[str, Any]] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        turns = sum(r["turns"] for r in self.rounds)
        seconds = sum(r["seconds"] for r in self.rounds)
        outcomes: dict[str, int] = {}
        replicas: dict[str, int] = {}
        for r in self.rounds:
            for key, value in r["cache"].items():
                outcomes[key] = outcomes.get(key, 0) + value
            for key, value in r["replicas"].items():
                replicas[key] = replicas.get(key, 0) + value
        return {
            "name": self.spec.name,
            "description": self.spec.description,
            "turns": turns,
            "errors": sum(r["errors"] for r in self.rounds),
            "seconds": round(seconds, 3),
            "turns_per_s": turns / seconds if seconds else 0.0,
            "p50_ms": statistics.median(r["p50_ms"] for r in self.rounds),
            "p99_ms": statistics.median(r["p99_ms"] for r in self.rounds),
            "outcomes": outcomes,
            "replicas": replicas,
            "follow_ups": sum(r["follow_ups"] for r in self.rounds),
            "recall_failures": sum(r["recall_failures"] for r in self.rounds),
            "rounds": [
                {k: r[k] for k in ("turns", "errors", "seconds", "turns_per_second", "p50_ms", "p99_ms")}
                for r in self.rounds
            ],
        }


def problems_of(runs: dict[str, dict[str, Any]], replicas: int) -> list[str]:
    """What makes the run invalid (failed turns, lost memory, memory not off, a replica unused)."""
    problems = []
    for name, run in runs.items():
        if run["errors"]:
            problems.append(f"{name}: {run['errors']} turns failed")
        if name == "stateless":
            if run["recall_failures"] != run["follow_ups"] or run["outcomes"].get("off", 0) != run["turns"]:
                problems.append(f"{name}: memory was not off ({run['outcomes']})")
        elif run["recall_failures"]:
            problems.append(f"{name}: {run['recall_failures']} follow-up turns did not see the previous turn")
        if len(run["replicas"]) < replicas:
            problems.append(f"{name}: only {len(run['replicas'])} of {replicas} workers answered")
    return problems


def plural(count: int, word: str) -> str:
    return f"{count} {word}" if count == 1 else f"{count} {word}s"


def describe_setup(args: argparse.Namespace, haproxy: str, load: tuple[float, float, float]) -> str:
    stacks = len(args.stacks.split(","))
    return (
        f"Each stack is `scripts/run-local.sh` (what `make run` runs): its own redis-server (AOF everysec), "
        f"{plural(args.replicas, 'replica')} × {plural(args.workers, 'uvicorn worker')}, echo model, {haproxy} in "
        f"front; all {stacks} stacks up at once. `engram loadgen --json` drives one stack at a time: "
        f"{plural(args.sessions, 'conversation')} × {plural(args.turns, 'turn')} ({args.sessions * args.turns} "
        f"turns), {args.concurrency} at once, new sessions every run; {plural(args.rounds, 'round')} per stack, "
        "the order rotating each round. Connections are "
        + (
            "kept alive (as SDKs and browsers do; HAProxy in http mode still balances every request: see the split)"
            if not args.no_keepalive
            else "opened anew for every request"
        )
        + f". loadgen, HAProxy, Redis and the replicas share this machine's {os.cpu_count()} cores. turns/s = "
        f"all turns / all seconds of a stack's rounds; p50 and p99 = the median over rounds. "
        f"Load average before the run: {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f} (1 / 5 / 15 min)."
    )


def run(args: argparse.Namespace) -> dict[str, Any]:
    names = args.stacks.split(",")
    unknown = set(names) - set(STACKS)
    if unknown:
        raise SystemExit(f"unknown stacks {sorted(unknown)}; choose from {sorted(STACKS)}")
    haproxy = subprocess.run(["bash", "-c", "haproxy -v 2>/dev/null || /usr/sbin/haproxy -v"], capture_output=True)
    haproxy_version = "HAProxy " + (haproxy.stdout.decode().split()[2:3] or ["?"])[0]
    load_before = os.getloadavg()
    per_stack = args.replicas + 2
    ports = quiet_ports(per_stack * len(names))
    results = {name: StackRuns(STACKS[name]) for name in names}
    stacks: dict[str, Stack] = {}
    with tempfile.TemporaryDirectory(prefix="engram-e2e-") as tmp:
        try:
            for i, name in enumerate(names):  # all start at once (their start-up is not what is measured)
                block = ports[i * per_stack : (i + 1) * per_stack]
                stacks[name] = Stack(STACKS[name], block, Path(tmp) / name, args.replicas, args.workers).spawn()
            for name, stack in stacks.items():
                stack.wait_ready()
                print(f"[e2e] {name:<9} up at {stack.url}", flush=True)
            keepalive = not args.no_keepalive
            for stack in stacks.values():  # warm-up (not counted): imports, tokenizer, connections
                loadgen(stack.url, args.replicas * 2, 3, args.concurrency, keepalive)
            for round_ in range(args.rounds):
                order = names[round_ % len(names) :] + names[: round_ % len(names)]
                for name in order:
                    time.sleep(args.pause)
                    result = loadgen(stacks[name].url, args.sessions, args.turns, args.concurrency, keepalive)
                    results[name].rounds.append(result)
                    print(
                        f"[e2e] round {round_ + 1} {name:<9} {result['turns_per_second']:7.1f} turns/s  "
                        f"p50 {result['p50_ms']:6.1f} ms  p99 {result['p99_ms']:6.1f} ms  "
                        f"errors {result['errors']}  cache {result['cache']}",
                        flush=True,
                    )
            load_after = os.getloadavg()
            rss = {
                name: {
                    served_by: vm_rss_mib(int(served_by.rsplit(":", 1)[1]))
                    for served_by in results[name].summary()["replicas"]
                }
                for name in names
            }
            ready_samples: list[float] = []
            reference = stacks.get("engram") or next(iter(stacks.values()))
            for _ in range(args.ready_samples):
                ready_samples.append(time_to_ready(reference.redis_url, Path(tmp) / "ready.log"))
                print(f"[e2e] engram serve: /readyz OK {ready_samples[-1]:.2f} s after start", flush=True)
        finally:
            for stack in stacks.values():
                stack.stop()

    runs = {name: results[name].summary() for name in names}
    by_name = {name: run["turns_per_s"] for name, run in runs.items()}
    out: dict[str, Any] = {
        "setup": describe_setup(args, haproxy_version, load_before),
        "parameters": {k: v for k, v in vars(args).items() if k != "json"},
        "cores": os.cpu_count(),
        "load_before": load_before,
        "load_after": load_after,
        "runs": list(runs.values()),
        "throughput_ratio": None,
        "sticky_ratio": None,
        "round_ratios": [],
        "footprint": {
            "rss_mib": {name: {k: round(v, 1) for k, v in per.items() if v is not None} for name, per in rss.items()},
            "ready_s": statistics.median(ready_samples) if ready_samples else None,
            "ready_samples_s": [round(s, 3) for s in ready_samples],
        },
        "problems": problems_of(runs, args.replicas * args.workers),
    }
    if by_name.get("stateless"):
        if "engram" in by_name:
            out["throughput_ratio"] = by_name["engram"] / by_name["stateless"]
            out["round_ratios"] = [
                a["turns_per_second"] / b["turns_per_second"]
                for a, b in zip(results["engram"].rounds, results["stateless"].rounds, strict=True)
                if b["turns_per_second"]
            ]
        if "sticky" in by_name:
            out["sticky_ratio"] = by_name["sticky"] / by_name["stateless"]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stacks", default="engram,stateless,sticky", help="stacks to run, in this order")
    parser.add_argument("--replicas", type=int, default=3, help="replicas per stack (make run's default: 3)")
    parser.add_argument("--workers", type=int, default=1, help="uvicorn workers per replica")
    parser.add_argument("--sessions", type=int, default=16, help="conversations per loadgen run")
    parser.add_argument("--turns", type=int, default=20, help="turns per conversation")
    parser.add_argument("--concurrency", type=int, default=8, help="conversations at once")
    parser.add_argument("--rounds", type=int, default=5, help="loadgen runs per stack (interleaved)")
    parser.add_argument("--pause", type=float, default=1.0, help="seconds of quiet before each loadgen run")
    parser.add_argument("--no-keepalive", action="store_true", help="loadgen opens a connection per request")
    parser.add_argument("--ready-samples", type=int, default=3, help="engram serve start-ups timed to /readyz")
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "end_to_end.json")
    args = parser.parse_args(argv)
    result = run(args)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1))
    for line in result["problems"]:
        print(f"[e2e] PROBLEM: {line}", file=sys.stderr)
    ratio = result["throughput_ratio"]
    print(f"[e2e] engram / stateless throughput: {ratio:.2f}×" if ratio else "[e2e] no throughput ratio")
    print(f"wrote {args.json}")
    return 1 if result["problems"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
