"""Errors the client sees, OpenAI-shaped; raised by the serving layer, mapped to responses
once, in server/http/errors.py."""

from __future__ import annotations

from server.serving.protocol import ErrorInfo, ErrorResponse


class APIError(Exception):
    """An error the client sees, OpenAI-shaped: status, message, type, param, code."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type = status, message, type
        self.param, self.code, self.headers = param, code, headers or {}

    def body(self) -> ErrorResponse:
        return ErrorResponse(
            error=ErrorInfo(message=self.message, type=self.type, param=self.param, code=self.code)
        )


def bad_request(message: str, param: str | None = None) -> APIError:
    """400: the client's mistake; `param` names what to change."""
    return APIError(400, message, param=param, code="invalid_value" if param else None)


def engine_error(error: str | None) -> APIError:
    """A sequence the engine failed (not the client's doing): 500, or an SSE error event."""
    message = f"generation failed: {error or 'engine error'}"
    return APIError(500, message, "server_error", code="engine_error")
