"""The engine: token ids in, token events out. It knows nothing of HTTP or text.

A step loop on its own thread (so the event loop stays free) runs, each iteration:
  1) inbox: typed messages (Add, Abort, LowerDepth) from the event loop
  2) schedule: decode slots for the running batch, FCFS admissions (scheduler.py)
  3) one forward for the admitted sequences' prompts and the running batch's next token
     together (more only past PREFILL_GROUP_TOKENS prompt tokens; runner.py), then the
     speculating rows' draft + verify cycles (speculative.py)
  4) sample per row, send events to each request's asyncio queue, retire finished rows
  5) publish an EngineStats snapshot (stats.py)

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
import threading
import time
import weakref
from collections import abc
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

import torch

from models import kernels
from models.llama import SortedModel
from server.engine.kv_cache import KVCacheConfig, KVCacheManager
from server.engine.runner import GroupOutput, Runner, pack, prefill_groups
from server.engine.sampling import (
    TokenMasks,
    bitmask_words,
    make_generator,
    sample_rows,
    token_logprob,
)
from server.engine.scheduler import Scheduler, SchedulerOutput, Sequence
from server.engine.speculative import SpecConfig, Speculator
from server.engine.stats import TurnMeter
from server.engine.types import (
    EngineStats,
    GenerationRequest,
    QueueFull,
    TokenEvent,
    TokenLogprob,
    is_token_id,
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
    prefix_cache: bool = True  # reuse the KV of cached prompt prefixes (kv_cache.py)
    kv_cache_dtype: str = "auto"  # KV_CACHE_DTYPES: "auto" is kv_cache_dtype()'s choice


# the KV cache's element types by name; "auto" picks one (kv_cache_dtype)
KV_CACHE_DTYPES = {"float32": torch.float32, "float16": torch.float16,
                   "bfloat16": torch.bfloat16}  # fmt: skip


def kv_cache_dtype(model: SortedModel, name: str = "auto") -> torch.dtype:
    """The KV cache's element type: `name`'s, or for "auto" fp16 where soft-serve's CPU
    kernels attend (they widen it as they load it: half the bytes a decode step reads
    from the cache, twice the tokens a cache's memory holds; llama.cpp's default too) and
    the model's own dtype elsewhere."""
    if name != "auto":
        if name not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be auto or one of {', '.join(KV_CACHE_DTYPES)}; "
                             f"got {name!r}")  # fmt: skip
        return KV_CACHE_DTYPES[name]
    cpu = model.device.type == "cpu" and model.dtype == torch.float32
    return torch.float16 if cpu and kernels.available() else model.dtype


# -- the inbox: what the event loop asks of the step loop ------------------------------------
@dataclass(frozen=True)
class Add:
    seq: Sequence  # checked and bounded in submit()


@dataclass(frozen=True)
class Abort:
    request_id: str


@dataclass(frozen=True)
class LowerDepth:
    request_id: str
    depth: int


Message = Add | Abort | LowerDepth


class _Sink:
    """A request's asyncio queue, on the event loop that consumes it."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.queue: asyncio.Queue[TokenEvent] = asyncio.Queue()


class _Outbox:
    """Events waiting for delivery, handed over in one call per event loop: waking a loop
    from another thread writes to its self-pipe, which cost ~0.2 ms of a 2-core machine
    per call when every row's token woke it on its own (a 16-row step: ~3 ms)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._items: list[tuple[_Sink, list[TokenEvent]]] = []

    def add(self, sink: _Sink, events: list[TokenEvent]) -> None:
        with self._lock:
            self._items.append((sink, events))

    def deliver(self) -> None:
        """Hand everything added so far to its event loops, in order."""
        with self._lock:
            items, self._items = self._items, []
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_Sink, list[TokenEvent]]]] = {}
        for item in items:
            by_loop.setdefault(item[0].loop, []).append(item)
        for loop, mine in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, mine)
            except RuntimeError:  # the loop is closed: nobody is listening any more
                pass


def _put_all(items: list[tuple[_Sink, list[TokenEvent]]]) -> None:
    for sink, events in items:
        for e in events:
            sink.queue.put_nowait(e)


