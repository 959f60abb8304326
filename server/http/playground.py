"""The playground page at `/` (static HTML/CSS/JS shipped in the package: no build step, no
CDN). The two read-only JSON views it polls, `GET /v1/soft/plan` and `GET /v1/soft/stats`,
are routed with the rest of /v1 (routes.py) and protected like it when an API key is set;
the page itself is not: it holds no data, and asks for the key."""

from __future__ import annotations

from functools import cache
from importlib import resources

from fastapi import APIRouter
from fastapi.responses import Response

from server.serving.errors import APIError

# name -> media type: the page's files, all under server/http/static/
STATIC = {
    "index.html": "text/html; charset=utf-8",
    "playground.css": "text/css; charset=utf-8",
    "playground.js": "text/javascript; charset=utf-8",
}

page = APIRouter(include_in_schema=False)


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
