"""The serving handlers: OpenAI requests in, engine requests out, token events back to
text, logprobs, SSE chunks and metrics. The router (server/api.py) does HTTP only; the
engine does token ids only; this module owns the tokenizer.

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
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

from pydantic import BaseModel

from server.metrics import Metrics, RequestRecord
from server.policy import DepthChoice, DepthRequest, Policy, PolicyError, parse_budget
from server.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    ChatTokenLogprob,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    DeltaMessage,
    ErrorInfo,
    ErrorResponse,
    ModelCard,
    ModelList,
    SoftInfo,
    TopLogprob,
    Usage,
    new_id,
    now,
)
from server.types import GenerationRequest, QueueFull, SamplingParams, TokenEvent, TokenLogprob

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


class Detokenizer:
    """Incremental detokenization that never emits half a character: text is released only
    once the window decodes without a trailing U+FFFD (an incomplete UTF-8 sequence)."""

    def __init__(self, tokenizer: Any, prompt_ids: Sequence[int]) -> None:
        self.tok = tokenizer
        self.ids = list(prompt_ids[-4:])  # a little context: leading-space rules
        self.prefix = self.read = len(self.ids)

    def _decode(self, ids: list[int]) -> str:
        return str(self.tok.decode(ids, skip_special_tokens=True))

    def add(self, token_id: int) -> str:
        self.ids.append(token_id)
        before = self._decode(self.ids[self.prefix : self.read])
        full = self._decode(self.ids[self.prefix :])
        if len(full) > len(before) and not full.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return full[len(before) :]
        return ""

    def flush(self) -> str:
        """The rest at the end of the sequence (a truncated character stays U+FFFD)."""
        before = self._decode(self.ids[self.prefix : self.read])
        full = self._decode(self.ids[self.prefix :])
        self.prefix = self.read = len(self.ids)
        return full[len(before) :]


@dataclass
class Track:
    """One sequence's progress: visible text (stop strings cut, held back while a stop
    might still be forming), token logprobs, timings."""

    request: GenerationRequest
    index: int  # choice index
    prompt_index: int
    detok: Detokenizer
    stops: tuple[str, ...]
    text: str = ""
    sent: int = 0  # chars of `text` already streamed
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: tuple[TokenLogprob | None, ...] | None = None
    finish_reason: str | None = None
    error: str | None = None
    depth: int = 0
    first_token_at: float | None = None
    last_token_at: float | None = None
    itl: list[float] = field(default_factory=list)
    queue_s: float | None = None
    recorded: bool = False

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def on_event(self, ev: TokenEvent, t: float) -> None:
        self.depth = ev.depth or self.depth
        if ev.prompt_logprobs is not None:
            self.prompt_logprobs = ev.prompt_logprobs
        if ev.queue_seconds is not None and self.queue_s is None:
            self.queue_s = ev.queue_seconds
        if ev.token_id is not None:
            if self.last_token_at is not None:
                self.itl.append(t - self.last_token_at)
            self.first_token_at = self.first_token_at or t
            self.last_token_at = t
            self.token_ids.append(ev.token_id)
            if ev.logprob is not None:
                self.logprobs.append(ev.logprob)
            self._append(self.detok.add(ev.token_id))
        if ev.finish_reason is not None and not self.done:
            if ev.finish_reason in ("stop", "length"):
                self._append(self.detok.flush())
            if not self.done:  # a stop string in the flushed tail wins
                self.finish_reason = ev.finish_reason
                self.error = ev.error

    def _append(self, piece: str) -> None:
        if not piece or self.done:
            return
        start = max(0, len(self.text) - max((len(s) for s in self.stops), default=0) + 1)
        self.text += piece
        hits = [i for i in (self.text.find(s, start) for s in self.stops) if i >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            self.finish_reason = "stop"

    def releasable(self) -> str:
        """New text safe to stream: all of it once done, else what no stop can still claim."""
        hold = 0 if self.done else max((len(s) for s in self.stops), default=1) - 1
        end = max(self.sent, len(self.text) - hold)
        piece, self.sent = self.text[self.sent : end], end
        return piece


def engine_error(t: Track) -> APIError:
    """A sequence the engine failed (not the client's doing): 500, or an SSE error event."""
    message = f"generation failed: {t.error or 'engine error'}"
    return APIError(500, message, "server_error", code="engine_error")


def sse(data: BaseModel | dict[str, Any]) -> str:
    payload = data.model_dump_json() if isinstance(data, BaseModel) else json.dumps(data)
    return f"data: {payload}\n\n"


class OpenAIServing:
    """Completions and chat over one model and one engine."""

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
            return self.policy.choose(DepthRequest(prompt_len, max_tokens, budget, pin))
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
        if choice.budget_ms is not None:
            deadline = hints.arrival + choice.budget_ms / 1000.0
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
                streams.append(self.engine.submit(t.request))
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
        if choice.budget_ms is not None:
            outcome = "infeasible"
            if choice.feasible:
                slowest = max(((t.last_token_at or end) for t in tracks), default=end)
                met = (slowest - hints.arrival) * 1000 <= choice.budget_ms
                outcome = "met" if met else "missed"
            self.metrics.budget.labels(outcome=outcome).inc()

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

    # -- /v1/completions --------------------------------------------------------------------
    def _tokenize_prompts(self, req: CompletionRequest) -> list[list[int]]:
        out: list[list[int]] = []
        for p in req.prompts():
            if isinstance(p, str):
                out.append(list(self.tokenizer(p)["input_ids"]) if p else [])
            else:
                if any(t >= self.vocab_size for t in p):
                    raise bad_request(
                        f"prompt token ids must be below the vocabulary size {self.vocab_size}",
                        "prompt",
                    )
                out.append(list(p))
        return out

    async def completions(self, req: CompletionRequest, hints: Hints) -> Served:
        if req.n > self.max_n:
            raise bad_request(f"n must be at most {self.max_n}", "n")
        if req.max_tokens == 0 and not req.echo:
            raise bad_request("max_tokens must be at least 1 (0 only with echo)", "max_tokens")
        prompts = await self._off_loop(self._tokenize_prompts, req, len(str(req.prompt)))
        if len(prompts) * req.n > self.max_n * 8:
            raise bad_request(
                f"at most {self.max_n * 8} sequences (prompts x n) per request", "prompt"
            )
        max_tokens = max(req.max_tokens, 1)  # echo-only: generate one token, show none
        for ids in prompts:
            self._check_length(len(ids), max_tokens, "prompt")
        choice = self._choose(req.model, hints, max(map(len, prompts)), max_tokens)
        rid = new_id("cmpl")
        tracks, streams = self._submit(
            prompts,
            req.to_sampling_params(max_tokens),
            req.n,
            choice,
            hints,
            req.stop_strings(),
            rid,
        )
        if req.stream:
            return Served(
                choice,
                stream=self._stream_completion(req, rid, prompts, tracks, streams, choice, hints),
                close=lambda: self._close(tracks, choice, hints),
            )
        try:
            async for _ in self._events(tracks, streams):
                pass
        finally:
            self._record(tracks, choice, hints)
        self._raise_engine_error(tracks)
        choices = [self._completion_choice(req, prompts, t, final=True) for t in tracks]
        return Served(
            choice,
            body=CompletionResponse(
                id=rid,
                created=now(),
                model=req.model or self.model_name,
                choices=choices,
                usage=self._usage(prompts, tracks, req.max_tokens > 0),
                soft=SoftInfo(
                    depth=choice.depth,
                    budget_ms=choice.budget_ms,
                    predicted_ms=round(choice.predicted_ms, 3),
                ),
            ),
        )

    def _echo_text(self, req: CompletionRequest, prompts: list[list[int]], i: int) -> str:
        p = req.prompts()[i]
        return p if isinstance(p, str) else str(self.tokenizer.decode(prompts[i]))

    def _completion_choice(
        self, req: CompletionRequest, prompts: list[list[int]], t: Track, final: bool
    ) -> CompletionChoice:
        show_tokens = req.max_tokens > 0
        text = t.text if show_tokens else ""
        prefix = self._echo_text(req, prompts, t.prompt_index) if req.echo else ""
        lp = None
        if req.logprobs is not None:
            lp = CompletionLogprobs()
            if req.echo:
                self._add_prompt_logprobs(lp, prompts[t.prompt_index], t.prompt_logprobs)
            if show_tokens:
                self._add_logprobs(lp, t.logprobs, len(prefix))
        return CompletionChoice(
            index=t.index,
            text=prefix + text,
            logprobs=lp,
            finish_reason=t.finish_reason if final else None,
        )

    def _top(self, entry: TokenLogprob) -> dict[str, float]:
        top = {self._token_str(tid): lp for tid, lp in entry.top}
        top.setdefault(self._token_str(entry.token_id), entry.logprob)
        return top

    def _add_prompt_logprobs(
        self,
        lp: CompletionLogprobs,
        ids: list[int],
        entries: tuple[TokenLogprob | None, ...] | None,
    ) -> None:
        offset = 0
        for k, tid in enumerate(ids):
            s = self._token_str(tid)
            e = entries[k] if entries is not None and k < len(entries) else None
            lp.tokens.append(s)
            lp.token_logprobs.append(None if e is None else e.logprob)
            lp.top_logprobs.append(None if e is None else self._top(e))
            lp.text_offset.append(offset)
            offset += len(s)

    def _add_logprobs(
        self, lp: CompletionLogprobs, entries: Sequence[TokenLogprob], offset: int
    ) -> None:
        for e in entries:
            s = self._token_str(e.token_id)
            lp.tokens.append(s)
            lp.token_logprobs.append(e.logprob)
            lp.top_logprobs.append(self._top(e))
            lp.text_offset.append(offset)
            offset += len(s)

    async def _stream_completion(
        self,
        req: CompletionRequest,
        rid: str,
        prompts: list[list[int]],
        tracks: list[Track],
        streams: dict[str, AsyncIterator[TokenEvent]],
        choice: DepthChoice,
        hints: Hints,
    ) -> AsyncIterator[str]:
        created, model = now(), req.model or self.model_name
        offsets = {t.index: 0 for t in tracks}  # text_offset of the next streamed token
        sent_lp = {t.index: 0 for t in tracks}
        prompt_lp_sent: set[int] = set()

        def chunk(c: CompletionChoice) -> str:
            return sse(CompletionResponse(id=rid, created=created, model=model, choices=[c]))

        try:
            if req.echo:
                for t in tracks:
                    text = self._echo_text(req, prompts, t.prompt_index)
                    offsets[t.index] = len(text)
                    # prompt logprobs arrive with the first event; echo the text right away
                    yield chunk(CompletionChoice(index=t.index, text=text))
            async for t in self._events(tracks, streams):
                piece = t.releasable() if req.max_tokens > 0 else ""
                lp = None
                if req.logprobs is not None:
                    lp = CompletionLogprobs()
                    if req.echo and t.index not in prompt_lp_sent:
                        prompt_lp_sent.add(t.index)
                        self._add_prompt_logprobs(lp, prompts[t.prompt_index], t.prompt_logprobs)
                    new = t.logprobs[sent_lp[t.index] :]
                    if req.max_tokens > 0:
                        self._add_logprobs(lp, new, offsets[t.index])
                        offsets[t.index] += sum(len(self._token_str(e.token_id)) for e in new)
                    sent_lp[t.index] = len(t.logprobs)
                if t.finish_reason == "error":
                    yield sse(engine_error(t).body())
                    continue
                if piece or lp is not None or t.done:
                    yield chunk(
                        CompletionChoice(
                            index=t.index, text=piece, logprobs=lp, finish_reason=t.finish_reason
                        )
                    )
            if req.include_usage():
                yield sse(
                    CompletionResponse(
                        id=rid,
                        created=created,
                        model=model,
                        choices=[],
                        usage=self._usage(prompts, tracks, req.max_tokens > 0),
                    )
                )
            yield "data: [DONE]\n\n"
        finally:
            self._record(tracks, choice, hints)

    # -- /v1/chat/completions ---------------------------------------------------------------
    def _chat_prompt(self, req: ChatCompletionRequest) -> list[int]:
        if self.tokenizer is None or not getattr(self.tokenizer, "chat_template", None):
            raise bad_request("this model has no chat template; use /v1/completions", "messages")
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        try:
            text = self.tokenizer.apply_chat_template(
                messages,
                tokenize=False,
                add_generation_prompt=req.add_generation_prompt,
                **(req.chat_template_kwargs or {}),
            )
        except Exception as e:  # jinja raises for roles/orders the template refuses
            raise bad_request(f"the chat template rejected these messages: {e}", "messages") from e
        return list(self.tokenizer(str(text), add_special_tokens=False)["input_ids"])

    async def chat(self, req: ChatCompletionRequest, hints: Hints) -> Served:
        if req.n > self.max_n:
            raise bad_request(f"n must be at most {self.max_n}", "n")
        ids = await self._off_loop(self._chat_prompt, req, sum(len(m.text()) for m in req.messages))
        max_tokens = req.requested_max_tokens()
        if max_tokens is None:  # OpenAI: up to the context window
            max_tokens = max(1, self.max_model_len - len(ids))
        self._check_length(len(ids), max_tokens, "messages")
        choice = self._choose(req.model, hints, len(ids), max_tokens)
        rid = new_id("chatcmpl")
        tracks, streams = self._submit(
            [ids], req.to_sampling_params(max_tokens), req.n, choice, hints, req.stop_strings(), rid
        )
        if req.stream:
            return Served(
                choice,
                stream=self._stream_chat(req, rid, [ids], tracks, streams, choice, hints),
                close=lambda: self._close(tracks, choice, hints),
            )
        try:
            async for _ in self._events(tracks, streams):
                pass
        finally:
            self._record(tracks, choice, hints)
        self._raise_engine_error(tracks)
        choices = [
            ChatChoice(
                index=t.index,
                message=AssistantMessage(content=t.text),
                logprobs=self._chat_logprobs(t.logprobs) if req.logprobs else None,
                finish_reason=t.finish_reason,
            )
            for t in tracks
        ]
        return Served(
            choice,
            body=ChatCompletionResponse(
                id=rid,
                created=now(),
                model=req.model or self.model_name,
                choices=choices,
                usage=self._usage([ids], tracks),
                soft=SoftInfo(
                    depth=choice.depth,
                    budget_ms=choice.budget_ms,
                    predicted_ms=round(choice.predicted_ms, 3),
                ),
            ),
        )

    def _chat_logprobs(self, entries: Sequence[TokenLogprob]) -> ChatLogprobs:
        content = []
        for e in entries:
            s = self._token_str(e.token_id)
            top = [
                TopLogprob(token=(ts := self._token_str(tid)), logprob=lp, bytes=list(ts.encode()))
                for tid, lp in e.top
            ]
            content.append(
                ChatTokenLogprob(
                    token=s, logprob=e.logprob, bytes=list(s.encode()), top_logprobs=top
                )
            )
        return ChatLogprobs(content=content)

    async def _stream_chat(
        self,
        req: ChatCompletionRequest,
        rid: str,
        prompts: list[list[int]],
        tracks: list[Track],
        streams: dict[str, AsyncIterator[TokenEvent]],
        choice: DepthChoice,
        hints: Hints,
    ) -> AsyncIterator[str]:
        created, model = now(), req.model or self.model_name
        sent_lp = {t.index: 0 for t in tracks}

        def chunk(c: ChatChunkChoice) -> str:
            return sse(ChatCompletionChunk(id=rid, created=created, model=model, choices=[c]))

        try:
            for t in tracks:
                yield chunk(
                    ChatChunkChoice(index=t.index, delta=DeltaMessage(role="assistant", content=""))
                )
            async for t in self._events(tracks, streams):
                if t.finish_reason == "error":
                    yield sse(engine_error(t).body())
                    continue
                piece = t.releasable()
                lp = None
                if req.logprobs:
                    lp = self._chat_logprobs(t.logprobs[sent_lp[t.index] :])
                    sent_lp[t.index] = len(t.logprobs)
                if piece or t.done or (lp is not None and lp.content):
                    yield chunk(
                        ChatChunkChoice(
                            index=t.index,
                            delta=DeltaMessage(content=piece or None),
                            logprobs=lp,
                            finish_reason=t.finish_reason,
                        )
                    )
            if req.include_usage():
                yield sse(
                    ChatCompletionChunk(
                        id=rid,
                        created=created,
                        model=model,
                        choices=[],
                        usage=self._usage(prompts, tracks),
                    )
                )
            yield "data: [DONE]\n\n"
        finally:
            self._record(tracks, choice, hints)
