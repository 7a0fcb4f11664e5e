"""How every failure becomes an HTTP answer: ``{"error": {"code": str, "message": str}}``.

The mapping, in one place::

    InvalidInput (InvalidSessionId, InvalidMessage, InvalidCursor, InvalidTenant)   422
    MessageTooLarge, RequestTooLarge                                                 413
    request body that does not validate (FastAPI)                                    422 invalid_request
    Unauthorized                                                                     401
    TurnIdReused (a turn_id already stored with another message)                     409
    SubjectMismatch (a turn names another subject than its session's)                409
    NotFound                                                                         404
    RateLimited (the tenant is over its requestsPerSecond + burst)                   429 + Retry-After
    QuotaExceeded (SessionQuotaExceeded, StorageQuotaExceeded; nothing stored)       403
    StoreFull (Redis at maxmemory: writes refused, checked before the model runs)    507
    StoreUnavailable (Redis unreachable, timed out or read-only; nothing stored)      503 + Retry-After
    OutcomeUnknown (a commit was sent, no answer: it may have landed)                503 + Retry-After,
                                                                                     body carries turn_id
    NotReplicated (durability replicated: no replica confirmed the turn in time)      503 + Retry-After,
                                                                                     body carries turn_id
    ModelFailed (the model raised, timed out or answered something unstorable)       502
    any other exception                                                              500 internal_error,
                                                                                     logged, no details sent

On the OpenAI-compatible routes (``OPENAI_PATHS``) the same errors take OpenAI's shape,
``{"error": {"message", "type", "param", "code"}}``, and its statuses (400 where the table says 422 or 413
for a message).
"""

from __future__ import annotations

import logging
import math
import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from engram.errors import (
    EngramError,
    InvalidInput,
    MessageTooLarge,
    NotFound,
    NotReplicated,
    OutcomeUnknown,
    QuotaExceeded,
    RateLimited,
    StoreFull,
    StoreUnavailable,
    SubjectMismatch,
)

log = logging.getLogger("engram.server")


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


class TurnIdReused(ServiceError):
    """A turn id that was already used for a different message: a retry must resend the same message."""

    status = 409
    code = "turn_id_reused"


class ModelNotFound(ServiceError):
    """A model id this service does not serve (OpenAI's ``model_not_found``)."""

    status = 404
    code = "model_not_found"
    param = "model"


class ModelFailed(ServiceError):
    """The model raised, timed out or gave an answer that cannot be stored. Nothing was committed."""

    status = 502
    code = "model_failed"


def status_for(error: EngramError) -> int:
    if isinstance(error, ServiceError):
        return error.status
    if isinstance(error, MessageTooLarge):
        return 413
    if isinstance(error, SubjectMismatch):
        return 409
    if isinstance(error, RateLimited):
        return 429
    if isinstance(error, QuotaExceeded):  # not 429: OpenAI's SDKs retry 429 by themselves, and retrying cannot help
        return 403
    if isinstance(error, InvalidInput):
        return 422
    if isinstance(error, NotFound):
        return 404
    if isinstance(error, StoreUnavailable):
        return 503
    if isinstance(error, StoreFull):
        return 507
    return 500


def error_body(code: str, message: str, **extra: str) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, **extra}}


# --- OpenAI's error shape, on the OpenAI-compatible routes -----------------------------------------------
OPENAI_PATHS = ("/v1/chat/completions", "/v1/models")


class OpenAIErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None
    turn_id: str | None = Field(None, description="with `outcome_unknown`: the Idempotency-Key to retry with")


class OpenAIErrorBody(BaseModel):
    error: OpenAIErrorDetail


def error_type(status: int) -> str:
    if status == 401:
        return "authentication_error"
    if status == 429:
        return "rate_limit_error"
    return "invalid_request_error" if status < 500 else "server_error"


def openai_status(status: int) -> int:
    """OpenAI answers a request it cannot take with 400 where Engram's own API says 422."""
    return 400 if status == 422 else status


