"""Engine speed against transformers and against the memory-bandwidth limit.

Side by side in one run on the default model (or --model):
  1) memory bandwidth: a large matrix-vector product in each dtype (the limit)
  2) batch-1 decode per exit: our engine (fp32, bf16) vs transformers' `generate()` on the
     truncated model (fp32, bf16); bandwidth utilisation = tok/s x weight bytes per token / BW
  3) depth scaling: time per token at d / at L vs the ratio of weight bytes read
  4) batching: 16 requests arriving at different times (continuous batching) vs
     transformers' static batch of 16; a mixed-depth step vs the per-depth cost model
  5) peak RSS, KV bytes per token by depth (a balcony exit's own layer included)
  6) balcony checkpoints: an exit-e row's step vs head + (e + 1) layers, the layer and the
     head fitted on depths without an exit layer (`--exit-steps-only` runs just this)

Writes JSON (--out) and prints a markdown table. Trials alternate between systems so that
noise from a shared machine hits both alike; each figure is the best of --trials.

Only one thread at a time holds torch's OpenMP team (server/engine/core.py says why): each
system is measured with the other's threads gone — an engine is started for its own
measurement and stopped after, transformers runs on a thread that ends.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import resource
import sys
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

import models
from models.loader import resolve
from models.weights import linear, pack
from server.engine.core import Engine, EngineConfig, on_own_thread
from server.engine.types import GenerationRequest, SamplingParams

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


def best_of(fn: Any, trials: int) -> float:
    return min(fn() for _ in range(trials))


def bandwidth(dtype: torch.dtype, trials: int) -> float:
    """Bytes/s of the fastest large matrix-vector product in `dtype` (256 MiB of matrix in
    fp32) among torch.mv and oneDNN on plain and packed weights: the limit a decode step
    is held to."""
    rows, cols = 8192, 8192
    a = torch.randn(rows, cols).to(dtype)
    x = torch.randn(1, cols).to(dtype)
    kernels = {"mv": (a, lambda w: torch.mv(w, x[0]))}
    packed = pack(a)
    if packed.is_mkldnn:
        kernels["onednn_packed"] = (packed, lambda w: linear(x, w))
    if dtype == torch.float32:
        kernels["onednn"] = (a, lambda w: linear(x, w))
    best = 0.0
    for w, fn in kernels.values():
        fn(w)

        def once(w: torch.Tensor = w, fn: Any = fn) -> float:
            t = time.perf_counter()
            for _ in range(5):
                fn(w)
            return (time.perf_counter() - t) / 5

        best = max(best, a.numel() * a.element_size() / best_of(once, trials))
    return best


# -- our engine ------------------------------------------------------------------------------
async def _run(engine: Engine, reqs: list[tuple[GenerationRequest, float]]) -> list[list[float]]:
    """Submit each request at its offset; return each one's token arrival times."""

    async def one(req: GenerationRequest, delay: float) -> list[float]:
        await asyncio.sleep(delay)
        return [time.perf_counter() async for _ in engine.submit(req)]

    return await asyncio.gather(*(one(r, d) for r, d in reqs))


def engine_decode(engine: Engine, prompt: list[int], depth: int, n: int) -> float:
    """Batch-1 decode tok/s (first token excluded: that is prefill)."""
    req = GenerationRequest(
        f"b1-{time.monotonic_ns()}", tuple(prompt),
        SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True), depth,
    )  # fmt: skip
    times = asyncio.run(_run(engine, [(req, 0.0)]))[0]
    return (len(times) - 1) / (times[-1] - times[0])


def engine_batch(engine: Engine, prompts: list[list[int]], depths: list[int], n: int,
                 gap: float) -> float:  # fmt: skip
    """Aggregate tok/s of len(prompts) requests arriving `gap` seconds apart."""
    reqs = [
        (GenerationRequest(f"cb-{i}-{time.monotonic_ns()}", tuple(p),
                           SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True), d),
         i * gap)
        for i, (p, d) in enumerate(zip(prompts, depths, strict=True))
    ]  # fmt: skip
    t0 = time.perf_counter()
    times = asyncio.run(_run(engine, reqs))
    return sum(len(t) for t in times) / (max(t[-1] for t in times) - t0)


