"""A separate OS process using the store, as another replica would: `python -m tests.history.worker ...`."""

from __future__ import annotations

import asyncio
import json
import sys

from tests.history.conftest import make_store


async def main(command: str, url: str, *args: str) -> None:
    store = make_store(url)
    try:
        if command == "commit":  # commit one turn, print nothing
            session, turn_id, user, reply = args
            await store.commit_turn("acme", session, turn_id, user, reply)
        elif command == "load":  # print the window as JSON
            window = await store.load_window("acme", args[0], int(args[1]))
            print(json.dumps({"outcome": window.outcome, "contents": [m.content for m in window.messages]}))
        elif command == "hammer":  # many turns on one session, each load+commit
            session, worker, turns = args[0], args[1], int(args[2])
            for n in range(turns):
                await store.load_window("acme", session, 3000)
                await store.commit_turn("acme", session, f"{worker}-{n}", f"u {worker} {n}", f"a {worker} {n}")
        else:
            raise SystemExit(f"unknown command {command}")
    finally:
        await store.client.aclose()


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:]))
