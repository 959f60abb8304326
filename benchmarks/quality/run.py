"""The paper's comparison, reproduced small: base, SFT, SoFT (full), SoFT (LoRA), early-exit.

    nice -n 19 python benchmarks/quality/run.py --steps 200 --out docs/quality/comparison

Same data (the first 899 records of alpaca_en_demo; the last 100 held out), same steps,
batch and exits for every method. Early-exit starts from this run's SFT checkpoint (the
paper's baseline: frozen fine-tuned backbone, one trained head per exit). Each method's
checkpoint lands in RUNS/<method>; a method whose checkpoint already exists is not retrained
(re-run the script after an interruption; each training run also has --resume state).
`--reuse soft-lora=runs/default` takes an existing checkpoint for a method instead — only
fair when it was trained with the same steps and data (its soft.json says). Writes OUT.json,
OUT.md and OUT.png through soft-eval and prints the table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
METHODS = ("base", "sft", "soft-full", "soft-lora", "early-exit")
BASE = "smollm2-135m-instruct"


def train_args(method: str, sft_dir: Path, lr: float) -> list[str]:
    """The method-specific part of each soft-train command (LoRA takes a 3x higher LR)."""
    return {
        "sft": ["--model", BASE, "--method", "sft", "--lr", str(lr)],
        "soft-full": ["--model", BASE, "--method", "soft", "--lr", str(lr)],
        "soft-lora": [
            "--model",
            BASE,
            "--method",
            "soft",
            "--lora-rank",
            "16",
            "--save-delta",
            "--lr",
            str(3 * lr),
        ],
        "early-exit": ["--model", str(sft_dir), "--method", "early-exit", "--lr", str(lr)],
    }[method]


def merge(paths: list[Path], out: Path) -> None:
    """Combine soft-eval JSON files (e.g. evaluated in parallel) into one table and plot."""
    from models.training.evaluate import CheckpointResult, DepthResult, markdown_table, plot

    results = []
    for path in paths:
        for r in json.loads(path.read_text())["results"]:
            depths = [DepthResult(**d) for d in r.pop("depths")]
            results.append(CheckpointResult(**{**r, "exits": tuple(r["exits"])}, depths=depths))
    payload = {
        "merged_from": [str(p) for p in paths],
        "results": [json.loads(p.read_text())["results"] for p in paths],
    }
    payload["results"] = [x for group in payload["results"] for x in group]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(payload, indent=2) + "\n")
    table = markdown_table(results)
    out.with_suffix(".md").write_text(table)
    plot(results, out.with_suffix(".png"))
    print(table)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--data", type=Path, default=ROOT / "data" / "alpaca_en_demo.json")
    p.add_argument("--train-records", default=":899")
    p.add_argument("--eval-records", default="899:")
    p.add_argument("--exits", default="15,20,25,30")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--grad-accum", type=int, default=4)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-4, help="full fine-tuning LR (LoRA: x3)")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast in training")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--reuse", action="append", default=[], help="METHOD=CHECKPOINT_DIR")
    p.add_argument("--runs", type=Path, default=ROOT / "runs" / "quality")
    p.add_argument("--gen-samples", type=int, default=10)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "quality" / "comparison")
    p.add_argument(
        "--merge",
        type=Path,
        nargs="+",
        default=None,
        help="only combine these soft-eval JSON files into OUT.{json,md,png}",
    )
    args = p.parse_args(argv)
    if args.merge:
        merge(args.merge, args.out)
        return
    if not args.data.is_file():
        p.error(f"{args.data}: missing; run `make data` first")
    methods = [m for m in args.methods.split(",") if m]
    if unknown := set(methods) - set(METHODS):
        p.error(f"unknown methods {sorted(unknown)}; choose from {', '.join(METHODS)}")
    reuse = dict(item.split("=", 1) for item in args.reuse)
    if "early-exit" in methods and "sft" not in methods and "sft" not in reuse:
        p.error("early-exit starts from the SFT checkpoint: include sft (or --reuse sft=DIR)")
    common = [
        "--data",
        str(args.data),
        "--records",
        args.train_records,
        "--exits",
        args.exits,
        "--steps",
        str(args.steps),
        "--batch-size",
        str(args.batch_size),
        "--grad-accum",
        str(args.grad_accum),
        "--max-length",
        str(args.max_length),
        "--save-every",
        "20",
        "--resume",
        "--warmup",
        str(max(1, args.steps // 20)),
    ]
    if args.bf16:
        common.append("--bf16")
    if args.threads:
        common += ["--threads", str(args.threads)]
    specs, timings = [], {}
    for method in methods:
        if method == "base":
            specs.append(f"{BASE}=base")
            continue
        out = Path(reuse.get(method, args.runs / method))
        if not (out / "soft.json").exists():
            sft_dir = Path(reuse.get("sft", args.runs / "sft"))
            extra = train_args(method, sft_dir, args.lr)
            train_cmd = [sys.executable, "-m", "models.training.train"]
            cmd = [*train_cmd, *extra, *common, "--out", str(out)]
            print("$", " ".join(cmd), flush=True)
            t0 = time.time()
            subprocess.run(cmd, check=True, cwd=ROOT)
            timings[method] = round(time.time() - t0, 1)
        specs.append(f"{out}={method}")
    eval_cmd = [
        sys.executable,
        "-m",
        "models.training.evaluate",
        *specs,
        "--data",
        str(args.data),
        "--records",
        args.eval_records,
        "--depths",
        args.exits,
        "--gen-samples",
        str(args.gen_samples),
        "--max-new-tokens",
        str(args.max_new_tokens),
        "--out",
        str(args.out),
    ]
    if args.threads:
        eval_cmd += ["--threads", str(args.threads)]
    print("$", " ".join(eval_cmd), flush=True)
    subprocess.run(eval_cmd, check=True, cwd=ROOT)
    result = json.loads(args.out.with_suffix(".json").read_text())
    result["benchmark"] = {
        "args": {k: str(v) for k, v in vars(args).items()},
        "train_seconds": timings,
    }
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
