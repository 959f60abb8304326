"""The load governor of `--policy load`: a depth cap for requests without a budget (and,
while it is lowered, the deepest exit a budget may pick: server/policy/policies.py).

Overload (the queue at `queue_high`, a running row's time per output token — its decode
step plus the prefills that share its loop turn — slower than `tpot_ms`, or — when the
policy can say — the recent arrivals needing more than all of the engine's time at the
current cap, before any queue shows it) held for `down_s` lowers the cap to the exit
nearest `factor` x its layers; calm (the queue at most
`queue_low`, and the time per token the batch would take one exit deeper predicted at most
`restore_ratio` x `tpot_ms`, and — when the policy can say — the recent arrivals, served
one exit deeper, needing at most `max_utilization` of the engine's time) held for `up_s`
since the last overload raises it one exit. The last condition stops the cycle a load
near one exit's capacity would otherwise run: restore, the queue builds, lower, it drains.
The gaps between the thresholds, and the dwell times, are the hysteresis: a load that
hovers near one threshold moves the cap at most once per dwell, and a cap that was just
lowered is not raised by the very drop in step time it caused. Exported as soft_depth_cap;
the deploy manifests scale replicas on the same signals.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from server.engine.types import EngineStats
from server.policy.latency import LatencyProfile


@dataclass(frozen=True)
class GovernorConfig:
    queue_high: int = 4  # waiting sequences that mean overload: requests queue, TTFT grows
    queue_low: int = 0  # restore only once nothing waits
    # time per output token (decode step + newcomers' prefills) that means overload; None:
    # 2x the default depth's one-row step (a batch that has grown past the device's sweet spot)
    tpot_ms: float | None = None
    restore_ratio: float = 0.7  # restore when one exit deeper is predicted under this x tpot
    factor: float = 0.7  # each lowering keeps ~this share of the cap's layers
    down_s: float = 0.5  # overload must last this long (and a lowering must show) first
    up_s: float = 5.0  # calm since the last overload before restoring one exit
    min_depth: int | None = None  # floor of the cap; None: the shallowest exit
    # restore only while the recent arrivals at one exit deeper are predicted to need at
    # most this share of the engine's time (>= 1 disables the check)
    max_utilization: float = 0.8


class Governor:
    """Tracks load and holds the cap. `observe` is called at each request and scrape."""

    def __init__(
        self,
        exits: Sequence[int],
        default_depth: int,
        profile: LatencyProfile,
        config: GovernorConfig,
        clock: Callable[[], float] = time.monotonic,
        utilization: Callable[[int], float | None] | None = None,
    ) -> None:
        """`utilization(depth)`: the share of the engine's time the recent arrivals would
        need with unbudgeted requests capped at `depth` (None: not known yet)."""
        self.config, self.profile, self.clock = config, profile, clock
        self.utilization = utilization
        floor = config.min_depth or min(exits)
        self.levels = tuple(d for d in sorted(exits) if floor <= d <= default_depth)
        assert self.levels, f"no exit between the floor {floor} and the default {default_depth}"
        self.tpot_ms = config.tpot_ms or 2.0 * profile.step_ms(default_depth)
        self.index = len(self.levels) - 1  # start uncapped
        self._over_since: float | None = None
        self._last_over = -float("inf")
        self._changed = -float("inf")
        self.changes = 0

    @property
    def cap(self) -> int:
        return self.levels[self.index]

    def observe(self, stats: EngineStats, now: float | None = None) -> int:
        """Args: the engine's snapshot; `now` (tests: a scripted clock). Returns the cap."""
        now = self.clock() if now is None else now
        cfg = self.config
        # what running rows wait per token: the decode step and newcomers' prefills
        step_ms = (stats.token_interval_seconds or stats.decode_step_seconds) * 1000.0
        busy = stats.running > 0
        over = stats.waiting >= cfg.queue_high or (busy and step_ms > self.tpot_ms)
        over = over or (busy and not self._sustainable(self.cap, 1.0))
        if over:
            self._last_over = now
            if self._over_since is None:
                self._over_since = now
            held = now - max(self._over_since, self._changed) >= cfg.down_s
            if held and self.index > 0:
                self._move(self._lower_index(), now)
                self._over_since = now
            return self.cap
        self._over_since = None
        if self.index == len(self.levels) - 1 or stats.waiting > cfg.queue_low:
            return self.cap
        calm = now - max(self._last_over, self._changed) >= cfg.up_s
        fits = not busy or self._deeper_step_ms(stats, step_ms) <= cfg.restore_ratio * self.tpot_ms
        if calm and fits and self._sustainable(self.levels[self.index + 1]):
            self._move(self.index + 1, now)
        return self.cap

    def _sustainable(self, depth: int, limit: float | None = None) -> bool:
        """Whether the recent arrivals at `depth` need at most `limit` (default:
        max_utilization) of the engine's time; True when unknown or the check is off."""
        if self.utilization is None or self.config.max_utilization >= 1.0:
            return True
        need = self.utilization(depth)
        return need is None or need <= (self.config.max_utilization if limit is None else limit)

    def _lower_index(self) -> int:
        want = self.cap * self.config.factor
        below = [i for i, d in enumerate(self.levels[: self.index]) if d <= want]
        return below[-1] if below else max(self.index - 1, 0)

    def _deeper_step_ms(self, stats: EngineStats, step_ms: float) -> float:
        """The measured time per token, scaled by the profile's decode steps to rows
        capped one exit deeper."""
        cap, up = self.cap, self.levels[self.index + 1]
        rows = [d for d, n in stats.depths_running.items() for _ in range(n)]
        now_ms = self.profile.batch_step_ms(rows)
        then_ms = self.profile.batch_step_ms([up if d >= cap else d for d in rows])
        return step_ms * then_ms / now_ms if now_ms > 0 else step_ms

    def _move(self, index: int, now: float) -> None:
        self.index, self._changed = index, now
        self.changes += 1