def openai_error_body(status: int, code: str, message: str, param: str | None = None, **extra: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": error_type(status), "param": param, "code": code, **extra}}


def speaks_openai(path: str) -> bool:
    """Requests to the OpenAI-compatible routes get OpenAI's error shape and statuses."""
    return path.startswith(OPENAI_PATHS)


def error_response(
    status: int,
    code: str,
    message: str,
    headers: dict[str, str] | None = None,
    *,
    path: str = "",
    param: str | None = None,
) -> JSONResponse:
    if speaks_openai(path):
        status = openai_status(status)
        return JSONResponse(openai_error_body(status, code, message, param), status_code=status, headers=headers)
    return JSONResponse(error_body(code, message), status_code=status, headers=headers)


def _public_message(error: EngramError) -> str:
    """What a client is told (messages of store errors never carry internals such as Redis' address)."""
    if isinstance(error, NotReplicated):
        return (
            "the turn was not acknowledged: no Redis replica confirmed it in time, so a failover could lose it. "
            f"Retry with turn_id {error.turn_id!r}: a retry with it is stored once and waits for a replica again"
        )
    if isinstance(error, OutcomeUnknown):
        return (
            "the history store (Redis) did not confirm this turn: it may or may not have been stored. "
            f"Retry with turn_id {error.turn_id!r}: a retry with it is answered once and never stored twice"
        )
    if isinstance(error, StoreUnavailable):
        return "the history store (Redis) is unavailable; nothing was stored; retry shortly"
    if isinstance(error, StoreFull):
        return (
            "the history store is full; nothing was stored. Delete sessions you no longer need "
            "(DELETE /v1/sessions/{session_id}) or ask the operator to give Redis more memory"
        )
    return str(error) or error.code


def error_content(error: EngramError, path: str = "") -> tuple[int, dict[str, Any], dict[str, str] | None]:
    """Status, JSON body and headers of the answer to ``error`` (in OpenAI's shape on its routes)."""
    status = status_for(error)
    extra = {"turn_id": error.turn_id} if isinstance(error, OutcomeUnknown) else {}
    headers = {"Retry-After": "1"} if status == 503 else None
    if isinstance(error, RateLimited):
        headers = {"Retry-After": str(max(1, math.ceil(error.retry_after)))}
    if speaks_openai(path):
        if isinstance(error, MessageTooLarge):  # OpenAI's answer to a message the model cannot take
            status = 400
        status = openai_status(status)
        param = getattr(error, "param", None)
        return status, openai_error_body(status, error.code, _public_message(error), param, **extra), headers
    return status, error_body(error.code, _public_message(error), **extra), headers


# --- model errors: a summary for clients, the details for the log with secrets masked -------------------
_SECRETS: set[str] = set()
_SECRET_PATTERNS = (
    re.compile(r"(?i)(bearer\s+)[^\s'\",}]+"),
    re.compile(r"(?i)((?:authorization|api[-_]?key|x-api-key|password)['\"]?\s*[:=]\s*['\"]?)[^\s'\",}]+"),
    re.compile(r"\b(egk_)[A-Za-z0-9._-]+"),  # Engram tenant API keys
    re.compile(r"\b(sk-)[A-Za-z0-9_-]{8,}"),  # OpenAI-style keys
)


def register_secret(value: str | None) -> None:
    """A value (the model's API key, a Redis password) that ``redact`` must never let through."""
    if value and len(value) >= 4:
        _SECRETS.add(value)


def redact(text: str, limit: int = 500) -> str:
    """``text`` with registered secrets and anything shaped like a credential masked, cut to ``limit``."""
    for secret in _SECRETS:
        text = text.replace(secret, "***")
    for pattern in _SECRET_PATTERNS:
        text = pattern.sub(r"\1***", text)
    return text[:limit]


def summarize_model_error(error: BaseException) -> str:
    """What a client may know of a model failure: its kind and the upstream HTTP status, never its text
    (a model server may echo the request, Authorization header included)."""
    name = type(error).__name__
    if isinstance(error, TimeoutError) or "timeout" in name.lower():
        return f"the model did not answer in time ({name})"
    status = getattr(error, "status_code", None) or getattr(getattr(error, "response", None), "status_code", None)
    upstream = f", upstream status {status}" if isinstance(status, int) else ""
    return f"the model failed ({name}{upstream}); the details are in the service log"


_HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "request_too_large",
    415: "unsupported_media_type",
}


def _first_param(error: RequestValidationError) -> str | None:
    """The request field the first problem is in, as OpenAI names it (``messages.0.role``)."""
    for item in error.errors()[:1]:
        where = [str(p) for p in item.get("loc", ()) if p != "body"]
        return ".".join(where) or None
    return None


def _validation_message(error: RequestValidationError) -> str:
    parts = []
    for item in error.errors()[:5]:
        where = ".".join(str(p) for p in item.get("loc", ()) if p != "body") or "body"
        parts.append(f"{where}: {item.get('msg', 'invalid')}")
    return "invalid request: " + "; ".join(parts)


def install(app: FastAPI) -> None:
    """Register the handlers that turn every exception into the JSON error body."""

    async def engram_error(request: Request, error: Exception) -> JSONResponse:
        assert isinstance(error, EngramError)
        status, body, headers = error_content(error, request.url.path)
        if status >= 500:
            log.warning("answering %d %s: %s", status, error.code, error)
        return JSONResponse(body, status_code=status, headers=headers)

    async def validation_error(request: Request, error: Exception) -> JSONResponse:
        assert isinstance(error, RequestValidationError)
        path = request.url.path
        return error_response(422, "invalid_request", _validation_message(error), path=path, param=_first_param(error))

    async def http_error(request: Request, error: Exception) -> JSONResponse:
        assert isinstance(error, StarletteHTTPException)
        path = request.url.path
        if error.status_code == 400:  # FastAPI's "error parsing the body" (e.g. not UTF-8): the contract's 422
            return error_response(422, "invalid_request", f"invalid request: {error.detail}", path=path)
        code = _HTTP_CODES.get(error.status_code, "http_error")
        return error_response(error.status_code, code, str(error.detail), dict(error.headers or {}), path=path)

    async def unexpected(request: Request, error: Exception) -> JSONResponse:
        log.exception("unexpected error", exc_info=error)
        return error_response(500, "internal_error", "internal error; see the service log", path=request.url.path)

    app.add_exception_handler(EngramError, engram_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, unexpected)
