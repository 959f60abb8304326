"""Text from token events: incremental detokenization that never splits a character, and
each sequence's progress (stop strings cut and held back, logprobs lined up with the text,
timings)."""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from server.engine.types import GenerationRequest, TokenEvent, TokenLogprob


class Detokenizer:
    """Incremental detokenization that never emits half a character: text is released only
    once the window decodes without a trailing U+FFFD (an incomplete UTF-8 sequence)."""

    def __init__(
        self, tokenizer: Any, prompt_ids: Sequence[int], skip_special_tokens: bool = True
    ) -> None:
        self.tok, self.skip = tokenizer, skip_special_tokens
        self.ids = list(prompt_ids[-4:])  # a little context: leading-space rules
        self.prefix = self.read = len(self.ids)

    def _decode(self, ids: list[int]) -> str:
        return str(self.tok.decode(ids, skip_special_tokens=self.skip))

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


def token_pieces(tokenizer: Any, ids: Sequence[int]) -> list[str]:
    """Each token's share of the text of `ids` (special tokens shown): the pieces join to
    the decoded text; a token that ends inside a multi-byte character has "" and the token
    that completes the character has all of it."""
    detok = Detokenizer(tokenizer, (), skip_special_tokens=False)
    pieces = [detok.add(t) for t in ids]
    if pieces:
        pieces[-1] += detok.flush()
    return pieces


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
    # where each logprobs entry's token starts in `text` (its piece; non-decreasing)
    starts: list[int] = field(default_factory=list)
    stop_token: bool = False  # ended by an EOS / stop_token_ids token (not in the text)
    prompt_logprobs: tuple[TokenLogprob | None, ...] | None = None
    finish_reason: str | None = None
    error: str | None = None
    depth: int = 0
    first_token_at: float | None = None
    last_token_at: float | None = None
    itl: list[float] = field(default_factory=list)
    queue_s: float | None = None
    cached_tokens: int = 0  # of the prompt, whose KV the engine's prefix cache held

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def on_event(self, ev: TokenEvent, t: float) -> None:
        self.depth = ev.depth or self.depth
        if ev.prompt_logprobs is not None:
            self.prompt_logprobs = ev.prompt_logprobs
        if ev.queue_seconds is not None and self.queue_s is None:
            self.queue_s = ev.queue_seconds
        if ev.cached_tokens is not None:
            self.cached_tokens = ev.cached_tokens
        if ev.token_id is not None:
            if self.last_token_at is not None:
                self.itl.append(t - self.last_token_at)
            self.first_token_at = self.first_token_at or t
            self.last_token_at = t
            self.token_ids.append(ev.token_id)
            if ev.logprob is not None and not self.done:
                self.logprobs.append(ev.logprob)
                self.starts.append(len(self.text))
            self._append(self.detok.add(ev.token_id))
        if ev.finish_reason is not None and not self.done:
            self.stop_token = ev.finish_reason == "stop" and ev.token_id is not None
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

    def shown_logprobs(self, end: int | None = None) -> int:
        """How many `logprobs` entries belong to the text before `end` (default: all of
        it): a token cut away with a stop string, or one that shows nothing at the end
        (EOS), has none."""
        return bisect_left(self.starts, len(self.text) if end is None else end)

    def piece(self, k: int) -> str:
        """The text of logprobs entry `k`'s token."""
        end = self.starts[k + 1] if k + 1 < len(self.starts) else len(self.text)
        return self.text[self.starts[k] : max(self.starts[k], end)]

    def releasable(self) -> str:
        """New text safe to stream: all of it once done, else what no stop can still claim."""
        hold = 0 if self.done else max((len(s) for s in self.stops), default=1) - 1
        end = max(self.sent, len(self.text) - hold)
        piece, self.sent = self.text[self.sent : end], end
        return piece