@torch.inference_mode()
def step_cost(engine: Engine, depths: list[int], steps: int = 6) -> float:
    """Seconds per decode step of a batch with these depths (rows at context ~64)."""
    from server.engine.scheduler import Sequence

    seqs = []
    for j, d in enumerate(sorted(depths, reverse=True)):
        req = GenerationRequest(f"sc-{j}", (5,) * 64, SamplingParams(max_tokens=steps + 2), d)
        s = Sequence(req, [5] * 64, d)
        assert engine.cache.allocate(s, d, 64 + steps + 2)
        s.num_computed = 63
        seqs.append(s)
    try:
        engine.decode_step(seqs)
        t = time.perf_counter()
        for _ in range(steps):
            engine.decode_step(seqs)
        return (time.perf_counter() - t) / steps
    finally:
        for s in seqs:
            engine.cache.free(s)


def exit_layer_steps(engine: Engine, trials: int, steps: int = 6) -> dict[str, Any]:
    """Balcony: each exit's one-row step against the cost model head + (e + 1) x layer,
    where layer and head are the least-squares line through the steps of depths that run
    no exit layer (base layers only, the shared head), measured in the same run."""
    model = engine.model
    L = model.num_layers
    bare = [d for d in range(1, L + 1) if model.exit_layer(d) is None]
    fit_depths = sorted({bare[0], bare[len(bare) // 3], bare[2 * len(bare) // 3], L})

    def one(d: int) -> float:
        return on_own_thread(partial(best_of, partial(step_cost, engine, [d], steps), trials))

    measured = {d: one(d) for d in fit_depths}
    n = len(measured)
    mx, my = sum(measured) / n, sum(measured.values()) / n
    layer = sum((d - mx) * (t - my) for d, t in measured.items()) / sum(
        (d - mx) ** 2 for d in measured
    )
    head = my - layer * mx
    rows = []
    for e in sorted(int(x) for x in model.exit_layers):
        t = one(e)
        predicted = head + (e + 1) * layer
        rows.append({"exit": e, "measured_s": t, "predicted_s": predicted,
                     "ratio": t / predicted, "layers_run": e + 1})  # fmt: skip
    return {"layer_s": layer, "head_s": head, "fit_steps_s": measured, "exits": rows,
            "full_depth_s": measured[L]}  # fmt: skip


# -- transformers ------------------------------------------------------------------------------
@contextlib.contextmanager
def hf_truncated(hf: Any, depth: int) -> Iterator[Any]:
    """transformers' model cut to its first `depth` layers (+ its final norm and head)."""
    layers, n = hf.model.layers, hf.config.num_hidden_layers
    hf.model.layers = nn.ModuleList(list(layers)[:depth])
    hf.config.num_hidden_layers = depth
    try:
        yield hf
    finally:
        hf.model.layers, hf.config.num_hidden_layers = layers, n


@torch.inference_mode()
def hf_decode(hf: Any, ids: torch.Tensor, n: int) -> float:
    """Decode tok/s of generate(): (time for n+1 tokens - time for 1) / n, batch rows summed."""
    kw = dict(do_sample=False, eos_token_id=None, pad_token_id=0)
    hf.generate(ids, max_new_tokens=2, min_new_tokens=2, **kw)  # warm-up
    t = time.perf_counter()
    hf.generate(ids, max_new_tokens=1, min_new_tokens=1, **kw)
    t1 = time.perf_counter() - t
    t = time.perf_counter()
    hf.generate(ids, max_new_tokens=n + 1, min_new_tokens=n + 1, **kw)
    tn = time.perf_counter() - t
    return ids.shape[0] * n / max(1e-9, tn - t1)


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="default", help="model spec (models.load)")
    ap.add_argument("--tokens", type=int, default=48, help="decoded tokens per measurement")
    ap.add_argument("--trials", type=int, default=3, help="repetitions; the best counts")
    ap.add_argument("--depths", default="", help="comma list; default: the model's exits")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    ap.add_argument("--out", default="docs/results/engine.json", help="JSON output path")
    ap.add_argument("--exit-steps-only", action="store_true",
                    help="balcony: only measure exit-layer step costs (6), fp32")  # fmt: skip
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.exit_steps_only:
        return exit_steps_main(args)
    from transformers import AutoModelForCausalLM

    t_start = time.perf_counter()

    def load_ours() -> tuple[dict[str, Any], dict[str, Engine]]:
        m = {tag: models.load(args.model, device="cpu", dtype=dt) for tag, dt in DTYPES.items()}
        return m, {tag: Engine(x, EngineConfig(kv_cache_memory=1 << 29)) for tag, x in m.items()}

    ours, engines = on_own_thread(load_ours)
    model = ours["fp32"]
    depths = [int(d) for d in args.depths.split(",")] if args.depths else list(model.exits)
    if len(depths) > 6:  # a base model allows every depth; sample a few
        depths = sorted({depths[len(depths) * k // 5] for k in range(5)} | {depths[-1]})
    L = model.num_layers
    # transformers runs the base weights: same shapes, so the same cost per token (a
    # balcony exit runs one layer more than its truncated base: section 6 measures that)
    base_dir = resolve(model.soft.base_model or args.model)
    hf = on_own_thread(lambda: {
        tag: AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=dt).eval()
        for tag, dt in DTYPES.items()
    })  # fmt: skip
    prompt = model.tokenizer.encode(PROMPT)
    ids = torch.tensor([prompt])

    result: dict[str, Any] = {
        "model": args.model, "num_layers": L, "depths": depths, "tokens": args.tokens,
        "trials": args.trials, "torch": torch.__version__, "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
    }  # fmt: skip

    # 1) the limit
    bw = {tag: on_own_thread(partial(bandwidth, dt, args.trials)) for tag, dt in DTYPES.items()}
    result["bandwidth_GBps"] = {k: v / 1e9 for k, v in bw.items()}

    # 2) + 3) batch-1 decode per depth, alternating systems
    rows = []
    for d in depths:
        meas: dict[str, list[float]] = {f"{s}_{t}": [] for s in ("ours", "hf") for t in DTYPES}
        for _ in range(args.trials):
            for tag in DTYPES:
                with engines[tag].running() as e:
                    meas[f"ours_{tag}"].append(engine_decode(e, prompt, d, args.tokens))
                with hf_truncated(hf[tag], d) as m:
                    meas[f"hf_{tag}"].append(on_own_thread(partial(hf_decode, m, ids, args.tokens)))
        best = {k: max(v) for k, v in meas.items()}
        row: dict[str, Any] = {"depth": d, **{f"{k}_tok_s": v for k, v in best.items()}}
        ours_best = max(best[f"ours_{t}"] for t in DTYPES)
        row["speedup_vs_best_hf"] = ours_best / max(best[f"hf_{t}"] for t in DTYPES)
        for tag in DTYPES:
            per_token = ours[tag].weight_bytes(d)
            for system in ("ours", "hf"):
                row[f"{system}_{tag}_bw_util"] = best[f"{system}_{tag}"] * per_token / bw[tag]
        rows.append(row)
        print(f"depth {d}: " + ", ".join(f"{k} {v:.1f}" for k, v in best.items()), file=sys.stderr)
    full = rows[-1] if rows[-1]["depth"] == max(depths) else max(rows, key=lambda r: r["depth"])
    best_tag = max(DTYPES, key=lambda t: full[f"ours_{t}_tok_s"])
    for r in rows:
        r["time_ratio_vs_full"] = full[f"ours_{best_tag}_tok_s"] / r[f"ours_{best_tag}_tok_s"]
        r["bytes_ratio_vs_full"] = ours[best_tag].weight_bytes(r["depth"]) / ours[
            best_tag
        ].weight_bytes(full["depth"])
    result["batch1"] = rows
    result["best_dtype"] = best_tag

    # 4) batching: 16 staggered requests vs transformers' static batch of 16, each dtype
    prompts16 = [prompt[: max(4, len(prompt) - (i % 5))] for i in range(16)]
    cb: dict[str, float] = {}
    for tag in DTYPES:
        with engines[tag].running() as e:
            cb[tag] = max(engine_batch(e, prompts16, [L] * 16, args.tokens, gap=0.01)
                          for _ in range(args.trials))  # fmt: skip
    tok = model.tokenizer
    tok.padding_side = "left"
    batch = tok([tok.decode(p) for p in prompts16], return_tensors="pt", padding=True)
    static = {
        tag: max(
            on_own_thread(partial(hf_decode_static, hf[tag], batch, args.tokens))
            for _ in range(args.trials)
        )
        for tag in DTYPES
    }
    result["batching"] = {
        "continuous_16_tok_s": cb,
        "hf_static_16_tok_s": static,
        "speedup_vs_best_static": max(cb.values()) / max(static.values()),
    }
    eng = engines[max(DTYPES, key=lambda t: cb[t])]  # stopped: step_cost drives it directly

    # mixed-depth step vs the per-depth cost model: step(n rows at d) = head(n) + d * layer(n)
    lo, hi, sizes, trials = min(depths), max(depths), (4, 8, 12, 16), args.trials
    cost = {
        (d, n): on_own_thread(partial(best_of, partial(step_cost, eng, [d] * n), trials))
        for d in (lo, hi)
        for n in sizes
    }

    def layer(n: int) -> float:
        n = min(sizes, key=lambda m: abs(m - n))
        return (cost[(hi, n)] - cost[(lo, n)]) / (hi - lo)

    mix = [depths[j * len(depths) // 16] for j in range(16)]
    measured = on_own_thread(lambda: best_of(lambda: step_cost(eng, mix), args.trials))
    head16 = cost[(hi, 16)] - hi * layer(16)
    predicted = head16 + sum(layer(sum(1 for d in mix if d > i)) for i in range(max(mix)))
    result["mixed_step"] = {
        "depths": mix, "measured_s": measured, "predicted_s": predicted,
        "ratio": measured / predicted,
        "uniform_costs_s": {f"{d}x{n}": c for (d, n), c in cost.items()},
    }  # fmt: skip

    # 5) memory
    result["kv_bytes_per_token"] = {d: engines[best_tag].cache.bytes_per_token(d) for d in depths}
    # 6) balcony: exit layers' steps against the cost model
    if model.exit_layers:
        result["exit_layer_steps"] = exit_layer_steps(eng, args.trials)
    result["peak_rss_MiB"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result["wall_s"] = time.perf_counter() - t_start
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(table(result))
    return 0


def exit_steps_main(args: argparse.Namespace) -> int:
    """Only section 6 (a short run): fp32, the model's exit layers."""
    model = on_own_thread(lambda: models.load(args.model, device="cpu", dtype=torch.float32))
    if not model.exit_layers:
        print(f"{args.model}: no exit layers (method {model.method})", file=sys.stderr)
        return 2
    eng = on_own_thread(lambda: Engine(model, EngineConfig(kv_cache_memory=1 << 28)))
    result = {"model": args.model, "num_layers": model.num_layers, "trials": args.trials,
              "load_avg": os.getloadavg(),
              "kv_bytes_per_token": {d: eng.cache.bytes_per_token(d) for d in model.exits},
              "exit_layer_steps": exit_layer_steps(eng, args.trials)}  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(exit_table(result))
    return 0


def exit_table(r: dict[str, Any]) -> str:
    x = r["exit_layer_steps"]
    out = [
        f"Exit-layer steps (batch 1, fp32): layer {x['layer_s'] * 1e3:.2f} ms, head + rest "
        f"{x['head_s'] * 1e3:.2f} ms (fitted on depths without an exit layer: "
        + ", ".join(f"{d}: {t * 1e3:.1f}" for d, t in x["fit_steps_s"].items()) + " ms)",
        "",
        "| exit | layers run | measured ms | head + (e+1) layers ms | ratio |",
        "|---:|---:|---:|---:|---:|",
    ]  # fmt: skip
    for e in x["exits"]:
        out.append(f"| {e['exit']} | {e['layers_run']} | {e['measured_s'] * 1e3:.2f} "
                   f"| {e['predicted_s'] * 1e3:.2f} | {e['ratio']:.3f} |")  # fmt: skip
    out.append(f"KV bytes per token: {r['kv_bytes_per_token']}")
    return "\n".join(out)


@torch.inference_mode()
def hf_decode_static(hf: Any, batch: Any, n: int) -> float:
    kw = dict(do_sample=False, eos_token_id=None, pad_token_id=0)
    hf.generate(**batch, max_new_tokens=2, min_new_tokens=2, **kw)  # warm-up
    t = time.perf_counter()
    hf.generate(**batch, max_new_tokens=n, min_new_tokens=n, **kw)
    return batch["input_ids"].shape[0] * n / (time.perf_counter() - t)


def table(r: dict[str, Any]) -> str:
    bw = r["bandwidth_GBps"]
    out = [
        f"Memory bandwidth (matrix-vector): fp32 {bw['fp32']:.1f} GB/s, bf16 {bw['bf16']:.1f} GB/s",
        "",
        "| depth | ours fp32 | ours bf16 | HF fp32 | HF bf16 | vs best HF "
        "| BW util ours fp32/bf16 | HF fp32/bf16 | time ratio | bytes ratio |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for x in r["batch1"]:
        out.append(
            f"| {x['depth']} | {x['ours_fp32_tok_s']:.1f} | {x['ours_bf16_tok_s']:.1f} "
            f"| {x['hf_fp32_tok_s']:.1f} | {x['hf_bf16_tok_s']:.1f} "
            f"| {x['speedup_vs_best_hf']:.2f}x "
            f"| {x['ours_fp32_bw_util']:.2f} / {x['ours_bf16_bw_util']:.2f} "
            f"| {x['hf_fp32_bw_util']:.2f} / {x['hf_bf16_bw_util']:.2f} "
            f"| {x['time_ratio_vs_full']:.3f} | {x['bytes_ratio_vs_full']:.3f} |"
        )
    b, m = r["batching"], r["mixed_step"]
    cb, st = b["continuous_16_tok_s"], b["hf_static_16_tok_s"]
    out += [
        "",
        f"Continuous batching, 16 staggered requests: fp32 {cb['fp32']:.1f}, bf16 "
        f"{cb['bf16']:.1f} tok/s; transformers static batch of 16: fp32 {st['fp32']:.1f}, "
        f"bf16 {st['bf16']:.1f} tok/s -> {b['speedup_vs_best_static']:.2f}x",
        f"Mixed-depth step (16 rows over {sorted(set(m['depths']))}): "
        f"{m['measured_s'] * 1e3:.1f} ms measured vs {m['predicted_s'] * 1e3:.1f} ms "
        f"predicted -> {m['ratio']:.2f}x",
        f"KV bytes per token by depth: {r['kv_bytes_per_token']}; "
        f"peak RSS {r['peak_rss_MiB']:.0f} MiB; wall {r['wall_s']:.0f} s",
    ]
    if "exit_layer_steps" in r:
        out += ["", exit_table(r)]
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
