"""Depth selection: which exit serves a request.

A request may pin a depth (`"model": "name@d"` or `x-soft-depth`), carry a latency budget
(`x-latency-budget: 250ms | 1.5s | 250`), or neither. A `Policy` turns that into a
`DepthChoice`; the latency it predicts comes from a `LatencyProfile`: soft.json's
`latency_profile` when the checkpoint has one, else a few seconds of measurement at start-up.

Profile format (what `latency_profile` in soft.json holds; depths as strings, ms):
```json
{"prefill_ms_per_token": {"2": 0.05, "4": 0.09},
 "decode_ms_per_step":   {"2": 1.1,  "4": 1.9},      a decode step of one row
 "prefill_ms_base":      {"2": 0.4,  "4": 0.7},      (optional)
 "decode_ms_per_row":    {"2": 0.1,  "4": 0.2}}      (optional) each further row
```
Depths it does not list are interpolated linearly in depth (cost is per layer + head).
`soft-profile` (server/profile.py) measures and writes it; other keys are kept, not read.

A step of a mixed batch costs the deepest row's one-row step (every layer it needs runs
once) plus `decode_ms_per_row` of each other row at that row's depth. The budget policies
predict with it on the batch a request will decode in (the running rows and the queue
ahead, each until its last token, and the arrivals expected while it runs, at the depths
recent requests got), scaled to the engine's measured steps, plus its wait
at the queue's measured drain rate (FixedPolicy.predict); `load` adds the governor
(server/governor.py); server/deadline.py lowers running requests that fall behind. Each
prediction and each finished request's queue and service time are logged at DEBUG.
"""

from __future__ import annotations

import asyncio
import bisect
import itertools
import logging
import math
import re
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from server.engine.types import EngineStats, GenerationRequest, SamplingParams
from server.policy.governor import Governor, GovernorConfig

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
_BUDGET = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(ms|s)?\s*$", re.IGNORECASE)


