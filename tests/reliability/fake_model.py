"""A local OpenAI-compatible model server on loopback for fault injection (no network, no real model).

Modes:
- ``reply``: answers ``/v1/chat/completions`` after ``delay`` seconds, JSON or (``stream: true``)
  server-sent chunks ``pieces`` of them, ``piece_delay`` seconds apart.
- ``hang``: accepts the connection, reads the request and never answers (a model that timed out).
- ``echo-error``: answers 500 with a body that echoes the request's headers, Authorization included
  (as some proxies and model servers do in their error pages).

``arrived`` is set when a request has been read: a test can act while the model is "thinking".

It runs its own event loop in a thread so that synchronous tests can use it as a context manager.
"""

from __future__ import annotations

import asyncio
import json
import threading
from typing import Any, Literal

from testkit.redis_server import free_port

Mode = Literal["reply", "hang", "echo-error"]


class FakeModel:
    def __init__(self, mode: Mode = "reply", *, delay: float = 0.0, pieces: int = 4, piece_delay: float = 0.0) -> None:
        self.mode = mode
        self.delay = delay
        self.pieces = pieces
        self.piece_delay = piece_delay
        self.port = free_port()
        self.requests = 0
        self.streams_finished = 0
        self.arrived = threading.Event()
        self.last_headers = ""
        self.last_request: dict[str, Any] = {}  # the JSON body of the newest request
        self.requests_seen: list[dict[str, Any]] = []  # every request's JSON body, in arrival order
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def service_env(self, timeout: float) -> dict[str, str]:
        return {
            "ENGRAM_LLM": "openai-like",
            "ENGRAM_LLM_BASE_URL": self.base_url,
            "ENGRAM_LLM_MODEL": "fake",
            "ENGRAM_LLM_TIMEOUT": str(timeout),
        }

    def __enter__(self) -> FakeModel:
        self._thread = threading.Thread(target=self._run, name="fake-model", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("fake model server did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _run(self) -> None:
        asyncio.run(self._serve())

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)
        self._ready.set()
        async with server:
            await self._stop.wait()
            server.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await self._read_request(reader)
            if request is None:
                return
            self.requests += 1
            self.arrived.set()
            if self.mode == "hang":
                await self._stop_or(3600)
                return
            if self.mode == "echo-error":
                body = json.dumps({"error": {"message": f"upstream rejected the request:\n{self.last_headers}"}})
                head = "HTTP/1.1 500 Internal Server Error\r\nContent-Type: application/json\r\n"
                head += f"Content-Length: {len(body)}\r\n"
                writer.write(head.encode() + b"Connection: close\r\n\r\n" + body.encode())
                await writer.drain()
                return
            await asyncio.sleep(self.delay)
            if request.get("stream"):
                await self._stream(writer, request)
            else:
                body = json.dumps(_completion(_reply_text(request))).encode()
                head = f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
                writer.write(head.encode() + b"Connection: close\r\n\r\n" + body)
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def _stop_or(self, seconds: float) -> None:
        assert self._stop is not None
        try:
            await asyncio.wait_for(self._stop.wait(), seconds)
        except TimeoutError:
            pass

    async def _read_request(self, reader: asyncio.StreamReader) -> dict[str, Any] | None:
        head = await reader.readuntil(b"\r\n\r\n")
        self.last_headers = head.decode("latin-1")
        length = 0
        for line in head.decode("latin-1").split("\r\n")[1:]:
            name, _, value = line.partition(":")
            if name.strip().lower() == "content-length":
                length = int(value.strip())
        body = await reader.readexactly(length) if length else b"{}"
        parsed: dict[str, Any] = json.loads(body or b"{}")
        self.last_request = parsed
        self.requests_seen.append(parsed)
        return parsed

    async def _stream(self, writer: asyncio.StreamWriter, request: dict[str, Any]) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n")
        text = _reply_text(request)
        for index in range(self.pieces):
            piece = f"{text} part {index}. " if index == 0 else f"part {index}. "
            writer.write(b"data: " + json.dumps(_chunk({"content": piece}, None)).encode() + b"\n\n")
            await writer.drain()
            if self.piece_delay:
                await asyncio.sleep(self.piece_delay)
        writer.write(b"data: " + json.dumps(_chunk({}, "stop")).encode() + b"\n\ndata: [DONE]\n\n")
        await writer.drain()
        self.streams_finished += 1


def _reply_text(request: dict[str, Any]) -> str:
    messages = request.get("messages") or [{}]
    last = str(messages[-1].get("content", ""))
    return f"fake reply to {last[:40]!r} with {len(messages) - 1} earlier messages"


def _completion(text: str) -> dict[str, Any]:
    return {
        "id": "fake-1",
        "object": "chat.completion",
        "created": 0,
        "model": "fake",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    }


def _chunk(delta: dict[str, Any], finish: str | None) -> dict[str, Any]:
    return {
        "id": "fake-1",
        "object": "chat.completion.chunk",
        "created": 0,
        "model": "fake",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
