"""The serving layer's shared part: OpenAI requests in, engine requests out, token events
back to text, logprobs, SSE chunks and metrics. The router (server/api.py) does HTTP only;
the engine does token ids only; this layer owns the tokenizer. The endpoints are in
serving_completion.py and serving_chat.py, put together in serving.py (the vLLM layout).

Each handler validates, picks the depth (policy), submits every sequence (`n` per
prompt), and returns a `Served`: a response body or an async iterator of SSE lines, plus
the depth choice for the `x-soft-*` headers. Client mistakes raise `APIError` (mapped to
OpenAI-shaped errors once, in the app); a disconnect cancels the consumer and aborts every
unfinished sequence, freeing its KV blocks.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import re
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from typing import Any, TypeVar

from pydantic import BaseModel

from server.engine.types import GenerationRequest, QueueFull, SamplingParams, TokenEvent
from server.metrics import Metrics, RequestRecord
from server.policy.deadline import DeadlineController
from server.policy.policies import (
    DepthChoice,
    DepthRequest,
    Policy,
    PolicyError,
    parse_budget,
    parse_budget_mode,
)
from server.serving.detokenizer import Detokenizer, Track
from server.serving.protocol import (
    ErrorInfo,
    ErrorResponse,
    ModelCard,
    ModelList,
    SoftInfo,
    Usage,
    now,
)

log = logging.getLogger(__name__)
LONG_INPUT_CHARS = 16_384  # longer prompts are tokenized off the event loop
R = TypeVar("R")
T = TypeVar("T")
_DEPTH = re.compile(r"[0-9]{1,6}")  # ASCII digits only: int() of "²" or of 5000 digits fails


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
    return APIError(400, message, param=param, code="invalid_value" if param else None)


@dataclass(frozen=True)
class Hints:
    """What the HTTP layer read from the request besides the body."""

    arrival: float  # time.monotonic() at receipt
    budget: str | None = None  # x-latency-budget
    depth: str | None = None  # x-soft-depth
    budget_mode: str | None = None  # x-latency-budget-mode: strict | best-effort
    slo_ttft: str | None = None  # x-slo-ttft-ms
    slo_tpot: str | None = None  # x-slo-tpot-ms


@dataclass
class Served:
    """A handler's result: a body, or SSE lines to stream; the choice for the headers."""

    choice: DepthChoice
    body: BaseModel | None = None
    stream: AsyncIterator[str] | None = None
    # after the response, however it ended (even a stream never started): abort what is
    # still running and record metrics; idempotent
    close: Callable[[], None] = lambda: None

    def headers(self) -> dict[str, str]:
        return {
            "x-soft-depth": str(self.choice.depth),
            "x-soft-predicted-ms": f"{self.choice.predicted_ms:.1f}",
        }


def engine_error(t: Track) -> APIError:
    """A sequence the engine failed (not the client's doing): 500, or an SSE error event."""
    message = f"generation failed: {t.error or 'engine error'}"
    return APIError(500, message, "server_error", code="engine_error")


def sse(data: BaseModel | dict[str, Any]) -> str:
    payload = data.model_dump_json() if isinstance(data, BaseModel) else json.dumps(data)
    return f"data: {payload}\n\n"


