"""What a route depends on: the app's state, the serving object (503 while loading or
draining), the API key, and the request's hints (arrival, depth and budget headers)."""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, Request

from server.metrics import Metrics
from server.serving.errors import APIError
from server.serving.headers import Hints, read_hints
from server.serving.openai import OpenAIServing
from server.settings import Settings


@dataclass
class AppState:
    settings: Settings
    version: str
    serving: OpenAIServing | None = None
    error: str | None = None
    draining: bool = False
    # rejections until the model has loaded (then carried into serving.metrics)
    metrics: Metrics = field(default_factory=Metrics)


def get_state(request: Request) -> AppState:
    state: AppState = request.app.state.soft
    return state


State = Annotated[AppState, Depends(get_state)]


def get_serving(state: State) -> OpenAIServing:
    if state.draining:
        raise APIError(
            503,
            "the server is shutting down",
            "service_unavailable",
            code="shutting_down",
            headers={"Retry-After": "5"},
        )
    if state.serving is None:
        why = f"the model failed to load: {state.error}" if state.error else "the model is loading"
        raise APIError(
            503, why, "service_unavailable", code="loading", headers={"Retry-After": "5"}
        )
    return state.serving


Serving = Annotated[OpenAIServing, Depends(get_serving)]


def check_api_key(request: Request, state: State) -> None:
    key = state.settings.api_key
    if key is None:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not secrets.compare_digest(
        token.strip().encode(), key.get_secret_value().encode()
    ):
        raise APIError(
            401,
            "missing or wrong API key: send 'Authorization: Bearer <key>'",
            "authentication_error",
            code="invalid_api_key",
            headers={"WWW-Authenticate": "Bearer"},
        )


def hints(request: Request) -> Hints:
    """The request's hint headers, parsed (400 for a malformed one) before its body is
    tokenized."""
    arrival = getattr(request.state, "arrival", None) or time.monotonic()
    return read_hints(arrival, request.headers.get)
