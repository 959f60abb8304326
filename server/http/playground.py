"""The playground page at `/` (static HTML/CSS/JS shipped in the package: no build step, no
CDN) and the two read-only JSON views it polls, `GET /v1/soft/plan` and `GET /v1/soft/stats`
(protected like the rest of /v1 when an API key is set; the page itself is not: it holds
no data, and asks for the key)."""

from __future__ import annotations

from functools import cache
from importlib import resources
from typing import Annotated

from fastapi import APIRouter, Depends, Query
from fastapi.responses import JSONResponse, Response

from server.http.deps import Serving, check_api_key
from server.serving.errors import APIError
from server.serving.soft import SoftServing

# name -> media type: the page's files, all under server/http/static/
STATIC = {
    "index.html": "text/html; charset=utf-8",
    "playground.css": "text/css; charset=utf-8",
    "playground.js": "text/javascript; charset=utf-8",
}

page = APIRouter(include_in_schema=False)
soft = APIRouter(prefix="/v1/soft", dependencies=[Depends(check_api_key)])


@cache
def static_file(name: str) -> bytes:
    return resources.files("server.http").joinpath("static", name).read_bytes()


def static_response(name: str) -> Response:
    # no-cache: a browser revalidates, so an upgraded server's page is never stale
    return Response(
        static_file(name), media_type=STATIC[name], headers={"Cache-Control": "no-cache"}
    )


@page.get("/")
async def index() -> Response:
    return static_response("index.html")


@page.get("/static/{name}")
async def static(name: str) -> Response:
    if name not in STATIC:
        raise APIError(404, f"the playground has no file {name!r}", "not_found_error")
    return static_response(name)


@soft.get("/plan")
async def plan(
    serving: Serving,
    max_tokens: Annotated[int, Query(ge=1)] = 16,
    prompt_tokens: Annotated[int, Query(ge=1)] = 16,
    budget: Annotated[str | None, Query(description="like x-latency-budget: 250ms, 1.5s")] = None,
) -> Response:
    body = SoftServing(serving).plan(max_tokens, prompt_tokens, budget)
    return JSONResponse(body.model_dump(mode="json"))


@soft.get("/stats")
async def stats(serving: Serving) -> Response:
    return JSONResponse(SoftServing(serving).stats().model_dump(mode="json"))
