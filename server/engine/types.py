"""The engine's vocabulary: what goes in (a request of token ids with sampling params and a
depth) and what comes out (token events, stats). Plain frozen dataclasses, no HTTP, no text.
"""

from __future__ import annotations

import numbers
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from torch import Tensor


def is_token_id(t: object, vocab: int) -> bool:
    """An integer id of the vocabulary (numpy's integers too; bools are not ids)."""
    return isinstance(t, numbers.Integral) and not isinstance(t, bool) and 0 <= int(t) < vocab


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens for one sequence (OpenAI/vLLM meanings)."""

    max_tokens: int = 16
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0  # 1 = off
    top_k: int = 0  # 0 = off
    seed: int | None = None  # same seed => same tokens, whatever else is in the batch
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # None: no logprobs; k: chosen token + top-k alternatives
    prompt_logprobs: int | None = None  # same for the prompt tokens (echo + logprobs)
    # logit processing before any choice (sampling.process_logits), off by default:
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token_id, added to its logit)
    frequency_penalty: float = 0.0  # OpenAI: minus this x occurrences in the output
    presence_penalty: float = 0.0  # OpenAI: minus this once a token is in the output
    repetition_penalty: float = 1.0  # vLLM: logits of prompt/output tokens /p (>0) or *p

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1

    @property
    def processes_logits(self) -> bool:
        """Whether the logits change before a choice (biases or penalties)."""
        return bool(
            self.logit_bias
            or self.frequency_penalty
            or self.presence_penalty
            or self.repetition_penalty != 1.0
        )


@dataclass(frozen=True)
class TokenLogprob:
    """Log-probability of one token and the top alternatives at that position."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # (token_id, logprob), most likely first


class TokenConstraint(Protocol):
    """A grammar's state for one sequence (structured outputs): which tokens may come next.
    The serving layer builds one per sequence (it holds the tokenizer and the grammar
    library); the engine only fills masks and advances it, on its step thread."""

    def fill_bitmask(self, bitmask: Tensor, row: int) -> None:
        """Write row `row` of `bitmask` (int32, (B, ceil(V / 32))): bit t % 32 of word
        t // 32 set <=> token t may come next."""
        ...

    def accept(self, token_id: int) -> bool:
        """Advance past `token_id`; False when the grammar does not allow it."""
        ...

    def is_terminated(self) -> bool:
        """The grammar is complete and has accepted its end (an EOS token): stop."""
        ...


@dataclass(frozen=True)
class GenerationRequest:
    """One sequence to generate. The API layer turns `n > 1` into n of these."""

    request_id: str
    prompt_ids: tuple[int, ...]
    params: SamplingParams
    depth: int  # the exit to run at; may be lowered while running, never raised
    deadline: float | None = None  # time.monotonic() by which the request should finish
    arrival: float = 0.0  # time.monotonic() when the server received it
    # structured outputs: this sequence's own grammar state (mutable, advanced by the
    # engine on every token it emits); None = unconstrained
    constraint: TokenConstraint | None = field(default=None, compare=False)


@dataclass(frozen=True)
class TokenEvent:
    """One generated token (or the end of a sequence), in order, per request."""

    request_id: str
    token_id: int | None  # None only on a final event that carries no token (abort/error)
    logprob: TokenLogprob | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"; None = more
    depth: int = 0  # depth this token was produced at
    # first event only:
    prompt_logprobs: tuple[TokenLogprob | None, ...] | None = None  # first entry None
    queue_seconds: float | None = None  # submit -> first scheduled
    cached_tokens: int | None = None  # prompt tokens whose KV came from the prefix cache
    error: str | None = None  # with finish_reason "error"


@dataclass(frozen=True)
class SpecCounters:
    """Self-speculative decoding at one draft exit, since start."""

    drafted: int  # draft tokens proposed
    accepted: int  # draft tokens the verifying depth agreed with
    cycles: int  # verify steps
    emitted: int  # tokens emitted by those cycles (accepted + corrections)


@dataclass(frozen=True)
class EngineStats:
    """A snapshot for metrics and the depth policy."""

    running: int
    waiting: int
    batch_size: int  # sequences in the last decode step
    kv_blocks_total: int
    kv_blocks_used: int
    kv_bytes_per_layer: tuple[int, ...]  # bytes held in each decoder layer [0, L)
    kv_bytes_total: int
    # EWMA of recent decode steps that ran alone (turns without a newcomer's prefill)
    decode_step_seconds: float
    steps: int  # decode steps run since start
    preemptions: int
    depths_running: dict[int, int] = field(default_factory=dict)  # depth -> sequences
    speculation: dict[int, SpecCounters] = field(default_factory=dict)  # draft exit -> counts
    # EWMA of the wall time between a running row's tokens: every turn's forward, the
    # newcomers' prefills in it included (0.0 until a decode step ran)
    token_interval_seconds: float = 0.0
    # sequences admitted per second while others waited (decayed over ~ADMIT_TAU_S):
    # how fast the queue drains; 0.0 until a request has had to wait
    admit_per_second: float = 0.0
    # (depth, tokens still to generate) of every running sequence, then of the queue in
    # admission order: when each of a newcomer's companions will leave the batch
    rows_left: tuple[tuple[int, int], ...] = ()
    # balcony: bytes held in each exit's own layer (exit -> bytes; in kv_bytes_total too)
    kv_bytes_per_exit_layer: dict[int, int] = field(default_factory=dict)
    # prefix cache, since start, by depth: prompt tokens admissions looked up, and found
    prefix_queries: dict[int, int] = field(default_factory=dict)
    prefix_hits: dict[int, int] = field(default_factory=dict)
    prefix_cached_blocks: int = 0  # blocks the prefix cache indexes now (held or idle)

    @property
    def kv_usage_ratio(self) -> float:
        return self.kv_blocks_used / self.kv_blocks_total if self.kv_blocks_total else 0.0


class QueueFull(Exception):
    """The engine's waiting queue is at its bound; the API answers 429 with Retry-After."""

    def __init__(self, retry_after_s: float) -> None:
        super().__init__(f"queue full; retry after {retry_after_s:.1f}s")
        self.retry_after_s = retry_after_s


class EngineClient(Protocol):
    """The engine as the serving layer drives it (server/engine/core.py's `Engine`; the
    tests' `FakeEngine`): requests of token ids in, each one's token events out."""

    @property
    def max_model_len(self) -> int:
        """The context window served: prompt + max_tokens, at most."""
        ...

    @property
    def max_queue(self) -> int:
        """Sequences it queues at once; past that `submit` raises QueueFull."""
        ...

    def start(self) -> None: ...

    def check(self, request: GenerationRequest) -> None:
        """Raises ValueError for a request it could never run (too long, empty)."""
        ...

    def submit(self, request: GenerationRequest) -> AsyncIterator[TokenEvent]:
        """Queue `request`; its events until one carries a finish_reason.

        Raises:
            QueueFull: no room in the queue now; ValueError: as `check`.
        """
        ...

    def abort(self, request_id: str) -> None:
        """Cancel a request (its KV blocks are freed); its stream ends with "abort"."""
        ...

    def cached_tokens(self, prompt_ids: Sequence[int], depths: Sequence[int]) -> dict[int, int]:
        """Prompt tokens a request would find in the prefix cache now, at each depth."""
        ...

    def lower_depth(self, request_id: str, depth: int) -> None:
        """Continue a running request at a shallower exit (never deeper)."""
        ...

    def stats(self) -> EngineStats: ...

    async def shutdown(self, drain_timeout: float) -> None:
        """Stop accepting, let in-flight requests finish for up to `drain_timeout` s."""
        ...
