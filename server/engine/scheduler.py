"""Which sequences run in the next step: FCFS admission, decode slots, preemption.

Iteration-level scheduling: every step, each running sequence gets room for one more token
(preempting the most recently admitted ones, by recompute, when blocks run out), then
waiting sequences are admitted in arrival order while there is room, up to a prefill token
budget so that admissions do not stall the running batch for long. Sequences of every
depth share the batch; the cache holds each one's blocks only in its own layers.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

import torch

from server.engine.kv_cache import KVCacheManager
from server.engine.types import GenerationRequest


@dataclass(eq=False)
class Sequence:
    """A request's live state inside the engine."""

    request: GenerationRequest
    tokens: list[int]  # prompt + generated so far
    depth: int
    generator: torch.Generator | None = None
    num_computed: int = 0  # tokens whose keys/values are in the cache
    cached_tokens: int = 0  # of the prompt, found in the prefix cache at first admission
    # balcony speculation: the exit whose own layer the row drafts with, and the tokens
    # whose KV that layer holds (the speculator fills it from the base's cached KV)
    draft_exit: int | None = None
    draft_computed: int = 0
    num_generated: int = 0
    first_scheduled: float | None = None
    preemptions: int = 0
    finish_reason: str | None = None
    sink: object = field(default=None, repr=False)  # where the engine sends its events

    @property
    def id(self) -> str:
        return self.request.request_id

    @property
    def before_first_token(self) -> bool:
        """Not yet prefilled (a preempted sequence's prefill is a recompute)."""
        return self.num_generated == 0 and self.preemptions == 0


@dataclass(frozen=True)
class SchedulerOutput:
    prefill: list[Sequence]  # run all their uncomputed tokens, then sample
    decode: list[Sequence]  # run their last token, then sample


class Scheduler:
    def __init__(
        self,
        cache: KVCacheManager,
        max_num_seqs: int = 32,
        max_prefill_tokens: int = 2048,
    ) -> None:
        self.cache = cache
        self.max_num_seqs = max_num_seqs
        self.max_prefill_tokens = max_prefill_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order
        self.num_preemptions = 0

    def remove(self, request_id: str) -> Sequence | None:
        """Take a sequence out wherever it is (cancel/finish) and free its blocks."""
        for seq in self.running:
            if seq.id == request_id:
                self.running.remove(seq)
                self.cache.free(seq)
                return seq
        for seq in self.waiting:
            if seq.id == request_id:
                self.waiting.remove(seq)
                self.cache.free(seq)
                return seq
        return None

    def lower_depth(self, request_id: str, depth: int) -> bool:
        """Move a sequence to a shallower exit; its deeper layers' blocks are freed now.

        A new exit with a layer of its own (balcony) has no KV there for the tokens so far
        (unless the row drafted at that exit and its draft KV is complete): the sequence
        then frees every block and is re-prefilled at the new depth first thing next turn,
        like a preemption by recompute: it continues exactly as a fresh request at that
        depth whose prompt is every token so far."""
        for seq in [*self.running, *self.waiting]:
            if seq.id == request_id and 1 <= depth < seq.depth:
                seq.depth = depth
                own = self.cache.cfg.exit_kv_layer(depth)
                drafted = (
                    seq.draft_exit == depth and seq.draft_computed >= seq.num_computed
                    and own is not None and self.cache.holds(seq, own)
                )  # fmt: skip
                if own is not None and seq.num_computed and not drafted:
                    self._recompute(seq)
                    return True
                self.cache.lower_depth(seq, depth)
                if seq.draft_exit is not None and seq.draft_exit >= depth:
                    seq.draft_exit, seq.draft_computed = None, 0  # its layer is depth's own
                return True
        return False

    def _recompute(self, seq: Sequence) -> None:
        """Free `seq`'s blocks; it is prefilled again (prompt + generated tokens) when
        readmitted, ahead of the queue."""
        if seq in self.running:
            self.running.remove(seq)
            self.waiting.appendleft(seq)
        self.cache.free(seq)
        seq.num_computed = 0
        seq.draft_exit, seq.draft_computed = None, 0

    def _preempt(self, seq: Sequence) -> None:
        self._recompute(seq)
        seq.preemptions += 1
        self.num_preemptions += 1

    def schedule(self) -> SchedulerOutput:
        """The next step's work: a decode slot for every running sequence (preempting the
        newest when blocks run out), then FCFS admissions within the prefill budget."""
        # 1) a slot for the next token of every running sequence, oldest first
        decode: list[Sequence] = []
        for seq in list(self.running):
            if seq not in self.running:
                continue  # preempted below on behalf of an older sequence
            while not self.cache.allocate(seq, seq.depth, len(seq.tokens)):
                victim = self.running[-1]
                self._preempt(victim)
                if victim is seq:
                    break
            if seq in self.running:
                decode.append(seq)
        # 2) admit waiting sequences in arrival order while they fit; a cached prefix
        # (kv_cache.admit) is neither computed nor counted against the prefill budget
        prefill: list[Sequence] = []
        budget = self.max_prefill_tokens
        while self.waiting and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            # prompt logprobs need every prompt position's logits: no cached prefix
            reuse = seq.request.params.prompt_logprobs is None or not seq.before_first_token
            n = len(seq.tokens)
            if prefill and n - (self.cache.cached_tokens(seq.tokens, seq.depth) if reuse
                                else 0) > budget:  # fmt: skip
                break  # long prompt: next step, after this batch decodes
            cached = self.cache.admit(seq, seq.depth, seq.tokens, reuse)
            if cached is None:
                break  # FCFS: the head of the queue waits for blocks
            self.waiting.popleft()
            self.running.append(seq)
            seq.num_computed = cached
            if seq.first_scheduled is None:
                seq.first_scheduled = time.monotonic()
                seq.cached_tokens = cached
            prefill.append(seq)
            budget -= n - cached
        return SchedulerOutput(prefill=prefill, decode=decode)

    @property
    def has_work(self) -> bool:
        return bool(self.running or self.waiting)
