"""A run's files: report.json (config, summary, every record), summary.md and the PNG
plots. The one module that uses both the summary (report.py) and the plots (plots.py)."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from loadtest.client import RequestRecord
from loadtest.plots import write_plots
from loadtest.report import Summary, markdown


@dataclass(frozen=True)
class ReportFiles:
    json: Path
    markdown: Path
    plots: tuple[Path, ...]


def write_report(
    out_dir: Path,
    records: Sequence[RequestRecord],
    summary: Summary,
    config: dict[str, Any],
    offered: Callable[[float], float] | None = None,
) -> ReportFiles:
    """Write report.json, summary.md and the PNG plots into `out_dir` (created)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / "report.json"
    body = {
        "config": config,
        "summary": asdict(summary),
        "records": [r.to_json() for r in records],
    }
    json_path.write_text(json.dumps(body, indent=1, default=str) + "\n")
    md_path = out_dir / "summary.md"
    md_path.write_text(markdown(summary, config))
    plots = write_plots(out_dir, records, summary, offered)
    return ReportFiles(json_path, md_path, plots)
