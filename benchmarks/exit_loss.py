"""The exit layers' loss, sampled vs full vocabulary, at equal CPU time and at equal steps.

Two `soft-train --method balcony` runs from the same initialisation, data, seed and
schedule, one with `--head sampled` (the default) and one with `--head full`, each with
`--eval-data` (so each writes OUT/curve.json: held-out CE per exit against CPU-hours).
This reads both curves and writes a table (markdown + JSON) and a plot:

    python -m benchmarks.exit_loss --sampled runs/exits/curve.json \
        --full runs/exits-full/curve.json --until 1.1 --out docs/quality/exit-loss

`--until` cuts both curves at that many CPU-hours (the full run is ~7x slower per token,
so it is stopped early).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def load(path: Path, until: float) -> list[dict[str, Any]]:
    points = json.loads(Path(path).read_text())
    return [p for p in points if p["cpu_hours"] <= until]


def table(sampled: list[dict[str, Any]], full: list[dict[str, Any]]) -> str:
    exits = sorted({e for p in sampled + full for e in p["ce"]}, key=int)
    head = "| run | CPU-hours | step | tokens | " + " | ".join(f"CE @{e}" for e in exits) + " |"
    rows = [head, "|---|---:|---:|---:|" + "---:|" * len(exits)]
    for name, points in (("sampled", sampled), ("full", full)):
        for p in points:
            ce = " | ".join(f"{p['ce'][e]:.3f}" for e in exits)
            rows.append(f"| {name} | {p['cpu_hours']:.3f} | {p['step']} | "
                        f"{p['train_tokens']:,} | {ce} |")  # fmt: skip
    return "\n".join(rows)


def plot(sampled: list[dict[str, Any]], full: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    exits = sorted({e for p in sampled for e in p["ce"]}, key=int)
    for i, e in enumerate(exits):
        color = f"C{i}"
        for points, style, name in ((sampled, "-", "sampled"), (full, "--", "full")):
            xs = [p["cpu_hours"] for p in points]
            ys = [p["ce"][e] for p in points]
            ax.plot(xs, ys, style, marker="o", ms=3, color=color, label=f"exit {e}, {name}")
    ax.set_xlabel("CPU-hours (teacher cache + training)")
    ax.set_ylabel("held-out response CE (nats/token)")
    ax.set_title("Exit-layer KL: sampled vs full vocabulary")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("--sampled", type=Path, required=True, help="the sampled run's curve.json")
    ap.add_argument("--full", type=Path, required=True, help="the full run's curve.json")
    ap.add_argument("--until", type=float, default=float("inf"), help="CPU-hours to cut at")
    ap.add_argument("--out", type=Path, required=True, help="writes OUT.json, OUT.md, OUT.png")
    args = ap.parse_args(argv)
    for p in (args.sampled, args.full):
        if not p.is_file():
            ap.exit(2, f"exit_loss: {p}: no such curve (soft-train --eval-data writes it)\n")
    sampled, full = load(args.sampled, args.until), load(args.full, args.until)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(
        json.dumps({"sampled": sampled, "full": full, "until_cpu_hours": args.until}, indent=1)
    )
    md = table(sampled, full)
    args.out.with_suffix(".md").write_text(md + "\n")
    plot(sampled, full, args.out.with_suffix(".png"))
    sys.stdout.write(md + "\n")


if __name__ == "__main__":
    main()
