"""Depth selection: which exit serves a request.

A request may pin a depth (`"model": "name@d"` or `x-soft-depth`), carry a latency budget
(`x-latency-budget: 250ms | 1.5s | 250`), or neither. A `Policy` turns that into a
`DepthChoice`; the latency it predicts comes from a `LatencyProfile`: soft.json's
`latency_profile` when the checkpoint has one, else a few seconds of measurement at start-up.

Profile format (what `latency_profile` in soft.json holds; depths as strings, ms):
```json
{"prefill_ms_per_token": {"2": 0.05, "4": 0.09},
 "decode_ms_per_step":   {"2": 1.1,  "4": 1.9},
 "prefill_ms_base":      {"2": 0.4,  "4": 0.7}}      (optional)
```
Depths it does not list are interpolated linearly in depth (cost is per layer + head).
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from server.types import GenerationRequest, SamplingParams

log = logging.getLogger(__name__)

_BUDGET = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(ms|s)?\s*$", re.IGNORECASE)


class PolicyError(ValueError):
    """A client's depth request that cannot be served; `param` names what to change."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


def parse_budget(value: str) -> float:
    """`250ms`, `1.5s` or a bare number of milliseconds -> milliseconds (> 0).

    Raises:
        PolicyError: malformed, zero, or not finite.
    """
    m = _BUDGET.match(value)
    ms = float(m.group(1)) * (1000.0 if (m.group(2) or "ms").lower() == "s" else 1.0) if m else 0
    if not m or not math.isfinite(ms) or ms <= 0:
        raise PolicyError(
            f"x-latency-budget {value!r} is not a latency: use e.g. '250ms', '1.5s' or '250'",
            "x-latency-budget",
        )
    return ms


@dataclass(frozen=True)
class LatencyProfile:
    """Predicted milliseconds per exit: prefill = base + per_token * prompt_len; each
    decode step = step_ms (batch-independent here; the load policy refines it)."""

    prefill_ms_base: Mapping[int, float]
    prefill_ms_per_token: Mapping[int, float]
    decode_ms_per_step: Mapping[int, float]
    source: str  # "soft.json" | "measured" | "given"

    def prefill_ms(self, depth: int, prompt_len: int) -> float:
        return self.prefill_ms_base[depth] + self.prefill_ms_per_token[depth] * prompt_len

    def step_ms(self, depth: int) -> float:
        return self.decode_ms_per_step[depth]

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
    ) -> LatencyProfile:
        """Fill every exit from measurements at some depths (linear in depth, never
        decreasing with depth, never negative)."""
        return cls(
            prefill_ms_base=_fill(exits, base),
            prefill_ms_per_token=_fill(exits, per_token),
            decode_ms_per_step=_fill(exits, step),
            source=source,
        )

    @classmethod
    def from_json(cls, data: Mapping[str, Any], exits: Sequence[int]) -> LatencyProfile:
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
        return cls.from_points(exits, base, per_token, step, "soft.json")

    def to_json(self) -> dict[str, dict[str, float]]:
        def f(t: Mapping[int, float]) -> dict[str, float]:
            return {str(d): round(v, 4) for d, v in sorted(t.items())}

        return {
            "prefill_ms_base": f(self.prefill_ms_base),
            "prefill_ms_per_token": f(self.prefill_ms_per_token),
            "decode_ms_per_step": f(self.decode_ms_per_step),
        }


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


@dataclass(frozen=True)
class DepthRequest:
    """What the policy sees of one request."""

    prompt_len: int
    max_tokens: int
    budget_ms: float | None = None
    pinned_depth: int | None = None


@dataclass(frozen=True)
class DepthChoice:
    depth: int
    predicted_ms: float
    budget_ms: float | None
    feasible: bool  # False: a budget no exit meets (served at the shallowest anyway)


class Policy(Protocol):
    """Chooses the exit for a request. Implementations: fixed, budget (load: later)."""

    name: str
    exits: tuple[int, ...]
    default_depth: int

    def choose(self, request: DepthRequest) -> DepthChoice:
        """Args: the request's sizes, budget and pin. Returns: the depth and prediction.
        Raises: PolicyError when the pin is not an exit."""
        ...

    def depth_cap(self) -> int:
        """The deepest depth the policy currently serves unpinned requests at."""
        ...


class FixedPolicy:
    """Always the default depth (a pin still wins); budgets are reported, not used."""

    name = "fixed"

    def __init__(self, exits: Sequence[int], default_depth: int, profile: LatencyProfile):
        if default_depth not in exits:
            raise ValueError(f"default depth {default_depth} is not an exit {list(exits)}")
        self.exits = tuple(sorted(exits))
        self.default_depth = default_depth
        self.profile = profile

    def check_pin(self, depth: int) -> int:
        if depth not in self.exits:
            raise PolicyError(
                f"depth {depth} is not an exit of this model; choose one of "
                f"{', '.join(map(str, self.exits))}",
                "model",
            )
        return depth

    def _choice(self, depth: int, req: DepthRequest, feasible: bool = True) -> DepthChoice:
        predicted = self.profile.predict_ms(depth, req.prompt_len, req.max_tokens)
        return DepthChoice(depth, predicted, req.budget_ms, feasible)

    def choose(self, request: DepthRequest) -> DepthChoice:
        if request.pinned_depth is not None:
            return self._choice(self.check_pin(request.pinned_depth), request)
        return self._choice(self.default_depth, request)

    def depth_cap(self) -> int:
        return self.default_depth


class BudgetPolicy(FixedPolicy):
    """The deepest exit whose predicted latency fits the budget, else the shallowest;
    without a budget, the default depth."""

    name = "budget"

    def choose(self, request: DepthRequest) -> DepthChoice:
        if request.pinned_depth is not None or request.budget_ms is None:
            return super().choose(request)
        budget = request.budget_ms
        for d in sorted(self.exits, reverse=True):
            if self.profile.predict_ms(d, request.prompt_len, request.max_tokens) <= budget:
                return self._choice(d, request)
        return self._choice(self.exits[0], request, feasible=False)


POLICIES: dict[str, type[FixedPolicy]] = {
    "fixed": FixedPolicy,
    "budget": BudgetPolicy,
    "load": BudgetPolicy,  # until the load governor lands
}


def make_policy(
    name: str, exits: Sequence[int], default_depth: int, profile: LatencyProfile
) -> Policy:
    if name not in POLICIES:
        raise ValueError(f"unknown policy {name!r}; choose one of {', '.join(POLICIES)}")
    return POLICIES[name](exits, default_depth, profile)
