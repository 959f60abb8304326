"""The engine: token ids in, token events out. It knows nothing of HTTP or text.

A step loop on its own thread (so the event loop stays free) runs, each iteration:
  1) inbox: new requests, aborts, depth changes
  2) schedule: decode slots for the running batch, FCFS admissions
  3) one forward for the admitted sequences' prompts and the running batch's next token
     together (more only past PREFILL_GROUP_TOKENS prompt tokens): the matrix products run
     over all their tokens at once (each weight is read once per turn), attention per group
     (a padded group of fresh prompts, or the decode batch); rows ordered deepest first,
     layer i runs on the rows whose depth is > i, each row leaves at its own exit, one
     norm + head call over every row's last token
  4) sample per row, send events to each request's asyncio queue, retire finished rows

Threads on CPU: torch runs its kernels on an OpenMP team per calling thread, and libgomp
makes its workers sleep instead of spin between kernels as soon as the process holds more
OpenMP threads than CPUs — every kernel then waits for a wake-up (measured here: a decode
step 1.6x slower, 2 cores). So while the engine runs, its step thread should be the only
one that has run torch work: load models with `on_own_thread` (its team goes when the
thread ends) and keep torch off the event loop's thread.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import logging
import math
import threading
import time
import weakref
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

import torch

from models.llama import SortedModel
from server.engine.kv_cache import KVCacheConfig, KVCacheManager, PagedAttention
from server.engine.sampling import make_generator, prompt_logprobs, sample_rows, token_logprob
from server.engine.scheduler import Scheduler, SchedulerOutput, Sequence
from server.engine.speculative import SpecConfig, Speculator, accept, draft_token
from server.engine.types import (
    EngineStats,
    GenerationRequest,
    QueueFull,
    SpecCounters,
    TokenEvent,
    TokenLogprob,
)

log = logging.getLogger(__name__)
T = TypeVar("T")


def on_own_thread(fn: Callable[[], T]) -> T:
    """Run `fn` on a new thread that ends when it returns (re-raising what it raised), so
    that the OpenMP team its torch work created ends too (see the module docstring)."""
    out: list[T] = []
    err: list[BaseException] = []

    def run() -> None:
        try:
            out.append(fn())
        except BaseException as e:  # handed to the caller below
            err.append(e)

    thread = threading.Thread(target=run, name="soft-torch")
    thread.start()
    thread.join()
    if err:
        raise err[0]
    return out[0]


_RUNNING: weakref.WeakSet[Engine] = weakref.WeakSet()


@atexit.register
def _stop_all() -> None:
    # a step thread still inside torch at interpreter exit aborts the process: stop them
    for engine in list(_RUNNING):
        engine.stop()


@dataclass(frozen=True)
class EngineConfig:
    block_size: int = 16
    kv_cache_memory: int = 1 << 30  # bytes for KV blocks (all layers together)
    max_num_seqs: int = 32  # sequences per decode batch
    max_queue: int = 256  # waiting requests before QueueFull (HTTP 429)
    max_prefill_tokens: int = 2048  # prompt tokens admitted per step
    max_model_len: int | None = None  # default: the model's context window
    speculative: SpecConfig = SpecConfig()  # self-speculative decoding (off by default)


# a batched prefill computes at most this many padded tokens per real one, and a forward
# takes at most this many prompt tokens: past a few hundred rows the weights' reads are
# already shared, and bigger activations only grow the allocator's high-water mark (soak
# test)
PAD_LIMIT = 1.25
PREFILL_GROUP_TOKENS = 256
# the queue's drain rate forgets turns older than about this many seconds of backlog
ADMIT_TAU_S = 4.0


@dataclass(frozen=True)
class _Group:
    """Rows that share one forward's attention call: a prefill group or the decode batch."""

    seqs: list[Sequence]  # deepest first
    ids: torch.Tensor  # (B, T) token ids, padded
    positions: torch.Tensor  # (B, T)
    depths: list[int]
    kv: PagedAttention
    lengths: list[int]  # real tokens per row (the last one's logits are sampled)
    prefill: bool


