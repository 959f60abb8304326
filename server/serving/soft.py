"""GET /v1/soft/plan and GET /v1/soft/stats: read-only views of the depth choice, for the
playground page (server/http/playground.py) and anyone watching a load test.

`plan` asks the policy what it would do with a request of the given sizes and budget right
now (every exit's prediction under the current load, the exit it would pick) without
counting it as an arrival. `stats` is the live picture per depth: the engine's snapshot,
the policy's depth cap, and the per-depth totals of the Prometheus metrics (cumulative
since start, like the counters: two polls' difference is a rate or a recent mean).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

from prometheus_client.metrics import MetricWrapperBase
from pydantic import BaseModel

from server.policy.policies import DepthRequest, PolicyError
from server.serving.errors import bad_request
from server.serving.generation import ServingContext
from server.serving.headers import parse_budget


class ExitPlan(BaseModel):
    """One exit's prediction for the planned request, joining the engine as it is now."""

    depth: int
    predicted_ms: float  # end to end: queue + prefill + max_tokens decode steps
    ttft_ms: float  # queue + prefill
    tpot_ms: float  # one decode step of the batch it would join
    queue_ms: float
    fits: bool | None  # within the budget; None without one


class PlanResponse(BaseModel):
    object: Literal["soft.plan"] = "soft.plan"
    model: str
    policy: str
    prompt_tokens: int
    max_tokens: int
    budget_ms: float | None
    depth: int  # the exit the policy would pick now
    feasible: bool  # False: no exit fits the budget (the shallowest would serve it)
    depth_cap: int
    default_depth: int
    exits: list[ExitPlan]


class DepthTotals(BaseModel):
    """One exit's requests since start (from the metrics) and its sequences running now."""

    depth: int
    requests: int  # finished sequences served (last) at this depth
    latency_seconds_sum: float  # their end-to-end latencies, summed
    ttft_count: int
    ttft_seconds_sum: float
    generated_tokens: int
    running: int


class StatsResponse(BaseModel):
    object: Literal["soft.stats"] = "soft.stats"
    model: str
    policy: str
    default_depth: int
    depth_cap: int  # the governor's cap under --policy load; else the default depth
    running: int
    waiting: int
    batch_size: int
    kv_cache_usage_ratio: float
    decode_step_ms: float
    token_interval_ms: float
    depths: list[DepthTotals]


class SoftServing:
    """The plan and the stats over the shared serving context."""

    def __init__(self, ctx: ServingContext) -> None:
        self.ctx = ctx

    def plan(self, max_tokens: int, prompt_tokens: int, budget: str | None) -> PlanResponse:
        """Raises APIError: 400 for a malformed budget or sizes past the context window."""
        ctx = self.ctx
        ctx.check_length(prompt_tokens, max_tokens, "prompt_tokens")
        budget_ms = None if budget is None else parse_budget(budget, "budget")
        request = DepthRequest(prompt_tokens, max_tokens, budget_ms)
        try:
            plan = ctx.policy.plan(request)
        except PolicyError as e:  # only a pin can fail; none is sent, but keep it a 400
            raise bad_request(str(e), e.param) from e
        exits = [
            ExitPlan(
                depth=d,
                predicted_ms=p.total_ms,
                ttft_ms=p.ttft_ms,
                tpot_ms=p.tpot_ms,
                queue_ms=p.queue_ms,
                fits=None if budget_ms is None else p.total_ms <= budget_ms,
            )
            for d, p in sorted(plan.predictions.items())
        ]
        return PlanResponse(
            model=ctx.model_name,
            policy=ctx.policy.name,
            prompt_tokens=prompt_tokens,
            max_tokens=max_tokens,
            budget_ms=budget_ms,
            depth=plan.depth,
            feasible=plan.feasible,
            depth_cap=plan.depth_cap,
            default_depth=ctx.policy.default_depth,
            exits=exits,
        )

    def stats(self) -> StatsResponse:
        ctx, m = self.ctx, self.ctx.metrics
        s = ctx.engine.stats()
        table = samples([m.latency, m.ttft, m.generated])

        def value(name: str, depth: int) -> float:
            return table.get((name, str(depth)), 0.0)

        depths = [
            DepthTotals(
                depth=d,
                requests=int(value("soft_request_latency_seconds_count", d)),
                latency_seconds_sum=value("soft_request_latency_seconds_sum", d),
                ttft_count=int(value("soft_time_to_first_token_seconds_count", d)),
                ttft_seconds_sum=value("soft_time_to_first_token_seconds_sum", d),
                generated_tokens=int(value("soft_generated_tokens_total", d)),
                running=s.depths_running.get(d, 0),
            )
            for d in ctx.policy.exits
        ]
        return StatsResponse(
            model=ctx.model_name,
            policy=ctx.policy.name,
            default_depth=ctx.policy.default_depth,
            depth_cap=ctx.policy.depth_cap(),
            running=s.running,
            waiting=s.waiting,
            batch_size=s.batch_size,
            kv_cache_usage_ratio=s.kv_usage_ratio,
            decode_step_ms=s.decode_step_seconds * 1000.0,
            token_interval_ms=s.token_interval_seconds * 1000.0,
            depths=depths,
        )


def samples(metrics: Iterable[MetricWrapperBase]) -> dict[tuple[str, str], float]:
    """(sample name, depth label) -> value, over the metrics' current samples."""
    out: dict[tuple[str, str], float] = {}
    for metric in metrics:
        for family in metric.collect():
            for sample in family.samples:
                if "depth" in sample.labels:
                    out[(sample.name, sample.labels["depth"])] = sample.value
    return out
