"""Self-speculative decoding against plain full-depth decoding, side by side in one run.

For the default model (or --model: a SoFT checkpoint, or a balcony one whose exits draft
with their own decoder layer, e.g. --model runs/balcony):
  1) identity: greedy outputs of speculative and plain decoding on --prompts prompts, run
     together, a fifth of them at the shallowest exit and a fifth at a middle one (they
     decode plainly beside the speculating full-depth rows)
  2) acceptance rate and tokens per verify cycle by draft exit and k (batch 1)
  3) tokens/s at batch 1: plain vs speculative (each exit, k; with and without the
     frequent-token draft vocabulary), next to what the cost model predicts from the
     measured acceptance rate
  4) tokens/s at --batches (default 4 and 16): plain vs speculative at each exit with its
     best batch-1 setting, with the acceptance measured there

Writes JSON (--out) and prints a markdown table. Short runs: --prompts 50 --tokens 24
--probe 2 --exits 15,20 --ks 3,5 --vocabs 0 --batches 4.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import models
from server.engine.core import Engine, EngineConfig, on_own_thread
from server.engine.speculative import SpecConfig, expected_tokens
from server.engine.types import GenerationRequest, SamplingParams

INSTRUCTIONS = [
    "Give three tips for staying healthy.",
    "What are the three primary colors?",
    "Describe the structure of an atom.",
    "How can we reduce air pollution?",
    "Explain why the sky is blue.",
    "Write a short poem about the ocean.",
    "List five fruits that are red.",
    "Summarize the plot of Romeo and Juliet in two sentences.",
    "What is the capital of Japan and what is it known for?",
    "Explain photosynthesis to a child.",
]


def chat_prompts(model: models.SortedModel, n: int) -> list[list[int]]:
    tok = model.tokenizer
    out = []
    for i in range(n):
        q = INSTRUCTIONS[i % len(INSTRUCTIONS)] + ("" if i < len(INSTRUCTIONS) else f" ({i})")
        ids = tok.apply_chat_template(
            [{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True
        )
        out.append(list(ids["input_ids"] if hasattr(ids, "keys") else ids))
    return out


def run(
    engine: Engine, prompts: list[list[int]], n: int, depths: list[int] | None = None
) -> tuple[list[list[int]], float]:
    """Greedy generations of all prompts submitted together (at full depth, or `depths`);
    returns tokens and tok/s. The engine runs only for this measurement: one OpenMP team
    at a time (server/engine/core.py)."""
    params = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
    depth = [engine.model.num_layers] * len(prompts) if depths is None else depths

    async def one(i: int, p: list[int]) -> list[int]:
        req = GenerationRequest(f"s{i}-{time.monotonic_ns()}", tuple(p), params, depth[i])
        return [e.token_id for e in [e async for e in engine.submit(req)] if e.token_id is not None]

    async def main() -> list[list[int]]:
        return await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))

    with engine.running():
        t = time.perf_counter()
        out = asyncio.run(main())
        return out, sum(len(o) for o in out) / (time.perf_counter() - t)


def engine(model: models.SortedModel, spec: SpecConfig | None) -> Engine:
    """An engine built on a thread that ends (it packs weights); `run` starts it."""
    cfg = EngineConfig(kv_cache_memory=1 << 29, speculative=spec or SpecConfig())
    return on_own_thread(lambda: Engine(model, cfg))


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="default", help="model spec (models.load), e.g. "
                    "runs/balcony")  # fmt: skip
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--prompts", type=int, default=50, help="prompts for the identity check")
    ap.add_argument("--tokens", type=int, default=32, help="generated tokens per prompt")
    ap.add_argument("--exits", default="", help="draft exits to try; default: the model's")
    ap.add_argument("--ks", default="2,4,6", help="draft lengths to try")
    ap.add_argument("--draft-vocab", type=int, default=8192, help="frequent-token draft head")
    ap.add_argument("--vocabs", default="", help="draft vocabularies to try (0 = the full "
                    "head) [0,--draft-vocab]")  # fmt: skip
    ap.add_argument("--probe", type=int, default=4, help="prompts per batch-1 measurement")
    ap.add_argument("--batches", default="4,16", help="batch sizes to compare at")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    ap.add_argument("--out", default="docs/results/speculative.json", help="JSON output")
    args = ap.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    model = on_own_thread(lambda: models.load(args.model, device="cpu", dtype=args.dtype))
    L = model.num_layers
    exits = ints(args.exits) if args.exits else [e for e in model.exits if e < L]
    if len(exits) > 4:
        exits = exits[-4:]  # a base model allows every depth: try the deepest few
    ks = ints(args.ks)
    vocabs = ints(args.vocabs) if args.vocabs else [0, args.draft_vocab]
    prompts = chat_prompts(model, args.prompts)
    plain = engine(model, None)
    result: dict[str, Any] = {"model": args.model, "dtype": args.dtype, "num_layers": L,
                              "method": model.method, "tokens": args.tokens,
                              "prompts": args.prompts, "load_avg": os.getloadavg()}  # fmt: skip

    # 2) + 3) batch 1, a few prompts per setting; plain measured between settings
    probe = prompts[: args.probe]

    def batch1(e: Engine) -> float:
        rates = [run(e, [p], args.tokens)[1] for p in probe]
        return sum(rates) / len(rates)

    base = batch1(plain)
    rows = []
    for exit_ in exits:
        for k in ks:
            for vocab in vocabs:
                spec = engine(model, SpecConfig(mode="auto", exit=exit_, k=k, draft_vocab=vocab))
                rate = batch1(spec)
                rows.append(
                    {
                        "exit": exit_,
                        "k": k,
                        "draft_vocab": vocab or model.cfg.vocab_size,
                        "tok_s": rate,
                        "speedup": rate / base,
                        **counters(spec, exit_, k),
                    }
                )
                print(f"exit {exit_} k {k} vocab {vocab}: acc {rows[-1]['acceptance']:.2f} "
                      f"{rate:.1f} tok/s ({rate / base:.2f}x)", file=sys.stderr)  # fmt: skip
        base = 0.5 * (base + batch1(plain))  # re-measure: drift on a shared machine
    result["plain_batch1_tok_s"] = base
    result["batch1"] = rows
    best = max(rows, key=lambda r: r["speedup"])
    result["best"] = best

    def config(row: dict[str, Any], max_batch: int) -> SpecConfig:
        vocab = 0 if row["draft_vocab"] == model.cfg.vocab_size else int(row["draft_vocab"])
        return SpecConfig(mode="auto", exit=int(row["exit"]), k=int(row["k"]),
                          draft_vocab=vocab, max_batch=max_batch)  # fmt: skip

    # 1) identity on every prompt, greedy, beside shallow rows; every full-depth row drafts
    shallow, middle = min(model.exits), sorted(model.exits)[len(model.exits) // 2]
    depths = [shallow if i % 5 == 1 else middle if i % 5 == 3 else L for i in range(len(prompts))]
    spec = engine(model, config(best, max_batch=len(prompts)))
    ref, _ = run(plain, prompts, args.tokens, depths)
    got, _ = run(spec, prompts, args.tokens, depths)
    same = sum(a == b for a, b in zip(ref, got, strict=True))
    result["identity"] = {"prompts": len(prompts), "identical": same,
                          "depths": {str(d): depths.count(d) for d in sorted(set(depths))},
                          **counters(spec, int(best["exit"]), int(best["k"]))}  # fmt: skip

    # 4) batches: plain vs each exit at its best batch-1 setting
    result["batched"] = {}
    for b in ints(args.batches):
        group = (prompts * b)[:b]
        p_rate = run(plain, group, args.tokens)[1]
        per_exit = []
        for exit_ in exits:
            row = max((r for r in rows if r["exit"] == exit_), key=lambda r: r["speedup"])
            spec = engine(model, config(row, max_batch=max(b, 4)))
            s_rate = run(spec, group, args.tokens)[1]
            per_exit.append({"exit": exit_, "k": row["k"], "draft_vocab": row["draft_vocab"],
                             "spec_tok_s": s_rate, "speedup": s_rate / p_rate,
                             **counters(spec, exit_, int(row["k"]))})  # fmt: skip
            print(f"batch {b} exit {exit_}: {s_rate / p_rate:.2f}x", file=sys.stderr)
        top = max(per_exit, key=lambda r: r["speedup"])
        result["batched"][b] = {"plain_tok_s": p_rate, "spec_tok_s": top["spec_tok_s"],
                                "speedup": top["speedup"], "by_exit": per_exit}  # fmt: skip
    result["expected_tokens_formula"] = "E = (1 - a^k) / (1 - a); speed-up = E / (k c_d + c_v)"
    result["example_expected_tokens"] = expected_tokens(best["acceptance"], int(best["k"]))
    result["wall_s"] = time.perf_counter() - t0
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(table(result))
    return 0 if same == len(prompts) else 1


def counters(spec: Engine, exit_: int, k: int) -> dict[str, float]:
    """What a run measured at `exit_`: acceptance, tokens per cycle, and the cost model's
    predicted speed-up at that acceptance."""
    st = spec.speculator.stats
    acc = st.accepted.get(exit_, 0) / max(1, st.drafted.get(exit_, 0))
    spec.speculator._ewma[exit_] = acc  # the model's prediction at this rate
    return {
        "acceptance": acc,
        "tokens_per_cycle": st.emitted.get(exit_, 0) / max(1, st.cycles.get(exit_, 0)),
        "predicted_speedup": spec.speculator.speedup(exit_, spec.model.num_layers, k),
        "cycles": st.cycles.get(exit_, 0),
    }


def table(r: dict[str, Any]) -> str:
    out = [
        f"Plain full-depth decoding at batch 1: {r['plain_batch1_tok_s']:.1f} tok/s "
        f"({r['dtype']}); greedy identity: {r['identity']['identical']}/"
        f"{r['identity']['prompts']} prompts identical",
        "",
        "| draft exit | k | draft vocab | acceptance | tokens/cycle | tok/s | speed-up "
        "| predicted |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for x in r["batch1"]:
        out.append(
            f"| {x['exit']} | {x['k']} | {x['draft_vocab']} | {x['acceptance']:.2f} "
            f"| {x['tokens_per_cycle']:.2f} | {x['tok_s']:.1f} | {x['speedup']:.2f}x "
            f"| {x['predicted_speedup']:.2f}x |"
        )
    out.append("")
    for b, v in r["batched"].items():
        out.append(
            f"Batch {b}: plain {v['plain_tok_s']:.1f} tok/s, speculative {v['spec_tok_s']:.1f} "
            f"tok/s -> {v['speedup']:.2f}x ("
            + ", ".join(f"exit {x['exit']} k {x['k']}: {x['speedup']:.2f}x at acceptance "
                        f"{x['acceptance']:.2f}" for x in v["by_exit"]) + ")"
        )  # fmt: skip
    out.append(f"load average at start: {', '.join(f'{x:.1f}' for x in r['load_avg'])}")
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
