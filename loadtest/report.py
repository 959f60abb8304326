"""What a run means: a summary computed from the per-request records, written as JSON
(records + summary), a markdown table, and PNG plots (matplotlib, Agg backend).

Definitions the numbers use:
- latency: client-side, from sending the request to its last byte (a request held back by
  the concurrency limit is timed from when it was actually sent; the hold is `delay_ms`).
- percentiles: numpy's linear interpolation between closest ranks.
- a request *met* its budget when it succeeded and its latency ≤ its budget. Attainment is
  met / (met + missed) over succeeded requests with a budget; `attainment_incl_failed` also
  counts budgeted requests that failed (429, 503, timeouts, …) as misses.
- errors are counted by HTTP status (429 and 503 are the server shedding load) and, for
  requests without a response, by kind: timeout, connect, protocol, stream, cancelled.
  Dropped requests (concurrency limit, `--overflow drop`) were never sent and are not errors.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from loadtest.client import RequestRecord

NO_DEPTH = "n/a"  # group of requests whose server reported no depth (e.g. vLLM)


@dataclass(frozen=True)
class Stats:
    """Distribution of one quantity (ms); all None when there are no samples."""

    count: int
    mean: float | None = None
    p50: float | None = None
    p90: float | None = None
    p95: float | None = None
    p99: float | None = None
    max: float | None = None


def stats(values: Iterable[float]) -> Stats:
    a = np.asarray(list(values), dtype=np.float64)
    if a.size == 0:
        return Stats(0)
    p50, p90, p95, p99 = (float(x) for x in np.percentile(a, [50, 90, 95, 99]))
    return Stats(int(a.size), float(a.mean()), p50, p90, p95, p99, float(a.max()))


@dataclass(frozen=True)
class Attainment:
    met: int
    missed: int
    failed: int  # had a budget, got no successful response
    attainment: float | None  # met / (met + missed)
    attainment_incl_failed: float | None  # met / (met + missed + failed)


def attainment(records: Iterable[RequestRecord]) -> Attainment:
    met = missed = failed = 0
    for r in records:
        if r.budget_ms is None or r.sent_s is None:
            continue
        outcome = r.met_budget
        if outcome is None:
            failed += 1
        elif outcome:
            met += 1
        else:
            missed += 1
    done, tried = met + missed, met + missed + failed
    return Attainment(
        met, missed, failed, met / done if done else None, met / tried if tried else None
    )


@dataclass(frozen=True)
class Group:
    """Requests sharing a depth or a budget class."""

    key: str
    sent: int
    ok: int
    latency_ms: Stats
    ttft_ms: Stats
    itl_ms: Stats
    attainment: Attainment


def group(key: str, records: Sequence[RequestRecord]) -> Group:
    ok = [r for r in records if r.ok]
    return Group(
        key=key,
        sent=sum(r.sent_s is not None for r in records),
        ok=len(ok),
        latency_ms=stats(r.latency_ms for r in ok if r.latency_ms is not None),
        ttft_ms=stats(r.ttft_ms for r in ok if r.ttft_ms is not None),
        itl_ms=stats(g for r in ok for g in r.itl_ms),
        attainment=attainment(records),
    )


def depth_key(r: RequestRecord) -> str:
    return NO_DEPTH if r.depth is None else str(r.depth)


def _sorted_keys(keys: Iterable[str]) -> list[str]:
    return sorted(set(keys), key=lambda k: (not k.isdigit(), int(k) if k.isdigit() else 0, k))


@dataclass(frozen=True)
class Summary:
    scheduled: int
    sent: int
    ok: int
    errors: int  # sent, no successful response
    shed: int  # errors that are the server refusing load: 429 + 503
    dropped: int  # never sent: the concurrency limit was full (--overflow drop)
    delayed: int  # sent late: waited for a free slot under the concurrency limit
    errors_by_status: dict[str, int]  # HTTP status → count
    errors_by_kind: dict[str, int]  # no response: timeout, connect, protocol, stream, cancelled
    elapsed_s: float
    offered_rps: float  # scheduled requests / scheduled span
    throughput_rps: float  # successful requests / elapsed
    output_tokens_per_s: float
    latency_ms: Stats
    ttft_ms: Stats
    itl_ms: Stats
    delay_ms: Stats  # of the delayed requests only
    lag_ms: Stats  # sent later than scheduled for another reason: the generator fell behind
    attainment: Attainment
    prediction_error: float | None  # median |predicted - latency| / latency, when reported
    by_depth: list[Group]
    by_budget: list[Group]


def summarize(
    records: Sequence[RequestRecord], elapsed_s: float, duration_s: float | None = None
) -> Summary:
    """Summary of a run. `duration_s`: the scheduled span (default: the last arrival)."""
    sent = [r for r in records if r.sent_s is not None]
    ok = [r for r in sent if r.ok]
    failed = [r for r in sent if not r.ok]
    by_status = Counter(str(r.status) for r in failed if r.status is not None)
    by_kind = Counter(r.error or "unknown" for r in failed if r.status is None)
    span = duration_s if duration_s else max((r.scheduled_s for r in records), default=0.0)
    tokens = sum(r.completion_tokens or 0 for r in ok)
    rel = [
        abs(r.predicted_ms - r.latency_ms) / r.latency_ms
        for r in ok
        if r.predicted_ms is not None and r.latency_ms
    ]
    depths = _sorted_keys(depth_key(r) for r in sent)
    budgets = list(dict.fromkeys(r.budget for r in records))  # order of first appearance
    return Summary(
        scheduled=len(records),
        sent=len(sent),
        ok=len(ok),
        errors=len(failed),
        shed=by_status.get("429", 0) + by_status.get("503", 0),
        dropped=sum(r.error == "dropped" for r in records),
        delayed=sum(r.delay_ms > 0 for r in sent),
        errors_by_status=dict(sorted(by_status.items())),
        errors_by_kind=dict(sorted(by_kind.items())),
        elapsed_s=elapsed_s,
        offered_rps=len(records) / span if span > 0 else 0.0,
        throughput_rps=len(ok) / elapsed_s if elapsed_s > 0 else 0.0,
        output_tokens_per_s=tokens / elapsed_s if elapsed_s > 0 else 0.0,
        latency_ms=stats(r.latency_ms for r in ok if r.latency_ms is not None),
        ttft_ms=stats(r.ttft_ms for r in ok if r.ttft_ms is not None),
        itl_ms=stats(g for r in ok for g in r.itl_ms),
        delay_ms=stats(r.delay_ms for r in sent if r.delay_ms > 0),
        lag_ms=stats(max(r.lag_ms, 0.0) for r in sent if r.lag_ms is not None),
        attainment=attainment(records),
        prediction_error=float(np.median(rel)) if rel else None,
        by_depth=[group(d, [r for r in sent if depth_key(r) == d]) for d in depths],
        by_budget=[group(b, [r for r in records if r.budget == b]) for b in budgets],
    )


# -- files -----------------------------------------------------------------------------------
def load_records(path: Path) -> list[RequestRecord]:
    """The per-request records of a report.json (to re-plot or compare runs)."""
    data = json.loads(path.read_text())
    return [RequestRecord.from_json(r) for r in data["records"]]


# -- markdown --------------------------------------------------------------------------------
def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f}"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100.0 * x:.1f}%"


def _table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def _group_rows(groups: Sequence[Group]) -> list[list[str]]:
    return [
        [
            g.key,
            str(g.sent),
            str(g.ok),
            _ms(g.latency_ms.p50),
            _ms(g.latency_ms.p95),
            _ms(g.latency_ms.p99),
            _ms(g.ttft_ms.p50),
            _ms(g.itl_ms.p50),
            _pct(g.attainment.attainment),
            f"{g.attainment.met}/{g.attainment.met + g.attainment.missed}",
        ]
        for g in groups
    ]


GROUP_HEADER = [
    "sent",
    "ok",
    "p50 ms",
    "p95 ms",
    "p99 ms",
    "TTFT p50",
    "ITL p50",
    "attainment",
    "met/done",
]


def markdown(summary: Summary, config: dict[str, Any]) -> str:
    s = summary
    shown = ["url", "model", "schedule", "rate", "step", "ramp", "duration", "max_requests"]
    shown += ["concurrency", "budget_mix", "seed"]
    if config.get("schedule") == "ramp":
        shown.remove("rate")  # the ramp sets the rate
    setup = ", ".join(f"{k}={config[k]}" for k in shown if config.get(k) is not None)
    lines = ["# Load test", "", setup, ""]
    if config.get("interrupted"):
        lines += ["**Interrupted**: stopped early; later requests were never sent.", ""]
    lines += _table(
        ["requests", "value"],
        [
            ["scheduled / sent / ok", f"{s.scheduled} / {s.sent} / {s.ok}"],
            ["errors (shed: 429+503)", f"{s.errors} ({s.shed})"],
            ["dropped / delayed by the concurrency limit", f"{s.dropped} / {s.delayed}"],
            ["offered / achieved rate", f"{s.offered_rps:.2f} / {s.throughput_rps:.2f} req/s"],
            ["output tokens/s", f"{s.output_tokens_per_s:.1f}"],
            ["latency p50 / p95 / p99 ms", " / ".join(map(_ms, _lat(s.latency_ms)))],
            ["TTFT p50 / p95 / p99 ms", " / ".join(map(_ms, _lat(s.ttft_ms)))],
            ["ITL p50 / p95 / p99 ms", " / ".join(map(_ms, _lat(s.itl_ms)))],
            ["budget attainment (incl. failed)", _att(s.attainment)],
            ["prediction error (median rel.)", _pct(s.prediction_error)],
            [
                "launch lag p50 / p99 ms (load generator behind)",
                f"{_ms(s.lag_ms.p50)} / {_ms(s.lag_ms.p99)}",
            ],
            ["elapsed", f"{s.elapsed_s:.1f} s"],
        ],
    )
    if s.errors_by_status or s.errors_by_kind:
        counts = {**{f"HTTP {k}": v for k, v in s.errors_by_status.items()}, **s.errors_by_kind}
        lines += ["", "## Errors", ""]
        lines += _table(["error", "count"], [[k, str(v)] for k, v in counts.items()])
    lines += ["", "## By depth", ""]
    lines += _table(["depth", *GROUP_HEADER], _group_rows(s.by_depth))
    lines += ["", "## By budget class", ""]
    lines += _table(["budget", *GROUP_HEADER], _group_rows(s.by_budget))
    return "\n".join(lines) + "\n"


def _lat(x: Stats) -> tuple[float | None, ...]:
    return x.p50, x.p95, x.p99


def _att(a: Attainment) -> str:
    if a.attainment is None and a.attainment_incl_failed is None:
        return "- (no request had a budget)"
    return f"{_pct(a.attainment)} ({_pct(a.attainment_incl_failed)}), {a.met} met"
