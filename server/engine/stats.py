"""What the engine measures about itself, for the depth policy and the metrics: EWMAs of
its decode steps and of the time between a running row's tokens, the queue's drain rate,
counters; `snapshot` turns them and the scheduler's state into an `EngineStats`."""

from __future__ import annotations

import math

from server.engine.kv_cache import KVCacheManager
from server.engine.scheduler import Scheduler
from server.engine.speculative import SpecStats
from server.engine.types import EngineStats, SpecCounters

# the queue's drain rate forgets turns older than about this many seconds of backlog
ADMIT_TAU_S = 4.0


class TurnMeter:
    """Timings of the step loop's turns (written by the engine thread only)."""

    def __init__(self) -> None:
        self.step_ewma = 0.0  # decode steps that ran alone (no newcomer's prefill)
        self.interval_ewma = 0.0  # every turn with a decode step, prefills included
        self.admitted = 0.0  # decayed admissions / seconds of turns that began with a queue
        self.backlog_s = 0.0
        self.steps = 0
        self.idled = True  # no decode step since the loop last ran out of work (or ever)
        self.last_batch = 0

    def idle(self) -> None:
        """Out of work: the averages restart with the next busy spell (a batch of other
        times must not describe the next one)."""
        self.idled = True

    def count_admissions(self, admitted: int, seconds: float) -> None:
        """A loop turn that began with requests waiting: `admitted` left the queue in
        `seconds`. The decayed ratio is the queue's drain rate (EngineStats.admit_per_second):
        under overload every turn counts; turns with nobody waiting say nothing about it.
        (Counting only turns that leave someone behind would select the slow ones.)"""
        keep = math.exp(-seconds / ADMIT_TAU_S)
        self.admitted = self.admitted * keep + admitted
        self.backlog_s = self.backlog_s * keep + seconds

    def decode_turn(self, seconds: float, rows: int, with_prefill: bool) -> None:
        """A turn that gave `rows` running sequences their next token in `seconds` (what
        they waited for it), newcomers' prefills in it or not."""
        if not with_prefill or self.idled:  # the decode step alone
            self.step_ewma = seconds if self.idled else 0.9 * self.step_ewma + 0.1 * seconds
        self.interval_ewma = seconds if self.idled else 0.95 * self.interval_ewma + 0.05 * seconds
        self.steps += 1
        self.idled = False
        self.last_batch = rows

    @property
    def admit_per_second(self) -> float:
        return self.admitted / self.backlog_s if self.backlog_s > 0 else 0.0

    def snapshot(
        self, scheduler: Scheduler, cache: KVCacheManager, spec: SpecStats, pending: int
    ) -> EngineStats:
        """The engine as it is now; `pending`: messages not yet read from its inbox."""
        running = scheduler.running
        depths: dict[int, int] = {}
        for s in running:
            depths[s.depth] = depths.get(s.depth, 0) + 1
        per_layer = cache.bytes_per_layer()
        L = cache.cfg.num_layers
        exit_layers = dict(zip(cache.cfg.exit_layers, per_layer[L:], strict=True))
        return EngineStats(
            running=len(running),
            waiting=len(scheduler.waiting) + pending,
            batch_size=self.last_batch,
            kv_blocks_total=cache.cfg.num_blocks,
            kv_blocks_used=cache.num_used,
            kv_bytes_per_layer=per_layer[:L],
            kv_bytes_per_exit_layer=exit_layers,
            kv_bytes_total=sum(per_layer),
            prefix_queries=dict(cache.prefix.queries) if cache.prefix is not None else {},
            prefix_hits=dict(cache.prefix.hits) if cache.prefix is not None else {},
            prefix_cached_blocks=cache.num_cached,
            decode_step_seconds=self.step_ewma,
            token_interval_seconds=self.interval_ewma,
            admit_per_second=self.admit_per_second,
            steps=self.steps,
            preemptions=scheduler.num_preemptions,
            depths_running=depths,
            rows_left=tuple(
                (s.depth, max(s.request.params.max_tokens - s.num_generated, 0))
                for s in (*running, *scheduler.waiting)
            ),
            speculation={
                e: SpecCounters(
                    n, spec.accepted.get(e, 0), spec.cycles.get(e, 0), spec.emitted.get(e, 0)
                )
                for e, n in spec.drafted.items()
            },  # fmt: skip
        )