class Engine:
    def __init__(self, model: SortedModel, config: EngineConfig | None = None) -> None:
        model.pack()  # matrices in the CPU kernels' own layouts (no-op elsewhere)
        if model.device.type == "cpu":
            if kernels.available():
                log.info("soft-serve CPU kernels: on (decode layers fused; %s), weights %s",
                         kernels.library(), model.quantization)  # fmt: skip
            else:
                log.warning("soft-serve CPU kernels off (%s): torch's kernels only, slower "
                            "decode", kernels.unavailable_reason())  # fmt: skip
        self.model = model
        self.config = config = config or EngineConfig()
        cfg = model.cfg
        self.max_model_len = min(config.max_model_len or 1 << 30, cfg.max_position_embeddings)
        exit_layers = tuple(sorted(int(e) for e in model.exit_layers))  # balcony
        self.cache = KVCacheManager(
            KVCacheConfig.for_memory(
                config.kv_cache_memory, cfg.num_layers, cfg.num_kv_heads, cfg.head_dim,
                config.block_size, kv_cache_dtype(model, config.kv_cache_dtype), model.device,
                exit_layers,
            ),
            prefix_cache=config.prefix_cache,
        )  # fmt: skip
        assert all(self.cache.cfg.exit_kv_layer(e) == model.kv_layer(e) for e in exit_layers)
        self.scheduler = Scheduler(self.cache, config.max_num_seqs, config.max_prefill_tokens)
        self.runner = Runner(model, self.cache)
        self.speculator = Speculator(model, config.speculative)
        self.meter = TurnMeter()
        self.eos = set(cfg.eos_token_ids)
        if model.tokenizer is not None and model.tokenizer.eos_token_id is not None:
            self.eos.add(model.tokenizer.eos_token_id)
        self._lock = threading.Lock()
        self._inbox: list[Message] = []
        self._outbox = _Outbox()
        self._wake = threading.Event()
        self._stop = False
        self._accepting = True
        self._thread: threading.Thread | None = None
        self._stats = self.snapshot()

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

    @property
    def max_queue(self) -> int:
        """Sequences queued at once before `submit` raises QueueFull."""
        return self.config.max_queue

    def check(self, request: GenerationRequest) -> None:
        """Raise ValueError when the request can never run (the API answers 400)."""
        n, p = len(request.prompt_ids), request.params
        if n == 0:
            raise ValueError("the prompt is empty")
        vocab = self.model.cfg.vocab_size
        bad = next((t for t in request.prompt_ids if not is_token_id(t, vocab)), None)
        if bad is not None:
            raise ValueError(f"prompt token ids must be integers in 0..{vocab - 1}, got {bad!r}")
        if not 1 <= request.depth <= self.model.num_layers:
            raise ValueError(f"depth must be in 1..{self.model.num_layers}")
        if p.max_tokens < 1:
            raise ValueError("max_tokens must be at least 1")
        if n + p.max_tokens > self.max_model_len:
            raise ValueError(
                f"this model's context window is {self.max_model_len} tokens; the prompt has "
                f"{n} and max_tokens asks for {p.max_tokens} more ({n + p.max_tokens})"
            )
        need = len(self.cache.layers(request.depth)) * self.cache.blocks_for(n + p.max_tokens)
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
            pending = sum(1 for m in self._inbox if isinstance(m, Add))
            if len(self.scheduler.waiting) + pending >= self.config.max_queue:
                raise QueueFull(retry_after_s=max(1.0, self.meter.step_ewma * 16))
            self._inbox.append(Add(seq))
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

    def cached_tokens(
        self, prompt_ids: abc.Sequence[int], depths: abc.Sequence[int]
    ) -> dict[int, int]:
        """Prompt tokens a request would find in the prefix cache now, at each of `depths`
        (a look that changes nothing; by admission time the cache may hold more or less)."""
        return self.cache.cached_by_depth(prompt_ids, depths)

    def abort(self, request_id: str) -> None:
        """Cancel a request wherever it is; its blocks are freed on the next turn."""
        self._post(Abort(request_id))

    def lower_depth(self, request_id: str, depth: int) -> None:
        """Move a request to a shallower exit (never deeper); later tokens carry it."""
        self._post(LowerDepth(request_id, depth))

    def _post(self, message: Message) -> None:
        with self._lock:
            self._inbox.append(message)
        self._wake.set()

    def stats(self) -> EngineStats:
        """The snapshot the step loop published after its last turn."""
        return self._stats

    def snapshot(self) -> EngineStats:
        """A snapshot taken now (the step loop publishes one after each turn)."""
        return self.meter.snapshot(
            self.scheduler, self.cache, self.speculator.stats, len(self._inbox)
        )

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
        self._outbox.deliver()

    @torch.inference_mode()
    def decode_step(self, seqs: list[Sequence]) -> None:
        """One decode step of `seqs` alone, outside the step loop (benchmarks time it):
        each gets its next token; their blocks must be allocated already."""
        self._emit(self.runner.forward([self.runner.decode_group(seqs)]))
        self._outbox.deliver()

    # -- the step loop (engine thread) ------------------------------------------------------
    def _run(self) -> None:
        torch.set_grad_enabled(False)
        while not self._stop:
            self._drain_inbox()
            if not self.scheduler.has_work:
                self._outbox.deliver()  # aborts of queued requests
                self.meter.idle()
                self._stats = self.snapshot()
                self._wake.wait(0.1)
                self._wake.clear()
                continue
            try:
                self.step()
            except Exception as e:  # a broken step must not take the server down
                log.exception("engine step failed")
                for seq in [*self.scheduler.running]:
                    self._finish(seq, "error", error=f"{type(e).__name__}: {e}")
            self._outbox.deliver()
            self._stats = self.snapshot()

    def _drain_inbox(self) -> None:
        with self._lock:
            inbox, self._inbox = self._inbox, []
        for message in inbox:
            if isinstance(message, Add):
                self.scheduler.waiting.append(message.seq)  # bound was checked in submit()
            elif isinstance(message, Abort):
                seq = self.scheduler.remove(message.request_id)
                if seq is not None:
                    self._send(seq, [TokenEvent(seq.id, None, finish_reason="abort",
                                                depth=seq.depth)])  # fmt: skip
            else:
                self.scheduler.lower_depth(message.request_id, message.depth)

    @torch.inference_mode()
    def step(self) -> None:
        """One turn: schedule, then the model work (see the module docstring)."""
        backlog = bool(self.scheduler.waiting)
        t_turn = time.perf_counter()
        out = self.scheduler.schedule()
        try:
            self._forward_step(out)
        finally:
            if backlog:
                self.meter.count_admissions(len(out.prefill), time.perf_counter() - t_turn)

    def _forward_step(self, out: SchedulerOutput) -> None:
        """One loop turn's model work: the newcomers' prefills and one decode step of the
        running rows in a single forward (their matrix products share each weight read;
        runner.pack), then the speculating rows' draft + verify cycles."""
        t0 = time.perf_counter()
        decode = [s for s in out.decode if s.finish_reason is None]
        plain, spec = (
            self.speculator.plan(decode, self.cache, self.max_model_len) if decode else ([], {})
        )
        prefill = [self.runner.prefill_group(g) for g in prefill_groups(out.prefill)]
        for groups in pack(prefill, self.runner.decode_group(plain) if plain else None):
            self._emit(self.runner.forward(groups))
            self._outbox.deliver()  # one wake-up of each event loop per forward
        for (exit_, k), seqs in spec.items():
            self._speculate(seqs, exit_, k)
            self._outbox.deliver()
        if decode:  # what the running rows waited for this token
            self.meter.decode_turn(time.perf_counter() - t0, len(decode), bool(out.prefill))

    def _speculate(self, seqs: list[Sequence], exit_: int, k: int) -> None:
        """One draft + verify cycle (speculative.py), then each row's tokens appended and
        its KV rolled back to what was kept."""
        for seq, tokens in self.speculator.cycle(seqs, exit_, k, self.cache):
            events = []
            for tok, lp in tokens:
                events.append(self._append(seq, tok, lp))
                if seq.finish_reason is not None:
                    break
            if seq.finish_reason is None:
                seq.num_computed = len(seq.tokens) - 1  # the last token is fed next step
                if seq.draft_exit == exit_:  # its draft layer saw the same tokens
                    seq.draft_computed = seq.num_computed
                self.cache.shrink(seq, len(seq.tokens))
                self.cache.publish(seq, seq.depth, seq.tokens, seq.num_computed)
            self._send(seq, events)

    def _emit(self, outputs: list[GroupOutput]) -> None:
        """Each row's next token from a forward: prefill groups first (with their prompt
        logprobs and queue time on a first prefill), then the decode rows."""
        for out in outputs:
            g = out.group
            if not g.prefill:
                for s in g.seqs:
                    s.num_computed = len(s.tokens)
                    self.cache.publish(s, s.depth, s.tokens, s.num_computed)
                self._sample(g.seqs, out.logits)
                continue
            for r, seq in enumerate(g.seqs):
                queue_s = None
                if seq.before_first_token and seq.first_scheduled is not None:
                    arrival = seq.request.arrival or seq.first_scheduled
                    queue_s = max(0.0, seq.first_scheduled - arrival)
                seq.num_computed = len(seq.tokens)
                self.cache.publish(seq, seq.depth, seq.tokens, seq.num_computed)
                self._sample([seq], out.logits[r : r + 1], out.prompt_logprobs[r], queue_s,
                             seq.cached_tokens if queue_s is not None else None)  # fmt: skip

    def _sample(
        self,
        seqs: list[Sequence],
        logits: torch.Tensor,
        prompt: tuple[TokenLogprob | None, ...] | None = None,
        queue_s: float | None = None,
        cached: int | None = None,
    ) -> None:
        """Sample each row's token, send its event, retire finished sequences (`prompt`,
        `queue_s`, `cached`: a first prefill's, for its first event)."""
        params = [s.request.params for s in seqs]
        histories = None
        if any(p.processes_logits for p in params):  # penalties see prompt and output
            cut = [len(s.request.prompt_ids) for s in seqs]
            histories = (
                [s.tokens[:c] for s, c in zip(seqs, cut, strict=True)],
                [s.tokens[c:] for s, c in zip(seqs, cut, strict=True)],
            )
        prompts, outputs = histories or (None, None)
        tokens = sample_rows(
            logits,
            params,
            [s.generator for s in seqs],
            prompts,
            outputs,
            masks=self._masks(seqs, logits.shape[-1]),
        )
        # the model's own logprobs (vLLM's): from the logits before penalties and masks
        want_lp = [j for j, p in enumerate(params) if p.logprobs is not None]
        logprobs = torch.log_softmax(logits[want_lp].float(), -1) if want_lp else None
        for j, (seq, tok) in enumerate(zip(seqs, tokens, strict=True)):
            p = seq.request.params
            lp = None
            if logprobs is not None and p.logprobs is not None:
                lp = token_logprob(logprobs[want_lp.index(j)], tok, p.logprobs)
            self._send(seq, [self._append(seq, tok, lp, prompt, queue_s, cached)])

    @staticmethod
    def _masks(seqs: list[Sequence], vocab: int) -> TokenMasks | None:
        """The grammar masks of the rows that have a constraint (structured outputs)."""
        rows = [j for j, s in enumerate(seqs) if s.request.constraint is not None]
        if not rows:
            return None
        bitmask = torch.zeros(len(rows), bitmask_words(vocab), dtype=torch.int32)
        for r, j in enumerate(rows):
            constraint = seqs[j].request.constraint
            assert constraint is not None
            constraint.fill_bitmask(bitmask, r)
        return TokenMasks(rows, bitmask)

    def _append(
        self,
        seq: Sequence,
        tok: int,
        lp: TokenLogprob | None,
        prompt: tuple[TokenLogprob | None, ...] | None = None,
        queue_s: float | None = None,
        cached: int | None = None,
    ) -> TokenEvent:
        """Add a generated token to `seq`; retire it when it is done. Returns its event.
        A constrained row's grammar advances past the token; it stops when the grammar
        is complete (it has accepted an EOS, which its mask allows only then)."""
        p, constraint = seq.request.params, seq.request.constraint
        if constraint is not None and not constraint.accept(tok):
            # the mask allowed nothing (a grammar the vocabulary cannot finish)
            seq.finish_reason = "error"
            self.scheduler.remove(seq.id)
            return TokenEvent(seq.id, None, finish_reason="error", depth=seq.depth,
                              error="the grammar allows no next token")  # fmt: skip
        seq.tokens.append(tok)
        seq.num_generated += 1
        finish = None
        if (tok in self.eos and not p.ignore_eos) or tok in p.stop_token_ids:
            finish = "stop"
        elif constraint is not None and constraint.is_terminated():
            finish = "stop"
        elif seq.num_generated >= p.max_tokens or len(seq.tokens) >= self.max_model_len:
            finish = "length"
        if finish is not None:  # free first: after its last event a request holds nothing
            seq.finish_reason = finish
            self.scheduler.remove(seq.id)
        return TokenEvent(seq.id, tok, lp, finish, seq.depth, prompt_logprobs=prompt,
                          queue_seconds=queue_s, cached_tokens=cached)  # fmt: skip

    def _finish(self, seq: Sequence, reason: str, error: str | None = None) -> None:
        self.scheduler.remove(seq.id)
        seq.finish_reason = reason
        self._send(seq, [TokenEvent(seq.id, None, finish_reason=reason, depth=seq.depth,
                                    error=error)])  # fmt: skip

    def _send(self, seq: Sequence, events: list[TokenEvent]) -> None:
        """Queue `events` for `seq`'s consumer (delivered by the next `_outbox.deliver`)."""
        if isinstance(seq.sink, _Sink):
            self._outbox.add(seq.sink, events)
