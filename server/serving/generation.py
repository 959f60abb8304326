"""What every endpoint shares: the serving context (one model, one engine, the policy, the
metrics) and a `Generation`, one request's sequences in the engine.

A handler validates, asks the context for the depth (`choose`), starts a Generation
(`start`: every sequence, `n` per prompt, all or nothing), and returns a `Served`: a
response body or SSE lines (server/serving/stream.py), plus the depth choice for the
`x-soft-*` headers. When a Generation ends, however it ends, `finish` aborts what still
runs (freeing its KV blocks), records the metrics and tells the policy what the request
took (the policy's calibration), and, for a request that set no max_tokens, how long its
output was (`OutputLengths`: what the policy predicts the next such request with).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, TypeVar

from pydantic import BaseModel

from server.engine.types import (
    EngineClient,
    GenerationRequest,
    QueueFull,
    SamplingParams,
    TokenEvent,
)
from server.metrics import Metrics, RequestRecord
from server.policy.deadline import DeadlineController
from server.policy.policies import DepthChoice, Policy, PolicyError
from server.serving.detokenizer import Detokenizer, Track
from server.serving.errors import APIError, bad_request, engine_error
from server.serving.headers import Hints, depth_request
from server.serving.protocol import PromptTokensDetails, SamplingFields, SoftInfo, Usage, now
from server.serving.structured import Grammar, Grammars
from server.serving.text import TextPool

if TYPE_CHECKING:
    from models.llama import SortedModel

T = TypeVar("T")


@dataclass(frozen=True)
class ServingOptions:
    """What the operator set for the serving layer (from server/settings.py)."""

    max_n: int = 16  # largest n
    max_queue: int | None = None  # sequences the engine queues; None: the engine's own
    trust_request_chat_template: bool = False  # a request may bring its own template
    text_timeout_s: float = 5.0  # one request's templating + tokenisation, at most
    output_tokens_prior: int = 256  # expected output of a request without max_tokens
    grammar_timeout_s: float = 5.0  # compiling one request's schema / regex / grammar


class OutputLengths:
    """How long outputs are when a request sets no max_tokens (the OpenAI SDK's usual
    chat request), per route, learnt from the sequences that finished (stop or length):
    the `quantile` of the last `window` of them. Until `min_seen` have finished, the
    missing ones count as `prior` tokens, so the estimate moves from the prior to the
    data smoothly. The policy predicts such a request's latency with this length (capped
    at what its context allows); one that runs longer is the deadline controller's to
    lower."""

    def __init__(
        self, prior: int = 256, quantile: float = 0.75, window: int = 256, min_seen: int = 8
    ) -> None:
        self.prior, self.quantile, self.window, self.min_seen = prior, quantile, window, min_seen
        self._seen: dict[str, deque[int]] = {}

    def expect(self, route: str, limit: int) -> int:
        """The output length to predict with for a new request on `route` (1..limit)."""
        seen = list(self._seen.get(route, ()))
        sample = sorted(seen + [self.prior] * max(0, self.min_seen - len(seen)))
        estimate = sample[min(len(sample) - 1, int(self.quantile * len(sample)))]
        return max(1, min(limit, estimate))

    def observe(self, route: str, tokens: int) -> None:
        self._seen.setdefault(route, deque(maxlen=self.window)).append(tokens)


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


class ServingContext:
    """One model, one engine, the policy and the metrics, shared by every endpoint."""

    def __init__(
        self,
        model: SortedModel,
        engine: EngineClient,
        policy: Policy,
        metrics: Metrics,
        model_name: str,
        options: ServingOptions | None = None,
    ) -> None:
        self.model, self.engine, self.policy, self.metrics = model, engine, policy, metrics
        self.model_name = model_name
        self.options = options = options or ServingOptions()
        self.tokenizer = model.tokenizer
        self.max_n = options.max_n
        # sequences the engine ever queues at once: a request with more can never be admitted
        self.max_queue: int = options.max_queue or engine.max_queue
        self.text = TextPool(timeout_s=options.text_timeout_s)
        eos = set(model.cfg.eos_token_ids)
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            eos.add(self.tokenizer.eos_token_id)  # the engine's stop tokens, the same way
        self.grammars = Grammars(
            self.tokenizer, model.cfg.vocab_size, eos, timeout_s=options.grammar_timeout_s
        )
        self.lengths = OutputLengths(prior=options.output_tokens_prior)
        self.max_model_len: int = engine.max_model_len
        self.vocab_size: int = model.cfg.vocab_size
        self.created = now()
        self.deadlines = DeadlineController(engine, policy.exits, policy.profile)

    def choose(
        self, model: str | None, hints: Hints, prompts: list[list[int]], max_tokens: int
    ) -> DepthChoice:
        """The depth for a request (pin, budget, SLOs from its headers; the policy), its
        prefill priced at the longest prompt's tokens the prefix cache does not hold."""
        prompt_len = max(map(len, prompts))
        uncached = dict.fromkeys(self.policy.exits, 0)
        for ids in prompts:
            for d, n in self.engine.cached_tokens(ids, self.policy.exits).items():
                uncached[d] = max(uncached[d], len(ids) - n)
        cached = {d: prompt_len - n for d, n in uncached.items()}
        request = depth_request(model, self.model_name, hints, prompt_len, max_tokens, cached)
        try:
            return self.policy.choose(request)
        except PolicyError as e:
            param = "x-soft-depth" if e.param == "model" and hints.depth is not None else e.param
            raise bad_request(str(e), param) from e

    def check_length(self, prompt_len: int, max_tokens: int, param: str) -> None:
        if prompt_len == 0:
            raise bad_request("the prompt is empty", param)
        if prompt_len + max_tokens > self.max_model_len:
            raise bad_request(
                f"this model's context window is {self.max_model_len} tokens; the prompt has "
                f"{prompt_len} tokens and max_tokens asks for {max_tokens} more "
                f"({prompt_len + max_tokens}): shorten the prompt or lower max_tokens",
                "max_tokens" if prompt_len < self.max_model_len else param,
            )

    def check_fields(self, req: SamplingFields) -> None:
        """400 for what the request asks that this server does not do, or a logit_bias
        key outside the vocabulary."""
        if (refused := req.unsupported()) is not None:
            param, message = refused
            raise APIError(400, message, param=param, code="unsupported_parameter")
        if req.n > self.max_n:
            raise bad_request(f"n must be at most {self.max_n}", "n")
        for token_id, _ in req.logit_bias_ids():
            if token_id >= self.vocab_size:
                raise bad_request(
                    f"logit_bias: token id {token_id} is not below the vocabulary size "
                    f"{self.vocab_size}",
                    "logit_bias",
                )

    async def grammar(self, req: SamplingFields) -> Grammar | None:
        """The request's structured-output constraint compiled (off the event loop,
        bounded, cached), or None; a 400 naming the field when it does not compile."""
        spec = req.structured()
        if spec is None:
            return None
        if self.tokenizer is None:
            raise bad_request("this model has no tokenizer: no structured outputs", spec.param)
        return await self.grammars.compile(spec)

    def check_admissible(self, sequences: int, param: str) -> None:
        """400 for a request of more sequences (prompts x n) than the engine ever queues:
        a 429 would invite a retry that can never succeed."""
        if sequences > self.max_queue:
            raise bad_request(
                f"this request has {sequences} sequences (prompts x n) but the server admits "
                f"at most {self.max_queue} at once (--max-queue): send fewer prompts or a "
                "smaller n per request",
                param,
            )

    def token_str(self, token_id: int) -> str:
        return str(self.tokenizer.decode([token_id]))

    def start(
        self,
        prompts: list[list[int]],
        params: SamplingParams,
        n: int,
        choice: DepthChoice,
        hints: Hints,
        stops: tuple[str, ...],
        base_id: str,
        learn: str | None = None,
        grammar: Grammar | None = None,
    ) -> Generation:
        """One engine request per (prompt, choice), all or nothing. `learn`: the route
        whose OutputLengths this request's output lengths teach (it set no max_tokens);
        `grammar`: each sequence gets a matcher of its own over it.

        Raises:
            APIError: 400 for a request the engine can never run, 429 when its queue is full.
        """
        self.check_admissible(len(prompts) * n, "n" if n > 1 else "prompt")
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
                    f"{base_id}-{i * n + j}",
                    tuple(ids),
                    p,
                    choice.depth,
                    deadline,
                    hints.arrival,
                    constraint=None if grammar is None else grammar.matcher(),
                )
                tracks.append(Track(req, i * n + j, i, Detokenizer(self.tokenizer, ids), stops))
        try:
            for t in tracks:
                self.engine.check(t.request)
        except ValueError as e:
            raise bad_request(str(e), "max_tokens") from e
        return Generation(self, tracks, self._submit(tracks), choice, hints, learn)

    def _submit(self, tracks: list[Track]) -> dict[str, AsyncIterator[TokenEvent]]:
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
        return dict(zip((t.request.request_id for t in tracks), streams, strict=True))


