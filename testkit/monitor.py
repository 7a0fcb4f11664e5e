"""Which commands a real redis-server ran while a block of code ran (MONITOR), for tests that count them."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import redis


@contextmanager
def commands_run(port: int) -> Iterator[list[str]]:
    """The names (upper case) of the commands clients sent while the block ran, in order; the calls a Lua
    function makes itself are left out. Read when the block ends, up to a PING sent as an end marker."""
    monitor, marker = redis.Redis(port=port), redis.Redis(port=port)
    marker.ping()  # connect now, so its handshake is not seen below
    seen: list[str] = []
    try:
        with monitor.monitor() as events:
            yield seen
            marker.ping()
            for event in events.listen():
                if event["command"] == "PING":
                    break
                if event.get("client_type") != "lua":
                    seen.append(event["command"].split()[0].upper())
    finally:
        monitor.close()
        marker.close()
