"""The HTTP layer: routes, the app's lifespan (model loaded once, in the background so
/health can answer 503 meanwhile), OpenAI-shaped errors mapped once, API key, body limit.

Handlers live in server/serving.py; this module only moves HTTP in and out of them.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.metrics import CONTENT_TYPE, Metrics
from server.policy.governor import GovernorConfig
from server.policy.policies import LatencyProfile, make_policy, measure_profile, read_profile_file
from server.serving.generation import APIError, Hints, Served
from server.serving.openai import OpenAIServing
from server.serving.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    ErrorInfo,
    ErrorResponse,
)
from server.settings import Settings

log = logging.getLogger("soft_serve")
T = TypeVar("T")

try:
    VERSION = importlib.metadata.version("soft-serve")
except importlib.metadata.PackageNotFoundError:  # running from a source tree
    VERSION = "0.0.0+local"


# -- loading ---------------------------------------------------------------------------------
def load_serving(settings: Settings) -> OpenAIServing:
    """Load the model, its latency profile, the policy, the engine: everything a request
    needs. Runs once, in a worker thread, during the lifespan."""
    import models
    from server.engine.core import Engine, EngineConfig, on_own_thread
    from server.engine.speculative import SpecConfig

    t0 = time.monotonic()

    def build() -> tuple[models.SortedModel, Engine]:
        model = models.load(settings.model, device=settings.device, dtype=settings.dtype)
        if model.tokenizer is None:
            raise ValueError(f"{settings.model}: no tokenizer files; the server needs a tokenizer")
        engine = Engine(
            model,
            EngineConfig(
                block_size=settings.block_size,
                kv_cache_memory=int(settings.kv_cache_memory),
                max_num_seqs=settings.max_num_seqs,
                max_queue=settings.max_queue,
                max_model_len=settings.max_model_len,
                speculative=SpecConfig(
                    mode=settings.speculative,
                    exit=settings.speculative_exit,
                    k=settings.speculative_k,
                    draft_vocab=settings.speculative_vocab,
                ),
            ),
        )
        return model, engine

    # torch work on a thread that ends, so the engine's step thread is the only one with
    # an OpenMP team (server/engine.py says why)
    model, engine = on_own_thread(build)
    exits = tuple(model.exits)
    default = settings.default_depth or exits[-1]
    if default not in exits:
        raise ValueError(f"--default-depth {default} is not an exit of the model {list(exits)}")
    raw = model.soft.latency_profile
    if settings.latency_profile:  # soft-profile --out, for a checkpoint one cannot write to
        profile = read_profile_file(settings.latency_profile, exits)
    elif raw:
        profile = LatencyProfile.from_json(raw, exits)
    else:
        engine.start()  # measured through the engine itself, before any request
        profile = measure_profile(engine, exits, seconds=settings.profile_seconds)
    serving = OpenAIServing(
        model,
        engine,
        make_policy(
            settings.policy,
            exits,
            default,
            profile,
            stats=engine.stats,
            max_num_seqs=settings.max_num_seqs,
            governor=GovernorConfig(
                queue_high=settings.governor_queue_high,
                queue_low=settings.governor_queue_low,
                tpot_ms=settings.governor_tpot_ms,
                restore_ratio=settings.governor_restore_ratio,
                factor=settings.governor_factor,
                down_s=settings.governor_down_s,
                up_s=settings.governor_up_s,
                min_depth=settings.governor_min_depth,
                max_utilization=settings.governor_max_utilization,
            ),
        ),
        Metrics(exits),
        settings.model_name(),
        max_n=settings.max_n,
    )
    log.info(
        "loaded %s (L=%d, exits=%s, method=%s, profile from %s) in %.1fs",
        settings.model,
        model.num_layers,
        list(exits),
        model.method,
        profile.source,
        time.monotonic() - t0,
    )
    return serving


@dataclass
class AppState:
    settings: Settings
    serving: OpenAIServing | None = None
    error: str | None = None
    draining: bool = False


def create_app(
    settings: Settings,
    loader: Callable[[Settings], OpenAIServing] = load_serving,
    on_load_error: Callable[[], None] | None = None,
) -> FastAPI:
    """The soft-serve ASGI app. `loader` builds the serving object (tests pass a fake
    engine through it); `on_load_error` is told when loading fails (the CLI exits)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state: AppState = app.state.soft

        async def load() -> None:
            try:
                serving = await asyncio.to_thread(loader, settings)
                serving.engine.start()
                state.serving = serving
            except Exception as e:
                if isinstance(e, (FileNotFoundError, ValueError)):  # the user's to fix
                    log.error("cannot serve %s: %s", settings.model, e)
                else:
                    log.exception("failed to load the model")
                state.error = f"{type(e).__name__}: {e}"
                if on_load_error is not None:
                    on_load_error()

        task = asyncio.create_task(load())
        try:
            yield
        finally:
            state.draining = True
            if not task.done():
                await asyncio.wait([task], timeout=settings.drain_timeout)
            if state.serving is not None:
                await state.serving.engine.shutdown(settings.drain_timeout)

    app = FastAPI(title="soft-serve", version=VERSION, lifespan=lifespan)
    app.state.soft = AppState(settings)
    app.include_router(router)
    app.include_router(v1)
    add_error_handlers(app)
    app.add_middleware(BodyLimit, max_bytes=int(settings.max_body_bytes))
    return app


