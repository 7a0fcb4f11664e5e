"""``engram loadgen`` against a real service: it drives conversations, checks every reply's memory and
reports throughput, latency and the cache split; it fails loudly when turns fail or forget."""

from __future__ import annotations

import json
import subprocess
import sys

from engram.server.loadgen import LoadReport, percentile, saw_previous
from testkit.redis_server import free_port
from tests.server.support import REPO, ServiceProcess


def loadgen(*args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "engram.server", "loadgen", *args]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=60)


def test_loadgen_drives_conversations_and_reports_recall_latency_and_cache_split(service: ServiceProcess) -> None:
    run = loadgen("--url", service.url, "--sessions", "4", "--turns", "5", "--concurrency", "2")
    assert run.returncode == 0, run.stdout + run.stderr
    out = run.stdout
    assert "turns      20 ok, 0 errors" in out
    assert "turns/s" in out and "p50" in out and "p99" in out
    assert "history    hit" in out and "delta" in out and "miss" in out
    assert "recall     all 16 follow-up turns saw the previous turn" in out
    assert out.rstrip().endswith("result     PASS")

    as_json = json.loads(loadgen("--url", service.url, "--sessions", "2", "--turns", "3", "--json").stdout)
    assert as_json["turns"] == 6 and as_json["errors"] == 0 and as_json["recall_failures"] == 0
    assert sum(as_json["cache"].values()) == 6


def test_loadgen_fails_and_counts_errors_when_nothing_answers() -> None:
    run = loadgen("--url", f"http://127.0.0.1:{free_port()}", "--sessions", "2", "--turns", "2")
    assert run.returncode == 1
    assert "0 ok, 4 errors" in run.stdout and "ConnectError x4" in run.stdout
    assert "result     FAIL" in run.stdout


def test_recall_check_needs_the_previous_turn_and_for_the_echo_model_its_exact_words() -> None:
    assert saw_previous('You said before: "hello there". I was given 2 earlier messages.', 2, "hello there")
    assert not saw_previous('You said before: "hello". I was given 2 earlier messages.', 2, "hello there")
    assert not saw_previous("This is the start of our conversation. I was given 0 earlier messages.", 0, "hi")
    assert saw_previous("Sure, as you said, hi.", 4, "hi")  # any other model: it was given the turn
    assert not saw_previous("Sure.", 1, "hi")


def test_report_fails_on_any_recall_failure_and_percentiles_use_nearest_rank() -> None:
    report = LoadReport(url="u", sessions=1, turns_per_session=2, concurrency=1, latencies=[0.1, 0.2])
    assert report.passed
    report.recall_failures.append("s turn 1 forgot")
    assert not report.passed and "did NOT see the previous turn" in report.format()
    values = [i / 100 for i in range(1, 101)]
    assert (percentile(values, 0.5), percentile(values, 0.99), percentile([], 0.5)) == (0.5, 0.99, 0.0)
