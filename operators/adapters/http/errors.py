"""One error shape for every failure: `{"error": {"code", "message", "field"?}}`.

`code` is stable (clients branch on it); `message` says what to do; `field` names the part of
the request at fault (`recipients`, `data`, `targeting.audience_id`) when there is one.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import redis
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from operators.adapters.redis.client import RedisUnavailable
from operators.notify.requests import Rejected
from operators.notify.service import RateLimited

log = logging.getLogger(__name__)

STATUS_OF: dict[str, int] = {
    "invalid_json": 400,
    "invalid_body": 400,
    "missing_api_key": 401,
    "invalid_api_key": 401,
    "revoked_api_key": 401,
    "invalid_token": 400,
    "forbidden": 403,
    "not_found": 404,
    "method_not_allowed": 405,
    "idempotency_key_reused": 409,
    "request_in_progress": 409,
    "not_cancellable": 409,
    "expired_token": 410,
    "payload_too_large": 413,
    "unsupported_media_type": 415,
    "rate_limited": 429,
    "internal": 500,
    "unavailable": 503,
}
"""HTTP status per error code; every other code of a refused request is 422."""
_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}


def error_body(code: str, message: str, field: str | None = None) -> dict[str, Any]:
    """The error document."""
    error: dict[str, Any] = {"code": code, "message": message}
    if field:
        error["field"] = field
    return {"error": error}


def error_response(
    code: str, message: str, field: str | None = None, headers: dict[str, str] | None = None
) -> JSONResponse:
    """The error document with its status."""
    return JSONResponse(
        error_body(code, message, field), status_code=STATUS_OF.get(code, 422), headers=headers
    )


def retry_after(seconds: float) -> str:
    """Retry-After in whole seconds, at least 1."""
    return str(max(1, math.ceil(seconds)))


def _field(loc: tuple[Any, ...]) -> str:
    parts = [str(p) for p in loc if p not in ("body", "query", "path")]
    return ".".join(parts)


def _validation(exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    first = errors[0] if errors else {"type": "", "loc": (), "msg": "invalid request"}
    kind = str(first.get("type", ""))
    field = _field(tuple(first.get("loc", ())))
    if kind == "json_invalid":
        ctx = first.get("ctx")
        detail = ctx.get("error", "") if isinstance(ctx, dict) else ""
        return error_response("invalid_json", f"the body is not valid JSON: {detail}".strip())
    if kind == "model_attributes_type" and not field:
        return error_response(
            "invalid_body", "the body must be a JSON object, sent as application/json"
        )
    if field == "recipients" and kind == "too_long":
        code = "too_many_recipients"
    elif kind == "missing":
        code = "missing_field"
    elif kind == "extra_forbidden":
        code = "unknown_field"
    else:
        code = "invalid_request"
    message = str(first.get("msg", "invalid value"))
    more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
    return error_response(code, f"{field or 'body'}: {message}{more}", field or None)


def install_error_handlers(app: FastAPI) -> None:
    """Map every failure to the error shape."""

    async def rejected(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, Rejected)
        headers: dict[str, str] = {}
        if isinstance(exc, RateLimited):
            headers["Retry-After"] = retry_after(exc.retry_after_s)
        elif STATUS_OF.get(exc.code) == 401:
            headers["WWW-Authenticate"] = 'Bearer realm="fanfare"'
        elif exc.code in ("request_in_progress", "unavailable"):
            headers["Retry-After"] = "1"
        return error_response(exc.code, exc.message, exc.field, headers)

    async def invalid(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        return _validation(exc)

    async def http_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        code = _HTTP_CODES.get(exc.status_code, "invalid_request")
        message = {
            "not_found": "no such endpoint (see /docs)",
            "method_not_allowed": "this endpoint does not take that method (see /docs)",
        }.get(code, str(exc.detail))
        response = error_response(code, message)
        response.status_code = exc.status_code
        return response

    async def redis_down(_: Request, exc: Exception) -> JSONResponse:
        log.warning("Redis unavailable: %s", exc)
        return error_response(
            "unavailable",
            "Redis is unavailable (keys and limits live there); retry",
            None,
            {"Retry-After": "1"},
        )

    async def internal(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error", exc_info=exc)
        return error_response("internal", "an unexpected error; it was logged")

    app.add_exception_handler(Rejected, rejected)
    app.add_exception_handler(RequestValidationError, invalid)
    app.add_exception_handler(StarletteHTTPException, http_error)
    for kind in (redis.ConnectionError, redis.TimeoutError, RedisUnavailable):
        app.add_exception_handler(kind, redis_down)
    app.add_exception_handler(Exception, internal)
