"""Errors mapped once, OpenAI-shaped (`{"error": {message, type, param, code}}`): the
serving layer's APIError, pydantic validation (400, not 422), HTTP errors, and a 500 that
names only the exception's type; the body-size limit (413). Every refusal is counted in
soft_requests_rejected_total{reason} (server/metrics.py's REJECT_REASONS)."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.serving.errors import APIError
from server.serving.protocol import ErrorInfo, ErrorResponse

log = logging.getLogger("soft_serve")


def error_response(
    status: int,
    message: str,
    type: str,
    param: str | None = None,
    code: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> JSONResponse:
    body = ErrorResponse(error=ErrorInfo(message=message, type=type, param=param, code=code))
    return JSONResponse(
        body.model_dump(mode="json"), status_code=status, headers=dict(headers or {})
    )


def count_rejection(app: Any, status: int) -> None:
    """soft_requests_rejected_total for a refusal of `app`'s (the loaded model's metrics,
    or the app's own until it has loaded)."""
    state = getattr(getattr(app, "state", None), "soft", None)
    if state is None:
        return
    metrics = state.serving.metrics if state.serving is not None else state.metrics
    metrics.reject(status)


def add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError) -> Response:
        count_rejection(request.app, e.status)
        return error_response(e.status, e.message, e.type, e.param, e.code, e.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError) -> Response:
        count_rejection(request.app, 400)
        errors = list(e.errors())
        if not errors:
            return error_response(400, "invalid request", "invalid_request_error")
        first = errors[0]
        loc = [str(x) for x in first.get("loc", ()) if x not in ("body", "query")]
        if first.get("type") == "json_invalid":
            msg = f"the request body is not valid JSON ({first.get('msg', '')})"
            return error_response(400, msg, "invalid_request_error", None, "invalid_json")
        where = ".".join(loc)
        msg = f"{where}: {first.get('msg', 'invalid value')}"
        if not where:  # the body as a whole: missing, not an object, not sent as JSON
            msg = (
                "the request body must be a JSON object sent with content-type "
                f"application/json ({first.get('msg', '')})"
            )
        if len(errors) > 1:
            msg += f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
        return error_response(
            400, msg, "invalid_request_error", loc[0] if loc else None, "invalid_value"
        )

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException) -> Response:
        count_rejection(request.app, e.status_code)
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return error_response(e.status_code, str(e.detail), kind, headers=e.headers)

    @app.exception_handler(Exception)
    async def internal(_: Request, e: Exception) -> Response:
        log.exception("unhandled error")
        return error_response(500, f"internal error: {type(e).__name__}", "server_error")


class BodyLimit:
    """Refuses bodies over `max_bytes` with 413 (declared or streamed); stamps arrival."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        scope.setdefault("state", {})["arrival"] = time.monotonic()
        declared = dict(scope["headers"]).get(b"content-length")
        too_big = f"the request body is over the limit of {self.max_bytes} bytes"
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            count_rejection(scope.get("app"), 413)
            response = error_response(413, too_big, "invalid_request_error", None, "too_large")
            return await response(scope, receive, send)
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise StarletteHTTPException(413, too_big)
            return message

        await self.app(scope, limited, send)
