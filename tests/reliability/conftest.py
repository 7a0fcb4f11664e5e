"""Fixtures of the reliability scenarios: real redis-server, replicas and HAProxy (see support.py)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.reliability.support import Stack, haproxy_binary, start_stack
from tests.server.conftest import make_service

__all__ = ["make_service"]  # the service tests' fixture: service processes stopped at the end

MakeStack = Callable[..., Stack]


@pytest.fixture
def make_stack(tmp_path: Path) -> Iterator[MakeStack]:
    """Start stacks (redis + replicas + HAProxy); every one is stopped at the end of the test."""
    if haproxy_binary() is None:
        pytest.skip("haproxy is not installed (make install installs it)")
    made: list[Stack] = []

    def make(**kwargs: Any) -> Stack:
        stack = start_stack(tmp_path / f"stack-{len(made)}", **kwargs)
        made.append(stack)
        return stack

    yield make
    for stack in made:
        stack.stop()
