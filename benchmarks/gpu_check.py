"""The CUDA path in one call: correctness, then timings (bf16), on a random model.

    python benchmarks/gpu_check.py                       # 7B-shaped, cuda, bf16
    python benchmarks/gpu_check.py --shape tiny --device cpu --dtype float32   # dry run

1) correctness: the engine's greedy tokens at several depths (mixed batch, staggered)
   equal a plain greedy loop over `SortedModel.logits` on the same device and dtype
2) timings: batch-1 decode per depth, batches of 1/4/16/64 at full depth, each as
   tok/s and as a fraction of the device's measured memory bandwidth
No weights are downloaded: the weights are random (speed does not depend on their values).
Writes JSON (--out) and prints a table; exits 1 if a correctness check fails.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from models.llama import ModelConfig, SortedModel
from server.engine.core import Engine, EngineConfig
from server.engine.types import GenerationRequest, SamplingParams

SHAPES = {  # LLaMA-2-7B and a tiny one for dry runs
    "7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_layers=32,
               num_heads=32, num_kv_heads=32, head_dim=128),
    "tiny": dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_layers=4,
                 num_heads=4, num_kv_heads=2, head_dim=32),
}  # fmt: skip


def random_model(shape: str, device: str, dtype: torch.dtype, seed: int = 0) -> SortedModel:
    cfg = ModelConfig(
        **SHAPES[shape],  # type: ignore[arg-type]
        rms_norm_eps=1e-5, max_position_embeddings=4096, tie_word_embeddings=False,
        attention_bias=False, model_type="llama", rope_type="default", bos_token_id=1,
        eos_token_ids=(2,),
    )  # fmt: skip
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, cfg.head_dim, 2).float() / cfg.head_dim))
    with torch.device("meta"):
        model = SortedModel(cfg, inv_freq, 1.0)
    model = model.to_empty(device=device).to(dtype)
    g = torch.Generator(device=device).manual_seed(seed)
    for name, p in model.named_parameters():
        if "norm" in name:
            p.data.fill_(1.0)
        else:
            p.data.normal_(0.0, 0.02, generator=g)
    model.inv_freq = inv_freq.to(device)
    model.soft = model.soft.__class__(method="base", exits=tuple(range(1, cfg.num_layers + 1)))
    return model.eval()


def reference_greedy(model: SortedModel, prompt: list[int], depth: int, n: int) -> list[int]:
    ids = torch.tensor([prompt], device=model.device)
    out: list[int] = []
    for _ in range(n):
        tok = int(model.logits(ids, depth)[0, -1].argmax())
        out.append(tok)
        ids = torch.cat([ids, torch.tensor([[tok]], device=model.device)], 1)
    return out


def generate(engine: Engine, prompts: list[list[int]], depths: list[int], n: int,
             gap: float = 0.0) -> tuple[list[list[int]], float]:  # fmt: skip
    params = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)

    async def one(i: int) -> list[int]:
        await asyncio.sleep(gap * i)
        req = GenerationRequest(f"g{i}-{time.monotonic_ns()}", tuple(prompts[i]), params, depths[i])
        return [e.token_id async for e in engine.submit(req) if e.token_id is not None]

    async def main() -> list[list[int]]:
        return await asyncio.gather(*(one(i) for i in range(len(prompts))))

    t = time.perf_counter()
    out = asyncio.run(main())
    if engine.model.device.type == "cuda":
        torch.cuda.synchronize()
    return out, time.perf_counter() - t


def bandwidth(device: str, dtype: torch.dtype) -> float:
    n = 1 << 28 if device == "cuda" else 1 << 24
    a = torch.empty(n, dtype=dtype, device=device)
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    if device == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(10):
        b.copy_(a)
    if device == "cuda":
        torch.cuda.synchronize()
    return 2 * a.numel() * a.element_size() * 10 / (time.perf_counter() - t)  # read + write


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="7b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--out", default="gpu_check.json")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: run with --device cpu --shape tiny for a dry run", file=sys.stderr)
        return 2
    dtype = getattr(torch, args.dtype)
    result: dict[str, Any] = {"shape": args.shape, "device": args.device, "dtype": args.dtype}
    if args.device == "cuda":
        result["gpu"] = torch.cuda.get_device_name()

    # 1) correctness on a small model (exact greedy parity needs no near-ties: few layers)
    small = random_model("tiny", args.device, dtype, seed=1)
    eng = Engine(small, EngineConfig(kv_cache_memory=1 << 26))
    eng.start()
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 500, (int(n),), generator=g).tolist() for n in (5, 17, 9, 30)]
    depths = [4, 1, 3, 2]
    got, _ = generate(eng, prompts, depths, 12, gap=0.01)
    ok = [got[i] == reference_greedy(small, prompts[i], depths[i], 12) for i in range(4)]
    result["correct"] = ok
    eng.stop()

    # 2) timings on the full shape
    model = random_model(args.shape, args.device, dtype)
    L = model.num_layers
    engine = Engine(
        model, EngineConfig(kv_cache_memory=8 << 30 if args.device == "cuda" else 1 << 28)
    )
    engine.start()
    bw = bandwidth(args.device, dtype)
    result["bandwidth_GBps"] = bw / 1e9
    prompt = list(range(10, 42))
    rows = []
    for d in sorted({max(1, L // 4), L // 2, 3 * L // 4, L}):
        generate(engine, [prompt], [d], 4)  # warm-up
        _, dt = generate(engine, [prompt], [d], args.tokens)
        tok_s = args.tokens / dt
        rows.append({"depth": d, "batch": 1, "tok_s": tok_s,
                     "bw_util": tok_s * model.weight_bytes(d) / bw})  # fmt: skip
    for b in (4, 16, 64):
        _, dt = generate(engine, [prompt] * b, [L] * b, args.tokens)
        tok_s = b * args.tokens / dt
        rows.append({"depth": L, "batch": b, "tok_s": tok_s,
                     "bw_util": tok_s / b * model.weight_bytes(L) / bw})  # fmt: skip
    result["timings"] = rows
    engine.stop()
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"correctness (engine == reference greedy): {ok}")
    print(f"bandwidth {bw / 1e9:.0f} GB/s")
    print("| depth | batch | tok/s | steps/s x weight bytes / bandwidth |")
    print("|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['depth']} | {r['batch']} | {r['tok_s']:.1f} | {r['bw_util']:.2f} |")
    return 0 if all(ok) else 1


if __name__ == "__main__":
    sys.exit(main())
