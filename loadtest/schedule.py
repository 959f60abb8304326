"""What the load tester sends, and when: arrival schedules and the request mix.

Everything here is pure and seeded: the same options and seed give the same plan, request
for request, so two runs (say `--policy fixed` against `--policy load`) see identical
traffic. Times are seconds from the start of the run.

An arrival schedule is a rate profile (requests/s as a function of time: constant, steps,
or a linear ramp) driven by an arrival process (Poisson, or evenly spaced). Both are
handled by time rescaling: unit-rate epochs s_1 < s_2 < ... (exponential gaps for Poisson,
gaps of exactly 1 for evenly spaced) are mapped through the inverse of the cumulative rate
Λ(t) = ∫₀ᵗ rate. That gives an exact non-homogeneous Poisson process for step and ramp
profiles without thinning, and k/rate for a constant schedule.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

ScheduleKind = Literal["poisson", "constant", "step", "ramp"]
ArrivalProcess = Literal["poisson", "constant"]
SCHEDULES: tuple[ScheduleKind, ...] = ("poisson", "constant", "step", "ramp")


class SpecError(ValueError):
    """An option value the user has to fix; the message says how."""


# -- rate profiles ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Segment:
    """Rate rising (or falling) linearly from `rate_start` at `start` to `rate_end` at `end`."""

    start: float
    end: float
    rate_start: float
    rate_end: float

    def rate_at(self, t: float) -> float:
        frac = (t - self.start) / (self.end - self.start)
        return self.rate_start + (self.rate_end - self.rate_start) * frac

    @property
    def mass(self) -> float:
        """Expected arrivals in the segment: the integral of the rate."""
        return 0.5 * (self.rate_start + self.rate_end) * (self.end - self.start)

    def time_of(self, s: float) -> float:
        """The time at which the cumulative rate since `start` reaches `s` (0 ≤ s ≤ mass)."""
        a, length = self.rate_start, self.end - self.start
        if s <= 0.0:
            return self.start
        slope = (self.rate_end - a) / length
        if abs(slope) < 1e-12:
            return self.start + s / a
        # a·u + slope·u²/2 = s, the root in [0, length]; written to avoid cancellation
        disc = max(a * a + 2.0 * slope * s, 0.0)
        return self.start + 2.0 * s / (a + math.sqrt(disc))


@dataclass(frozen=True)
class RateProfile:
    """Offered load over [0, duration): contiguous segments, each with a linear rate."""

    segments: tuple[Segment, ...]

    @property
    def duration(self) -> float:
        return self.segments[-1].end

    def rate_at(self, t: float) -> float:
        """Requests/s offered at time t (0 outside [0, duration))."""
        for seg in self.segments:
            if seg.start <= t < seg.end:
                return seg.rate_at(t)
        return 0.0

    def expected_count(self) -> float:
        return sum(seg.mass for seg in self.segments)

    def times_for(self, epochs: np.ndarray) -> np.ndarray:
        """Map sorted unit-rate epochs to arrival times; epochs past the end are dropped."""
        out: list[float] = []
        done = 0.0  # cumulative rate at the start of `seg`
        i = 0
        for seg in self.segments:
            mass = seg.mass
            while i < len(epochs) and epochs[i] < done + mass:
                out.append(seg.time_of(float(epochs[i]) - done))
                i += 1
            done += mass
        return np.asarray(out, dtype=np.float64)


def constant_profile(rate: float, duration: float) -> RateProfile:
    return RateProfile((Segment(0.0, duration, rate, rate),))


def ramp_profile(start_rate: float, end_rate: float, duration: float) -> RateProfile:
    return RateProfile((Segment(0.0, duration, start_rate, end_rate),))


def step_profile(
    initial_rate: float, steps: Sequence[tuple[float, float]], duration: float
) -> RateProfile:
    """`initial_rate` from t=0, then each (rate, at) step sets the rate from `at` seconds on.
    Steps at or past `duration` never happen."""
    bounds = [(0.0, initial_rate)] + [(at, r) for r, at in steps if at < duration]
    segments = []
    for k, (at, rate) in enumerate(bounds):
        end = bounds[k + 1][0] if k + 1 < len(bounds) else duration
        if end > at:
            segments.append(Segment(at, end, rate, rate))
    return RateProfile(tuple(segments))


def arrival_times(
    profile: RateProfile, process: ArrivalProcess, seed: int, max_requests: int | None = None
) -> np.ndarray:
    """Arrival times (s, sorted) in [0, profile.duration), at most `max_requests` of them.

    Poisson: the count over the whole run is Poisson(expected_count), gaps exponential.
    Constant: evenly spaced in cumulative rate, so the k-th arrival is at Λ⁻¹(k), k = 0, 1, …
    (a constant 4/s schedule sends at 0, 0.25, 0.5, …).
    """
    total = profile.expected_count()
    if process == "constant":
        epochs = np.arange(0.0, total, 1.0)
    else:
        rng = np.random.default_rng(seed)
        # draw gaps in chunks until past the end: enough for the mean plus 10 sigma
        n = int(total + 10.0 * math.sqrt(total) + 16)
        epochs = np.cumsum(rng.exponential(1.0, size=n))
        while epochs[-1] < total:
            more = np.cumsum(rng.exponential(1.0, size=n)) + epochs[-1]
            epochs = np.concatenate([epochs, more])
        epochs = epochs[epochs < total]
    if max_requests is not None:
        epochs = epochs[:max_requests]
    return profile.times_for(epochs)


# -- parsing of the schedule and mix options -------------------------------------------------
_BUDGET = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(ms|s)?\s*$", re.IGNORECASE)


def parse_budget_ms(text: str) -> float | None:
    """`250ms`, `1.5s`, a bare number of milliseconds, or `none` (no budget header)."""
    if text.strip().lower() == "none":
        return None
    m = _BUDGET.match(text)
    if not m:
        raise SpecError(f"budget {text!r}: write e.g. 250ms, 1.5s, 800 (ms) or none")
    value = float(m.group(1)) * (1000.0 if (m.group(2) or "ms").lower() == "s" else 1.0)
    if value <= 0:
        raise SpecError(f"budget {text!r} must be more than 0")
    return value


@dataclass(frozen=True)
class BudgetClass:
    """One entry of --budget-mix: a label as the user wrote it, its budget, its share."""

    label: str
    budget_ms: float | None
    weight: float


def parse_budget_mix(text: str) -> tuple[BudgetClass, ...]:
    """`"250ms:0.3,1s:0.4,none:0.3"` → classes; weights are relative (normalized to 1)."""
    classes: list[BudgetClass] = []
    for part in text.split(","):
        if not part.strip():
            continue
        label, sep, weight_text = part.strip().rpartition(":")
        if not sep or not label.strip():
            raise SpecError(
                f"budget mix entry {part.strip()!r}: write BUDGET:WEIGHT, e.g. 250ms:0.3"
            )
        try:
            weight = float(weight_text)
        except ValueError:
            raise SpecError(f"budget mix entry {part.strip()!r}: weight is not a number") from None
        if not (weight >= 0 and math.isfinite(weight)):
            raise SpecError(f"budget mix entry {part.strip()!r}: weight must be ≥ 0")
        label = label.strip().lower()
        if any(c.label == label for c in classes):
            raise SpecError(f"budget mix lists {label!r} twice")
        classes.append(BudgetClass(label, parse_budget_ms(label), weight))
    total = sum(c.weight for c in classes)
    if not classes or total <= 0:
        raise SpecError(f"budget mix {text!r}: give at least one BUDGET:WEIGHT with weight > 0")
    return tuple(BudgetClass(c.label, c.budget_ms, c.weight / total) for c in classes)


def parse_range(text: str, what: str) -> tuple[int, int]:
    """`16:128` (uniform, inclusive) or `32` (fixed) → (low, high), both ≥ 1."""
    lo_text, _, hi_text = text.partition(":")
    try:
        lo = int(lo_text)
        hi = int(hi_text) if hi_text else lo
    except ValueError:
        raise SpecError(f"{what} {text!r}: write MIN:MAX or N, e.g. 16:128") from None
    if lo < 1 or hi < lo:
        raise SpecError(f"{what} {text!r}: need 1 ≤ MIN ≤ MAX")
    return lo, hi


def parse_steps(text: str) -> tuple[tuple[float, float], ...]:
    """`"2@10,8@20"` → ((2, 10), (8, 20)): the rate becomes 2/s at 10 s, 8/s at 20 s."""
    steps: list[tuple[float, float]] = []
    for part in text.split(","):
        rate_text, sep, at_text = part.strip().partition("@")
        try:
            if not sep:
                raise ValueError
            rate, at = float(rate_text), float(at_text.removesuffix("s"))
        except ValueError:
            raise SpecError(
                f"step {part.strip()!r}: write RATE@SECONDS, e.g. --step 2@10,8@20"
            ) from None
        if not (rate >= 0 and at >= 0 and math.isfinite(rate) and math.isfinite(at)):
            raise SpecError(f"step {part.strip()!r}: rate and time must be ≥ 0")
        if steps and at <= steps[-1][1]:
            raise SpecError(f"step times must increase: {part.strip()!r} after {steps[-1][1]:g}s")
        steps.append((rate, at))
    return tuple(steps)


def parse_ramp(text: str) -> tuple[float, float]:
    """`"1:10"` → rate rises linearly from 1/s at t=0 to 10/s at the end of --duration."""
    start_text, sep, end_text = text.partition(":")
    try:
        if not sep:
            raise ValueError
        start, end = float(start_text), float(end_text)
    except ValueError:
        raise SpecError(f"ramp {text!r}: write START:END requests/s, e.g. --ramp 1:10") from None
    if not (start >= 0 and end >= 0 and math.isfinite(start) and math.isfinite(end)):
        raise SpecError(f"ramp {text!r}: rates must be ≥ 0")
    if start == end == 0:
        raise SpecError(f"ramp {text!r}: at least one end must be above 0")
    return start, end


# -- the plan --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Workload:
    """The request mix: drawn per request, independently of the arrival times."""

    budgets: tuple[BudgetClass, ...] = (BudgetClass("none", None, 1.0),)
    prompt_tokens: tuple[int, int] = (16, 128)
    max_tokens: tuple[int, int] = (16, 64)
    stream_fraction: float = 0.5
    chat_fraction: float = 0.3


@dataclass(frozen=True)
class PlannedRequest:
    """One request of the plan; `at` is its launch time in seconds from the start."""

    index: int
    at: float
    budget: BudgetClass
    prompt_tokens: int
    max_tokens: int
    stream: bool
    chat: bool
    measured: bool = True  # False: background load (--warmup, --steady), never recorded


def extend_profile(profile: RateProfile, seconds: float) -> RateProfile:
    """`profile` followed by `seconds` more at the rate it ends with (--steady's tail)."""
    rate, end = profile.segments[-1].rate_end, profile.duration
    return RateProfile((*profile.segments, Segment(end, end + seconds, rate, rate)))


def plan_requests(times: np.ndarray, workload: Workload, seed: int) -> list[PlannedRequest]:
    """Attach a drawn budget class, lengths and API shape to each arrival time."""
    # a generator of its own: the mix of request k does not depend on the arrival process
    rng = np.random.default_rng([seed, 1])
    n = len(times)
    weights = np.array([c.weight for c in workload.budgets])
    budget_idx = rng.choice(len(workload.budgets), size=n, p=weights / weights.sum())
    prompt = rng.integers(workload.prompt_tokens[0], workload.prompt_tokens[1] + 1, size=n)
    gen = rng.integers(workload.max_tokens[0], workload.max_tokens[1] + 1, size=n)
    stream = rng.random(n) < workload.stream_fraction
    chat = rng.random(n) < workload.chat_fraction
    return [
        PlannedRequest(
            index=k,
            at=float(times[k]),
            budget=workload.budgets[int(budget_idx[k])],
            prompt_tokens=int(prompt[k]),
            max_tokens=int(gen[k]),
            stream=bool(stream[k]),
            chat=bool(chat[k]),
        )
        for k in range(n)
    ]
