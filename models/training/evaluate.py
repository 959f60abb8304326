"""`soft-eval`: per-depth quality of one or more checkpoints on held-out instruction data.

    soft-eval runs/sft=SFT runs/soft=SoFT --data data/alpaca_en_demo.json --records 899: \
        --depths 15,20,25,30 --out docs/quality/eval

For every checkpoint (any spec `models.load` accepts, optionally `SPEC=LABEL`) and depth:
response cross-entropy and perplexity (teacher-forced, response tokens only), greedy
generations scored by ROUGE-L against the reference and against the same checkpoint's
full-depth output (agreement), and measured generation tokens/s. Writes OUT.json, OUT.md
(a markdown table) and OUT.png (quality vs depth, one line per checkpoint; quality vs speed).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

import models
from models.generate import greedy_generate
from models.llama import SortedModel
from models.training.data import (
    IGNORE,
    DataError,
    Dataset,
    collate,
    iter_eval_batches,
    load_dataset,
    split_spec,
)
from models.training.data import parse_range as parse_records

log = logging.getLogger("soft-eval")


@dataclass(frozen=True)
class DepthResult:
    depth: int
    ce: float  # mean response cross-entropy, nats/token
    ppl: float
    rouge_l: float | None  # F-measure vs the reference response, mean over samples
    agreement: float | None  # ROUGE-L F vs this checkpoint's full-depth generation
    tokens_per_s: float | None  # greedy generation incl. prefill, batch 1
    sample: str | None = None  # first generation, for the docs
    ce_by_data: dict[str, float] = field(default_factory=dict)  # every --data set's CE
    token_agreement: float | None = None  # top-1 = full depth's greedy token, first 32
    tokens_per_s_b16: float | None = None  # greedy decode, 16 rows in one batch
    samples: list[str] = field(default_factory=list)  # generations for the docs


@dataclass(frozen=True)
class CheckpointResult:
    label: str
    spec: str
    method: str
    exits: tuple[int, ...]
    num_layers: int
    depths: list[DepthResult] = field(default_factory=list)


@torch.inference_mode()
def response_ce(model: SortedModel, data: Dataset, depths: list[int], batch_size: int,
                progress: bool = False) -> dict[int, float]:  # fmt: skip
    """Mean response CE per depth, one pass through the layers per batch: the base's
    residual stream is carried from one depth to the next (`hidden(start_layer=, h=)`);
    a balcony exit layer runs on a copy of it."""
    sums = dict.fromkeys(depths, 0.0)
    count = 0
    pad = 0
    batches = list(iter_eval_batches(data.examples, batch_size))
    for mb in tqdm(batches, desc="cross-entropy", disable=not progress, leave=False):
        b = collate(mb, pad)  # right padding + causal attention: pads never reach real tokens
        ids = b.input_ids.to(model.device)
        n, t = ids.shape
        pos = torch.arange(t, device=model.device).expand(n, t)
        targets = b.labels[:, 1:].to(model.device)
        select = targets != IGNORE  # (B, T-1)
        flat = targets[select]
        count += int(select.sum())
        h, done = None, 0
        for d in sorted(depths):
            # the base's residual stream, carried deeper; an exit layer runs on a copy
            h = model.hidden(ids, pos, [d] * n, start_layer=done, h=h, exit_layers=False)
            done = d
            out = h
            if model.exit_layer(d) is not None:
                out = model.hidden(None, pos, [d] * n, start_layer=d, h=h.clone())
            logits = model.head(out[:, :-1][select][None], [d])[0]  # (N, V)
            sums[d] += float(F.cross_entropy(logits.float(), flat, reduction="sum"))
    return {d: sums[d] / max(count, 1) for d in depths}


def rouge_l(pred: str, ref: str) -> float:
    from rouge_score import rouge_scorer

    scorer = _SCORER.get("s") or rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    _SCORER["s"] = scorer
    if pred.strip() == ref.strip():
        return 1.0  # also two empty outputs: they agree
    if not pred.strip() or not ref.strip():
        return 0.0
    return float(scorer.score(ref, pred)["rougeL"].fmeasure)


_SCORER: dict[str, Any] = {}


def generations(model: SortedModel, data: Dataset, depths: list[int], samples: int,
                max_new_tokens: int, progress: bool = False,
                ) -> dict[int, tuple[list[str], float, list[list[int]]]]:  # fmt: skip
    """Greedy generations for the first `samples` held-out prompts at each depth.
    Returns {depth: (texts, tokens/s at batch 1, token ids)}."""
    tok = model.tokenizer
    eos = tuple(i for i in {tok.eos_token_id, getattr(tok, "pad_token_id", None)} if i is not None)
    out: dict[int, tuple[list[str], float, list[list[int]]]] = {}
    chosen = data.examples[:samples]
    for d in tqdm(depths, desc="generation", disable=not progress, leave=False):
        texts, all_ids, ntok, secs = [], [], 0, 0.0
        for ex in chosen:
            prompt = torch.tensor(ex.input_ids[: ex.prompt_len])
            t0 = time.perf_counter()
            ids = greedy_generate(model, prompt, d, max_new_tokens, eos)
            secs += time.perf_counter() - t0
            ntok += len(ids)
            all_ids.append(ids)
            texts.append(tok.decode([i for i in ids if i not in eos], skip_special_tokens=True))
        out[d] = (texts, ntok / secs if secs > 0 else math.nan, all_ids)
    return out


AGREEMENT_TOKENS = 32  # greedy agreement is measured over the full model's first 32 tokens


@torch.inference_mode()
def token_agreement(model: SortedModel, data: Dataset, full: list[list[int]], depths: list[int]
                    ) -> dict[int, float]:  # fmt: skip
    """Per depth, the fraction of the full model's first greedy tokens that the sub-model
    also predicts (top-1) given the same prefix: teacher-forced on the full model's own
    continuation, so one early disagreement does not decide every later token. This is
    also what a speculative draft at that depth would have accepted."""
    hits, total = dict.fromkeys(depths, 0), 0
    for ex, cont in zip(data.examples, full, strict=False):
        cont = cont[:AGREEMENT_TOKENS]
        if not cont:
            continue
        prompt = list(ex.input_ids[: ex.prompt_len])
        ids = torch.tensor([prompt + cont], device=model.device)
        target = torch.tensor(cont, device=model.device)
        for d in depths:
            pred = model.logits(ids, d)[0, len(prompt) - 1 : -1].argmax(-1)  # (len(cont),)
            hits[d] += int((pred == target).sum())
        total += len(cont)
    return {d: hits[d] / total if total else math.nan for d in depths}


@torch.inference_mode()
def decode_speed(model: SortedModel, prompt: list[int], depth: int, rows: int, steps: int = 24
                 ) -> float:  # fmt: skip
    """Greedy decode tokens/s of `rows` copies of one prompt in one batch (after prefill)."""
    from models.generate import DenseKVCache

    cache = DenseKVCache(model.num_kv_layers, model.scale)
    ids = torch.tensor([prompt] * rows, device=model.device)
    pos = torch.arange(len(prompt), device=model.device).expand(rows, -1)
    h = model.hidden(ids, pos, [depth] * rows, cache)
    nxt = model.head(h[:, -1:], [depth] * rows).argmax(-1)  # (rows, 1)
    t0 = time.perf_counter()
    for step in range(steps):
        p = torch.full((rows, 1), len(prompt) + step, device=model.device)
        h = model.hidden(nxt, p, [depth] * rows, cache)
        nxt = model.head(h, [depth] * rows).argmax(-1)
    return rows * steps / (time.perf_counter() - t0)


def evaluate(spec: str, label: str, data_specs: list[str], records: slice,
             depths: list[int] | None, args: argparse.Namespace) -> CheckpointResult:  # fmt: skip
    """Every per-depth figure of one checkpoint. The first data set is the primary one:
    generations, ROUGE-L and agreement use its first `--gen-samples` prompts."""
    model = models.load(spec, device="cpu", dtype=torch.float32, quantization=args.quantization)
    if model.tokenizer is None:
        raise DataError(f"{spec}: no tokenizer files; soft-eval needs one")
    ds = [d for d in (depths or list(model.exits)) if 1 <= d <= model.num_layers]
    if model.num_layers not in ds:
        ds.append(model.num_layers)  # agreement is measured against full depth
    ds = sorted(set(ds))
    progress = not args.no_progress
    sets = {}
    for item in data_specs:
        path, rng = split_spec(item)
        sets[item] = load_dataset(path, model.tokenizer, args.max_length, "skip",
                                  rng if "@" in item else records)  # fmt: skip
    ce_by = {name: response_ce(model, d, ds, args.batch_size, progress) for name, d in sets.items()}
    data = sets[data_specs[0]]
    refs = [r.messages[-1]["content"] if r.messages else (r.text or "")
            for r in data.records[: args.gen_samples]]  # fmt: skip
    gens = generations(model, data, ds, args.gen_samples, args.max_new_tokens, progress)
    full_texts, full_ids = gens[model.num_layers][0], gens[model.num_layers][2]
    agree_tok = token_agreement(model, data, full_ids, ds) if full_ids else {}
    prompt = list(data.examples[0].input_ids[: data.examples[0].prompt_len])
    results = []
    for d in ds:
        texts, tps, _ = gens.get(d, ([], math.nan, []))
        score = [rouge_l(p, r) for p, r in zip(texts, refs, strict=False)]
        agree = [rouge_l(p, f) for p, f in zip(texts, full_texts, strict=False)]
        b16 = decode_speed(model, prompt, d, 16) if args.speed_b16 else None
        ce = ce_by[data_specs[0]][d]
        results.append(DepthResult(
            depth=d, ce=round(ce, 4), ppl=round(math.exp(min(ce, 50.0)), 2),
            rouge_l=round(sum(score) / len(score), 4) if score else None,
            agreement=round(sum(agree) / len(agree), 4) if agree else None,
            tokens_per_s=round(tps, 1) if texts else None,
            sample=texts[0] if texts else None,
            ce_by_data={name: round(c[d], 4) for name, c in ce_by.items()},
            token_agreement=round(agree_tok[d], 4) if d in agree_tok else None,
            tokens_per_s_b16=round(b16, 1) if b16 else None,
            samples=texts[: args.show_samples],
        ))  # fmt: skip
    return CheckpointResult(label, spec, model.method, tuple(model.exits), model.num_layers,
                            results)  # fmt: skip


def markdown_table(results: list[CheckpointResult]) -> str:
    names = list(results[0].depths[0].ce_by_data) if results and results[0].depths else []
    extra = "".join(f" CE {Path(split_spec(n)[0]).stem} |" for n in names[1:])
    lines = [f"| checkpoint | method | depth | CE (nats) |{extra} ppl | ROUGE-L | agreement | "
             "token agreement | tok/s b1 | tok/s b16 |",
             "|---|---|---:|---:|" + "---:|" * (len(names) + 5)]  # fmt: skip

    def f(x: float | None, spec: str) -> str:
        return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)

    for r in results:
        for d in r.depths:
            others = "".join(f" {f(d.ce_by_data.get(n), '.3f')} |" for n in names[1:])
            lines.append(
                f"| {r.label} | {r.method} | {d.depth} | {d.ce:.3f} |{others} {f(d.ppl, '.1f')} | "
                f"{f(d.rouge_l, '.3f')} | {f(d.agreement, '.3f')} | "
                f"{f(d.token_agreement, '.3f')} | {f(d.tokens_per_s, '.1f')} | "
                f"{f(d.tokens_per_s_b16, '.1f')} |"
            )
    return "\n".join(lines) + "\n"


def plot(results: list[CheckpointResult], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for r in results:
        xs = [d.depth for d in r.depths]
        axes[0].plot(xs, [d.ce for d in r.depths], marker="o", label=r.label)
        axes[1].plot(xs, [d.rouge_l or 0.0 for d in r.depths], marker="o", label=r.label)
        pts = [(d.tokens_per_s, d.ce) for d in r.depths if d.tokens_per_s]
        if pts:
            style = "--" if r.method == "base" else "-"  # the base truncated: the floor
            axes[2].plot(*zip(*pts, strict=True), style, marker="o", label=r.label)
    axes[0].set(xlabel="depth (layers)", ylabel="response CE (nats/token)", yscale="log",
                title="held-out cross-entropy vs depth")  # fmt: skip
    axes[1].set(xlabel="depth (layers)", ylabel="ROUGE-L F vs reference",
                title="generation quality vs depth")  # fmt: skip
    axes[2].set(xlabel="measured tokens/s (greedy, batch 1)", ylabel="response CE (nats/token)",
                yscale="log", title="quality vs speed (dashed: the base truncated)")  # fmt: skip
    for ax in axes:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="soft-eval", description=__doc__,
                                formatter_class=argparse.RawTextHelpFormatter)  # fmt: skip
    p.add_argument("checkpoints", nargs="+", help="model specs, each optionally SPEC=LABEL")
    p.add_argument(
        "--data",
        required=True,
        nargs="+",
        help="held-out data files (PATH or PATH@START:END); CE on each, generations on the\nfirst",
    )
    p.add_argument("--records", default=None, help="START:END records to use (e.g. 899:)")
    p.add_argument(
        "--depths", default=None, help="comma-separated depths (default: each checkpoint's exits)"
    )
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--gen-samples", type=int, default=20, help="prompts generated per depth")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--show-samples", type=int, default=0, help="generations kept per depth")
    p.add_argument(
        "--quantization",
        choices=("none", "int8", "int4", "bf16"),
        default="none",
        help="weight-only quantization of every checkpoint (as soft-serve --quantization)",
    )
    p.add_argument(
        "--no-speed-b16",
        dest="speed_b16",
        action="store_false",
        help="skip the batch-16 decode speed per depth",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="output prefix: writes OUT.json, OUT.md, OUT.png (default\n"
        "runs/eval/soft-eval-<date>-<time>, never over an earlier run)",
    )
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.gen_samples < 0 or args.max_new_tokens < 1 or args.batch_size < 1:
        parser.error("--gen-samples must be >= 0, --max-new-tokens and --batch-size >= 1")
    for item in args.data:
        if not split_spec(item)[0].is_file():
            parser.error(f"--data {item}: no such file (try `make data`)")
    try:
        records = parse_records(args.records)
        depths = [int(x) for x in args.depths.split(",")] if args.depths else None
    except ValueError as e:
        parser.error(str(e))
    results = []
    for item in tqdm(args.checkpoints, desc="checkpoints", disable=args.no_progress):
        spec, _, label = item.partition("=")
        try:
            results.append(evaluate(spec, label or spec, args.data, records, depths, args))
        except (FileNotFoundError, DataError, models.CheckpointError) as e:
            parser.error(f"{spec}: {e}")
    write_outputs(results, args)


def write_outputs(results: list[CheckpointResult], args: argparse.Namespace) -> None:
    out: Path = args.out or Path("runs/eval") / time.strftime("soft-eval-%Y%m%d-%H%M%S")
    args.out = out
    out.parent.mkdir(parents=True, exist_ok=True)
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    payload = {"config": config, "results": [asdict(r) for r in results]}
    out.with_suffix(".json").write_text(json.dumps(payload, indent=2) + "\n")
    table = markdown_table(results)
    out.with_suffix(".md").write_text(table)
    plot(results, out.with_suffix(".png"))
    print(table)
    log.info("wrote %s.{json,md,png}", out)


if __name__ == "__main__":
    main()
