"""``scripts/run-local.sh`` (what ``make run`` runs) as a child of a test or benchmark, in a process group
of its own, so that stopping it can never orphan its redis-server, replicas or HAProxy.

``stop()`` sends what Ctrl-C sends (SIGINT) to the script and waits for it to stop everything itself;
whatever is still in its group afterwards is SIGKILLed and reported in ``leftovers``, so a caller can
assert that the script cleaned up after itself.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections.abc import Mapping
from pathlib import Path

from testkit.processes import ProcessInfo, group_members, kill_group

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "run-local.sh"
READY_LINE = "Press Ctrl-C to stop everything"
# The script's own bound is STOP_GRACE (5 s) per stage, two stages; the rest is slack for a busy machine.
STOP_TIMEOUT = 40.0


def clean_env(**overrides: str) -> dict[str, str]:
    """This environment minus inherited ENGRAM_*/metrics settings, plus ``overrides``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ENGRAM_") and k != "PROMETHEUS_MULTIPROC_DIR"}
    env.update(overrides)
    return env


def _default_sigint() -> None:
    """In the child before exec: SIGINT back to its default. A test run started in the background by a
    non-interactive shell (as CI runners do) inherits SIGINT *ignored*, and bash can neither trap nor
    reset a signal ignored on entry, so the script would never see our Ctrl-C. A terminal's Ctrl-C always
    reaches a `make run` whose SIGINT is not ignored: this gives the script the same start."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def stack_env(run_dir: Path, ports: list[int], replicas: int, **extra: str) -> dict[str, str]:
    """The environment of a stack whose load balancer, Redis and first replica listen on ``ports[:3]``
    (replica i on ``ports[2] + i``), keeping its data and logs in ``run_dir``."""
    lb, redis_port, replica_base = ports[:3]
    return clean_env(
        REPLICAS=str(replicas),
        PORT=str(lb),
        REDIS_PORT=str(redis_port),
        REPLICA_BASE_PORT=str(replica_base),
        RUN_DIR=str(run_dir),
        **extra,
    )


class LocalStack:
    """One run of ``scripts/run-local.sh``; its output is kept in ``lines`` (and appended to ``log``)."""

    def __init__(self, env: Mapping[str, str], log: Path | None = None) -> None:
        self.env = dict(env)
        self.log = log
        self.process: subprocess.Popen[str] | None = None
        self.lines: list[str] = []
        self.leftovers: list[ProcessInfo] = []
        self.stuck: list[ProcessInfo] = []  # what was still running when stop() gave up waiting
        self._ready = threading.Event()
        self._drained = threading.Event()
        self._stopped = False

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def spawn(self) -> LocalStack:
        self.process = subprocess.Popen(
            ["bash", str(SCRIPT)],
            env=self.env,
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,  # its own process group: see stop()
            preexec_fn=_default_sigint,
        )
        threading.Thread(target=self._drain, daemon=True).start()
        return self

    def _drain(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        with self.process.stdout:
            for line in self.process.stdout:
                self.lines.append(line)
                if self.log is not None:
                    with self.log.open("a") as out:
                        out.write(line)
                if READY_LINE in line:
                    self._ready.set()
        self._drained.set()

    def wait_ready(self, timeout: float = 180.0) -> LocalStack:
        """Until the script prints its ready line; stops it and raises if it exits or times out first."""
        assert self.process is not None
        deadline = time.monotonic() + timeout
        while not self._ready.wait(0.2):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("run-local.sh did not become ready:\n" + "".join(self.lines[-40:]))
        return self

    def start(self, timeout: float = 180.0) -> LocalStack:
        return self.spawn().wait_ready(timeout)

    def stop(self, sig: int = signal.SIGINT, timeout: float = STOP_TIMEOUT) -> int:
        """``sig`` to the script alone (SIGINT is Ctrl-C), wait up to ``timeout`` s for it to exit, then
        SIGKILL its group. Returns the script's exit status (negative: killed by that signal)."""
        assert self.process is not None
        if self._stopped:
            return self.process.returncode
        self._stopped = True
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                # Keep what was still running and what the script said, for the failure report.
                self.stuck = group_members(self.process.pid)
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self.leftovers = kill_group(self.process.pid)
        self._drained.wait(10)
        return self.process.returncode

    def __enter__(self) -> LocalStack:
        return self.start() if self.process is None else self.wait_ready()

    def __exit__(self, *exc: object) -> None:
        self.stop()