class ServingBase:
    """What both endpoints share: one model, one engine, the policy, the metrics."""

    def __init__(
        self,
        model: Any,  # SortedModel
        engine: Any,  # server.engine.Engine (or a test double with the same interface)
        policy: Policy,
        metrics: Metrics,
        model_name: str,
        max_n: int = 16,
    ) -> None:
        self.model, self.engine, self.policy, self.metrics = model, engine, policy, metrics
        self.model_name = model_name
        self.tokenizer = model.tokenizer
        self.max_n = max_n
        self.max_model_len: int = engine.max_model_len
        self.vocab_size: int = model.cfg.vocab_size
        self.created = now()
        self.deadlines = DeadlineController(engine, policy.exits, policy.profile)

    # -- /v1/models -------------------------------------------------------------------------
    def models(self) -> ModelList:
        cards = [
            ModelCard(
                id=self.model_name,
                created=self.created,
                root=self.model.source,
                max_model_len=self.max_model_len,
                depth=self.policy.default_depth,
            )
        ]
        for d in self.model.exits:
            cards.append(
                ModelCard(
                    id=f"{self.model_name}@{d}",
                    created=self.created,
                    parent=self.model_name,
                    max_model_len=self.max_model_len,
                    depth=d,
                )
            )
        return ModelList(data=cards)

    # -- shared steps -----------------------------------------------------------------------
    def _pinned_depth(self, model: str | None, hints: Hints) -> int | None:
        pin: int | None = None
        if model is not None and model != self.model_name:
            name, sep, depth = model.rpartition("@")
            if not sep or name != self.model_name:
                raise APIError(
                    404,
                    f"the model {model!r} does not exist; this server serves "
                    f"{self.model_name!r} (see GET /v1/models)",
                    param="model",
                    code="model_not_found",
                )
            if not _DEPTH.fullmatch(depth):
                raise bad_request(f"{model!r}: the depth after '@' must be a whole number", "model")
            pin = int(depth)
        if hints.depth is not None:
            value = hints.depth.strip()
            if not _DEPTH.fullmatch(value):
                raise bad_request(
                    f"x-soft-depth {hints.depth!r} must be a whole number", "x-soft-depth"
                )
            if pin is not None and pin != int(value):
                raise bad_request(
                    f"model pins depth {pin} but x-soft-depth says {value}", "x-soft-depth"
                )
            pin = int(value)
        return pin

    def _choose(
        self, model: str | None, hints: Hints, prompt_len: int, max_tokens: int
    ) -> DepthChoice:
        pin = self._pinned_depth(model, hints)
        try:
            budget = parse_budget(hints.budget) if hints.budget is not None else None
            ttft = None if hints.slo_ttft is None else parse_budget(hints.slo_ttft, "x-slo-ttft-ms")
            tpot = None if hints.slo_tpot is None else parse_budget(hints.slo_tpot, "x-slo-tpot-ms")
            strict = parse_budget_mode(hints.budget_mode)
            return self.policy.choose(
                DepthRequest(prompt_len, max_tokens, budget, pin, ttft, tpot, strict)
            )
        except PolicyError as e:
            param = "x-soft-depth" if e.param == "model" and hints.depth is not None else e.param
            raise bad_request(str(e), param) from e

    def _check_length(self, prompt_len: int, max_tokens: int, param: str) -> None:
        if prompt_len == 0:
            raise bad_request("the prompt is empty", param)
        if prompt_len + max_tokens > self.max_model_len:
            raise bad_request(
                f"this model's context window is {self.max_model_len} tokens; the prompt has "
                f"{prompt_len} tokens and max_tokens asks for {max_tokens} more "
                f"({prompt_len + max_tokens}): shorten the prompt or lower max_tokens",
                "max_tokens" if prompt_len < self.max_model_len else param,
            )

    def _submit(
        self,
        prompts: list[list[int]],
        params: SamplingParams,
        n: int,
        choice: DepthChoice,
        hints: Hints,
        stops: tuple[str, ...],
        base_id: str,
    ) -> tuple[list[Track], dict[str, AsyncIterator[TokenEvent]]]:
        """One engine request per (prompt, choice), all or nothing. Returns the tracks and
        each request's event stream."""
        deadline = None
        if choice.target_ms is not None:
            deadline = hints.arrival + choice.target_ms / 1000.0
        tracks: list[Track] = []
        for i, ids in enumerate(prompts):
            for j in range(n):
                p = params
                if params.seed is not None and n > 1:  # n choices differ, each reproducible
                    p = replace(params, seed=(params.seed + j) % 2**63)
                req = GenerationRequest(
                    f"{base_id}-{i * n + j}", tuple(ids), p, choice.depth, deadline, hints.arrival
                )
                tracks.append(Track(req, i * n + j, i, Detokenizer(self.tokenizer, ids), stops))
        try:
            for t in tracks:
                self.engine.check(t.request)
        except ValueError as e:
            raise bad_request(str(e), "max_tokens") from e
        streams: list[AsyncIterator[TokenEvent]] = []
        try:
            for t in tracks:
                streams.append(self.deadlines.follow(t.request, self.engine.submit(t.request)))
        except QueueFull as e:
            for t in tracks[: len(streams)]:
                self.engine.abort(t.request.request_id)
            raise APIError(
                429,
                f"the server's queue is full; retry after {e.retry_after_s:.0f}s",
                type="rate_limit_error",
                code="queue_full",
                headers={"Retry-After": str(max(1, math.ceil(e.retry_after_s)))},
            ) from e
        except ValueError as e:
            for t in tracks[: len(streams)]:
                self.engine.abort(t.request.request_id)
            raise bad_request(str(e)) from e
        return tracks, dict(zip((t.request.request_id for t in tracks), streams, strict=True))

    async def _events(
        self, tracks: list[Track], streams: dict[str, AsyncIterator[TokenEvent]]
    ) -> AsyncIterator[Track]:
        """Merge every sequence's events; yields the track each event advanced. On exit
        (done, error, or the consumer cancelled by a disconnect) every unfinished sequence
        is aborted in the engine."""
        by_id = {t.request.request_id: t for t in tracks}
        queue: asyncio.Queue[tuple[str, TokenEvent | None]] = asyncio.Queue()

        async def pump(rid: str, it: AsyncIterator[TokenEvent]) -> None:
            try:
                async for ev in it:
                    await queue.put((rid, ev))
            finally:
                await queue.put((rid, None))

        tasks = [asyncio.create_task(pump(rid, it)) for rid, it in streams.items()]
        open_ = set(streams)
        try:
            while open_:
                rid, ev = await queue.get()
                track = by_id[rid]
                if ev is None:
                    open_.discard(rid)
                    if not track.done:  # the stream ended without a final event
                        track.finish_reason = "abort"
                    continue
                if track.done:
                    continue  # after a stop string: the abort's own event
                track.on_event(ev, time.monotonic())
                if track.done and ev.finish_reason is None:
                    self.engine.abort(rid)  # a stop string ended it: free its blocks now
                yield track
        finally:
            self._abort_unfinished(tracks)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def _abort_unfinished(self, tracks: list[Track]) -> None:
        """Cancel in the engine (freeing KV blocks) every sequence that has not finished."""
        for t in tracks:
            if t.finish_reason is None:
                t.finish_reason = "abort"
                self.engine.abort(t.request.request_id)

    def _close(self, tracks: list[Track], choice: DepthChoice, hints: Hints) -> None:
        self._abort_unfinished(tracks)
        self._record(tracks, choice, hints)

    def _record(self, tracks: list[Track], choice: DepthChoice, hints: Hints) -> None:
        """Metrics for the request's sequences; once, whichever path ends it first."""
        if all(t.recorded for t in tracks):
            return
        end = time.monotonic()
        for t in tracks:
            if t.recorded:
                continue
            t.recorded = True
            latency = (t.last_token_at or end) - hints.arrival
            self.metrics.observe(
                RequestRecord(
                    depth=t.depth or choice.depth,
                    finish_reason=t.finish_reason or "abort",
                    prompt_tokens=len(t.request.prompt_ids),
                    generated_tokens=len(t.token_ids),
                    latency=latency,
                    ttft=None if t.first_token_at is None else t.first_token_at - hints.arrival,
                    inter_token=tuple(t.itl),
                    queue=t.queue_s,
                )
            )
        if choice.target_ms is not None:  # a budget or SLOs: met | missed | infeasible
            outcome = "infeasible"
            if choice.feasible:
                slowest = max(((t.last_token_at or end) for t in tracks), default=end)
                met = (slowest - hints.arrival) * 1000 <= choice.target_ms
                outcome = "met" if met else "missed"
            depth = min((t.depth for t in tracks if t.depth), default=choice.depth)
            self.metrics.observe_budget(min(depth, choice.depth), outcome)
        if all(t.finish_reason == "length" and t.depth == choice.depth for t in tracks):
            slowest = max(((t.last_token_at or end) for t in tracks), default=end)
            waited = [t.queue_s for t in tracks if t.queue_s is not None]
            queue_ms = max(waited) * 1000.0 if waited else None
            self.policy.observe(choice, (slowest - hints.arrival) * 1000.0, queue_ms)

    @staticmethod
    def _served_at(choice: DepthChoice, tracks: list[Track]) -> DepthChoice:
        """The choice as served: the depth the engine finished at (it may lower a depth
        mid-request, never raise it), the policy's prediction unchanged."""
        depth = min((t.depth for t in tracks if t.depth), default=choice.depth)
        return replace(choice, depth=min(depth, choice.depth))

    @staticmethod
    def _soft_info(choice: DepthChoice) -> SoftInfo:
        return SoftInfo(
            depth=choice.depth,
            budget_ms=choice.budget_ms,
            predicted_ms=round(choice.predicted_ms, 3),
        )

    @staticmethod
    def _usage(prompts: list[list[int]], tracks: list[Track], shown: bool = True) -> Usage:
        p = sum(len(ids) for ids in prompts)
        c = sum(len(t.token_ids) for t in tracks) if shown else 0  # echo-only hides its token
        return Usage(prompt_tokens=p, completion_tokens=c, total_tokens=p + c)

    async def _off_loop(self, fn: Callable[[R], T], req: R, size: int) -> T:
        """Tokenize long inputs on a worker thread so the event loop keeps streaming."""
        if size < LONG_INPUT_CHARS:
            return fn(req)
        return await asyncio.to_thread(fn, req)

    def _token_str(self, token_id: int) -> str:
        return str(self.tokenizer.decode([token_id]))

    @staticmethod
    def _raise_engine_error(tracks: list[Track]) -> None:
        for t in tracks:
            if t.finish_reason == "error":
                raise engine_error(t)
