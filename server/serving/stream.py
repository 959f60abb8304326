"""The one SSE skeleton both endpoints stream with: opening chunks, a chunk per event that
has something to show, an error event for a failed sequence, the usage chunk when asked
for, `data: [DONE]`; the generation finished however the stream ends."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

from pydantic import BaseModel

from server.serving.detokenizer import Track
from server.serving.errors import engine_error
from server.serving.generation import Generation


def sse(data: BaseModel | dict[str, Any]) -> str:
    payload = data.model_dump_json() if isinstance(data, BaseModel) else json.dumps(data)
    return f"data: {payload}\n\n"


async def stream(
    gen: Generation,
    opening: Callable[[], Iterable[BaseModel]],
    chunk: Callable[[Track], BaseModel | None],
    usage: Callable[[], BaseModel] | None,
) -> AsyncIterator[str]:
    """SSE lines for `gen`.

    Args:
        opening: the chunks sent before any event (chat's role, completion's echo).
        chunk: the chunk for a track an event advanced; None when it has nothing to show.
        usage: the final usage chunk, None when the request did not ask for it.
    """
    try:
        for first in opening():
            yield sse(first)
        async for t in gen.events():
            if t.finish_reason == "error":
                yield sse(engine_error(t.error).body())
                continue
            c = chunk(t)
            if c is not None:
                yield sse(c)
        if usage is not None:
            yield sse(usage())
        yield "data: [DONE]\n\n"
    finally:
        gen.finish()
