"""The end-of-run check in tests/conftest.py: a process a test started that outlived it is found, even
after it was re-parented (its parent gone), and `stop_process` stops a child's whole process group."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from testkit.processes import LEAK_MARKER, group_members, stop_process, tagged_processes
from tests.conftest import kill_leftovers


def orphan() -> int:
    """A `sleep` whose parent shell has already exited (as a child of a SIGKILLed script would be)."""
    shell = subprocess.run(
        ["bash", "-c", "sleep 300 >/dev/null 2>&1 & echo $!"], capture_output=True, text=True, check=True
    )
    return int(shell.stdout)


def test_a_process_that_outlived_its_parent_is_found_by_the_run_marker() -> None:
    pid = orphan()
    try:
        [found] = [p for p in tagged_processes(os.environ[LEAK_MARKER]) if p.pid == pid]
        assert found.ppid != os.getpid() and "sleep 300" in found.command  # re-parented, still ours
    finally:
        os.kill(pid, 9)


def test_the_end_of_run_check_reports_and_kills_what_is_left(monkeypatch: pytest.MonkeyPatch) -> None:
    # A marker of its own: the run's own marker is also on processes other tests still use.
    monkeypatch.setenv(LEAK_MARKER, f"leftover-check-{os.getpid()}")
    pid = orphan()
    monkeypatch.setattr("tests.conftest.LEFTOVER_GRACE", 0.5)
    assert pid in [p.pid for p in kill_leftovers()]  # what pytest_sessionfinish reports, failing the run
    deadline = time.monotonic() + 5
    while any(p.pid == pid for p in tagged_processes(os.environ[LEAK_MARKER])) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert all(p.pid != pid for p in tagged_processes(os.environ[LEAK_MARKER]))


def test_stop_process_stops_the_children_of_a_process_group_leader() -> None:
    script = "import subprocess, time; subprocess.Popen(['sleep', '300']); time.sleep(300)"
    parent = subprocess.Popen([sys.executable, "-c", script], start_new_session=True)
    deadline = time.monotonic() + 10
    while len(group_members(parent.pid)) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(group_members(parent.pid)) == 2
    stop_process(parent, timeout=5)
    assert group_members(parent.pid) == []
