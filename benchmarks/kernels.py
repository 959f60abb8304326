"""soft-serve's CPU kernels (models/kernels) against torch's, one matrix product at a time.

For SmolLM2-135M's layer shapes (q|k|v 960x576, o 576x576, gate|up 3072x576, down
576x1536; 30 layers of distinct matrices, so that the weights stream from memory as in a
decode step) and each weight format:
  1) batch 1: time per 30 layers of products and the bytes/s that streams, ours against
     oneDNN's packed fp32 GEMM (what the engine ran before) and torch's weight-only
     int8 / int4 kernels;
  2) 1 to 256 rows on one gate|up matrix: where ours stop beating theirs (the row counts
     up to which models.weights.KERNEL_ROWS sends products to ours);
  3) a whole decode step's 30 layers of the default model (context 64) in one call
     (kernels.decode_layers, what the engine runs) against one call per layer with
     Python between (kernels.decode_layer), at 1 and 16 rows; at 1 row also against the
     stream of its own weights (plain loads of the same buffers in the same order,
     kernels.stream_read) read right before it, pair by pair (BESIDE pairs, the median).
and the machine's ceilings they are read against: the fp32 FMA peak (kernels.fma_peak, a
register-only loop) for products over many rows, or, for those on bf16 panels where they
multiply in bf16 (kernels.panel_pairs), the bf16 dot-product peak (kernels.bf16_peak);
the read bandwidth of a 1 GiB array for batch 1 (its weights stream from memory).
Each figure is the best of --trials. Writes JSON (--out) and prints markdown tables.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch

from models import kernels
from models.kernels import KernelWeight
from models.weights import Bf16Weight, Int4Weight, Int8Weight, pack

SHAPES = ((960, 576), (576, 576), (3072, 576), (576, 1536))  # one SmolLM2 layer
SWEEP = SHAPES[2]  # the row sweep's matrix: gate|up
ROWS = (1, 2, 4, 8, 16, 64, 256)


def best(fn: Callable[[], object], trials: int, inner: int = 1) -> float:
    """Seconds per call of fn, best of `trials` runs of `inner` calls."""
    fn()
    out = float("inf")
    for _ in range(trials):
        t = time.perf_counter()
        for _ in range(inner):
            fn()
        out = min(out, (time.perf_counter() - t) / inner)
    return out


def formats(w: torch.Tensor) -> dict[str, tuple[Callable[[torch.Tensor], object], int]]:
    """name -> (product x -> y, bytes of weights it reads)."""
    q8, q4, b16 = Int8Weight.quantize(w), Int4Weight.quantize(w), Bf16Weight.quantize(w)
    packed = pack(w)
    assert q8.kernel is not None and q4.kernel is not None and b16.kernel is not None
    mine = {"fp32": KernelWeight.dense(w), "bf16": b16.kernel, "int8": q8.kernel,
            "int4": q4.kernel}  # fmt: skip

    def ours(kw: KernelWeight) -> Callable[[torch.Tensor], object]:
        return lambda x: kernels.linear(x, kw)

    def onednn(x: torch.Tensor) -> object:
        return torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")

    out = {f"ours {k}": (ours(kw), kw.nbytes) for k, kw in mine.items()}
    out["oneDNN fp32 (packed)"] = (onednn, w.nbytes)
    out["torch int8"] = (q8.matmul, q8.nbytes)
    out["torch int4"] = (q4.matmul, q4.nbytes)
    return out


def ceilings(trials: int, threads: int) -> dict[str, Any]:
    """The FMA peak (GFLOP/s, with vectors as wide as the panels use: vector_lanes), the
    bf16 dot-product peak where the panels multiply in bf16 (else None) and the read
    bandwidth of a 1 GiB fp32 array (GB/s)."""
    peak = max(kernels.fma_peak(threads, 20_000_000) for _ in range(trials))
    bf16 = [p for _ in range(trials) if (p := kernels.bf16_peak(threads, 20_000_000)) is not None]
    return {"fma_peak_gflop_s": peak, "vector_lanes": kernels.vector_lanes(),
            "bf16_dot_peak_gflop_s": max(bf16, default=None),
            "read_gb_s_first": read_bandwidth(trials)}  # fmt: skip


def panel_rows() -> dict[str, int]:
    """Per format of ours that multiplies on bf16 panels in bf16 (kernels.panel_pairs):
    from how many rows it does (the rows whose bound is the bf16 dot-product peak)."""
    if not kernels.panel_pairs():
        return {}
    return {"ours bf16": 2, "ours int8": kernels.panel_rows(kernels.I8),
            "ours int4": kernels.panel_rows(kernels.Q4)}  # fmt: skip


def read_bandwidth(trials: int) -> float:
    """GB/s summing a 1 GiB fp32 array (torch's vectorized sum on the run's threads)."""
    big = torch.ones(1 << 28)
    return big.nbytes / best(lambda: big.sum(), trials) / 1e9


def gflop_s(us: float, rows: int) -> float:
    """A SWEEP product over `rows` rows in `us` microseconds, in GFLOP/s."""
    return 2 * SWEEP[0] * SWEEP[1] * rows / us / 1e3


def stream(trials: int) -> list[dict[str, Any]]:
    """Batch 1 over 30 layers of distinct matrices."""
    g = torch.Generator().manual_seed(0)
    mats = [torch.randn(s, generator=g) * 0.05 for _ in range(30) for s in SHAPES]
    per = [formats(w) for w in mats]
    xs = {k: torch.randn(1, k, generator=g) for k in {s[1] for s in SHAPES}}
    rows = []
    for name in per[0]:
        calls = [(p[name][0], xs[w.shape[1]]) for p, w in zip(per, mats, strict=True)]
        nbytes = sum(p[name][1] for p in per)

        def run(calls: list[tuple[Callable[[torch.Tensor], object], torch.Tensor]] = calls) -> None:
            for fn, x in calls:
                fn(x)

        t = best(run, trials)
        rows.append({"format": name, "ms_per_30_layers": t * 1e3, "weight_mb": nbytes / 1e6,
                     "gb_s": nbytes / t / 1e9})  # fmt: skip
    return rows


def batches(trials: int) -> list[dict[str, Any]]:
    """1..256 rows on one SWEEP (gate|up) matrix."""
    w = torch.randn(*SWEEP, generator=torch.Generator().manual_seed(1)) * 0.05
    fs = formats(w)
    out = []
    for m in ROWS:
        x = torch.randn(m, SWEEP[1])
        row: dict[str, Any] = {"rows": m}
        for name, (fn, _) in fs.items():
            row[name] = best(partial(fn, x), trials, 5) * 1e6
        out.append(row)
    return out


STEP_FORMATS = ("none", "bf16", "int8", "int4")
STEP_ROWS = (1, 16)
STEP_CONTEXT = 64
BESIDE = 15  # pairs of (the weights' own stream, batch-1 step)


def step(trials: int) -> list[dict[str, Any]]:
    """ms per decode step through the default model's layers, one call or one per layer."""
    import models

    out = []
    for q in STEP_FORMATS:
        model = models.load("default", quantization=q)
        model.pack()
        stack = model.weights.stack
        assert stack is not None, "every layer has kernel layouts here"
        nbytes = model.layer_bytes() * model.num_layers
        for n in STEP_ROWS:
            if n <= stack.max_rows:  # fp32 past 4 rows: oneDNN's products instead
                one, per, beside = step_times(model, n, trials, own_stream=n == 1)
                out.append({"format": q if q != "none" else "fp32", "rows": n,
                            "one_call_ms": one * 1e3, "per_layer_ms": per * 1e3,
                            "weight_mb": nbytes / 1e6,
                            "of_own_stream_beside": beside})  # fmt: skip
        del model
    return out


