"""`soft-profile`: measure a checkpoint's latency per exit through the real engine (its
step loop, paged KV cache and thread: what requests meet), fit the cost model the depth
policy predicts with, store it in soft.json (or a file), print a table, write a PNG.

Cost model (ms), per profiled depth d (each coefficient then smoothed to its least-squares
line in the layers a token runs when 3 or more depths are profiled: d, or d + 1 at a
balcony exit, which runs its own layer), the other exits interpolated linearly:
  prefill(d, n)      = prefill_ms_base[d] + prefill_ms_per_token[d] * n   (least squares)
  step(d, B rows)    = decode_ms_per_step[d] + decode_ms_per_row[d] * (B - 1)
  step(mixed batch)  = decode_ms_per_step[deepest] + sum of the other rows' per_row
Prefill is timed to the first token of a request alone; a step is the median gap between
consecutive tokens of B requests decoding together after every prefill is done. The
server's start-up measurement (`startup_profile`, when soft.json has no profile) is the
same measurement on a smaller plan.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import os
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from models.quantization import Quantization
from server.policy.latency import LatencyProfile, least_squares, line_through
from server.settings import Settings

log = logging.getLogger(__name__)

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
    rounds: int = 1


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
    served = Settings.model_fields["quantization"].default
    p.add_argument(
        "--quantization",
        choices=[m.value for m in Quantization],
        default=served,
        help=f"the weights' format, as soft-serve --quantization (profile what you serve) "
        f"[{served}]",
    )
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


@dataclass(frozen=True)
class Plan:
    """What to measure: every point is measured once per round, and rounds repeat at
    least `min_rounds` and at most `max_rounds` times, stopping once `seconds` are spent."""

    depths: list[int]
    prompt_lens: list[int]
    batch_sizes: list[int]
    tokens: int = 12  # per decode probe (the gaps after its 3rd token are the steps)
    min_rounds: int = 3
    max_rounds: int = 3
    seconds: float = math.inf
    quiet: bool = True


def probe(depth: int, n_prompt: int, max_tokens: int) -> Any:
    """A greedy request of `n_prompt` synthetic ids that runs all its `max_tokens`."""
    from server.engine.types import GenerationRequest, SamplingParams

    ids = tuple(3 + (7 * i + n_prompt) % 97 for i in range(n_prompt))
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    return GenerationRequest(f"profile-{uuid.uuid4().hex}", ids, params, depth)


async def ttft(engine: Any, depth: int, n: int) -> float:
    """Milliseconds to the first token of an `n`-token prompt alone at `depth`."""
    t0 = time.perf_counter()
    async for _ in engine.submit(probe(depth, n, 1)):
        pass
    return (time.perf_counter() - t0) * 1000.0


async def step(engine: Any, rows: Sequence[int], tokens: int) -> float:
    """The median decode step (ms) of a batch of requests at depths `rows`: the gaps
    between the first row's tokens once every prefill is behind it."""
    gaps: list[float] = []

    async def one(depth: int, record: bool) -> None:
        last = None
        k = 0
        async for _ in engine.submit(probe(depth, 8, tokens)):
            now = time.perf_counter()
            k += 1
            if record and last is not None and k > 3:  # every prefill is behind us
                gaps.append((now - last) * 1000.0)
            last = now

    await asyncio.gather(*(one(d, i == 0) for i, d in enumerate(rows)))
    return median(gaps)


def measure(engine: Any, plan: Plan) -> Measurements:
    """Time the started engine itself (its step loop, paged cache and threads: what
    requests will meet): time to first token per depth and prompt length, decode steps per
    depth and batch size, and mixed-depth batches; medians over the rounds. Call from a
    thread without a running event loop."""
    depths = plan.depths
    lens = [n for n in plan.prompt_lens if n + 2 <= engine.max_model_len] or [4]
    batches = [b for b in plan.batch_sizes if b <= engine.config.max_num_seqs] or [1]
    mixes = [tuple(depths[i % len(depths)] for i in range(b)) for b in batches if b > 1]
    points = len(depths) * (len(lens) + len(batches)) + len(mixes)
    progress = Progress(points * plan.max_rounds if plan.seconds == math.inf else points,
                        plan.quiet)  # fmt: skip

    async def run() -> Measurements:
        for d in depths:  # warm-up: allocation, kernel selection
            await ttft(engine, d, lens[0])
            await step(engine, [d, d], plan.tokens)
        prefill: dict[int, dict[int, list[float]]] = {d: {n: [] for n in lens} for d in depths}
        steps: dict[int, dict[int, list[float]]] = {d: {b: [] for b in batches} for d in depths}
        mixed: dict[tuple[int, ...], list[float]] = {rows: [] for rows in mixes}
        deadline, rounds = time.perf_counter() + plan.seconds, 0
        while rounds < plan.min_rounds or (
            time.perf_counter() < deadline and rounds < plan.max_rounds
        ):
            rounds += 1
            for d in depths:
                for n in lens:
                    prefill[d][n].append(await ttft(engine, d, n))
                    progress.tick(f"prefill d={d} n={n}")
                for b in batches:
                    steps[d][b].append(await step(engine, [d] * b, plan.tokens))
                    progress.tick(f"step d={d} B={b}")
            for rows in mixes:
                mixed[rows].append(await step(engine, rows, plan.tokens))
                progress.tick(f"mixed B={len(rows)}")
        return Measurements(
            {d: {n: median(v) for n, v in t.items()} for d, t in prefill.items()},
            {d: {b: median(v) for b, v in t.items()} for d, t in steps.items()},
            [(rows, median(v)) for rows, v in mixed.items()],
            rounds,
        )

    return asyncio.run(run())


