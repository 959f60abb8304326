"""Prometheus metrics (names fixed in ARCHITECTURE.md), a consumer of plain dataclasses:
`RequestRecord` from the serving layer when a sequence ends, `EngineStats` at scrape time.
Everything lives in its own `CollectorRegistry`, so several apps (tests) never collide."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from server.engine.types import EngineStats

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# a small model on a CPU is fast: start at 1 ms
LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
)
# soft_requests_rejected_total{reason}: the HTTP status of a refused request -> its reason
REJECT_REASONS = {
    400: "bad_request",
    401: "unauthorized",
    404: "not_found",
    413: "too_large",
    429: "queue_full",
    503: "unavailable",
}
TOKEN_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.5, 5.0)


@dataclass(frozen=True)
class RequestRecord:
    """Timings of one finished sequence, measured by the serving layer (seconds)."""

    depth: int
    finish_reason: str  # stop | length | abort | error
    prompt_tokens: int
    generated_tokens: int
    latency: float  # arrival -> last event
    ttft: float | None  # arrival -> first token
    inter_token: Sequence[float] = field(default_factory=tuple)
    queue: float | None = None  # from the first TokenEvent


class Metrics:
    """The server's metrics: per-request series (`observe`, `observe_budget`, `reject`) and
    the engine's state at scrape time (`update`)."""

    def __init__(self, exits: Iterable[int] = ()) -> None:
        exits = tuple(exits)
        self.registry = CollectorRegistry()
        self._request_series()
        self._outcome_series()
        self._engine_series()
        self._speculation_series()
        self._prefix_series()
        # the engine counts since start: (series, label value) -> what was counted so far
        self._seen: dict[tuple[int, str], int] = {}
        for d in exits:  # every exit's series exists from the start (dashboards, rate())
            for h in (self.latency, self.ttft, self.itl):
                h.labels(depth=str(d))
            self.generated.labels(depth=str(d))
            self.prefix_queries.labels(depth=str(d))
            self.prefix_hits.labels(depth=str(d))
        for outcome in ("met", "missed", "infeasible"):
            self.budget.labels(outcome=outcome)
            for d in exits:
                self.budget_by_depth.labels(depth=str(d), outcome=outcome)
        for reason in REJECT_REASONS.values():
            self.rejected.labels(reason=reason)

    def _request_series(self) -> None:
        """Timings and token counts of finished sequences (RequestRecord)."""
        r = self.registry
        self.latency = Histogram(
            "soft_request_latency_seconds",
            "End-to-end request latency (arrival to last token), by the depth that served it",
            ["depth"],
            registry=r,
            buckets=LATENCY_BUCKETS,
        )
        self.ttft = Histogram(
            "soft_time_to_first_token_seconds",
            "Arrival to first generated token",
            ["depth"],
            registry=r,
            buckets=LATENCY_BUCKETS,
        )
        self.itl = Histogram(
            "soft_inter_token_latency_seconds",
            "Time between consecutive generated tokens",
            ["depth"],
            registry=r,
            buckets=TOKEN_BUCKETS,
        )
        self.queue = Histogram(
            "soft_request_queue_seconds",
            "Time from submission to first being scheduled",
            registry=r,
            buckets=LATENCY_BUCKETS,
        )
        self.requests = Counter(
            "soft_requests",
            "Finished sequences by depth and finish reason",
            ["depth", "finish_reason"],
            registry=r,
        )
        self.generated = Counter(
            "soft_generated_tokens", "Generated tokens by depth", ["depth"], registry=r
        )
        self.prompt = Counter("soft_prompt_tokens", "Prompt tokens processed", registry=r)

    def _outcome_series(self) -> None:
        """How requests ended before or beside generation: budgets met, refusals."""
        r = self.registry
        self.budget = Counter(
            "soft_latency_budget",
            "Requests with x-latency-budget by outcome (met | missed | infeasible)",
            ["outcome"],
            registry=r,
        )
        self.budget_by_depth = Counter(
            "soft_latency_budget_depth",
            "Requests with a latency budget or SLO headers by the depth that served them and "
            "outcome (met | missed | infeasible)",
            ["depth", "outcome"],
            registry=r,
        )
        self.rejected = Counter(
            "soft_requests_rejected",
            "Requests answered with an error before any generation, by reason: queue_full "
            "(429), too_large (413), unauthorized (401), bad_request (400), not_found (404), "
            "unavailable (503: loading or draining)",
            ["reason"],
            registry=r,
        )

    def _engine_series(self) -> None:
        """The engine's and the policy's state, set at scrape time (EngineStats)."""
        r = self.registry
        self.running = Gauge("soft_num_requests_running", "Sequences running", registry=r)
        self.waiting = Gauge("soft_num_requests_waiting", "Sequences waiting", registry=r)
        self.kv_usage = Gauge(
            "soft_kv_cache_usage_ratio", "Fraction of KV-cache blocks in use", registry=r
        )
        self.kv_bytes = Gauge(
            "soft_kv_cache_bytes",
            "KV-cache bytes held, per decoder layer (exit layers: exit<e>)",
            ["layer"],
            registry=r,
        )
        self.depth_cap = Gauge(
            "soft_depth_cap", "Deepest depth the policy serves unpinned requests at", registry=r
        )
        self.batch_size = Gauge("soft_batch_size", "Sequences in the last decode step", registry=r)

    def _speculation_series(self) -> None:
        """Self-speculative decoding, by draft exit (EngineStats.speculation)."""
        r = self.registry
        self.spec_acceptance = Gauge(
            "soft_spec_acceptance_ratio",
            "Self-speculative decoding: share of draft tokens accepted, by draft exit",
            ["exit"],
            registry=r,
        )
        self.spec_tokens_per_verify = Gauge(
            "soft_spec_tokens_per_verify",
            "Self-speculative decoding: tokens emitted per verify step, by draft exit",
            ["exit"],
            registry=r,
        )
        self.spec_drafted = Counter(
            "soft_spec_draft_tokens",
            "Self-speculative decoding: draft tokens proposed, by draft exit",
            ["exit"],
            registry=r,
        )

    def _prefix_series(self) -> None:
        """The prefix cache (EngineStats.prefix_*): prompt tokens looked up and found, by
        the depth of the request that looked (hits / queries = the hit rate)."""
        r = self.registry
        self.prefix_queries = Counter(
            "soft_prefix_cache_queries",
            "Prompt tokens admissions looked up in the prefix cache, by depth",
            ["depth"],
            registry=r,
        )
        self.prefix_hits = Counter(
            "soft_prefix_cache_hits",
            "Prompt tokens admissions found in the prefix cache (not computed), by depth",
            ["depth"],
            registry=r,
        )
        self.prefix_blocks = Gauge(
            "soft_prefix_cache_blocks",
            "KV blocks the prefix cache holds (in use or idle, all layers)",
            registry=r,
        )

    def _count_to(self, counter: Counter, label: str, value: str, total: int) -> None:
        """Advance `counter{label=value}` to the engine's since-start `total`."""
        key = (id(counter), value)
        counter.labels(**{label: value}).inc(max(0, total - self._seen.get(key, 0)))
        self._seen[key] = total

    def reject(self, status: int) -> None:
        """A request refused with `status` (counted when it has a reason)."""
        reason = REJECT_REASONS.get(status)
        if reason is not None:
            self.rejected.labels(reason=reason).inc()

    def carry_rejections(self, earlier: Metrics) -> None:
        """Add the rejections `earlier` counted (the app's, while the model loaded)."""
        for family in earlier.rejected.collect():
            for sample in family.samples:
                if sample.name.endswith("_total") and sample.value:
                    self.rejected.labels(**sample.labels).inc(sample.value)

    def observe_budget(self, depth: int, outcome: str) -> None:
        """One request with a budget (or SLOs) ended: met | missed | infeasible."""
        self.budget.labels(outcome=outcome).inc()
        self.budget_by_depth.labels(depth=str(depth), outcome=outcome).inc()

    def observe(self, rec: RequestRecord) -> None:
        d = str(rec.depth)
        self.requests.labels(depth=d, finish_reason=rec.finish_reason).inc()
        self.prompt.inc(rec.prompt_tokens)
        self.generated.labels(depth=d).inc(rec.generated_tokens)
        self.latency.labels(depth=d).observe(rec.latency)
        if rec.ttft is not None:
            self.ttft.labels(depth=d).observe(rec.ttft)
        itl = self.itl.labels(depth=d)
        for dt in rec.inter_token:
            itl.observe(dt)
        if rec.queue is not None:
            self.queue.observe(rec.queue)

    def update(self, stats: EngineStats, depth_cap: int) -> None:
        self.running.set(stats.running)
        self.waiting.set(stats.waiting)
        self.kv_usage.set(stats.kv_usage_ratio)
        self.batch_size.set(stats.batch_size)
        for e, c in stats.speculation.items():
            self.spec_acceptance.labels(exit=str(e)).set(c.accepted / max(1, c.drafted))
            self.spec_tokens_per_verify.labels(exit=str(e)).set(c.emitted / max(1, c.cycles))
            self._count_to(self.spec_drafted, "exit", str(e), c.drafted)
        for d, n in stats.prefix_queries.items():
            self._count_to(self.prefix_queries, "depth", str(d), n)
        for d, n in stats.prefix_hits.items():
            self._count_to(self.prefix_hits, "depth", str(d), n)
        self.prefix_blocks.set(stats.prefix_cached_blocks)
        self.depth_cap.set(depth_cap)
        for layer, b in enumerate(stats.kv_bytes_per_layer):
            self.kv_bytes.labels(layer=str(layer)).set(b)
        for exit_, b in stats.kv_bytes_per_exit_layer.items():  # balcony: layer="exit15"
            self.kv_bytes.labels(layer=f"exit{exit_}").set(b)

    def render(self) -> bytes:
        return generate_latest(self.registry)
