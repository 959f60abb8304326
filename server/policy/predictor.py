"""What a request will take at each depth, joining the engine as it is now.

The profile (server/policy/latency.py) says what the device costs alone; the predictor
puts a request on the batch it will decode in: the running rows and the queue ahead, each
until its last token, and the arrivals expected while it runs (at the recent arrival
rate, at the depths recent requests got), every step scaled to the engine's measured
steps, plus its wait at the queue's measured drain rate. Finished requests calibrate the
share of the service time the profile does not see. Each prediction and each finished
request's queue and service time are logged at DEBUG.
"""

from __future__ import annotations

import bisect
import itertools
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from server.engine.types import EngineStats
from server.policy.latency import LatencyProfile

log = logging.getLogger(__name__)

# the share of one finished request's log-error (actual / predicted service time) that the
# calibration factor learns: it follows a steady bias within ~200 requests, and averages
# out the +-35 % one request's latency scatters under load (at 0.05, ~40 requests, it
# swung with a standard deviation of 0.26 at 10 requests/s and doubled the errors)
CALIBRATION_RATE = 0.01
# the step scale (measured / profiled step of the running batch, read at each request)
# follows the engine with this time constant, at most half of the way per look: ~20 looks
# at 10 requests/s; at a light load it forgets a burst's contention within seconds too
SCALE_TAU_S = 2.0
# the arrival rate the predictions assume is the decayed count of this many seconds
ARRIVAL_TAU_S = 5.0


@dataclass(frozen=True)
class Prediction:
    """Milliseconds a request would take at one depth, joining the engine as it is now."""

    queue_ms: float  # waiting for the requests ahead of it
    ttft_ms: float  # queue + prefill
    tpot_ms: float  # one decode step of the batch it joins
    total_ms: float  # ttft + max_tokens steps (the first token's step is the margin)