def startup_profile(
    engine: Any, exits: Sequence[int], seconds: float = 3.0, prompt_len: int = 64
) -> LatencyProfile:
    """The server's start-up profile when the checkpoint has none: `measure` at the
    shallowest, middle and deepest exit, alone at batch 1, a long and a short prompt, for
    about `seconds` (2 to 50 rounds); the other exits are interpolated."""
    depths = sorted({exits[0], exits[len(exits) // 2], exits[-1]})
    long_len = max(4, min(prompt_len, engine.max_model_len - 10))
    plan = Plan(depths, [long_len // 4, long_len], [1], min_rounds=2, max_rounds=50,
                seconds=seconds)  # fmt: skip
    m = measure(engine, plan)
    profile = fit(m, exits, source="measured", layers=engine.model.layers_run)
    log.info("measured latency profile in %d rounds: %s", m.rounds, profile.to_json())
    return profile


def median(xs: Sequence[float]) -> float:
    """The middle value (requests will meet the same neighbours as the median probe)."""
    s = sorted(xs)
    return s[len(s) // 2] if s else 0.0


def line_fit(points: dict[int, float]) -> tuple[float, float]:
    """Least-squares (intercept, slope) >= 0 through x -> y (one point: a flat line)."""
    if len(points) == 1:
        return max(*points.values(), 0.0), 0.0
    icpt, slope = least_squares(points)
    return max(icpt, 0.0), slope


def in_depth(
    table: dict[int, float], layers: Callable[[int], int] | None = None
) -> dict[int, float]:
    """A cost measured at 3 or more depths, as its least-squares line in the layers a
    token runs there (`layers(depth)`, default the depth; a balcony exit runs its own
    layer too): a fixed part (head, launches) plus the same amount per layer. One noisy
    depth then cannot bend the table into a plateau (the policy forces costs never to fall
    with depth, so a high reading at the shallowest depth would otherwise flatten every
    deeper one to it)."""
    x = layers or (lambda d: d)
    if len(table) < 3 or len({x(d) for d in table}) < 2:
        return table
    icpt, slope = line_through([(x(d), y) for d, y in table.items()])
    icpt = max(icpt, 0.0)
    return {d: icpt + slope * x(d) for d in table}


def fit(
    m: Measurements,
    exits: Sequence[int],
    source: str = "soft-profile",
    layers: Callable[[int], int] | None = None,
) -> LatencyProfile:
    """The cost model (see the module docstring) through the measurements; `layers`: the
    model's layers run per depth (SortedModel.layers_run), the x of every fit in depth."""
    base, per_token, step, per_row = {}, {}, {}, {}
    for d in m.prefill:
        base[d], per_token[d] = line_fit(m.prefill[d])
        c, r = line_fit({b - 1: ms for b, ms in m.step[d].items()})  # B - 1: one row at 0
        step[d], per_row[d] = c, r
    base, per_token, step, per_row = (in_depth(t, layers) for t in (base, per_token, step, per_row))
    rows = any(len(t) > 1 for t in m.step.values())  # else the profile is batch-free
    return LatencyProfile.from_points(
        exits, base, per_token, step, source, per_row if rows else None, layers
    )


def report(m: Measurements, profile: LatencyProfile) -> tuple[str, float]:
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


def plot(m: Measurements, profile: LatencyProfile, path: Path) -> bool:
    """The measured points and the fitted lines as a PNG; False (nothing written) without
    matplotlib, which only the `train` extra installs."""
    try:
        import matplotlib
    except ImportError:
        return False

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
    return True


def fail(message: str) -> int:
    print(f"soft-profile: error: {message}", file=sys.stderr)
    return 2


def write_profile(data: dict[str, Any], out: Path | None, directory: Path, layers: int) -> Path:
    """The profile into `out`, or into the checkpoint's soft.json; returns where."""
    from models.checkpoint import read_soft_json, write_soft_json

    if out is not None:
        out.write_text(json.dumps(data, indent=2) + "\n")
        return out
    soft = read_soft_json(directory, layers)
    assert soft is not None, "main checked that soft.json exists"
    return write_soft_json(directory, soft.with_profile(data))


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.tokens < 5 or args.repeats < 1:
        return fail("--tokens must be at least 5 and --repeats at least 1")
    import models
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
        # with an OpenMP team, as in the server (server/engine/core.py says why)
        model = models.load(args.model, device=args.device, dtype=args.dtype,
                            quantization=args.quantization)  # fmt: skip
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
    plan = Plan(depths, args.prompt_lens, args.batch_sizes, args.tokens, args.repeats,
                args.repeats, quiet=args.quiet)  # fmt: skip
    with engine.running():
        m = measure(engine, plan)
    profile = fit(m, exits, layers=model.layers_run)
    table, error = report(m, profile)
    data: dict[str, Any] = dict(profile.to_json())
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
    where = write_profile(data, args.out, directory, model.num_layers)
    png = args.png or where.with_name(where.stem.replace("soft", "latency_profile") + ".png")
    drawn = plot(m, profile, png)
    print(table)
    print(f"\nfit: median |fitted - measured| / measured = {100 * error:.1f}%")
    if drawn:
        print(f"profile written to {where}; plot {png}")
    else:
        print(f"profile written to {where}; no plot: matplotlib is not installed "
              "(pip install 'soft-serve[train]')")  # fmt: skip
    if args.out is not None:
        print(f"serve with: soft-serve --model {args.model} --latency-profile {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