class Generation:
    """One request's sequences in the engine: their tracks, merged events, and the end."""

    def __init__(
        self,
        ctx: ServingContext,
        tracks: list[Track],
        streams: dict[str, AsyncIterator[TokenEvent]],
        choice: DepthChoice,
        hints: Hints,
        learn: str | None = None,
    ) -> None:
        self.ctx, self.tracks, self.streams = ctx, tracks, streams
        self.choice, self.hints, self.learn = choice, hints, learn
        self._finished = False

    async def events(self) -> AsyncIterator[Track]:
        """Merge every sequence's events; yields the track each event advanced. On exit
        (done, error, or the consumer cancelled by a disconnect) every unfinished sequence
        is aborted in the engine."""
        by_id = {t.request.request_id: t for t in self.tracks}
        queue: asyncio.Queue[tuple[str, TokenEvent | None]] = asyncio.Queue()

        async def pump(rid: str, it: AsyncIterator[TokenEvent]) -> None:
            try:
                async for ev in it:
                    await queue.put((rid, ev))
            finally:
                await queue.put((rid, None))

        tasks = [asyncio.create_task(pump(rid, it)) for rid, it in self.streams.items()]
        open_ = set(self.streams)
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
                    self.ctx.engine.abort(rid)  # a stop string ended it: free its blocks now
                yield track
        finally:
            self._abort_unfinished()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def run(self) -> None:
        """Every event, for a response sent whole; raises APIError (500) when the engine
        failed a sequence."""
        try:
            async for _ in self.events():
                pass
        finally:
            self.finish()
        for t in self.tracks:
            if t.finish_reason == "error":
                raise engine_error(t.error)

    def finish(self) -> None:
        """The end, however it came (idempotent): abort what still runs, record the
        metrics, and let the policy learn from a request that ran as it chose."""
        self._abort_unfinished()
        if self._finished:
            return
        self._finished = True
        end = time.monotonic()
        self._record(end)
        self._teach_policy(end)
        if self.learn is not None:
            for t in self.tracks:
                if t.finish_reason in ("stop", "length"):
                    self.ctx.lengths.observe(self.learn, len(t.token_ids))

    def _abort_unfinished(self) -> None:
        """Cancel in the engine (freeing KV blocks) every sequence that has not finished."""
        for t in self.tracks:
            if t.finish_reason is None:
                t.finish_reason = "abort"
                self.ctx.engine.abort(t.request.request_id)

    def _slowest(self, end: float) -> float:
        return max(((t.last_token_at or end) for t in self.tracks), default=end)

    def _record(self, end: float) -> None:
        """Metrics for each sequence, and the budget's outcome for the request."""
        choice, arrival, metrics = self.choice, self.hints.arrival, self.ctx.metrics
        for t in self.tracks:
            metrics.observe(
                RequestRecord(
                    depth=t.depth or choice.depth,
                    finish_reason=t.finish_reason or "abort",
                    prompt_tokens=len(t.request.prompt_ids),
                    generated_tokens=len(t.token_ids),
                    latency=(t.last_token_at or end) - arrival,
                    ttft=None if t.first_token_at is None else t.first_token_at - arrival,
                    inter_token=tuple(t.itl),
                    queue=t.queue_s,
                )
            )
        if choice.target_ms is not None:  # a budget or SLOs: met | missed | infeasible
            outcome = "infeasible"
            if choice.feasible:
                met = (self._slowest(end) - arrival) * 1000 <= choice.target_ms
                outcome = "met" if met else "missed"
            metrics.observe_budget(self.served_choice().depth, outcome)

    def _teach_policy(self, end: float) -> None:
        """Requests that ran all their max_tokens at the chosen depth calibrate it."""
        choice = self.choice
        if all(t.finish_reason == "length" and t.depth == choice.depth for t in self.tracks):
            waited = [t.queue_s for t in self.tracks if t.queue_s is not None]
            queue_ms = max(waited) * 1000.0 if waited else None
            actual_ms = (self._slowest(end) - self.hints.arrival) * 1000.0
            self.ctx.policy.observe(choice, actual_ms, queue_ms)

    def served_choice(self) -> DepthChoice:
        """The choice as served: the depth the engine finished at (it may lower a depth
        mid-request, never raise it), the policy's prediction unchanged."""
        depth = min((t.depth for t in self.tracks if t.depth), default=self.choice.depth)
        return replace(self.choice, depth=min(depth, self.choice.depth))

    def soft_info(self) -> SoftInfo:
        choice = self.served_choice()
        return SoftInfo(
            depth=choice.depth,
            budget_ms=choice.budget_ms,
            predicted_ms=round(choice.predicted_ms, 3),
        )

    def usage(self, prompts: list[list[int]], shown: bool = True) -> Usage:
        """Token counts, each prompt once; its cached tokens: those none of its `n`
        sequences computed (the fewest any of them found in the prefix cache)."""
        p = sum(len(ids) for ids in prompts)
        c = sum(len(t.token_ids) for t in self.tracks) if shown else 0  # echo-only hides it
        cached: dict[int, int] = {}
        for t in self.tracks:
            cached[t.prompt_index] = min(cached.get(t.prompt_index, t.cached_tokens),
                                         t.cached_tokens)  # fmt: skip
        details = PromptTokensDetails(cached_tokens=sum(cached.values()))
        return Usage(prompt_tokens=p, completion_tokens=c, total_tokens=p + c,
                     prompt_tokens_details=details)  # fmt: skip