class Predictor:
    """Learns from the engine's stats and the finished requests; predicts latencies."""

    def __init__(
        self,
        profile: LatencyProfile,
        stats: Callable[[], EngineStats] | None = None,
        max_num_seqs: int = 32,
    ) -> None:
        self.profile, self.stats, self.max_num_seqs = profile, stats, max_num_seqs
        self._scale = 1.0  # measured / profiled step time, smoothed
        self._scale_seen = -math.inf  # when the engine's step was last looked at
        self.calibration = 1.0  # actual / predicted latency of finished requests, smoothed
        self.clock: Callable[[], float] = time.monotonic
        self._arrivals = 0.0  # requests seen, decayed with time constant ARRIVAL_TAU_S
        self._last_arrival = 0.0
        self._depth_mix: dict[int, float] = {}  # depths chosen, decayed alike
        self._sizes: tuple[float, float] | None = None  # mean prompt_len, max_tokens (EWMA)

    def arrival_rate(self) -> float:
        """Requests per second that reached the policy over the last ~ARRIVAL_TAU_S."""
        idle = self.clock() - self._last_arrival
        return self._arrivals * math.exp(-idle / ARRIVAL_TAU_S) / ARRIVAL_TAU_S

    def arrive(self, prompt_len: int, max_tokens: int) -> EngineStats | None:
        """Count a request's arrival (and its sizes); the engine's stats (None without an
        engine), with the measured step scale taken from them."""
        now = self.clock()
        keep = math.exp(-(now - self._last_arrival) / ARRIVAL_TAU_S)
        self._arrivals, self._last_arrival = self._arrivals * keep + 1.0, now
        self._depth_mix = {d: w * keep for d, w in self._depth_mix.items() if w * keep > 1e-3}
        size = (float(prompt_len), float(max_tokens))
        old = self._sizes or size
        self._sizes = (0.9 * old[0] + 0.1 * size[0], 0.9 * old[1] + 0.1 * size[1])
        if self.stats is None:
            return None
        s = self.stats()
        self._follow_scale(s, now)
        return s

    def _follow_scale(self, s: EngineStats, now: float) -> None:
        running = [d for d, n in sorted(s.depths_running.items()) for _ in range(n)]
        # what the running rows wait per token: their step and the prefills sharing its turns
        per_token = s.token_interval_seconds or s.decode_step_seconds
        if running and s.steps and per_token > 0:
            profiled = self.profile.batch_step_ms(running[: self.max_num_seqs])
            if profiled > 0:
                ratio = min(max(per_token * 1000.0 / profiled, 0.5), 4.0)
                take = min(1.0 - math.exp(-(now - self._scale_seen) / SCALE_TAU_S), 0.5)
                self._scale += take * (ratio - self._scale)
                self._scale_seen = now

    def chose(self, depth: int) -> None:
        """A request was given `depth`: the arrivals expected later come at such depths."""
        self._depth_mix[depth] = self._depth_mix.get(depth, 0.0) + 1.0

    def utilization(self, cap: int) -> float | None:
        """The share of the engine's time the recent arrivals (rate over ARRIVAL_TAU_S, mean
        sizes) would need if every request were served at `cap`: prefill plus max_tokens
        rows of a full batch's step, from the profile scaled to the measured steps. None
        before any request."""
        if self._sizes is None:
            return None
        prompt, tokens = self._sizes
        p, rows = self.profile, self.max_num_seqs
        per_row = p.batch_step_ms([cap] * rows) / rows
        work_ms = (p.prefill_ms(cap, round(prompt)) + tokens * per_row) * self._scale
        return self.arrival_rate() * work_ms / 1000.0

    def observe(
        self, predicted_ms: float, queue_ms: float, actual_ms: float, actual_queue_ms: float | None
    ) -> None:
        """A request the policy chose a depth for (predicted `predicted_ms`, `queue_ms` of it
        queueing) ran all its max_tokens at that depth in `actual_ms` (server side),
        `actual_queue_ms` of it waiting to be scheduled: learn the share of its
        service time (prefill + decode) the profile does not see (HTTP, SSE, detokenising,
        the event loop: it grows with the tokens streamed) as a factor on that part of the
        prediction, CALIBRATION_RATE of the log-error at a time. The queue is predicted from
        the engine's drain rate and kept out of it."""
        if self.stats is None:
            return
        predicted = predicted_ms - queue_ms
        actual = actual_ms - (queue_ms if actual_queue_ms is None else actual_queue_ms)
        log.debug(
            "queue %.0f ms (predicted %.0f), service %.0f ms (predicted %.0f)",
            actual_ms - actual, queue_ms, actual, predicted,
        )  # fmt: skip
        if predicted <= 0 or actual <= 0:
            return
        # one request moves it by at most ~1.5 %, and it stays within [0.5, 2]: it is for
        # steady overheads; a burst the snapshot could not foresee (a batch filling up
        # while the request runs) must not swing every later prediction
        ratio = min(max(actual / predicted, 0.75), 1.0 / 0.75)
        self.calibration = min(max(self.calibration * ratio**CALIBRATION_RATE, 0.5), 2.0)

    def predict(
        self, depth: int, prompt_len: int, max_tokens: int, s: EngineStats | None = None
    ) -> Prediction:
        """The request's latency at `depth` if admitted now (alone when `s` is None)."""
        prefill = self.profile.prefill_ms(depth, prompt_len)
        if s is None:
            step = self.profile.step_ms(depth)
            return Prediction(0.0, prefill, step, prefill + max_tokens * step)
        # the batch it will decode in: the running rows and the queue ahead of it (they
        # are admitted first), the latest max_num_seqs - 1 of them, and itself; each stays
        # for the tokens it has left
        ahead = list(s.rows_left[max(0, len(s.rows_left) - (self.max_num_seqs - 1)) :])
        # and the requests that arrive while it runs: at the recent arrival rate, rate x
        # service time of them are in service on average (Little's law), at most a full
        # batch; they take the places of those that leave
        first = self.profile.batch_step_ms([d for d, _ in ahead] + [depth]) * self._scale
        service_s = (prefill * self._scale + max_tokens * first) / 1000.0
        busy = min(self.max_num_seqs, round(self.arrival_rate() * service_s))
        decode = self._decode_ms(depth, max_tokens, ahead, busy)
        queue = self._queue_ms(s, prefill * self._scale, decode)
        ttft = queue + prefill * self._scale * self.calibration
        decode *= self.calibration
        step = decode / max(max_tokens, 1)
        return Prediction(queue, ttft, step, ttft + decode)

    def _decode_ms(self, depth: int, tokens: int, ahead: list[tuple[int, int]],
                   busy: int) -> float:  # fmt: skip
        """`tokens` decode steps at `depth` beside the rows `ahead` ((depth, tokens left)),
        each leaving after its last token, the batch kept at `busy` rows by newcomers
        (at the depths recent requests got): the sum of the profile's batch steps, segment
        by segment."""
        total, done = 0.0, 0
        for until in sorted({min(left, tokens) for _, left in ahead if left < tokens} | {tokens}):
            rows = [d for d, left in ahead if left > done]
            rows += [depth, *self._newcomers(busy - len(rows) - 1, depth)]
            total += (until - done) * self.profile.batch_step_ms(rows) * self._scale
            done = until
        return total

    def _newcomers(self, n: int, depth: int) -> list[int]:
        """The depths of `n` requests still to arrive: evenly spaced quantiles of the
        depths chosen recently (decayed over ARRIVAL_TAU_S); `depth` when none were."""
        total = sum(self._depth_mix.values())
        if n <= 0 or total <= 0:
            return [depth] * max(n, 0)
        depths = sorted(self._depth_mix)
        upto = list(itertools.accumulate(self._depth_mix[d] for d in depths))
        pick = [bisect.bisect_left(upto, (i + 0.5) / n * total) for i in range(n)]
        return [depths[min(j, len(depths) - 1)] for j in pick]

    def _queue_ms(self, s: EngineStats, prefill_ms: float, decode_ms: float) -> float:
        """Waiting to be scheduled. With a free slot for it and everyone ahead: the rest of
        the loop turn in progress (half a turn on average), then the prefills of those
        ahead (admitted in the same turn). Past the free slots, its place beyond them over
        the rate the queue has been draining (Little's law: it follows the engine through
        overload instead of compounding profile errors); before any queue has drained, the
        profile's guess: each waiting request's prefill runs first, and a full batch adds a
        share of a turnover."""
        turn = 0.5 * s.token_interval_seconds * 1000.0 if s.running else 0.0
        over = s.running + s.waiting + 1 - self.max_num_seqs  # places beyond the free slots
        if over <= 0:
            return turn + s.waiting * prefill_ms
        if s.admit_per_second > 0:
            return turn + over / s.admit_per_second * 1000.0
        return s.waiting * prefill_ms + over / self.max_num_seqs * decode_ms
