"""Engram's chat service: a FastAPI app over the history store, with metrics, a web page and a CLI."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fastapi import FastAPI

    from engram.settings import Settings

__all__ = ["create_app"]


def create_app(settings: Settings | None = None, **_: Any) -> FastAPI:
    """See :func:`engram.server.app.create_app` (imported lazily: prometheus_client must not be
    imported before ``engram serve`` has set up multiprocess metrics)."""
    from engram.server.app import create_app as build

    return build(settings)
