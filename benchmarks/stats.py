"""What the benchmarks report of a run's requests: order statistics (nearest rank, no
interpolation) and failures by kind."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

from loadtest.client import RequestRecord


def pct(xs: list[float], q: float) -> float | None:
    """The `q`-quantile of `xs` (0 <= q <= 1) by nearest rank; None when `xs` is empty."""
    if not xs:
        return None
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))]


def failures(records: Iterable[RequestRecord]) -> dict[str, int]:
    """Failed requests by kind: the client's error ("timeout", "stream", ...) or the status."""
    return dict(Counter(r.error or f"http {r.status}" for r in records if not r.ok))