class _Sink:
    """Delivers events to the asyncio queue of the request that owns them."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.queue: asyncio.Queue[TokenEvent] = asyncio.Queue()

    def send(self, events: list[TokenEvent]) -> None:
        def put() -> None:
            for e in events:
                self.queue.put_nowait(e)

        try:
            self.loop.call_soon_threadsafe(put)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            pass


class Engine:
    def __init__(self, model: SortedModel, config: EngineConfig | None = None) -> None:
        model.pack()  # matrices in the CPU GEMM library's own layout (no-op elsewhere)
        self.model = model
        self.config = config = config or EngineConfig()
        cfg = model.cfg
        self.max_model_len = min(config.max_model_len or 1 << 30, cfg.max_position_embeddings)
        self.cache = KVCacheManager(
            KVCacheConfig.for_memory(
                config.kv_cache_memory,
                cfg.num_layers,
                cfg.num_kv_heads,
                cfg.head_dim,
                config.block_size,
                model.dtype,
                model.device,
            )
        )
        self.scheduler = Scheduler(
            self.cache, config.max_num_seqs, config.max_queue, config.max_prefill_tokens
        )
        self.speculator = Speculator(model, config.speculative)
        self.eos = set(cfg.eos_token_ids)
        if model.tokenizer is not None and model.tokenizer.eos_token_id is not None:
            self.eos.add(model.tokenizer.eos_token_id)
        self._lock = threading.Lock()
        self._inbox: list[tuple[str, object]] = []
        self._wake = threading.Event()
        self._stop = False
        self._accepting = True
        self._thread: threading.Thread | None = None
        self._step_ewma = 0.0
        self._interval_ewma = 0.0
        self._admitted = 0.0  # decayed admissions / seconds of turns that began with a queue
        self._backlog_s = 0.0
        self._steps = 0
        self._idled = True  # no decode step since the loop last ran out of work (or ever)
        self._last_batch = 0
        self._stats = self._snapshot()

    # -- public, event-loop side ------------------------------------------------------------
    def start(self) -> None:
        """Start the step loop (again, after `stop`) on its own thread."""
        if self._thread is None:
            self._stop = False
            self._thread = threading.Thread(target=self._run, name="soft-engine", daemon=True)
            self._thread.start()
            _RUNNING.add(self)

    @contextlib.contextmanager
    def running(self) -> Iterator[Engine]:
        """The step loop for the duration of a `with` block (a benchmark's measurement):
        started on entry, stopped on exit, so its OpenMP team is gone afterwards."""
        self.start()
        try:
            yield self
        finally:
            self.stop()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the step loop now (no drain); see `shutdown` for the graceful path."""
        self._stop = True
        self._wake.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)
            if not self._thread.is_alive():
                self._thread = None

    def check(self, request: GenerationRequest) -> None:
        """Raise ValueError when the request can never run (the API answers 400)."""
        n, p = len(request.prompt_ids), request.params
        if n == 0:
            raise ValueError("the prompt is empty")
        if not 1 <= request.depth <= self.model.num_layers:
            raise ValueError(f"depth must be in 1..{self.model.num_layers}")
        if p.max_tokens < 1:
            raise ValueError("max_tokens must be at least 1")
        if n + p.max_tokens > self.max_model_len:
            raise ValueError(
                f"this model's context window is {self.max_model_len} tokens; the prompt has "
                f"{n} and max_tokens asks for {p.max_tokens} more ({n + p.max_tokens})"
            )
        need = request.depth * self.cache.blocks_for(n + p.max_tokens)
        if need > self.cache.cfg.num_blocks:
            raise ValueError(
                f"prompt + max_tokens needs {need} KV blocks at depth {request.depth}; the cache "
                f"holds {self.cache.cfg.num_blocks}: lower max_tokens or raise --kv-cache-memory"
            )

    def submit(self, request: GenerationRequest) -> AsyncIterator[TokenEvent]:
        """Queue a request; its events arrive in order, the last has a finish_reason.

        Raises QueueFull at the queue's bound, ValueError for an impossible request.
        Must be called from the event loop that will consume the events."""
        self.check(request)
        sink = _Sink(asyncio.get_running_loop())
        seq = Sequence(
            request=request,
            tokens=list(request.prompt_ids),
            depth=request.depth,
            generator=make_generator(request.params, self.model.device),
            sink=sink,
        )
        with self._lock:
            if not self._accepting:
                raise QueueFull(retry_after_s=5.0)
            pending = sum(1 for kind, _ in self._inbox if kind == "add")
            if len(self.scheduler.waiting) + pending >= self.config.max_queue:
                raise QueueFull(retry_after_s=max(1.0, self._step_ewma * 16))
            self._inbox.append(("add", seq))
        self._wake.set()
        return self._stream(request.request_id, sink)

    async def _stream(self, request_id: str, sink: _Sink) -> AsyncIterator[TokenEvent]:
        done = False
        try:
            while True:
                event = await sink.queue.get()
                done = event.finish_reason is not None
                yield event
                if done:
                    return
        finally:
            if not done:  # consumer went away (disconnect, cancel): free its blocks
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        with self._lock:
            self._inbox.append(("abort", request_id))
        self._wake.set()

    def lower_depth(self, request_id: str, depth: int) -> None:
        with self._lock:
            self._inbox.append(("depth", (request_id, depth)))
        self._wake.set()

    def stats(self) -> EngineStats:
        return self._stats

    async def shutdown(self, drain_timeout: float = 30.0) -> None:
        """Stop accepting, let in-flight requests finish (up to the timeout), then stop."""
        with self._lock:
            self._accepting = False
        deadline = time.monotonic() + drain_timeout
        while time.monotonic() < deadline and (self.scheduler.has_work or self._inbox):
            await asyncio.sleep(0.05)
        self._stop = True
        self._wake.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 10.0)
        for seq in [*self.scheduler.running, *self.scheduler.waiting]:
            self._finish(seq, "abort")

    # -- the step loop (engine thread) ------------------------------------------------------
    def _run(self) -> None:
        torch.set_grad_enabled(False)
        while not self._stop:
            self._drain_inbox()
            if not self.scheduler.has_work:
                # the step and interval averages restart with the next busy spell: a batch
                # of other times must not describe the next one
                self._idled = True
                self._stats = self._snapshot()
                self._wake.wait(0.1)
                self._wake.clear()
                continue
            try:
                self.step()
            except Exception as e:  # a broken step must not take the server down
                log.exception("engine step failed")
                for seq in [*self.scheduler.running]:
                    self._finish(seq, "error", error=f"{type(e).__name__}: {e}")
            self._stats = self._snapshot()

    def _drain_inbox(self) -> None:
        with self._lock:
            inbox, self._inbox = self._inbox, []
        for kind, arg in inbox:
            if kind == "add":
                assert isinstance(arg, Sequence)
                self.scheduler.waiting.append(arg)  # bound was checked in submit()
            elif kind == "abort":
                seq = self.scheduler.remove(str(arg))
                if seq is not None:
                    self._send(seq, [TokenEvent(seq.id, None, finish_reason="abort",
                                                depth=seq.depth)])  # fmt: skip
            elif kind == "depth":
                assert isinstance(arg, tuple)
                self.scheduler.lower_depth(str(arg[0]), int(arg[1]))

    @torch.inference_mode()
    def step(self) -> None:
        backlog = bool(self.scheduler.waiting)
        t_turn = time.perf_counter()
        out = self.scheduler.schedule()
        try:
            self._forward_step(out)
        finally:
            if backlog:
                self._count_admissions(len(out.prefill), time.perf_counter() - t_turn)

    def _count_admissions(self, admitted: int, seconds: float) -> None:
        """A loop turn that began with requests waiting: `admitted` left the queue in
        `seconds`. The decayed ratio is the queue's drain rate (EngineStats.admit_per_second):
        under overload every turn counts; turns with nobody waiting say nothing about it.
        (Counting only turns that leave someone behind would select the slow ones.)"""
        keep = math.exp(-seconds / ADMIT_TAU_S)
        self._admitted = self._admitted * keep + admitted
        self._backlog_s = self._backlog_s * keep + seconds

    def _forward_step(self, out: SchedulerOutput) -> None:
        """One loop turn's model work: the newcomers' prefills and one decode step of the
        running rows in a single forward (their matrix products share each weight read;
        `_pack`), then the speculating rows' draft + verify cycles."""
        t0 = time.perf_counter()
        decode = [s for s in out.decode if s.finish_reason is None]
        plain, spec = self._plan_speculation(decode) if decode else ([], {})
        prefill = [self._prefill_group(g) for g in self._prefill_groups(out.prefill)]
        for groups in self._pack(prefill, self._decode_group(plain) if plain else None):
            self._forward(groups)
        for (exit_, k), seqs in spec.items():
            self._speculate(seqs, exit_, k)
        if not decode:
            return
        dt = time.perf_counter() - t0  # what the running rows waited for this token
        if not out.prefill or self._idled:  # the decode step alone (no newcomer's prefill)
            self._step_ewma = dt if self._idled else 0.9 * self._step_ewma + 0.1 * dt
        self._interval_ewma = dt if self._idled else 0.95 * self._interval_ewma + 0.05 * dt
        self._steps += 1
        self._idled = False
        self._last_batch = len(decode)

    def _plan_speculation(
        self, seqs: list[Sequence]
    ) -> tuple[list[Sequence], dict[tuple[int, int], list[Sequence]]]:
        """Split the decode batch: rows that draft+verify this step, grouped by (exit, k),
        and rows that decode plainly."""
        plain: list[Sequence] = []
        groups: dict[tuple[int, int], list[Sequence]] = {}
        cfg = self.speculator.cfg
        if cfg.mode != "auto" or len(seqs) > cfg.max_batch:
            return seqs, groups
        for seq in seqs:
            choice = self.speculator.choose(seq.depth)
            left = min(
                seq.request.params.max_tokens - seq.num_generated,
                self.max_model_len - len(seq.tokens),
            )
            if choice is None or left < 2:
                plain.append(seq)
                continue
            exit_, k = choice[0], min(choice[1], left)
            if not self.cache.allocate(seq, seq.depth, len(seq.tokens) + k - 1):
                plain.append(seq)  # no room for the drafts' KV: one token at a time
                continue
            groups.setdefault((exit_, k), []).append(seq)
        return plain, groups

    def _prefill_groups(self, seqs: list[Sequence]) -> list[list[Sequence]]:
        """The admitted sequences in prefill groups: fresh ones together in padded groups
        of similar length (attention runs once per group), the rest one by one."""
        fresh = sorted((s for s in seqs if s.num_computed == 0), key=lambda s: len(s.tokens))
        groups: list[list[Sequence]] = []
        group: list[Sequence] = []
        for seq in fresh:
            n = len(seq.tokens)  # the longest so far: the group's padded length if it joins
            real = sum(len(g.tokens) for g in group) + n
            padded = n * (len(group) + 1)
            if group and (padded > PAD_LIMIT * real or padded > PREFILL_GROUP_TOKENS):
                groups.append(group)
                group = []
            group.append(seq)
        if group:
            groups.append(group)
        return groups + [[s] for s in seqs if s.num_computed != 0]

    @staticmethod
    def _pack(prefill: list[_Group], decode: _Group | None) -> list[list[_Group]]:
        """The groups in forwards of at most PREFILL_GROUP_TOKENS prompt tokens (padded)
        each, the decode batch in the last: the activations stay as small as a prefill
        group's, so does the allocator's high-water mark."""
        forwards: list[list[_Group]] = []
        current: list[_Group] = []
        tokens = 0
        for g in prefill:
            n = g.ids.numel()
            if current and tokens + n > PREFILL_GROUP_TOKENS:
                forwards.append(current)
                current, tokens = [], 0
            current.append(g)
            tokens += n
        current += [decode] if decode is not None else []
        return [*forwards, current] if current else forwards

    def _prefill_group(self, seqs: list[Sequence]) -> _Group:
        """Each sequence's uncomputed tokens, rows padded to the longest (more than one row
        only when all start at 0)."""
        model = self.model
        seqs = sorted(seqs, key=lambda s: -s.depth)  # deepest first: active rows are a prefix
        starts = [s.num_computed for s in seqs]  # 0 unless a prefix stayed cached
        lengths = [len(s.tokens) - st for s, st in zip(seqs, starts, strict=True)]
        t, batched = max(lengths), len(seqs) > 1
        if batched:  # padded lengths in whole blocks: few distinct shapes, so kernel caches
            bs = self.cache.cfg.block_size  # and the allocator stay bounded
            t = -(-t // bs) * bs
        ids = torch.tensor(
            [s.tokens[st:] + [0] * (t - n) for s, st, n in zip(seqs, starts, lengths, strict=True)],
            device=model.device,
        )
        positions = torch.tensor(starts, device=model.device)[:, None] + torch.arange(
            t, device=model.device
        )
        depths = [s.depth for s in seqs]
        kv = self.cache.step_view(seqs, depths, starts, t, lengths if batched else None)
        return _Group(seqs, ids, positions, depths, kv, lengths, prefill=True)

    def _decode_group(self, seqs: list[Sequence]) -> _Group:
        """Each sequence's last token."""
        model = self.model
        seqs = sorted(seqs, key=lambda s: -s.depth)  # deepest first: active rows are a prefix
        depths = [s.depth for s in seqs]
        starts = [len(s.tokens) - 1 for s in seqs]
        ids = torch.tensor([[s.tokens[-1]] for s in seqs], device=model.device)  # (B, 1)
        positions = torch.tensor(starts, device=model.device)[:, None]
        kv = self.cache.step_view(seqs, depths, starts, 1)
        return _Group(seqs, ids, positions, depths, kv, [1] * len(seqs), prefill=False)

    def _forward(self, groups: list[_Group]) -> None:
        """One forward over every group, one head call over each row's last token, then
        each row's next token: prefill groups first (and their prompt logprobs), then the
        decode rows."""
        model = self.model
        hs = model.hidden_groups(
            [(model.embed_ids(g.ids), g.positions, g.depths, g.kv) for g in groups]
        )
        last = [h[torch.arange(len(g.seqs)), torch.tensor(g.lengths) - 1] for g, h in
                zip(groups, hs, strict=True)]  # fmt: skip
        depths = [d for g in groups for d in g.depths]
        logits = model.head(torch.cat(last)[:, None], depths)[:, 0]  # (rows, V)
        row = 0
        for g, h in zip(groups, hs, strict=True):
            mine = logits[row : row + len(g.seqs)]
            row += len(g.seqs)
            if not g.prefill:
                for s in g.seqs:
                    s.num_computed = len(s.tokens)
                self._emit(g.seqs, mine)
                continue
            for r, seq in enumerate(g.seqs):
                first = seq.num_generated == 0 and seq.preemptions == 0
                plp = None
                if first and seq.request.params.prompt_logprobs is not None:
                    full = model.head(h[r : r + 1, : g.lengths[r]], [seq.depth])[0]  # (T, V)
                    plp = prompt_logprobs(full, seq.tokens, seq.request.params.prompt_logprobs)
                seq.num_computed = len(seq.tokens)
                queue_s = None
                if first and seq.first_scheduled is not None:
                    arrival = seq.request.arrival or seq.first_scheduled
                    queue_s = max(0.0, seq.first_scheduled - arrival)
                self._emit([seq], mine[r : r + 1], prompt=plp, queue_s=queue_s)

    def _decode(self, seqs: list[Sequence]) -> None:
        """One decode step of `seqs` alone (benchmarks time it)."""
        self._forward([self._decode_group(seqs)])

    def _speculate(self, seqs: list[Sequence], exit_: int, k: int) -> None:
        """One draft + verify cycle for rows deeper than `exit_` (see server/speculative.py)."""
        model, dev = self.model, self.model.device
        seqs = sorted(seqs, key=lambda s: -s.depth)
        b, starts = len(seqs), [len(s.tokens) - 1 for s in seqs]
        params = [s.request.params for s in seqs]
        inputs = [s.tokens[-1] for s in seqs]
        drafts: list[list[int]] = [[] for _ in seqs]
        qs: list[list[torch.Tensor | None]] = [[] for _ in seqs]
        kept = []  # exit-e residual of each input: k x (B, 1, H)
        # 1) draft k tokens at exit e; layers [0, e) write their KV for positions p..p+k-1
        for j in range(k):
            ids = torch.tensor([[t] for t in inputs], device=dev)
            positions = torch.tensor(starts, device=dev)[:, None] + j
            kv = self.cache.step_view(seqs, [exit_] * b, [p + j for p in starts], 1)
            h = model.hidden(ids, positions, [exit_] * b, kv)
            kept.append(h)
            logits = self.speculator.draft_logits(h, exit_)  # (B, V_draft)
            for r, seq in enumerate(seqs):
                tok, q = draft_token(logits[r], params[r], seq.generator, model.cfg.vocab_size)
                drafts[r].append(tok)
                qs[r].append(q)
                inputs[r] = tok
        # 2) verify: layers [e, d) over the kept residuals, reusing layers [0, e)'s KV
        depths = [s.depth for s in seqs]
        positions = torch.tensor(starts, device=dev)[:, None] + torch.arange(k, device=dev)
        kv = self.cache.step_view(seqs, depths, starts, k)
        h = model.hidden(None, positions, depths, kv, start_layer=exit_, h=torch.cat(kept, 1))
        target = model.head(h, depths)  # (B, k, V)
        # 3) accept, emit, 4) roll back to what was kept
        for r, seq in enumerate(seqs):
            p = params[r]
            tokens = accept(drafts[r], qs[r], target[r], p, seq.generator)
            accepted = len(tokens) if tokens == drafts[r] else len(tokens) - 1
            self.speculator.observe(exit_, k, accepted, len(tokens))
            lps = torch.log_softmax(target[r].float(), -1) if p.logprobs is not None else None
            events = []
            for i, tok in enumerate(tokens):
                lp = None
                if lps is not None and p.logprobs is not None:
                    lp = token_logprob(lps[i], tok, p.logprobs)
                events.append(self._append(seq, tok, lp))
                if seq.finish_reason is not None:
                    break
            if seq.finish_reason is None:
                seq.num_computed = len(seq.tokens) - 1  # the last token is fed next step
                self.cache.shrink(seq, len(seq.tokens))
            self._send(seq, events)

    def _emit(
        self,
        seqs: list[Sequence],
        logits: torch.Tensor,
        prompt: tuple[TokenLogprob | None, ...] | None = None,
        queue_s: float | None = None,
    ) -> None:
        """Sample each row's token, send its event, retire finished sequences."""
        params = [s.request.params for s in seqs]
        tokens = sample_rows(logits, params, [s.generator for s in seqs])
        want_lp = [j for j, p in enumerate(params) if p.logprobs is not None]
        logprobs = torch.log_softmax(logits[want_lp].float(), -1) if want_lp else None
        for j, (seq, tok) in enumerate(zip(seqs, tokens, strict=True)):
            p = seq.request.params
            lp = None
            if logprobs is not None and p.logprobs is not None:
                lp = token_logprob(logprobs[want_lp.index(j)], tok, p.logprobs)
            self._send(seq, [self._append(seq, tok, lp, prompt, queue_s)])

    def _append(
        self,
        seq: Sequence,
        tok: int,
        lp: TokenLogprob | None,
        prompt: tuple[TokenLogprob | None, ...] | None = None,
        queue_s: float | None = None,
    ) -> TokenEvent:
        """Add a generated token to `seq`; retire it when it is done. Returns its event."""
        p = seq.request.params
        seq.tokens.append(tok)
        seq.num_generated += 1
        finish = None
        if (tok in self.eos and not p.ignore_eos) or tok in p.stop_token_ids:
            finish = "stop"
        elif seq.num_generated >= p.max_tokens or len(seq.tokens) >= self.max_model_len:
            finish = "length"
        if finish is not None:  # free first: after its last event a request holds nothing
            seq.finish_reason = finish
            self.scheduler.remove(seq.id)
        return TokenEvent(
            seq.id, tok, lp, finish, seq.depth, prompt_logprobs=prompt, queue_seconds=queue_s
        )

    def _finish(self, seq: Sequence, reason: str, error: str | None = None) -> None:
        self.scheduler.remove(seq.id)
        seq.finish_reason = reason
        self._send(seq, [TokenEvent(seq.id, None, finish_reason=reason, depth=seq.depth,
                                    error=error)])  # fmt: skip

    def _send(self, seq: Sequence, events: list[TokenEvent]) -> None:
        if isinstance(seq.sink, _Sink):
            seq.sink.send(events)

    def _snapshot(self) -> EngineStats:
        running = self.scheduler.running
        depths: dict[int, int] = {}
        for s in running:
            depths[s.depth] = depths.get(s.depth, 0) + 1
        per_layer = self.cache.bytes_per_layer()
        spec = self.speculator.stats
        return EngineStats(
            running=len(running),
            waiting=len(self.scheduler.waiting) + len(self._inbox),
            batch_size=self._last_batch,
            kv_blocks_total=self.cache.cfg.num_blocks,
            kv_blocks_used=self.cache.num_used,
            kv_bytes_per_layer=per_layer,
            kv_bytes_total=sum(per_layer),
            decode_step_seconds=self._step_ewma,
            token_interval_seconds=self._interval_ewma,
            admit_per_second=self._admitted / self._backlog_s if self._backlog_s > 0 else 0.0,
            steps=self._steps,
            preemptions=self.scheduler.num_preemptions,
            depths_running=depths,
            rows_left=tuple(
                (s.depth, max(s.request.params.max_tokens - s.num_generated, 0))
                for s in (*running, *self.scheduler.waiting)
            ),
            speculation={
                e: SpecCounters(
                    n, spec.accepted.get(e, 0), spec.cycles.get(e, 0), spec.emitted.get(e, 0)
                )
                for e, n in spec.drafted.items()
            },  # fmt: skip
        )
