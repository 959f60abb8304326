"""`soft-profile`: measure a checkpoint's latency per exit through the real engine (its
step loop, paged KV cache and thread: what requests meet), fit the cost model the depth
policy predicts with, store it in soft.json (or a file), print a table, write a PNG.

Cost model (ms), per profiled depth d (each coefficient then smoothed to its least-squares
line in depth when 3 or more depths are profiled), the other exits interpolated linearly:
  prefill(d, n)      = prefill_ms_base[d] + prefill_ms_per_token[d] * n   (least squares)
  step(d, B rows)    = decode_ms_per_step[d] + decode_ms_per_row[d] * (B - 1)
  step(mixed batch)  = decode_ms_per_step[deepest] + sum of the other rows' per_row
Prefill is timed to the first token of a request alone; a step is the median gap between
consecutive tokens of B requests decoding together after every prefill is done.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

EXAMPLES = """\
examples:
  soft-profile ./ckpt                       # updates ./ckpt/soft.json's latency_profile
  soft-profile default --out profile.json   # the embedded default (read-only package):
  soft-serve --latency-profile profile.json #   a file the server is pointed at
  soft-profile ./ckpt --batch-sizes 1,8,32 --prompt-lens 16,128,512 --png prof.png

exit status: 0 done, 1 the model failed to load or run, 2 bad options or unwritable output.
"""


@dataclass(frozen=True)
class Measurements:
    """Raw medians (ms) per depth: prefill by prompt length, step by batch size, and
    mixed batches (their depths -> step)."""

    prefill: dict[int, dict[int, float]]
    step: dict[int, dict[int, float]]
    mixed: list[tuple[tuple[int, ...], float]]


def ints(text: str) -> list[int]:
    try:
        out = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated integers") from None
    if not out or out[0] < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected positive integers")
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="soft-profile",
        description="Measure prefill and decode-step latency per exit (vs prompt length, batch "
        "size and depth mix) through soft-serve's engine, fit the cost model the depth policy "
        "uses, and store it as soft.json's latency_profile (or --out FILE). Prints a table "
        "and writes a PNG.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", nargs="?", default="default", help="checkpoint dir or 'default'")
    p.add_argument("--out", type=Path, help="write the profile to this JSON file instead of "
                   "the checkpoint's soft.json (serve it with --latency-profile FILE)")  # fmt: skip
    p.add_argument("--png", type=Path, help="plot path [beside the profile]")
    p.add_argument("--depths", type=ints, help="depths to measure [up to 5 exits, spread]")
    p.add_argument("--prompt-lens", type=ints, default=[16, 64, 128, 256],
                   help="prompt lengths for prefill [16,64,128,256]")  # fmt: skip
    p.add_argument("--batch-sizes", type=ints, default=[1, 4, 12, 24],
                   help="decode batch sizes [1,4,12,24]")  # fmt: skip
    p.add_argument("--tokens", type=int, default=12, help="tokens per decode probe [12]")
    p.add_argument("--repeats", type=int, default=3, help="repeats per point (median) [3]")
    p.add_argument("--device", help="torch device [cuda if present]")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="weights dtype")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


class Progress:
    """A one-line progress bar on stderr."""

    def __init__(self, total: int, quiet: bool) -> None:
        self.total, self.done, self.quiet, self.t0 = total, 0, quiet, time.monotonic()

    def tick(self, what: str) -> None:
        self.done += 1
        if self.quiet:
            return
        frac = self.done / max(self.total, 1)
        bar = "#" * int(30 * frac)
        sys.stderr.write(
            f"\r[soft-profile] [{bar:<30}] {self.done}/{self.total} "
            f"{time.monotonic() - self.t0:5.1f}s {what:<28}"
        )
        if self.done >= self.total:
            sys.stderr.write("\n")
        sys.stderr.flush()


def spread(exits: Sequence[int], k: int = 5) -> list[int]:
    if len(exits) <= k:
        return list(exits)
    return sorted({exits[round(i * (len(exits) - 1) / (k - 1))] for i in range(k)})


def measure(engine: Any, depths: list[int], args: argparse.Namespace) -> Measurements:
    from server.engine.types import GenerationRequest, SamplingParams

    lens = [n for n in args.prompt_lens if n + 2 <= engine.max_model_len] or [4]
    batches = [b for b in args.batch_sizes if b <= engine.config.max_num_seqs] or [1]
    mixes = [tuple(depths[i % len(depths)] for i in range(b)) for b in batches if b > 1]
    progress = Progress(len(depths) * (len(lens) + len(batches)) + len(mixes), args.quiet)

    def request(depth: int, n_prompt: int, max_tokens: int) -> GenerationRequest:
        ids = tuple(3 + (7 * i + n_prompt) % 97 for i in range(n_prompt))
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        return GenerationRequest(f"profile-{uuid.uuid4().hex}", ids, params, depth)

    async def ttft(depth: int, n: int) -> float:
        t0 = time.perf_counter()
        async for _ in engine.submit(request(depth, n, 1)):
            pass
        return (time.perf_counter() - t0) * 1000.0

    async def step(rows: Sequence[int]) -> float:
        gaps: list[float] = []

        async def one(depth: int, record: bool) -> None:
            last = None
            k = 0
            async for _ in engine.submit(request(depth, 8, args.tokens)):
                now = time.perf_counter()
                k += 1
                if record and last is not None and k > 3:  # every prefill is behind us
                    gaps.append((now - last) * 1000.0)
                last = now

        await asyncio.gather(*(one(d, i == 0) for i, d in enumerate(rows)))
        return median(gaps)

    async def run() -> Measurements:
        for d in depths:  # warm-up: allocation, kernel selection
            await ttft(d, lens[0])
            await step([d, d])
        prefill: dict[int, dict[int, float]] = {d: {} for d in depths}
        steps: dict[int, dict[int, float]] = {d: {} for d in depths}
        for d in depths:
            for n in lens:
                prefill[d][n] = median([await ttft(d, n) for _ in range(args.repeats)])
                progress.tick(f"prefill d={d} n={n}")
            for b in batches:
                steps[d][b] = median([await step([d] * b) for _ in range(args.repeats)])
                progress.tick(f"step d={d} B={b}")
        mixed = []
        for rows in mixes:
            mixed.append((rows, median([await step(rows) for _ in range(args.repeats)])))
            progress.tick(f"mixed B={len(rows)}")
        return Measurements(prefill, steps, mixed)

    return asyncio.run(run())


def median(xs: Sequence[float]) -> float:
    s = sorted(xs)
    return s[len(s) // 2] if s else 0.0


def line_fit(points: dict[int, float]) -> tuple[float, float]:
    """Least-squares (intercept, slope) >= 0 through x -> y."""
    xs = sorted(points)
    if len(xs) == 1:
        return max(points[xs[0]], 0.0), 0.0
    mx, my = sum(xs) / len(xs), sum(points.values()) / len(xs)
    slope = sum((x - mx) * (points[x] - my) for x in xs) / sum((x - mx) ** 2 for x in xs)
    slope = max(slope, 0.0)
    return max(my - slope * mx, 0.0), slope


def in_depth(table: dict[int, float]) -> dict[int, float]:
    """A cost measured at 3 or more depths, as its least-squares line in depth: a fixed
    part (head, launches) plus the same amount per layer. One noisy depth then cannot bend
    the table into a plateau (the policy forces costs never to fall with depth, so a high
    reading at the shallowest depth would otherwise flatten every deeper one to it)."""
    if len(table) < 3:
        return table
    icpt, slope = line_fit(table)
    return {d: icpt + slope * d for d in table}


def fit(m: Measurements, exits: Sequence[int]) -> Any:
    from server.policy.policies import LatencyProfile

    base, per_token, step, per_row = {}, {}, {}, {}
    for d in m.prefill:
        base[d], per_token[d] = line_fit(m.prefill[d])
        c, r = line_fit({b - 1: ms for b, ms in m.step[d].items()})  # B - 1: one row at 0
        step[d], per_row[d] = c, r
    base, per_token, step, per_row = (in_depth(t) for t in (base, per_token, step, per_row))
    return LatencyProfile.from_points(exits, base, per_token, step, "soft-profile", per_row)


def report(m: Measurements, profile: Any) -> tuple[str, float]:
    """The table (measured vs fitted) and the fit's median relative error."""
    errors: list[float] = []
    rows = ["| depth | prefill base ms | ms/prompt token | step ms (B=1) | ms/extra row | "
            "measured steps (B: ms) | fit error |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for d in sorted(m.prefill):
        errs = [abs(profile.prefill_ms(d, n) - ms) / ms for n, ms in m.prefill[d].items() if ms]
        errs += [abs(profile.batch_step_ms([d] * b) - ms) / ms for b, ms in m.step[d].items() if ms]
        errors += errs
        steps = ", ".join(f"{b}: {ms:.1f}" for b, ms in sorted(m.step[d].items()))
        rows.append(
            f"| {d} | {profile.prefill_ms_base[d]:.2f} | {profile.prefill_ms_per_token[d]:.3f} | "
            f"{profile.step_ms(d):.2f} | {profile.decode_ms_per_row.get(d, 0.0):.3f} | {steps} | "
            f"{100 * median(errs):.0f}% |"
        )
    for depths, ms in m.mixed:
        pred = profile.batch_step_ms(depths)
        errors.append(abs(pred - ms) / ms if ms else 0.0)
        mix = ",".join(f"{d}x{depths.count(d)}" for d in sorted(set(depths)))
        rows.append(f"| mix {mix} | | | | | measured {ms:.1f}, predicted {pred:.1f} | "
                    f"{100 * errors[-1]:.0f}% |")  # fmt: skip
    return "\n".join(rows), median(errors)


def plot(m: Measurements, profile: Any, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    for d in sorted(m.prefill):
        ns = sorted(m.prefill[d])
        (ln,) = a.plot(ns, [m.prefill[d][n] for n in ns], "o", label=f"depth {d}")
        a.plot(ns, [profile.prefill_ms(d, n) for n in ns], "-", color=ln.get_color())
        bs = sorted(m.step[d])
        (ln,) = b.plot(bs, [m.step[d][x] for x in bs], "o", label=f"depth {d}")
        b.plot(bs, [profile.batch_step_ms([d] * x) for x in bs], "-", color=ln.get_color())
    for depths, ms in m.mixed:
        b.plot([len(depths)], [ms], "kx")
    a.set(xlabel="prompt tokens", ylabel="time to first token (ms)", title="prefill")
    b.set(xlabel="decode batch (rows)", ylabel="step (ms)", title="decode step (x: mixed depths)")
    for ax in (a, b):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("soft-profile: measured (points) and fitted cost model (lines)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def fail(message: str) -> int:
    print(f"soft-profile: error: {message}", file=sys.stderr)
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.tokens < 5 or args.repeats < 1:
        return fail("--tokens must be at least 5 and --repeats at least 1")
    import models
    from models.checkpoint import read_soft_json, write_soft_json
    from models.loader import resolve

    try:
        directory = resolve(args.model)
    except (FileNotFoundError, ValueError) as e:
        return fail(str(e))
    soft_path = directory / "soft.json"
    if args.out is None and not (soft_path.exists() and os.access(soft_path, os.W_OK)):
        why = "has no soft.json" if not soft_path.exists() else "cannot be written"
        return fail(
            f"{soft_path} {why}: pass --out FILE and serve with --latency-profile FILE"
        )  # fmt: skip
    if args.out is not None and not os.access(args.out.parent.resolve(), os.W_OK):
        return fail(f"--out {args.out}: the directory does not exist or is not writable")
    from server.engine.core import Engine, EngineConfig, on_own_thread

    def build() -> tuple[models.SortedModel, Engine]:
        # torch work on a thread that ends: the engine's step thread is then the only one
        # with an OpenMP team, as in the server (server/engine.py says why)
        model = models.load(args.model, device=args.device, dtype=args.dtype)
        return model, Engine(model, EngineConfig(max_num_seqs=max(args.batch_sizes + [32])))

    try:
        model, engine = on_own_thread(build)
    except (FileNotFoundError, ValueError) as e:
        print(f"soft-profile: cannot load {args.model}: {e}", file=sys.stderr)
        return 1
    exits = list(model.exits)
    depths = args.depths or spread(exits)
    if not set(depths) <= set(exits):
        return fail(f"--depths {depths}: each must be an exit of the model {exits}")
    engine.start()
    try:
        m = measure(engine, depths, args)
    finally:
        engine.stop()
    profile = fit(m, exits)
    table, error = report(m, profile)
    data = profile.to_json()
    data["measured"] = {  # kept for plots and audits; the policy reads the fitted tables
        "depths": depths,
        "prefill_ms": {str(d): {str(n): round(v, 3) for n, v in t.items()}
                       for d, t in m.prefill.items()},
        "step_ms": {str(d): {str(b): round(v, 3) for b, v in t.items()}
                    for d, t in m.step.items()},
        "fit_median_error": round(error, 4),
        "device": str(model.device),
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }  # fmt: skip
    if args.out is not None:
        args.out.write_text(json.dumps(data, indent=2) + "\n")
        where = args.out
    else:
        soft = read_soft_json(directory, model.num_layers)
        assert soft is not None, "checked above"
        where = write_soft_json(directory, soft.with_profile(data))
    png = args.png or where.with_name(where.stem.replace("soft", "latency_profile") + ".png")
    plot(m, profile, png)
    print(table)
    print(f"\nfit: median |fitted - measured| / measured = {100 * error:.1f}%")
    print(f"profile written to {where}; plot {png}")
    if args.out is not None:
        print(f"serve with: soft-serve --model {args.model} --latency-profile {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