def step_times(model: Any, n: int, trials: int, own_stream: bool = False
               ) -> tuple[float, float, float | None]:  # fmt: skip
    """Seconds per decode step of n rows at context STEP_CONTEXT: the stack in one call,
    and one call per layer; with `own_stream`, also the one call's time against
    the stream of the same weights read right before it (kernels.stream_read: plain
    loads of those buffers, in the step's order, split and synchronized as it is): the
    fraction of that stream's bytes/s the step gets, median of BESIDE pairs (the two meet
    the same spell of a shared host's bandwidth, which moves within minutes)."""
    from server.engine.attention import PagedAttention
    from server.engine.core import kv_cache_dtype
    from server.engine.kv_cache import KVCacheConfig, KVCacheManager
    from server.engine.scheduler import Sequence
    from server.engine.types import GenerationRequest, SamplingParams

    c, n_layers, stack = model.cfg, model.num_layers, model.weights.stack
    shape = {
        "num_kv_heads": c.num_kv_heads,
        "head_dim": c.head_dim,
        "block_size": 16,
        "dtype": kv_cache_dtype(model),
    }  # the engine's cache: fp16 where the kernels run
    blocks = n_layers * n * -(-(STEP_CONTEXT + 1) // 16) + 8  # one pool for every layer
    cache = KVCacheManager(KVCacheConfig(num_layers=n_layers, num_blocks=blocks, **shape))
    seqs = []
    for j in range(n):
        req = GenerationRequest(f"s{j}", (5,) * STEP_CONTEXT, SamplingParams(), n_layers)
        seqs.append(Sequence(req, [5] * STEP_CONTEXT, n_layers))
        assert cache.allocate(seqs[-1], n_layers, STEP_CONTEXT + 1)
    kv = PagedAttention(cache, seqs, [n_layers] * n, [STEP_CONTEXT] * n, 1)
    h = torch.randn(n, c.hidden_size)
    cos, sin = (t.reshape(n, -1) for t in model.rope(torch.full((n, 1), STEP_CONTEXT), h.dtype))
    paged = [p for i in range(n_layers) if (p := kv.paged(i)) is not None]
    assert len(paged) == n_layers, "a paged fp32 or fp16 cache on CPU"
    layers = [f for layer in model.weights.layers if (f := layer.fused) is not None]
    assert len(layers) == n_layers

    def one_call() -> None:
        kernels.decode_layers(h, stack, 0, [n] * n_layers, cos, sin, paged[0])

    def per_layer() -> None:
        for layer, p in zip(layers, paged, strict=True):
            kernels.decode_layer(h, layer, cos, sin, p)

    beside = None
    if own_stream:  # the same weights' bytes: plain loads, the step's order
        bufs = [t for layer in layers for m in layer.matrices
                for t in (m.data, m.scale, m.minimum) if t is not None]  # fmt: skip
        size, threads = sum(b.nbytes for b in bufs), torch.get_num_threads()
        fractions = []
        for _ in range(BESIDE):
            read = size / best(lambda: kernels.stream_read(bufs, threads), 2)
            fractions.append(size / best(one_call, 1, 5) / read)
        beside = statistics.median(fractions)
    return best(one_call, trials, 5), best(per_layer, trials, 5), beside


def tables(r: dict[str, Any]) -> str:
    c = r["ceilings"]
    bw, peak = c["read_gb_s"], c["fma_peak_gflop_s"]
    lanes = c.get("vector_lanes", 8)
    bf16 = c.get("bf16_dot_peak_gflop_s")
    on_bf16 = r.get("panel_rows", {}) if bf16 else {}
    dot = f", bf16 dot-product peak {bf16:.0f} GFLOP/s" if bf16 else ""
    lines = [f"Ceilings: fp32 FMA peak {peak:.0f} GFLOP/s ({lanes}-lane vectors){dot}, "
             f"read bandwidth {bw:.1f} GB/s (the best of {c['read_gb_s_first']:.1f} before "
             f"the kernels and {c['read_gb_s_last']:.1f} after them).", "",
             "| format | ms per 30 layers (batch 1) | weights MB | GB/s | of read bandwidth |",
             "|---|---:|---:|---:|---:|"]  # fmt: skip
    for row in r["stream"]:
        lines.append(f"| {row['format']} | {row['ms_per_30_layers']:.1f} | "
                     f"{row['weight_mb']:.0f} | {row['gb_s']:.1f} | "
                     f"{row['gb_s'] / bw:.2f} |")  # fmt: skip
    names = [k for k in r["batches"][0] if k != "rows"]
    lines += ["", "| rows | " + " | ".join(names) + " |", "|---:|" + "---:|" * len(names)]
    for row in r["batches"]:
        lines.append(f"| {row['rows']} | " + " | ".join(f"{row[n]:.0f}" for n in names) + " |")
    mark = "; b: of the bf16 dot-product peak, the products on bf16 panels" if on_bf16 else ""
    lines += ["", f"GFLOP/s (fraction of the FMA peak{mark}):", "",
              "| rows | " + " | ".join(names) + " |", "|---:|" + "---:|" * len(names)]  # fmt: skip
    for row in r["batches"]:
        cells = []
        for n in names:
            g = gflop_s(row[n], row["rows"])
            dotted = row["rows"] >= on_bf16.get(n, 1 << 30)  # none without a bf16 peak
            cells.append(f"{g:.0f} ({g / bf16:.2f} b)" if dotted else f"{g:.0f} ({g / peak:.2f})")
        lines.append(f"| {row['rows']} | " + " | ".join(cells) + " |")
    lines += ["", "| weights | rows | one call per step, ms | one call per layer, ms | ratio | "
              "weights MB | GB/s (one call) | of read bandwidth | of its own weights' "
              "stream, beside it |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for row in r["step"]:
        one, per, mb = row["one_call_ms"], row["per_layer_ms"], row.get("weight_mb")
        beside = row.get("of_own_stream_beside")
        # batch 1 streams the weights; more rows are bound by arithmetic (the sweep above)
        bytes_cells = (
            f"{mb:.0f} | {mb / one:.1f} | {mb / one / bw:.2f} | "
            + (f"{beside:.2f}" if beside else "-")
            if mb and row["rows"] == 1
            else "| | |"
        )
        lines.append(f"| {row['format']} | {row['rows']} | {one:.2f} | {per:.2f} | "
                     f"{per / one:.2f}x | {bytes_cells} |")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--trials", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("docs/results/kernels.json"))
    args = ap.parse_args(argv)
    if not kernels.available():
        print(f"soft-serve's kernels are not available here: {kernels.unavailable_reason()}",
              file=sys.stderr)  # fmt: skip
        return 2
    torch.set_num_threads(args.threads)
    load = os.getloadavg()
    r: dict[str, Any] = {
        "benchmark": "kernels",
        "command": [sys.executable, "-m", "benchmarks.kernels", *(argv or sys.argv[1:])],
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "threads": args.threads,
            "torch": torch.__version__,
        },  # fmt: skip
        "load_average_before": load,
        "ceilings": ceilings(args.trials, args.threads),
        "panel_rows": panel_rows(),
        "stream": stream(args.trials),
        "batches": batches(args.trials),
        "batches_unit": f"microseconds per product, {SWEEP[0]} x {SWEEP[1]}",
        "step": step(args.trials),
        "step_context": STEP_CONTEXT,
    }
    # the bandwidth moves with the neighbours' load on a shared host: measured again after
    # the kernels, the better of the two is what the fractions are taken against
    c = r["ceilings"]
    c["read_gb_s_last"] = read_bandwidth(args.trials)
    c["read_gb_s"] = max(c["read_gb_s_first"], c["read_gb_s_last"])
    r["load_average_after"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(r, indent=2) + "\n")
    print(tables(r))
    print(f"\nload average {load[0]:.2f} before, {r['load_average_after'][0]:.2f} after")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
