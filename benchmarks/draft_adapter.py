"""How far a trained draft head lifts self-speculative acceptance (issue 8's open question).

Speculation pays on this CPU only if the draft exit agrees with the full model on ~60 % of
tokens (docs/performance.md); the default model's exits 15 / 20 agree on 24–41 %. This
measures what a small trained adapter on top of an exit gains, without changing the
checkpoint: teacher-forced on the Alpaca records, it collects each exit's residual and the
full model's greedy next token, then trains per exit

    draft(h) = W · (x + B A x),  x = RMSNorm(h)      (A: r x H, B: H x r zero-initialised;
                                                      norm trained; W: the shared head's
                                                      first --vocab rows, frozen)

with cross-entropy on the full model's greedy token (self-distillation: what verification
accepts). Reports top-1 agreement on held-out records' response positions before and after.

    .venv/bin/python benchmarks/draft_adapter.py --out docs/results/draft_adapter.json  # ~11 min
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

import models
from models.training.data import IGNORE, load_dataset, parse_range


def collect(model: Any, examples: list[Any], exits: list[int]) -> dict[str, Any]:
    """Per position: the residual after each exit, the full model's greedy next token,
    whether it predicts a response token, and its record index."""
    feats: dict[int, list[torch.Tensor]] = {e: [] for e in exits}
    target, response, record = [], [], []
    full = model.num_layers
    with torch.inference_mode():
        for ex in tqdm(examples, desc="collect", unit="record"):
            ids = torch.tensor([ex.input_ids])
            pos = torch.arange(ids.shape[1])[None]
            h, done = None, 0
            for e in [*exits, full]:
                h = model.hidden(ids if h is None else None, pos, [e], start_layer=done, h=h)
                done = e
                if e != full:
                    feats[e].append(h[0].clone())
            target.append(model.head(h, [full])[0].argmax(-1))
            labels = torch.tensor(ex.labels)
            response.append(torch.cat([labels[1:] != IGNORE, torch.tensor([False])]))
            record.append(torch.full((ids.shape[1],), ex.index))
    return {
        "feats": {e: torch.cat(v) for e, v in feats.items()},
        "target": torch.cat(target),
        "response": torch.cat(response),
        "record": torch.cat(record),
    }


def train_exit(
    model: Any, x: torch.Tensor, target: torch.Tensor, train: torch.Tensor, test: torch.Tensor,
    vocab: int, rank: int, steps: int,
) -> dict[str, float]:  # fmt: skip
    hidden, eps = x.shape[1], model.cfg.rms_norm_eps
    norm = torch.nn.Parameter(model.norm.detach().float().clone())
    head = model.lm_head.detach().float()[:vocab]
    a = torch.nn.Parameter(torch.randn(rank, hidden) * 0.01)
    b = torch.nn.Parameter(torch.zeros(hidden, rank))

    def logits(h: torch.Tensor) -> torch.Tensor:
        y = F.rms_norm(h, (hidden,), norm, eps)
        return (y + (y @ a.T) @ b.T) @ head.T

    def agreement(mask: torch.Tensor) -> float:
        with torch.no_grad():
            hits = [
                (logits(x[mask][i : i + 4096]).argmax(-1) == target[mask][i : i + 4096]).float()
                for i in range(0, int(mask.sum()), 4096)
            ]
        return float(torch.cat(hits).mean())

    before = agreement(test)
    rows = torch.nonzero(train & (target < vocab))[:, 0]  # tokens the draft vocab can say
    opt = torch.optim.AdamW([norm, a, b], lr=1e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 1e-3, total_steps=steps, pct_start=0.05)
    g = torch.Generator().manual_seed(0)
    for _ in tqdm(range(steps), desc="train", unit="step", leave=False):
        batch = rows[torch.randint(len(rows), (1024,), generator=g)]
        loss = F.cross_entropy(logits(x[batch]), target[batch])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return {"before": before, "after": agreement(test), "train_after": agreement(train)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--data", type=Path, default=Path("data/alpaca_en_demo.json"))
    ap.add_argument("--train-records", default=":899", help="records to train on [:899]")
    ap.add_argument("--test-records", default="899:", help="held-out records [899:]")
    ap.add_argument("--exits", default="15,20", help="draft exits [15,20]")
    ap.add_argument("--vocab", type=int, default=8192, help="draft vocabulary [8192]")
    ap.add_argument("--rank", type=int, default=576, help="adapter rank [576: full]")
    ap.add_argument("--steps", type=int, default=600, help="training steps of 1024 [600]")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("runs/draft_adapter.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    t0 = time.monotonic()
    model = models.load(args.model, device="cpu", dtype=torch.float32)
    exits = [int(e) for e in args.exits.split(",")]
    examples = load_dataset(args.data, model.tokenizer, 256).examples
    train_range, test_range = parse_range(args.train_records), parse_range(args.test_records)
    n = max(ex.index for ex in examples) + 1
    train_ids = set(range(n)[train_range])
    test_ids = set(range(n)[test_range])
    data = collect(model, [ex for ex in examples if ex.index in train_ids | test_ids], exits)
    rec, resp, target = data["record"], data["response"], data["target"]
    train = torch.tensor([int(r) in train_ids for r in rec])
    test = torch.tensor([int(r) in test_ids for r in rec]) & resp
    result: dict[str, Any] = {
        "model": args.model, "vocab": args.vocab, "rank": args.rank, "steps": args.steps,
        "positions": len(target), "test_positions": int(test.sum()),
        "test_targets_in_draft_vocab": float((target[test] < args.vocab).float().mean()),
        "exits": {},
    }  # fmt: skip
    for e in exits:
        result["exits"][str(e)] = train_exit(
            model, data["feats"][e], target, train, test, args.vocab, args.rank, args.steps
        )
    result["wall_s"] = time.monotonic() - t0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    share = 100 * result["test_targets_in_draft_vocab"]
    print(f"held-out response positions: {result['test_positions']}, {share:.1f} % of "
          "their full-model tokens within the draft vocabulary")  # fmt: skip
    print("| exit | agreement, shared head | with the adapter | (train records) |")
    print("|---:|---:|---:|---:|")
    for e, r in result["exits"].items():
        print(f"| {e} | {r['before']:.3f} | {r['after']:.3f} | {r['train_after']:.3f} |")
    print(f"wall {result['wall_s'] / 60:.1f} min")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
