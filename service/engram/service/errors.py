"""How every failure becomes an HTTP answer: ``{"error": {"code": str, "message": str}}``.

The mapping, in one place::

    InvalidInput (InvalidSessionId, InvalidMessage, InvalidCursor, InvalidTenant)   422
    MessageTooLarge, RequestTooLarge                                                 413
    request body that does not validate (FastAPI)                                    422 invalid_request
    Unauthorized                                                                     401
    NotFound                                                                         404
    StoreUnavailable (Redis unreachable or timed out)                                503
    ModelFailed (the model raised, timed out or answered something unstorable)       502
    any other exception                                                              500 internal_error,
                                                                                     logged, no details sent
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from engram.errors import EngramError, InvalidInput, MessageTooLarge, NotFound, StoreUnavailable

log = logging.getLogger("engram.service")


class ServiceError(EngramError):
    """An error of the HTTP layer itself, with its status."""

    status = 500
    code = "internal_error"


class Unauthorized(ServiceError):
    status = 401
    code = "unauthorized"


class RequestTooLarge(ServiceError):
    status = 413
    code = "request_too_large"


class ModelFailed(ServiceError):
    """The model raised, timed out or gave an answer that cannot be stored. Nothing was committed."""

    status = 502
    code = "model_failed"


def status_for(error: EngramError) -> int:
    if isinstance(error, ServiceError):
        return error.status
    if isinstance(error, MessageTooLarge):
        return 413
    if isinstance(error, InvalidInput):
        return 422
    if isinstance(error, NotFound):
        return 404
    if isinstance(error, StoreUnavailable):
        return 503
    return 500


def error_body(code: str, message: str) -> dict[str, Any]:
    return {"error": {"code": code, "message": message}}


def error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(code, message), status_code=status, headers=headers)


def describe(error: EngramError) -> tuple[int, str, str]:
    """Status, code and message for an Engram error (messages of 5xx errors never carry internals)."""
    status = status_for(error)
    if isinstance(error, StoreUnavailable):
        return status, error.code, "the history store (Redis) is unavailable; retry shortly"
    return status, error.code, str(error) or error.code


_HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "request_too_large",
    415: "unsupported_media_type",
}


def _validation_message(error: RequestValidationError) -> str:
    parts = []
    for item in error.errors()[:5]:
        where = ".".join(str(p) for p in item.get("loc", ()) if p != "body") or "body"
        parts.append(f"{where}: {item.get('msg', 'invalid')}")
    return "invalid request: " + "; ".join(parts)


def install(app: FastAPI) -> None:
    """Register the handlers that turn every exception into the JSON error body."""

    async def engram_error(_: Request, error: Exception) -> JSONResponse:
        assert isinstance(error, EngramError)
        status, code, message = describe(error)
        if status == 503:
            log.warning("answering 503: %s", error)
        elif status >= 500:
            log.warning("answering %d %s: %s", status, code, error)
        headers = {"Retry-After": "1"} if status == 503 else None
        return error_response(status, code, message, headers)

    async def validation_error(_: Request, error: Exception) -> JSONResponse:
        assert isinstance(error, RequestValidationError)
        return error_response(422, "invalid_request", _validation_message(error))

    async def http_error(_: Request, error: Exception) -> JSONResponse:
        assert isinstance(error, StarletteHTTPException)
        if error.status_code == 400:  # FastAPI's "error parsing the body" (e.g. not UTF-8): the contract's 422
            return error_response(422, "invalid_request", f"invalid request: {error.detail}")
        code = _HTTP_CODES.get(error.status_code, "http_error")
        return error_response(error.status_code, code, str(error.detail), dict(error.headers or {}))

    async def unexpected(_: Request, error: Exception) -> JSONResponse:
        log.exception("unexpected error", exc_info=error)
        return error_response(500, "internal_error", "internal error; see the service log")

    app.add_exception_handler(EngramError, engram_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, unexpected)
