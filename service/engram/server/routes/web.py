"""The chat page at ``/`` (static HTML and JavaScript shipped in the package)."""

from __future__ import annotations

from importlib.resources import files

from fastapi import APIRouter, HTTPException
from fastapi.responses import HTMLResponse, Response

router = APIRouter(include_in_schema=False)

_WEB = files("engram.server") / "web"
_TYPES = {"app.js": "text/javascript; charset=utf-8", "style.css": "text/css; charset=utf-8"}


@router.get("/")
async def page() -> HTMLResponse:
    return HTMLResponse((_WEB / "index.html").read_text(encoding="utf-8"), headers={"Cache-Control": "no-cache"})


@router.get("/static/{name}")
async def asset(name: str) -> Response:
    if name not in _TYPES:  # a fixed list: nothing else in the package is served
        raise HTTPException(404, f"no asset {name!r}")
    return Response(
        (_WEB / name).read_text(encoding="utf-8"), media_type=_TYPES[name], headers={"Cache-Control": "no-cache"}
    )
