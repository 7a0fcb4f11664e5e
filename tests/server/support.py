"""Real service processes for the tests: ``python -m engram.server serve`` on a free port.

Each process runs in its own process group, so ``kill()`` (SIGKILL, as a crash would) also takes down
the workers of a ``--workers`` replica. Readiness is polled, never slept for.
"""

from __future__ import annotations

import dataclasses
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import httpx
import redis

from engram.policy import Policy
from engram.redis_keys import KeySpace
from engram.tenancy.provision import Credentials, TenantSpec, record_for
from testkit.redis_server import free_port

REPO = Path(__file__).resolve().parents[2]
START_TIMEOUT = 60.0  # importing llama_index takes seconds on a busy 2-core machine


def service_env(redis_url: str, **overrides: str) -> dict[str, str]:
    """The environment of a service: this one minus inherited ENGRAM_*/metrics settings, plus ours."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ENGRAM_") and k != "PROMETHEUS_MULTIPROC_DIR"}
    env.update(
        ENGRAM_REDIS_URL=redis_url,
        ENGRAM_AUTH="disabled",
        PYTHONUNBUFFERED="1",
    )
    env.update(overrides)
    return env


class ServiceProcess:
    """One ``engram serve`` (a replica), possibly with several workers."""

    def __init__(self, env: Mapping[str, str], log_path: Path, *, workers: int = 1, port: int | None = None) -> None:
        self.env = dict(env)
        self.log_path = log_path
        self.workers = workers
        self.port = port or free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def spawn(self) -> ServiceProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        args = [sys.executable, "-m", "engram.server", "serve", "--port", str(self.port)]
        args += ["--workers", str(self.workers)]
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                args, env=self.env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        return self

    def wait(self, path: str = "/healthz", timeout: float = START_TIMEOUT) -> ServiceProcess:
        """Poll ``path`` until it answers 200 (``/healthz`` does not need Redis, ``/readyz`` does)."""
        deadline = time.monotonic() + timeout
        while True:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"service exited with {self.process.returncode}:\n{self.log()}")
            try:
                if httpx.get(self.url + path, timeout=1.0).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"service not answering {path} after {timeout} s:\n{self.log()}")
            time.sleep(0.05)

    def start(self, path: str = "/readyz") -> ServiceProcess:
        return self.spawn().wait(path)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:] if self.log_path.exists() else ""

    def _signal_group(self, sig: int) -> None:
        if self.process is not None and self.process.poll() is None:
            try:
                os.killpg(self.process.pid, sig)
            except ProcessLookupError:
                pass

    def kill(self) -> None:
        """SIGKILL the whole replica (supervisor and workers)."""
        self._signal_group(signal.SIGKILL)
        if self.process is not None:
            self.process.wait(timeout=10)

    def stop(self) -> None:
        if self.process is None:
            return
        self._signal_group(signal.SIGTERM)
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.kill()
        # workers of a --workers replica may outlive the supervisor by a moment
        self._signal_group(signal.SIGKILL)


def start_all(services: Iterable[ServiceProcess], path: str = "/readyz") -> list[ServiceProcess]:
    """Spawn every service first, then wait for each: they start in parallel."""
    started = [service.spawn() for service in services]
    return [service.wait(path) for service in started]


def chat(url: str, session_id: str, message: str, **extra: Any) -> httpx.Response:
    headers = extra.pop("headers", None)
    body = {"session_id": session_id, "message": message, **extra}
    return httpx.post(url + "/v1/chat", json=body, headers=headers, timeout=15.0)


_SAMPLE = re.compile(r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>.*)\})?\s+(?P<value>\S+)$")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def scrape(url: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """``/metrics`` parsed into {(name, labels): value}."""
    response = httpx.get(url + "/metrics", timeout=5.0)
    response.raise_for_status()
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    for line in response.text.splitlines():
        if not line or line.startswith("#"):
            continue
        match = _SAMPLE.match(line)
        if match:
            labels = frozenset(_LABEL.findall(match["labels"] or ""))
            samples[(match["name"], labels)] = float(match["value"])
    return samples


def metric(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``."""
    wanted = set(labels.items())
    return sum(value for (n, lbl), value in samples.items() if n == name and wanted <= lbl)


def register_tenant(redis_url: str, tenant: str, policy: Policy | None = None, api_key: str | None = None) -> str:
    """Write a tenant's registry record as the operator or `engram tenant` would (again, with ``api_key``,
    to change its policy); return its API key."""
    credentials = Credentials.generate(tenant)
    if api_key is not None:
        credentials = dataclasses.replace(credentials, api_key=api_key)
    keys = KeySpace()
    spec = TenantSpec(tenant, policy or Policy(token_limit=500))
    record = record_for(keys, spec, credentials, owner="cli")
    with redis.Redis.from_url(redis_url, decode_responses=True) as client:
        client.hset(keys.tenant_record(tenant), mapping=record.content())
        client.sadd(keys.tenant_set(), tenant)
    return credentials.api_key


def process_group_rss(pid: int) -> int:
    """Resident bytes of every process in ``pid``'s process group (a replica and its workers)."""
    group = os.getpgid(pid)
    total = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if os.getpgid(int(entry.name)) != group:
                continue
            for line in (entry / "status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except (ProcessLookupError, FileNotFoundError, PermissionError):
            continue
    return total