# -- dependencies ----------------------------------------------------------------------------
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
    return Hints(
        arrival=getattr(request.state, "arrival", None) or time.monotonic(),
        budget=request.headers.get("x-latency-budget"),
        depth=request.headers.get("x-soft-depth"),
        budget_mode=request.headers.get("x-latency-budget-mode"),
        slo_ttft=request.headers.get("x-slo-ttft-ms"),
        slo_tpot=request.headers.get("x-slo-tpot-ms"),
    )


async def until_disconnect(request: Request, work: Awaitable[T]) -> T | None:
    """Run `work`, cancelling it if the client goes away first (then None)."""
    task = asyncio.ensure_future(work)

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait([task, watcher], return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():  # disconnected (or we were cancelled): stop the work
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    return None if task.cancelled() else task.result()


def respond(served: Served | None) -> Response:
    if served is None:  # the client disconnected; nobody reads this
        return Response(status_code=499)
    if served.stream is not None:
        return SSEResponse(served)
    assert served.body is not None, "a handler returns a body or a stream"
    return JSONResponse(served.body.model_dump(mode="json"), headers=served.headers())


class SSEResponse(StreamingResponse):
    """An SSE stream that cleans up after itself however it ends: finished, failed, or the
    client gone before the first byte (when the generator's own `finally` never runs)."""

    def __init__(self, served: Served) -> None:
        assert served.stream is not None
        super().__init__(
            served.stream,
            media_type="text/event-stream",
            headers={**served.headers(), "Cache-Control": "no-cache"},
        )
        self.served = served

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.served.close()


# -- routes ----------------------------------------------------------------------------------
router = APIRouter()
v1 = APIRouter(prefix="/v1", dependencies=[Depends(check_api_key)])


@v1.post("/completions")
async def completions(body: CompletionRequest, request: Request, serving: Serving) -> Response:
    return respond(await until_disconnect(request, serving.completions(body, hints(request))))


@v1.post("/chat/completions")
async def chat(body: ChatCompletionRequest, request: Request, serving: Serving) -> Response:
    return respond(await until_disconnect(request, serving.chat(body, hints(request))))


@v1.get("/models")
async def list_models(serving: Serving) -> Response:
    return JSONResponse(serving.models().model_dump(mode="json"))


@router.get("/health")
async def health(state: State) -> Response:
    if state.serving is not None and not state.draining:
        return JSONResponse({"status": "ok"})
    status = "draining" if state.draining else "error" if state.error else "loading"
    body: dict[str, Any] = {"status": status}
    if state.error:
        body["error"] = state.error
    return JSONResponse(body, status_code=503, headers={"Retry-After": "5"})


@router.get("/version")
async def version(state: State) -> Response:
    body: dict[str, Any] = {"version": VERSION, "model": state.settings.model_name()}
    if (s := state.serving) is not None:
        body.update(
            method=s.model.method,
            num_layers=s.model.num_layers,
            exits=list(s.model.exits),
            policy=s.policy.name,
            default_depth=s.policy.default_depth,
            max_model_len=s.max_model_len,
        )
    return JSONResponse(body)


@router.get("/metrics")
async def metrics(state: State) -> Response:
    if state.serving is None:
        return Response(Metrics().render(), media_type=CONTENT_TYPE)
    s = state.serving
    s.metrics.update(s.engine.stats(), s.policy.depth_cap())
    return Response(s.metrics.render(), media_type=CONTENT_TYPE)


# -- errors, mapped once ---------------------------------------------------------------------
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


def add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(_: Request, e: APIError) -> Response:
        return error_response(e.status, e.message, e.type, e.param, e.code, e.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, e: RequestValidationError) -> Response:
        errors = list(e.errors())
        if not errors:
            return error_response(400, "invalid request", "invalid_request_error")
        first = errors[0]
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
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
    async def http_error(_: Request, e: StarletteHTTPException) -> Response:
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