class PolicyError(ValueError):
    """A client's depth request that cannot be served; `param` names what to change."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


def parse_budget(value: str, header: str = "x-latency-budget") -> float:
    """`250ms`, `1.5s` or a bare number of milliseconds -> milliseconds (> 0).

    Raises:
        PolicyError: malformed, zero, or not finite; `param` is `header`.
    """
    m = _BUDGET.match(value)
    ms = float(m.group(1)) * (1000.0 if (m.group(2) or "ms").lower() == "s" else 1.0) if m else 0
    if not m or not math.isfinite(ms) or ms <= 0:
        raise PolicyError(
            f"{header} {value!r} is not a latency: use e.g. '250ms', '1.5s' or '250'", header
        )
    return ms


def parse_budget_mode(value: str | None) -> bool:
    """`x-latency-budget-mode`: `strict` (refuse what no exit meets) or `best-effort`.
    Returns True for strict."""
    mode = (value or "best-effort").strip().lower()
    if mode not in ("strict", "best-effort"):
        raise PolicyError(
            f"x-latency-budget-mode {value!r}: use 'strict' or 'best-effort'",
            "x-latency-budget-mode",
        )
    return mode == "strict"


@dataclass(frozen=True)
class LatencyProfile:
    """Predicted milliseconds per exit: prefill = base + per_token * prompt_len; a decode
    step = one-row step of the deepest row + per_row of every other row."""

    prefill_ms_base: Mapping[int, float]
    prefill_ms_per_token: Mapping[int, float]
    decode_ms_per_step: Mapping[int, float]
    source: str  # "soft.json" | "measured" | "given" | a file
    decode_ms_per_row: Mapping[int, float] = field(default_factory=dict)  # {}: batch-free

    def prefill_ms(self, depth: int, prompt_len: int) -> float:
        return self.prefill_ms_base[depth] + self.prefill_ms_per_token[depth] * prompt_len

    def step_ms(self, depth: int) -> float:
        return self.decode_ms_per_step[depth]

    def batch_step_ms(self, depths: Sequence[int]) -> float:
        """One decode step of a batch whose rows run at `depths` (any order)."""
        if not depths:
            return 0.0
        rows = sorted(depths)
        extra = sum(self.decode_ms_per_row.get(d, 0.0) for d in rows[:-1])
        return self.decode_ms_per_step[rows[-1]] + extra

    def predict_ms(self, depth: int, prompt_len: int, max_tokens: int) -> float:
        """End-to-end server-side time of one request at `depth`, alone on the device."""
        return self.prefill_ms(depth, prompt_len) + max_tokens * self.step_ms(depth)

    @classmethod
    def from_points(
        cls,
        exits: Sequence[int],
        base: Mapping[int, float],
        per_token: Mapping[int, float],
        step: Mapping[int, float],
        source: str,
        per_row: Mapping[int, float] | None = None,
    ) -> LatencyProfile:
        """Fill every exit from measurements at some depths (linear in depth, never
        decreasing with depth, never negative)."""
        return cls(
            prefill_ms_base=_fill(exits, base),
            prefill_ms_per_token=_fill(exits, per_token),
            decode_ms_per_step=_fill(exits, step),
            source=source,
            decode_ms_per_row=_fill(exits, per_row) if per_row else {},
        )

    @classmethod
    def from_json(
        cls, data: Mapping[str, Any], exits: Sequence[int], source: str = "soft.json"
    ) -> LatencyProfile:
        """Read soft.json's `latency_profile`; raises ValueError naming the bad field."""

        def table(key: str, required: bool) -> dict[int, float]:
            raw = data.get(key)
            if raw is None and not required:
                return {}
            if not isinstance(raw, Mapping) or not raw:
                raise ValueError(f"latency_profile.{key} must be an object depth -> ms")
            try:
                return {int(k): float(v) for k, v in raw.items()}
            except (TypeError, ValueError) as e:
                raise ValueError(f"latency_profile.{key}: {e}") from e

        per_token = table("prefill_ms_per_token", True)
        step = table("decode_ms_per_step", True)
        base = table("prefill_ms_base", False) or dict.fromkeys(per_token, 0.0)
        per_row = table("decode_ms_per_row", False)
        return cls.from_points(exits, base, per_token, step, source, per_row)

    def to_json(self) -> dict[str, dict[str, float]]:
        def f(t: Mapping[int, float]) -> dict[str, float]:
            return {str(d): round(v, 4) for d, v in sorted(t.items())}

        out = {
            "prefill_ms_base": f(self.prefill_ms_base),
            "prefill_ms_per_token": f(self.prefill_ms_per_token),
            "decode_ms_per_step": f(self.decode_ms_per_step),
        }
        if self.decode_ms_per_row:
            out["decode_ms_per_row"] = f(self.decode_ms_per_row)
        return out


def _fill(exits: Sequence[int], points: Mapping[int, float]) -> dict[int, float]:
    """Each exit's value: the table's own when it lists every exit, else a least-squares
    line in depth through the known points (cost is per layer + a fixed part); clamped so
    cost never falls as depth grows."""
    assert points, "a latency table needs at least one depth"
    xs = sorted(points)
    if len(xs) == 1:
        slope, icpt = points[xs[0]] / xs[0], 0.0
    else:
        mx = sum(xs) / len(xs)
        my = sum(points[x] for x in xs) / len(xs)
        slope = sum((x - mx) * (points[x] - my) for x in xs) / sum((x - mx) ** 2 for x in xs)
        slope = max(slope, 0.0)
        icpt = my - slope * mx
    out: dict[int, float] = {}
    prev = 0.0
    exact = all(d in points for d in exits)
    for d in sorted(exits):
        v = points[d] if exact else icpt + slope * d
        prev = max(prev, v, 0.0)
        out[d] = prev
    return out


