"""Starting and stopping the child processes tests and benchmarks start, so that none outlives them.

A child that starts children of its own (uvicorn workers, Chromium's helpers, run-local.sh's whole
stack) is started in a session of its own (``start_new_session=True``): its process group then holds
every descendant that did not leave it, and ``stop_process`` signals the group, not only the leader.

Every process started during a test run carries ``LEAK_MARKER`` in its environment (inherited from the
pytest process), which is how ``tagged_processes`` finds the ones that outlived their test, even after
they were re-parented to PID 1.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

LEAK_MARKER = "TESTRUN_LEAK_MARKER"  # no ENGRAM_ prefix: harnesses drop inherited ENGRAM_* variables


def _signal(process: subprocess.Popen[bytes] | subprocess.Popen[str], sig: int, group: bool) -> None:
    """Signal the process's group (``group``: it leads one), else the process alone."""
    try:
        if group:
            os.killpg(process.pid, sig)
        else:
            process.send_signal(sig)
    except ProcessLookupError:
        pass


def stop_process(process: subprocess.Popen[bytes] | subprocess.Popen[str], timeout: float = 10.0) -> None:
    """SIGTERM, then SIGKILL if it has not exited within ``timeout`` seconds; always reaped. A process
    started with ``start_new_session=True`` is stopped with its whole group (its children too)."""
    # Known only while the process is not reaped yet: afterwards its pid may belong to someone else.
    leads_group = process.returncode is None and _leads_group(process.pid)
    if process.poll() is None:
        _signal(process, signal.SIGTERM, leads_group)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _signal(process, signal.SIGKILL, leads_group)
            process.wait(timeout=timeout)
    if leads_group:
        # Children left in its group. A pid is not reused while a group of that id has members, so
        # this reaches only what it started.
        kill_group(process.pid)


def _leads_group(pid: int) -> bool:
    try:
        return os.getpgid(pid) == pid
    except ProcessLookupError:
        return False


@dataclass(frozen=True)
class ProcessInfo:
    pid: int
    ppid: int
    pgid: int
    command: str

    def __str__(self) -> str:
        return f"pid {self.pid} (parent {self.ppid}, group {self.pgid}): {self.command}"


def _info(pid: int) -> ProcessInfo | None:
    """Parent, group and command line of a live (not zombie) process, from /proc."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()  # the command name in (...) may hold spaces
    state, ppid, pgid = fields[0], int(fields[1]), int(fields[2])
    if state in ("Z", "X"):
        return None
    return ProcessInfo(pid, ppid, pgid, command)


def _all_pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def group_members(pgid: int) -> list[ProcessInfo]:
    """Live processes in process group ``pgid``."""
    members = (_info(pid) for pid in _all_pids())
    return [info for info in members if info is not None and info.pgid == pgid]


def kill_group(pgid: int, timeout: float = 5.0) -> list[ProcessInfo]:
    """SIGKILL whatever is left in group ``pgid`` and wait until it is gone; returns what was left."""
    left = group_members(pgid)
    if left:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + timeout
        while group_members(pgid) and time.monotonic() < deadline:
            time.sleep(0.05)
    return left


def tagged_processes(marker_value: str, exclude: set[int] | frozenset[int] = frozenset()) -> list[ProcessInfo]:
    """Live processes whose environment has ``LEAK_MARKER=marker_value``."""
    needle = f"{LEAK_MARKER}={marker_value}".encode()
    found = []
    for pid in _all_pids():
        if pid in exclude:
            continue
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes()
        except OSError:  # gone, or not ours to read
            continue
        if needle in environ.split(b"\0"):
            info = _info(pid)
            if info is not None:
                found.append(info)
    return found
