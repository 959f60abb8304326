"""PNG plots of a run (matplotlib, Agg backend: no display needed).

- latency_by_depth.png: p50/p90/p99 latency per depth served.
- attainment.png: budget attainment per budget class and per depth.
- depth_over_time.png: the depth each request got over time, with the offered load.
- throughput.png: completed requests/s, errors/s and output tokens/s over time.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from loadtest.client import RequestRecord
from loadtest.report import Group, Summary


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_plots(
    out_dir: Path,
    records: Sequence[RequestRecord],
    summary: Summary,
    offered: Callable[[float], float] | None = None,
) -> tuple[Path, ...]:
    """Write the four plots; `offered(t)` is the scheduled rate (req/s) at time t."""
    plt = _pyplot()
    paths = (
        _latency_by_depth(plt, out_dir / "latency_by_depth.png", summary),
        _attainment(plt, out_dir / "attainment.png", summary),
        _depth_over_time(plt, out_dir / "depth_over_time.png", records, offered),
        _throughput(plt, out_dir / "throughput.png", records),
    )
    return paths


def _save(plt: Any, fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _no_data(ax: Any, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes)


def _latency_by_depth(plt: Any, path: Path, summary: Summary) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4))
    groups = [g for g in summary.by_depth if g.latency_ms.count]
    x = np.arange(len(groups))
    for k, (name, width) in enumerate((("p50", -0.27), ("p90", 0.0), ("p99", 0.27))):
        values = [getattr(g.latency_ms, name) for g in groups]
        ax.bar(x + width, values, width=0.27, label=name, color=f"C{k}")
    ax.set_xticks(x, [f"{g.key}\n(n={g.ok})" for g in groups])
    ax.set_xlabel("depth (layers)")
    ax.set_ylabel("end-to-end latency (ms)")
    ax.set_title("Latency percentiles per depth")
    if groups:
        ax.legend()
    else:
        _no_data(ax, "no successful requests")
    return _save(plt, fig, path)


def _attainment_bars(ax: Any, groups: Sequence[Group], xlabel: str) -> None:
    shown = [g for g in groups if g.attainment.attainment is not None]
    x = np.arange(len(shown))
    values = [100.0 * (g.attainment.attainment or 0.0) for g in shown]
    ax.bar(x, values, color="C2")
    for xi, g, v in zip(x, shown, values, strict=True):
        n = g.attainment.met + g.attainment.missed
        ax.text(xi, v + 1, f"{v:.0f}%\nn={n}", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(x, [g.key for g in shown])
    ax.set_ylim(0, 118)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("met budget (%)")
    if not shown:
        _no_data(ax, "no completed request had a budget")


def _attainment(plt: Any, path: Path, summary: Summary) -> Path:
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    _attainment_bars(left, summary.by_budget, "budget class")
    left.set_title("Budget attainment per budget class")
    _attainment_bars(right, summary.by_depth, "depth (layers)")
    right.set_title("Budget attainment per depth")
    return _save(plt, fig, path)


def _bins(end: float, width: float = 1.0) -> np.ndarray:
    return np.arange(0.0, max(end, width) + width, width)


def _depth_over_time(
    plt: Any,
    path: Path,
    records: Sequence[RequestRecord],
    offered: Callable[[float], float] | None,
) -> Path:
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(9, 4))
    served = [r for r in records if r.ok and r.depth is not None and r.sent_s is not None]
    labels = list(dict.fromkeys(r.budget for r in records))
    for k, label in enumerate(labels):
        pts = [r for r in served if r.budget == label]
        if pts:
            ax.scatter(
                [r.sent_s for r in pts],
                [r.depth for r in pts],
                s=12,
                alpha=0.6,
                color=f"C{k}",
                label=f"budget {label}",
            )
    ax.set_xlabel("time since start (s)")
    ax.set_ylabel("depth served (layers)")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title("Depth chosen over time against offered load")
    if not served:
        _no_data(ax, "the server reported no depth (x-soft-depth)")
    load = ax.twinx()
    end = max((r.scheduled_s for r in records), default=0.0)
    bins = _bins(end)
    counts, _ = np.histogram([r.scheduled_s for r in records], bins=bins)
    load.stairs(counts, bins, color="0.4", lw=1, label="scheduled (req/s)")
    if offered is not None:
        t = np.linspace(0.0, bins[-1], 400, endpoint=False)
        load.plot(t, [offered(x) for x in t], color="k", lw=1.5, ls="--", label="offered rate")
    load.set_ylabel("offered load (req/s)")
    load.set_ylim(bottom=0)
    handles = ax.get_legend_handles_labels()
    more = load.get_legend_handles_labels()
    if handles[0] or more[0]:
        ax.legend(handles[0] + more[0], handles[1] + more[1], loc="upper left", fontsize=8)
    return _save(plt, fig, path)


def _throughput(plt: Any, path: Path, records: Sequence[RequestRecord]) -> Path:
    fig, ax = plt.subplots(figsize=(9, 4))
    done = [(r.done_s, r) for r in records if r.done_s is not None]
    end = max((t for t, _ in done), default=0.0)
    bins = _bins(end)
    ok, _ = np.histogram([t for t, r in done if r.ok], bins=bins)
    bad, _ = np.histogram([t for t, r in done if not r.ok], bins=bins)
    ax.stairs(ok, bins, color="C0", label="completed (req/s)")
    ax.stairs(bad, bins, color="C3", label="errors (req/s)")
    ax.set_xlabel("time since start (s)")
    ax.set_ylabel("requests/s")
    ax.set_ylim(bottom=0)
    ax.set_title("Throughput over time")
    tokens = ax.twinx()
    weights = [float(r.completion_tokens or 0) for _, r in done if r.ok]
    tok, _ = np.histogram([t for t, r in done if r.ok], bins=bins, weights=weights)
    tokens.plot(bins[:-1] + 0.5, tok, color="C2", marker=".", label="output tokens/s")
    tokens.set_ylabel("output tokens/s")
    tokens.set_ylim(bottom=0)
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = tokens.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, loc="upper left", fontsize=8)
    return _save(plt, fig, path)
