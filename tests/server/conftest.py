"""Fixtures of the service tests: real redis-server and real ``engram serve`` processes on free ports."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from testkit.redis_server import RedisServer
from tests.server.browser import Chromium, Page, find_chromium
from tests.server.support import ServiceProcess, service_env

MakeService = Callable[..., ServiceProcess]


@pytest.fixture
def make_service(tmp_path: Path) -> Iterator[MakeService]:
    """Build service processes (not started); all are stopped at the end of the test."""
    made: list[ServiceProcess] = []

    def make(redis_url: str, *, workers: int = 1, **env: str) -> ServiceProcess:
        service = ServiceProcess(service_env(redis_url, **env), tmp_path / f"service-{len(made)}.log", workers=workers)
        made.append(service)
        return service

    yield make
    for service in made:
        service.stop()


@pytest.fixture(scope="session")
def module_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def service(module_redis: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    """One echo-model service with auth disabled, shared by the service tests (they use distinct sessions).
    Its token limit leaves room for a message at the byte limit (32 KiB is up to ~8,000 tokens)."""
    env = service_env(module_redis.url, ENGRAM_TOKEN_LIMIT="20000")
    process = ServiceProcess(env, tmp_path_factory.mktemp("service") / "service.log")
    process.start()
    yield process
    process.stop()


@pytest.fixture
def page(tmp_path: Path) -> Iterator[Page]:
    """A tab of a real headless Chromium with its own profile."""
    binary = find_chromium()
    if binary is None:
        pytest.skip("chromium is not installed and could not be installed with apt-get (needs root)")
    browser = Chromium(binary, tmp_path / "profile")
    try:
        with browser.page() as tab:
            yield tab
    finally:
        browser.close()
