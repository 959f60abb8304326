"""The KV cache's element type against held-out data, through the engine's own decode path.

Each held-out record's prompt is prefilled, then its answer is fed one token a decode step,
as a served request runs (the paged cache, soft-serve's decode call); at every answer token
the step's logits give its cross-entropy and the top-1 token. Each depth runs with an fp32
cache and an fp16 one (what `--kv-cache-dtype auto` picks where the CPU kernels attend):

  - CE: nats per answer token, each cache type
  - top-1 agreement: the share of answer positions where both caches' logits pick the
    same token (a greedy continuation follows the fp32 one's choice there)
  - max |logit difference|: the largest gap between the two caches' logits, in nats

Writes docs/results/kv_cache.{json,md} (--out-dir). A smoke run:
  python -m benchmarks.kv_cache --data data/dpo_en_demo.json@:2 --depths 30 --out-dir /tmp/x
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

import models
from models.training.data import IGNORE, Example, load_dataset, split_spec
from server.engine.core import Engine, EngineConfig, on_own_thread
from server.engine.scheduler import Sequence
from server.engine.types import GenerationRequest, SamplingParams


@torch.inference_mode()
def answer_logits(engine: Engine, ex: Example, depth: int) -> tuple[torch.Tensor, list[int]]:
    """The logits (A, V) that predict each answer token of `ex` (A of them, its labelled
    positions after the first) and those tokens: the prompt prefilled in one forward, then
    one decode step per token, the record's own tokens fed (teacher forcing)."""
    ids, labels = list(ex.input_ids), ex.labels
    first = next(t for t in range(1, len(ids)) if labels[t] != IGNORE)
    params = SamplingParams(max_tokens=len(ids), ignore_eos=True)
    req = GenerationRequest(f"kv-{ex.index}", tuple(ids[:first]), params, depth)
    seq = Sequence(req, ids[:first], depth)
    assert engine.cache.allocate(seq, depth, len(ids) + 1), "the cache holds a record"
    runner, rows, targets = engine.runner, [], []
    try:
        logits = runner.forward([runner.prefill_group([seq])])[0].logits
        for t in range(first, len(ids)):
            if labels[t] != IGNORE:  # logits from ids[:t] predict ids[t]
                rows.append(logits[0].float())
                targets.append(ids[t])
            if t + 1 == len(ids):
                break
            seq.num_computed = len(seq.tokens)
            seq.tokens.append(ids[t])
            logits = runner.forward([runner.decode_group([seq])])[0].logits
    finally:
        engine.cache.free(seq)
    return torch.stack(rows), targets


def compare(model: Any, examples: list[Example], depths: list[int]) -> list[dict[str, Any]]:
    rows = []
    engines = {name: Engine(model, EngineConfig(kv_cache_memory=1 << 28, prefix_cache=False,
                                                kv_cache_dtype=name))
               for name in ("float32", "float16")}  # fmt: skip
    for depth in depths:
        nll = {name: 0.0 for name in engines}
        agree = count = 0
        gap = 0.0
        t0 = time.perf_counter()
        for i, ex in enumerate(examples):
            out = {name: answer_logits(e, ex, depth) for name, e in engines.items()}
            targets = torch.tensor(out["float32"][1])
            for name, (logits, _) in out.items():
                nll[name] += float(F.cross_entropy(logits, targets, reduction="sum"))
            a, b = out["float32"][0], out["float16"][0]
            agree += int((a.argmax(-1) == b.argmax(-1)).sum())
            gap = max(gap, float((a - b).abs().max()))
            count += len(targets)
            print(f"\rdepth {depth}: {i + 1}/{len(examples)} records, {count} answer tokens, "
                  f"{time.perf_counter() - t0:.0f} s", end="", file=sys.stderr)  # fmt: skip
        print(file=sys.stderr)
        rows.append({"depth": depth, "tokens": count, "ce_float32": nll["float32"] / count,
                     "ce_float16": nll["float16"] / count, "top1_agreement": agree / count,
                     "max_logit_gap": gap})  # fmt: skip
    return rows


def markdown(r: dict[str, Any]) -> str:
    head = (
        "| depth | answer tokens | CE fp32 cache | CE fp16 cache | difference "
        "| top-1 agreement | max logit gap |"
    )
    lines = [head, "|---:|---:|---:|---:|---:|---:|---:|"]
    for row in r["rows"]:
        diff = row["ce_float16"] - row["ce_float32"]
        lines.append(f"| {row['depth']} | {row['tokens']:,} | {row['ce_float32']:.4f} | "
                     f"{row['ce_float16']:.4f} | {diff:+.4f} | {row['top1_agreement']:.4f} | "
                     f"{row['max_logit_gap']:.3f} |")  # fmt: skip
    load = r["load_average"]
    lines += ["", f"{r['records']} records of {r['data']}, chat template, at most "
              f"{r['max_length']} tokens, weights {r['quantization']}, {r['torch_threads']} "
              f"threads; load average {load[0]:.2f} before, {load[1]:.2f} after."]  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="default", help="model spec (models.load)")
    ap.add_argument("--quantization", default="auto", help="weights' format (models.load)")
    ap.add_argument("--data", default="data/dpo_en_demo.json@:60",
                    help="held-out records, PATH[@START:END] (default: the DPO set soft-eval "
                    "reports)")  # fmt: skip
    ap.add_argument("--max-length", type=int, default=256, help="tokens per record, at most")
    ap.add_argument("--depths", default="20,30", help="comma-separated depths")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    ap.add_argument("--out-dir", default="docs/results", help="kv_cache.{json,md} here")
    args = ap.parse_args(argv)
    try:
        depths = [int(d) for d in args.depths.split(",")]
    except ValueError:
        ap.error(f"--depths: comma-separated integers, got {args.depths!r}")
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        model = on_own_thread(lambda: models.load(args.model, quantization=args.quantization))
    except (OSError, ValueError) as e:  # a missing model, a format it does not know
        ap.error(str(e))
    if bad := [d for d in depths if not 1 <= d <= model.num_layers]:
        ap.error(f"--depths must be in 1..{model.num_layers}, got {bad}")
    path, records = split_spec(args.data)
    try:
        data = load_dataset(path, model.tokenizer, args.max_length, records=records)
    except ValueError as e:  # DataError: a missing or unusable file
        ap.error(str(e))
    load0 = os.getloadavg()
    rows = on_own_thread(lambda: compare(model, data.examples, depths))
    result = {"model": args.model, "quantization": model.quantization.value, "data": args.data,
              "records": len(data.examples), "max_length": args.max_length,
              "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
              "load_average": [load0[0], os.getloadavg()[0]], "rows": rows}  # fmt: skip
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "kv_cache.json").write_text(json.dumps(result, indent=2) + "\n")
    table = markdown(result)
    (out / "kv_cache.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
