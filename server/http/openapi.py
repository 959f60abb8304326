"""The OpenAPI document as the server behaves: OpenAI-shaped errors (400, never FastAPI's
422), the SSE `text/event-stream` answers of the streaming endpoints, the request headers
that choose a depth, the response headers that report it, `/metrics` as Prometheus text,
and the optional bearer key of /v1/*."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from server.serving.protocol import ChatCompletionChunk, ErrorResponse

ERROR = {"$ref": "#/components/schemas/ErrorResponse"}
RETRY_AFTER = {"Retry-After": {"description": "seconds to wait", "schema": {"type": "string"}}}

# the request headers a generation endpoint reads (server/serving/headers.py)
REQUEST_HEADERS = {
    "x-latency-budget": "end-to-end budget: '250ms', '1.5s' or a bare number of ms",
    "x-latency-budget-mode": "'strict' (400 when no exit meets the budget) or 'best-effort'",
    "x-soft-depth": "pin the exit to run at (as 'model': '<name>@<depth>' does)",
    "x-slo-ttft-ms": "first-token target, like a budget",
    "x-slo-tpot-ms": "per-output-token target, like a budget",
    "x-llm-d-slo-ttft-ms": "llm-d's name for x-slo-ttft-ms",
    "x-llm-d-slo-tpot-ms": "llm-d's name for x-slo-tpot-ms",
}
LATENCY = {"type": "string", "pattern": r"^\s*(\d+(\.\d*)?|\.\d+)\s*(ms|s)?\s*$"}
HEADER_SCHEMAS = {
    "x-latency-budget-mode": {"type": "string", "enum": ["strict", "best-effort"]},
    "x-soft-depth": {"type": "string", "pattern": "^[0-9]{1,6}$"},
}
RESPONSE_HEADERS = {
    "x-soft-depth": {"description": "the depth that served the request",
                     "schema": {"type": "string"}},
    "x-soft-predicted-ms": {"description": "the policy's predicted latency (ms)",
                            "schema": {"type": "string"}},
}  # fmt: skip
ERRORS = {
    "400": "invalid request: the message says what to change",
    "401": "missing or wrong API key (only when the server has one)",
    "404": "no such model",
    "413": "request body over --max-body-bytes",
    "429": "the queue is full: retry after Retry-After seconds",
    "503": "the model is loading or the server is shutting down",
}


# what each streaming endpoint sends in its SSE `data:` lines (besides errors and [DONE])
STREAM_CHUNKS = {
    "/v1/completions": "CompletionResponse",
    "/v1/chat/completions": "ChatCompletionChunk",
}


def sse_event(chunk: str) -> dict[str, Any]:
    """One SSE event of a stream (stream: true): `data:` holds a chunk as JSON, an error
    (a sequence the engine failed), or the closing `[DONE]`."""
    payload = {"anyOf": [{"$ref": f"#/components/schemas/{chunk}"}, ERROR]}
    return {
        "type": "object",
        "required": ["data"],
        "properties": {
            "data": {
                "anyOf": [
                    {"const": "[DONE]"},
                    {"type": "string", "contentMediaType": "application/json",
                     "contentSchema": payload},
                ]
            }
        },
        "description": "with stream: true: 'data: <chunk JSON>' events, then 'data: [DONE]'",
    }  # fmt: skip


def error(status: str) -> dict[str, Any]:
    out: dict[str, Any] = {
        "description": ERRORS[status],
        "content": {"application/json": {"schema": ERROR}},
    }
    if status in ("429", "503"):
        out["headers"] = RETRY_AFTER
    return out


def describe(app: FastAPI) -> Callable[[], dict[str, Any]]:
    """app.openapi: FastAPI's document, made to say what the server does."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        doc = get_openapi(
            title=app.title, version=app.version, routes=app.routes, description=__doc__
        )
        components = doc.setdefault("components", {})
        schemas = components.setdefault("schemas", {})
        for name in ("HTTPValidationError", "ValidationError"):
            schemas.pop(name, None)
        error_schema = ErrorResponse.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(error_schema.pop("$defs", {}))
        schemas["ErrorResponse"] = error_schema
        chunk = ChatCompletionChunk.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(chunk.pop("$defs", {}))
        schemas["ChatCompletionChunk"] = chunk
        components["securitySchemes"] = {
            "bearer": {"type": "http", "scheme": "bearer",
                       "description": "only when the server runs with --api-key"}
        }  # fmt: skip
        for path, item in doc["paths"].items():
            for method, op in item.items():
                responses = op.setdefault("responses", {})
                responses.pop("422", None)
                statuses = []
                if path.startswith("/v1/"):
                    statuses.append("503")
                    op["security"] = [{"bearer": []}, {}]  # a key, or none when unset
                    statuses += ["401", "404"]
                if any(p.get("in") == "query" for p in op.get("parameters", [])):
                    statuses.append("400")  # a malformed query parameter
                if method == "post":
                    statuses += ["400", "413", "429"]
                    op["parameters"] = [
                        {"name": h, "in": "header", "required": False, "description": d,
                         "schema": HEADER_SCHEMAS.get(h, LATENCY)}
                        for h, d in REQUEST_HEADERS.items()
                    ]  # fmt: skip
                    ok = responses.setdefault("200", {"description": "OK"})
                    ok["headers"] = RESPONSE_HEADERS
                    ok.setdefault("content", {})["text/event-stream"] = {
                        "schema": sse_event(STREAM_CHUNKS[path])
                    }
                for status in statuses:
                    responses.setdefault(status, error(status))
        metrics = doc["paths"]["/metrics"]["get"]["responses"]["200"]
        metrics["content"] = {"text/plain": {"schema": {"type": "string"}}}
        app.openapi_schema = doc
        return doc

    return openapi
