"""The routes: HTTP in and out of the serving handlers (server/serving/), nothing else.
A client that disconnects cancels its request (and frees its KV blocks)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from server.http.deps import Serving, State, check_api_key, hints
from server.metrics import CONTENT_TYPE
from server.serving.generation import Served
from server.serving.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    ModelCard,
    ModelList,
)

T = TypeVar("T")


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


router = APIRouter()
v1 = APIRouter(prefix="/v1", dependencies=[Depends(check_api_key)])


@v1.post("/completions", responses={200: {"model": CompletionResponse}})
async def completions(body: CompletionRequest, request: Request, serving: Serving) -> Response:
    work = serving.completion.create(body, hints(request))
    return respond(await until_disconnect(request, work))


@v1.post("/chat/completions", responses={200: {"model": ChatCompletionResponse}})
async def chat(body: ChatCompletionRequest, request: Request, serving: Serving) -> Response:
    return respond(await until_disconnect(request, serving.chat.create(body, hints(request))))


@v1.get("/models", responses={200: {"model": ModelList}})
async def list_models(serving: Serving) -> Response:
    return JSONResponse(serving.models.list().model_dump(mode="json"))


@v1.get("/models/{model_id:path}", responses={200: {"model": ModelCard}})
async def get_model(model_id: str, serving: Serving) -> Response:
    return JSONResponse(serving.models.get(model_id).model_dump(mode="json"))


# the playground's views (server/http/playground.py serves the page)
@v1.get("/soft/plan")
async def plan(
    serving: Serving,
    max_tokens: Annotated[int, Query(ge=1)] = 16,
    prompt_tokens: Annotated[int, Query(ge=1)] = 16,
    budget: Annotated[str | None, Query(description="like x-latency-budget: 250ms, 1.5s")] = None,
) -> Response:
    body = serving.soft.plan(max_tokens, prompt_tokens, budget)
    return JSONResponse(body.model_dump(mode="json"))


@v1.get("/soft/stats")
async def stats(serving: Serving) -> Response:
    return JSONResponse(serving.soft.stats().model_dump(mode="json"))


HEALTH = {"type": "object", "required": ["status"],
          "properties": {"status": {"enum": ["ok", "loading", "draining", "error"]},
                         "error": {"type": "string"}}}  # fmt: skip


@router.get(
    "/health",
    responses={
        200: {"content": {"application/json": {"schema": HEALTH}}},
        503: {"description": "loading, draining or failed",
              "content": {"application/json": {"schema": HEALTH}}},
    },
)  # fmt: skip
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
    body: dict[str, Any] = {"version": state.version, "model": state.settings.model_name()}
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
        return Response(state.metrics.render(), media_type=CONTENT_TYPE)
    s = state.serving
    s.metrics.update(s.engine.stats(), s.policy.depth_cap())
    return Response(s.metrics.render(), media_type=CONTENT_TYPE)