def measure_profile(
    engine: Any, exits: Sequence[int], seconds: float = 3.0, prompt_len: int = 64
) -> LatencyProfile:
    """Time the started engine itself (its step loop, paged cache and threads: what requests
    will meet) at the shallowest, middle and deepest exit, alone at batch 1, for about
    `seconds`; the other exits are interpolated. Call from a thread without a running
    event loop (the lifespan's loader thread).

    Per depth: a long and a short prompt with max_tokens=1 give prefill base + per token;
    the short prompt with 1 + STEPS tokens gives the decode step."""
    steps = 8
    depths = sorted({exits[0], exits[len(exits) // 2], exits[-1]})
    long_len = max(4, min(prompt_len, engine.max_model_len - steps - 2))
    short_len = long_len // 4
    prompt = tuple(3 + (7 * i) % 97 for i in range(long_len))  # any ids will do

    async def timed(depth: int, n_prompt: int, max_tokens: int) -> float:
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        req = GenerationRequest(f"profile-{uuid.uuid4().hex}", prompt[:n_prompt], params, depth)
        t0 = time.perf_counter()
        async for _ in engine.submit(req):
            pass
        return (time.perf_counter() - t0) * 1000.0

    async def run() -> tuple[int, dict[int, dict[str, list[float]]]]:
        samples: dict[int, dict[str, list[float]]] = {
            d: {"long": [], "short": [], "steps": []} for d in depths
        }
        for d in depths:  # warm-up: first calls pay for allocation and kernel selection
            await timed(d, short_len, 2)
        deadline, rounds = time.perf_counter() + seconds, 0
        while rounds < 2 or (time.perf_counter() < deadline and rounds < 50):
            rounds += 1
            for d in depths:
                samples[d]["long"].append(await timed(d, long_len, 1))
                samples[d]["short"].append(await timed(d, short_len, 1))
                samples[d]["steps"].append(await timed(d, short_len, 1 + steps))
        return rounds, samples

    rounds, samples = asyncio.run(run())

    def median(xs: list[float]) -> float:  # requests will meet the same neighbours
        return sorted(xs)[len(xs) // 2]

    base, per_token, step = {}, {}, {}
    for d in depths:
        long_ms, short_ms = median(samples[d]["long"]), median(samples[d]["short"])
        per_token[d] = max(long_ms - short_ms, 0.0) / (long_len - short_len)
        base[d] = max(short_ms - per_token[d] * short_len, 0.0)
        step[d] = max(median(samples[d]["steps"]) - short_ms, 0.0) / steps
    profile = LatencyProfile.from_points(exits, base, per_token, step, "measured")
    log.info("measured latency profile in %d rounds: %s", rounds, profile.to_json())
    return profile


def read_profile_file(path: str, exits: Sequence[int]) -> LatencyProfile:
    """A profile from a JSON file: `soft-profile --out`'s, or a soft.json holding one.
    Raises ValueError naming the file (the server reports it and exits)."""
    import json
    from pathlib import Path

    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"--latency-profile {path}: {e}") from e
    if isinstance(data, Mapping) and isinstance(data.get("latency_profile"), Mapping):
        data = data["latency_profile"]
    if not isinstance(data, Mapping):
        raise ValueError(f"--latency-profile {path}: expected a JSON object")
    try:
        return LatencyProfile.from_json(data, exits, source=path)
    except ValueError as e:
        raise ValueError(f"--latency-profile {path}: {e}") from e


@dataclass(frozen=True)
class DepthRequest:
    """What the policy sees of one request."""

    prompt_len: int
    max_tokens: int
    budget_ms: float | None = None  # x-latency-budget, end to end
    pinned_depth: int | None = None
    ttft_ms: float | None = None  # x-slo-ttft-ms: arrival -> first token
    tpot_ms: float | None = None  # x-slo-tpot-ms: between tokens
    strict: bool = False  # x-latency-budget-mode: strict -> refuse what no exit meets

    @property
    def target_ms(self) -> float | None:
        """The end-to-end time the request asks for: its budget, or what its SLOs add up
        to (the tighter of both when it sends both); None without either."""
        slo = None
        if self.ttft_ms is not None or self.tpot_ms is not None:
            first = self.ttft_ms if self.ttft_ms is not None else math.inf
            per = self.tpot_ms if self.tpot_ms is not None else math.inf
            slo = first + self.max_tokens * per  # as predicted: one step of margin
            slo = None if math.isinf(slo) else slo
        if slo is None or self.budget_ms is None:
            return slo if self.budget_ms is None else self.budget_ms
        return min(slo, self.budget_ms)

    @property
    def has_target(self) -> bool:
        return self.budget_ms is not None or self.ttft_ms is not None or self.tpot_ms is not None


@dataclass(frozen=True)
class DepthChoice:
    depth: int
    predicted_ms: float
    budget_ms: float | None
    feasible: bool  # False: a budget no exit meets (served at the shallowest anyway)
    target_ms: float | None = None  # end-to-end deadline after arrival (budget or SLOs)
    pinned: bool = False  # the client chose the depth
    queue_ms: float = 0.0  # the part of predicted_ms spent waiting to be scheduled


@dataclass(frozen=True)
class Prediction:
    """Milliseconds a request would take at one depth, joining the engine as it is now."""

    queue_ms: float  # waiting for the requests ahead of it
    ttft_ms: float  # queue + prefill
    tpot_ms: float  # one decode step of the batch it joins
    total_ms: float  # ttft + max_tokens steps (the first token's step is the margin)


class Policy(Protocol):
    """Chooses the exit for a request. Implementations: fixed, budget, load."""

    name: str
    exits: tuple[int, ...]
    default_depth: int
    profile: LatencyProfile

    def choose(self, request: DepthRequest) -> DepthChoice:
        """Args: the request's sizes, budget, SLOs and pin. Returns: the depth and prediction.
        Raises: PolicyError when the pin is not an exit, or (strict mode) no exit fits."""
        ...

    def depth_cap(self) -> int:
        """The deepest depth the policy currently serves unpinned requests at."""
        ...

    def observe(self, choice: DepthChoice, actual_ms: float, queue_ms: float | None = None) -> None:
        """A request it chose for ran to max_tokens at that depth in `actual_ms`, of which
        `queue_ms` (when known) waiting to be scheduled."""
        ...


class FixedPolicy:
    """Always the default depth (a pin still wins); budgets are reported, not used.

    Predictions use the live engine (`stats`, when given): the queue ahead, the batch the
    request joins, and the measured time per token of the running rows against the
    profile's decode step as a correction factor (CPU contention, speculation, and the
    newcomers' prefills that share the rows' turns)."""

    name = "fixed"

    def __init__(
        self,
        exits: Sequence[int],
        default_depth: int,
        profile: LatencyProfile,
        stats: Callable[[], EngineStats] | None = None,
        max_num_seqs: int = 32,
        governor: GovernorConfig | None = None,
    ):
        if default_depth not in exits:
            raise ValueError(f"default depth {default_depth} is not an exit {list(exits)}")
        self.exits = tuple(sorted(exits))
        self.default_depth = default_depth
        self.profile = profile
        self.stats = stats
        self.max_num_seqs = max_num_seqs
        self._scale = 1.0  # measured / profiled step time, smoothed
        self._scale_seen = -math.inf  # when the engine's step was last looked at
        self.calibration = 1.0  # actual / predicted latency of finished requests, smoothed
        self.clock: Callable[[], float] = time.monotonic
        self._arrivals = 0.0  # requests seen, decayed with time constant ARRIVAL_TAU_S
        self._last_arrival = 0.0
        self._depth_mix: dict[int, float] = {}  # depths chosen, decayed alike

    def check_pin(self, depth: int) -> int:
        if depth not in self.exits:
            raise PolicyError(
                f"depth {depth} is not an exit of this model; choose one of "
                f"{', '.join(map(str, self.exits))}",
                "model",
            )
        return depth

    def arrival_rate(self) -> float:
        """Requests per second that reached the policy over the last ~ARRIVAL_TAU_S."""
        idle = self.clock() - self._last_arrival
        return self._arrivals * math.exp(-idle / ARRIVAL_TAU_S) / ARRIVAL_TAU_S

    def _snapshot(self, req: DepthRequest) -> EngineStats | None:
        """Count `req`'s arrival; the engine's stats (None without an engine), with the
        measured step scale taken from them."""
        now = self.clock()
        keep = math.exp(-(now - self._last_arrival) / ARRIVAL_TAU_S)
        self._arrivals, self._last_arrival = self._arrivals * keep + 1.0, now
        self._depth_mix = {d: w * keep for d, w in self._depth_mix.items() if w * keep > 1e-3}
        if self.stats is None:
            return None
        s = self.stats()
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
        return s

    def observe(self, choice: DepthChoice, actual_ms: float, queue_ms: float | None = None) -> None:
        """A request served at its chosen depth ran all its max_tokens in `actual_ms`
        (server side), `queue_ms` of it waiting to be scheduled: learn the share of its
        service time (prefill + decode) the profile does not see (HTTP, SSE, detokenising,
        the event loop: it grows with the tokens streamed) as a factor on that part of the
        prediction, CALIBRATION_RATE of the log-error at a time. The queue is predicted from
        the engine's drain rate and kept out of it."""
        if self.stats is None or choice.pinned:
            return
        predicted = choice.predicted_ms - choice.queue_ms
        actual = actual_ms - (choice.queue_ms if queue_ms is None else queue_ms)
        log.debug(
            "served at %d: queue %.0f ms (predicted %.0f), service %.0f ms (predicted %.0f)",
            choice.depth, actual_ms - actual, choice.queue_ms, actual, predicted,
        )  # fmt: skip
        if predicted <= 0 or actual <= 0:
            return
        # one request moves it by at most ~1.5 %, and it stays within [0.5, 2]: it is for
        # steady overheads; a burst the snapshot could not foresee (a batch filling up
        # while the request runs) must not swing every later prediction
        ratio = min(max(actual / predicted, 0.75), 1.0 / 0.75)
        self.calibration = min(max(self.calibration * ratio**CALIBRATION_RATE, 0.5), 2.0)

    def predict(self, depth: int, req: DepthRequest, s: EngineStats | None = None) -> Prediction:
        """The request's latency at `depth` if admitted now (alone when `s` is None)."""
        prefill = self.profile.prefill_ms(depth, req.prompt_len)
        if s is None:
            step = self.profile.step_ms(depth)
            return Prediction(0.0, prefill, step, prefill + req.max_tokens * step)
        # the batch it will decode in: the running rows and the queue ahead of it (they
        # are admitted first), the latest max_num_seqs - 1 of them, and itself; each stays
        # for the tokens it has left
        ahead = list(s.rows_left[max(0, len(s.rows_left) - (self.max_num_seqs - 1)) :])
        # and the requests that arrive while it runs: at the recent arrival rate, rate x
        # service time of them are in service on average (Little's law), at most a full
        # batch; they take the places of those that leave
        first = self.profile.batch_step_ms([d for d, _ in ahead] + [depth]) * self._scale
        service_s = (prefill * self._scale + req.max_tokens * first) / 1000.0
        busy = min(self.max_num_seqs, round(self.arrival_rate() * service_s))
        decode = self._decode_ms(depth, req.max_tokens, ahead, busy)
        queue = self._queue_ms(s, prefill * self._scale, decode)
        ttft = queue + prefill * self._scale * self.calibration
        decode *= self.calibration
        step = decode / max(req.max_tokens, 1)
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

    def _choice(
        self,
        depth: int,
        req: DepthRequest,
        feasible: bool = True,
        s: EngineStats | None = None,
        p: Prediction | None = None,
    ) -> DepthChoice:
        p = p or self.predict(depth, req, s)
        self._depth_mix[depth] = self._depth_mix.get(depth, 0.0) + 1.0
        if s is not None and log.isEnabledFor(logging.DEBUG):
            log.debug(
                "depth %d: queue %.0f ms (%d waiting, %d running, drain %.2f/s), ttft %.0f ms, "
                "step %.1f ms (scale %.2f calibration %.2f; engine step %.1f "
                "interval %.1f), total %.0f ms",
                depth, p.queue_ms, s.waiting, s.running, s.admit_per_second, p.ttft_ms,
                p.tpot_ms, self._scale, self.calibration,
                s.decode_step_seconds * 1e3, s.token_interval_seconds * 1e3, p.total_ms,
            )  # fmt: skip
        return DepthChoice(
            depth, p.total_ms, req.budget_ms, feasible, req.target_ms, queue_ms=p.queue_ms
        )

    def _unbudgeted_depth(self) -> int:
        return self.default_depth

    def _budget_exits(self) -> tuple[int, ...]:
        """The exits a request with a budget or SLOs may be served at."""
        return self.exits

    def choose(self, request: DepthRequest) -> DepthChoice:
        s = self._snapshot(request)
        if request.pinned_depth is not None:
            choice = self._choice(self.check_pin(request.pinned_depth), request, s=s)
            return replace(choice, pinned=True)
        return self._choice(self._unbudgeted_depth(), request, s=s)

    def depth_cap(self) -> int:
        return self.default_depth


def fits(p: Prediction, req: DepthRequest) -> bool:
    """Whether a prediction meets every target the request set."""
    target = req.target_ms
    return (
        (target is None or p.total_ms <= target)
        and (req.ttft_ms is None or p.ttft_ms <= req.ttft_ms)
        and (req.tpot_ms is None or p.tpot_ms <= req.tpot_ms)
    )


class BudgetPolicy(FixedPolicy):
    """The deepest exit whose predicted latency fits the budget / SLOs, else the shallowest
    (infeasible; refused in strict mode); without either, the default depth."""

    name = "budget"

    def choose(self, request: DepthRequest) -> DepthChoice:
        if request.pinned_depth is not None or not request.has_target:
            return super().choose(request)
        s = self._snapshot(request)
        for d in sorted(self._budget_exits(), reverse=True):  # ends with the shallowest
            best = self.predict(d, request, s)
            if fits(best, request):
                return self._choice(d, request, s=s, p=best)
        if request.strict:
            raise PolicyError(
                "no exit meets this request's latency targets right now (the shallowest, "
                f"depth {self.exits[0]}, is predicted at "
                f"{best.total_ms:.0f} ms, first token {best.ttft_ms:.0f} ms, "
                f"{best.tpot_ms:.1f} ms/token): raise the budget, lower max_tokens, or "
                "drop 'x-latency-budget-mode: strict' to be served at the shallowest exit",
                "x-latency-budget",
            )
        return self._choice(self.exits[0], request, feasible=False, s=s, p=best)


class LoadPolicy(BudgetPolicy):
    """`budget`, plus a governor that caps the depth of requests without a budget as the
    queue and step time grow, and restores it when load falls (server/governor.py)."""

    name = "load"

    def __init__(
        self,
        exits: Sequence[int],
        default_depth: int,
        profile: LatencyProfile,
        stats: Callable[[], EngineStats] | None = None,
        max_num_seqs: int = 32,
        governor: GovernorConfig | None = None,
    ):
        super().__init__(exits, default_depth, profile, stats, max_num_seqs)
        self._sizes: tuple[float, float] | None = None  # mean prompt_len, max_tokens (EWMA)
        self.governor = Governor(
            self.exits,
            default_depth,
            profile,
            governor or GovernorConfig(),
            utilization=self.utilization,
        )

    def _snapshot(self, req: DepthRequest) -> EngineStats | None:
        size = (float(req.prompt_len), float(req.max_tokens))
        old = self._sizes or size
        self._sizes = (0.9 * old[0] + 0.1 * size[0], 0.9 * old[1] + 0.1 * size[1])
        return super()._snapshot(req)

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

    def depth_cap(self) -> int:
        if self.stats is None:
            return self.governor.cap
        return self.governor.observe(self.stats())

    def _budget_exits(self) -> tuple[int, ...]:
        """Under a lowered cap, the exits up to it: a row deeper than the batch's others
        sets everyone's decode step (its extra layers' weights are read for it alone),
        so under overload a budget picks the deepest exit that fits within the cap."""
        cap = self.depth_cap()
        if cap >= self.default_depth:
            return self.exits
        return tuple(d for d in self.exits if d <= cap) or self.exits[:1]

    def _unbudgeted_depth(self) -> int:
        cap = self.depth_cap()
        return max((d for d in self.exits if d <= min(cap, self.default_depth)), default=cap)


POLICIES: dict[str, type[FixedPolicy]] = {
    "fixed": FixedPolicy,
    "budget": BudgetPolicy,
    "load": LoadPolicy,
}


def make_policy(
    name: str,
    exits: Sequence[int],
    default_depth: int,
    profile: LatencyProfile,
    stats: Callable[[], EngineStats] | None = None,
    max_num_seqs: int = 32,
    governor: GovernorConfig | None = None,
) -> Policy:
    """Args: the policy's name, the model's exits, the default depth, the profile; `stats`
    (the engine's) makes predictions load-aware; `governor` configures `load`."""
    if name not in POLICIES:
        raise ValueError(f"unknown policy {name!r}; choose one of {', '.join(POLICIES)}")
    return POLICIES[name](exits, default_depth, profile, stats, max_num_seqs, governor)
