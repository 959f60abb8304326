"""Text work off the event loop: a request's tokenisation and chat templating run on a small
pool of worker threads, so /health and every stream keep answering while one request's
text is prepared, and with a bound on what that preparation may cost:

- a deadline (`TextPool.timeout_s`): past it the client gets a 400; a chat template is
  stopped where it stands (a trace hook on the worker thread raises inside the template's
  own frames at the next line it runs), tokenisation is bounded by the body limit;
- a size cap on a template a request brings (`MAX_TEMPLATE_CHARS`), which is refused
  anyway unless the operator started the server with --trust-request-chat-template.
"""

from __future__ import annotations

import asyncio
import functools
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from types import FrameType
from typing import Any, TypeVar

from server.serving.errors import bad_request

T = TypeVar("T")

MAX_TEMPLATE_CHARS = 64 * 1024  # a request's own chat template; a model's is ~1-10 KiB
TEMPLATE_CODE = "<template>"  # the filename of the code Jinja compiles templates into


class TemplateTimeout(Exception):
    """A chat template ran past its deadline (raised inside the template's frames)."""


@contextmanager
def deadline_for_templates(seconds: float) -> Iterator[None]:
    """Within the block, on this thread, a Jinja template that runs past `seconds` raises
    TemplateTimeout at its next line (loops included). Other code is not traced line by
    line: the cost is one check per Python call while the block runs."""
    deadline = time.monotonic() + seconds

    def in_template(frame: FrameType, event: str, arg: Any) -> Any:
        if event == "line" and time.monotonic() > deadline:
            raise TemplateTimeout(f"the chat template ran for over {seconds:g}s")
        return in_template

    def on_call(frame: FrameType, event: str, arg: Any) -> Any:
        return in_template if frame.f_code.co_filename == TEMPLATE_CODE else None

    previous = sys.gettrace()
    sys.settrace(on_call)
    try:
        yield
    finally:
        sys.settrace(previous)


class TextPool:
    """Worker threads for tokenisation and templating, and their deadline."""

    def __init__(self, workers: int = 4, timeout_s: float = 5.0) -> None:
        self.timeout_s = timeout_s
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="soft-text")

    async def run(self, param: str, fn: Callable[..., T], *args: Any) -> T:
        """`fn(*args)` on a worker thread; `param` names the input a timeout blames.

        Raises:
            APIError: 400 when it takes longer than `timeout_s` (the client's input is too
                large or its template too slow); whatever `fn` raises otherwise.
        """
        loop = asyncio.get_running_loop()
        job = functools.partial(self._bounded, fn, *args)
        future = loop.run_in_executor(self._pool, job)
        try:
            return await asyncio.wait_for(future, self.timeout_s + 1.0)
        except (TemplateTimeout, asyncio.TimeoutError) as e:
            raise bad_request(
                f"preparing this request's text took over {self.timeout_s:g}s: shorten the "
                "prompt (or simplify the chat template)",
                param,
            ) from e

    def _bounded(self, fn: Callable[..., T], *args: Any) -> T:
        with deadline_for_templates(self.timeout_s):
            return fn(*args)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
