"""Depth selection: which exit serves a request.

A request may pin a depth (`"model": "name@d"` or `x-soft-depth`), carry a latency budget
(`x-latency-budget: 250ms | 1.5s | 250`) or SLOs (`x-slo-ttft-ms`, `x-slo-tpot-ms`), or
neither (the headers are parsed in server/serving/headers.py). A `Policy` turns that into a
`DepthChoice`, predicting with a `Predictor` (server/policy/predictor.py) over the
`LatencyProfile`: soft.json's `latency_profile` when the checkpoint has one, else a few
seconds of measurement at start-up (server/profile.py).

Three thin policies over one `PolicyConfig`: `fixed` (the default depth), `budget` (the
deepest exit whose prediction fits), `load` (budget + the governor,
server/policy/governor.py); server/policy/deadline.py lowers running requests that fall
behind.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Protocol

from server.engine.types import EngineStats
from server.policy.governor import Governor, GovernorConfig
from server.policy.latency import LatencyProfile
from server.policy.predictor import Prediction, Predictor

log = logging.getLogger(__name__)


class PolicyError(ValueError):
    """A client's depth request that cannot be served; `param` names what to change."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


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
    # depth -> prompt tokens the prefix cache holds already (only the rest is prefilled)
    cached_tokens: Mapping[int, int] = field(default_factory=dict)

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
class Plan:
    """What the policy would give a request now, and each exit's prediction (read-only)."""

    depth: int  # the exit `choose` would pick
    feasible: bool  # False: a budget no exit meets (the shallowest would serve it)
    depth_cap: int  # the deepest depth unpinned requests get now (load: the governor's cap)
    predictions: Mapping[int, Prediction]  # per exit, joining the engine as it is now


@dataclass(frozen=True)
class PolicyConfig:
    """What every policy is configured with."""

    exits: tuple[int, ...]  # sorted
    default_depth: int  # for requests without a budget, SLOs or pin
    max_num_seqs: int = 32  # the engine's decode batch: the batch a request may join
    governor: GovernorConfig | None = None  # `load` only

    def __post_init__(self) -> None:
        if self.default_depth not in self.exits:
            raise ValueError(
                f"default depth {self.default_depth} is not an exit {list(self.exits)}"
            )


class Policy(Protocol):
    """Chooses the exit for a request (what the serving layer sees). Implementations:
    fixed, budget, load."""

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

    def plan(self, request: DepthRequest) -> Plan:
        """Args: as `choose`. Returns: the exit `choose` would pick now and every exit's
        prediction, without counting the request (read-only: GET /v1/soft/plan).
        Raises: PolicyError when the pin is not an exit."""
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
        config: PolicyConfig,
        profile: LatencyProfile,
        stats: Callable[[], EngineStats] | None = None,
    ) -> None:
        self.config, self.profile, self.stats = config, profile, stats
        self.exits, self.default_depth = config.exits, config.default_depth
        self.predictor = Predictor(profile, stats, config.max_num_seqs)
        self._start()

    def _start(self) -> None:
        """What a policy builds beyond the shared parts (load: its governor)."""

    def check_pin(self, depth: int) -> int:
        if depth not in self.exits:
            raise PolicyError(
                f"depth {depth} is not an exit of this model; choose one of "
                f"{', '.join(map(str, self.exits))}",
                "model",
            )
        return depth

    def choose(self, request: DepthRequest) -> DepthChoice:
        s = self.predictor.arrive(request.prompt_len, request.max_tokens)
        depth, p, feasible = self._pick(request, lambda d: self.predict(d, request, s))
        choice = self._choice(depth, request, feasible, s=s, p=p)
        return replace(choice, pinned=True) if request.pinned_depth is not None else choice

    def plan(self, request: DepthRequest) -> Plan:
        s = self.stats() if self.stats is not None else None  # no arrival, no step scale
        predictions = {d: self.predict(d, request, s) for d in self.exits}
        depth, _, feasible = self._pick(replace(request, strict=False), predictions.__getitem__)
        return Plan(depth, feasible, self.depth_cap(), predictions)

    def _pick(
        self, request: DepthRequest, predict: Callable[[int], Prediction]
    ) -> tuple[int, Prediction, bool]:
        """The depth for `request`, its prediction, and whether it meets the targets: the
        one place `choose` and `plan` decide."""
        if request.pinned_depth is not None:
            depth = self.check_pin(request.pinned_depth)
        else:
            depth = self._unbudgeted_depth()
        return depth, predict(depth), True

    def depth_cap(self) -> int:
        return self.default_depth

    def observe(self, choice: DepthChoice, actual_ms: float, queue_ms: float | None = None) -> None:
        """A request it chose the depth for (pins teach nothing) ran to max_tokens at that
        depth in `actual_ms`, `queue_ms` of it waiting: calibrate the predictor."""
        if not choice.pinned:
            self.predictor.observe(choice.predicted_ms, choice.queue_ms, actual_ms, queue_ms)

    def predict(self, depth: int, req: DepthRequest, s: EngineStats | None = None) -> Prediction:
        """The request's latency at `depth` if admitted now (alone when `s` is None)."""
        prefill = req.prompt_len - req.cached_tokens.get(depth, 0)
        return self.predictor.predict(depth, prefill, req.max_tokens, s)

    def _choice(
        self,
        depth: int,
        req: DepthRequest,
        feasible: bool = True,
        s: EngineStats | None = None,
        p: Prediction | None = None,
    ) -> DepthChoice:
        p = p or self.predict(depth, req, s)
        self.predictor.chose(depth)
        if s is not None and log.isEnabledFor(logging.DEBUG):
            log.debug(
                "depth %d: queue %.0f ms (%d waiting, %d running, drain %.2f/s), ttft %.0f ms, "
                "step %.1f ms (scale %.2f calibration %.2f; engine step %.1f "
                "interval %.1f), total %.0f ms",
                depth, p.queue_ms, s.waiting, s.running, s.admit_per_second, p.ttft_ms,
                p.tpot_ms, self.predictor._scale, self.predictor.calibration,
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

    def _pick(
        self, request: DepthRequest, predict: Callable[[int], Prediction]
    ) -> tuple[int, Prediction, bool]:
        if request.pinned_depth is not None or not request.has_target:
            return super()._pick(request, predict)
        for d in sorted(self._budget_exits(), reverse=True):  # ends with the shallowest
            best = predict(d)
            if fits(best, request):
                return d, best, True
        if request.strict:
            raise PolicyError(
                "no exit meets this request's latency targets right now (the shallowest, "
                f"depth {self.exits[0]}, is predicted at "
                f"{best.total_ms:.0f} ms, first token {best.ttft_ms:.0f} ms, "
                f"{best.tpot_ms:.1f} ms/token): raise the budget, lower max_tokens, or "
                "drop 'x-latency-budget-mode: strict' to be served at the shallowest exit",
                "x-latency-budget",
            )
        return self.exits[0], best, False


class LoadPolicy(BudgetPolicy):
    """`budget`, plus a governor that caps the depth of requests without a budget as the
    queue and step time grow, and restores it when load falls (server/policy/governor.py)."""

    name = "load"

    def _start(self) -> None:
        self.governor = Governor(
            self.exits,
            self.default_depth,
            self.profile,
            self.config.governor or GovernorConfig(),
            utilization=self.predictor.utilization,
        )

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
    config = PolicyConfig(tuple(sorted(exits)), default_depth, max_num_seqs, governor)
    return POLICIES[name](config, profile, stats)
