"""``engram serve`` and ``engram loadgen``: registered on the ``engram`` command by :func:`add_parser`."""

from __future__ import annotations

import argparse
import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

MULTIPROCESS_ENV = "PROMETHEUS_MULTIPROC_DIR"
_SECRET_FIELDS = {"redis_password", "redis_sentinel_password", "llm_api_key"}


def add_parser(subparsers: Any) -> None:
    """Register ``serve`` and ``loadgen`` on an ``argparse`` sub-parsers object; each sets ``func``."""
    serve = subparsers.add_parser(
        "serve",
        help="run the chat service (API, web page at /, /metrics)",
        description="Run the chat service. Configuration comes from ENGRAM_* environment variables.",
    )
    serve.add_argument("--host", default=os.environ.get("ENGRAM_HOST", "127.0.0.1"), help="default 127.0.0.1")
    serve.add_argument("--port", type=int, default=int(os.environ.get("ENGRAM_PORT", "8000")), help="default 8000")
    serve.add_argument("--workers", type=int, default=1, help="worker processes in this replica (default 1)")
    serve.add_argument("--access-log", action="store_true", help="log every request")
    serve.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    serve.set_defaults(func=serve_command)

    loadgen = subparsers.add_parser(
        "loadgen",
        help="drive conversations against a service and check every reply saw the previous turn",
    )
    loadgen.add_argument("--url", default="http://127.0.0.1:8080", help="service or load balancer URL")
    loadgen.add_argument("--sessions", type=int, default=20, help="conversations (default 20)")
    loadgen.add_argument("--turns", type=int, default=10, help="turns per conversation (default 10)")
    loadgen.add_argument("--concurrency", type=int, default=5, help="conversations at once (default 5)")
    loadgen.add_argument("--api-key", default=os.environ.get("ENGRAM_API_KEY"), help="default $ENGRAM_API_KEY")
    loadgen.add_argument("--timeout", type=float, default=30.0, help="seconds per request (default 30)")
    loadgen.add_argument("--no-keepalive", action="store_true", help="a new connection for every request")
    loadgen.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    loadgen.set_defaults(func=loadgen_command)


def _configuration_errors(error: Any) -> str:
    lines = []
    for item in error.errors():
        if not item["loc"]:  # a check of several variables together: its message names them
            lines.append(f"  {item['msg'].removeprefix('Value error, ')}")
            continue
        name = "ENGRAM_" + "_".join(str(part) for part in item["loc"]).upper()
        got = "" if any(part in _SECRET_FIELDS for part in item["loc"]) else f" (got {item.get('input')!r})"
        lines.append(f"  {name}: {item['msg']}{got}")
    return "\n".join(lines)


def load_settings() -> Any:
    """The settings, or a clear message naming each bad variable and exit status 2."""
    from pydantic import ValidationError

    from engram.server.config import ConfigurationError, check_llm_settings
    from engram.settings import Settings

    try:
        settings = Settings()
        check_llm_settings(settings)
    except ValidationError as error:
        print(f"engram: invalid configuration:\n{_configuration_errors(error)}", file=sys.stderr)
        raise SystemExit(2) from None
    except (ConfigurationError, ValueError) as error:
        print(f"engram: invalid configuration: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    return settings


def prepare_metrics_dir() -> Path:
    """An empty folder for multiprocess metrics, exported as PROMETHEUS_MULTIPROC_DIR before any worker
    starts. A folder given in the environment is reused and emptied of old samples (``*.db``)."""
    configured = os.environ.get(MULTIPROCESS_ENV)
    if configured:
        path = Path(configured)
        path.mkdir(parents=True, exist_ok=True)
        for stale in path.glob("*.db"):
            stale.unlink()
        return path
    path = Path(tempfile.mkdtemp(prefix="engram-metrics-"))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    os.environ[MULTIPROCESS_ENV] = str(path)
    return path


def serve_command(args: argparse.Namespace) -> int:
    if args.workers < 1:
        print("engram serve: --workers must be at least 1", file=sys.stderr)
        return 2
    try:
        settings = load_settings()
    except SystemExit as exit_:
        return int(exit_.code or 2)
    prepare_metrics_dir()
    import uvicorn

    if settings.auth == "disabled":
        print("engram serve: WARNING: ENGRAM_AUTH=disabled, every request is tenant 'default'", file=sys.stderr)
    uvicorn.run(
        "engram.server.app:create_app",
        factory=True,
        host=args.host,
        port=args.port,
        workers=args.workers,
        access_log=args.access_log,
        log_level=args.log_level,
        timeout_graceful_shutdown=10,
        proxy_headers=False,
    )
    return 0


def loadgen_command(args: argparse.Namespace) -> int:
    from engram.server import loadgen

    for name in ("sessions", "turns", "concurrency"):
        if getattr(args, name) < 1:
            print(f"engram loadgen: --{name} must be at least 1", file=sys.stderr)
            return 2
    return loadgen.main(
        args.url,
        args.sessions,
        args.turns,
        args.concurrency,
        args.api_key,
        as_json=args.json,
        keepalive=not args.no_keepalive,
        timeout=args.timeout,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="engram", description="Engram chat service commands")
    subparsers = parser.add_subparsers(dest="command", required=True)
    add_parser(subparsers)
    args = parser.parse_args(argv)
    result: int = args.func(args)
    return result
