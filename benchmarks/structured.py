"""Structured outputs at every exit: what a JSON schema does for a shallow exit.

For the default model (or --model), --prompts extraction prompts (short synthetic
sentences about a person: name, age, city, occupation; written below), greedy, at every
exit, each with and without the schema (response_format json_schema's constraint, through
the engine directly):
  - valid: the share of answers that parse as JSON and are valid under the schema
  - field accuracy: the share of fields equal to the full-depth constrained answer's (and,
    as a second column, to the sentence's own facts)
  - tokens/s of the whole batch (all prompts submitted together)
and the mask overhead: the grammar's mask fill + its application per decode step at
batch 1 and 16, against that batch's plain decode step (the engine's own EWMA).

Writes docs/results/structured.{json,md,png} (--out-dir). A smoke run:
  python -m benchmarks.structured --model CKPT --prompts 2 --max-tokens 48 --out-dir /tmp/x
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

import jsonschema
import torch

import models
from server.engine.core import Engine, EngineConfig, on_own_thread
from server.engine.sampling import sample_rows
from server.engine.scheduler import Sequence
from server.engine.types import GenerationRequest, SamplingParams
from server.serving.protocol import StructuredSpec
from server.serving.structured import Grammar, Grammars

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 130},
        "city": {"type": "string", "maxLength": 40},
        "occupation": {"type": "string", "maxLength": 40},
    },
    "required": ["name", "age", "city", "occupation"],
    "additionalProperties": False,
}
FIELDS = tuple(SCHEMA["required"])
NAMES = ["Ada Lovelace", "Omar Haddad", "Mei Chen", "Lars Berg", "Priya Nair", "Tom Okafor",
         "Sofia Rossi", "Jonas Weber", "Aiko Tanaka", "Diego Ramos", "Fatima Zahra",
         "Liam Murphy"]  # fmt: skip
CITIES = ["London", "Cairo", "Shanghai", "Oslo", "Chennai", "Lagos", "Rome", "Berlin",
          "Kyoto", "Lima", "Rabat", "Dublin"]  # fmt: skip
JOBS = ["engineer", "teacher", "nurse", "pilot", "chef", "architect", "lawyer", "farmer",
        "painter", "pharmacist", "journalist", "baker"]  # fmt: skip
TEMPLATES = [
    "{name} is a {age}-year-old {job} who lives in {city}.",
    "Meet {name}: {age} years old, works as a {job}, based in {city}.",
    "After years abroad, {name} ({age}) settled in {city} and now works as a {job}.",
]


def facts(n: int) -> list[dict[str, Any]]:
    """n people, each a different mix of name, age, city and occupation."""
    return [
        {
            "name": NAMES[i % 12],
            "age": 19 + (i * 7) % 60,
            "city": CITIES[(i * 5 + 3) % 12],
            "occupation": JOBS[(i * 7 + 1) % 12],
        }  # fmt: skip
        for i in range(n)
    ]


def prompts(model: models.SortedModel, people: list[dict[str, Any]]) -> list[list[int]]:
    tok = model.tokenizer
    out = []
    for i, p in enumerate(people):
        text = TEMPLATES[i % len(TEMPLATES)].format(job=p["occupation"], **p)
        ask = (f"{text}\nExtract the person's name, age, city and occupation as JSON with "
               'the keys "name", "age", "city", "occupation".')  # fmt: skip
        ids = tok.apply_chat_template(
            [{"role": "user", "content": ask}], add_generation_prompt=True, tokenize=True
        )
        out.append(list(ids["input_ids"] if hasattr(ids, "keys") else ids))
    return out


def run(
    engine: Engine, ids: list[list[int]], depth: int, max_tokens: int, grammar: Grammar | None
) -> tuple[list[str], float]:
    """Greedy answers of every prompt submitted together; their text and tokens/s."""
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    tok = engine.model.tokenizer

    async def one(i: int, p: list[int]) -> list[int]:
        constraint = None if grammar is None else grammar.matcher()
        rid = f"s{i}-{time.monotonic_ns()}"
        req = GenerationRequest(rid, tuple(p), params, depth, constraint=constraint)
        return [e.token_id async for e in engine.submit(req) if e.token_id is not None]

    async def main() -> list[list[int]]:
        return await asyncio.gather(*(one(i, p) for i, p in enumerate(ids)))

    with engine.running():
        t = time.perf_counter()
        out = asyncio.run(main())
        rate = sum(len(o) for o in out) / (time.perf_counter() - t)
    return [str(tok.decode(o, skip_special_tokens=True)) for o in out], rate


def parse(text: str) -> dict[str, Any] | None:
    """The answer as a schema-valid object, or None."""
    try:
        value = json.loads(text)
        jsonschema.validate(value, SCHEMA)
    except (ValueError, jsonschema.ValidationError):
        return None
    return value if isinstance(value, dict) else None


def accuracy(answers: list[dict[str, Any] | None], refs: list[dict[str, Any] | None]) -> float:
    """Share of fields equal to the reference's (an invalid answer scores 0)."""
    hits = total = 0
    for a, r in zip(answers, refs, strict=True):
        if r is None:
            continue
        total += len(FIELDS)
        hits += 0 if a is None else sum(a.get(f) == r.get(f) for f in FIELDS)
    return hits / total if total else 0.0


def mask_overhead(engine: Engine, grammar: Grammar, batch: int, repeats: int) -> float:
    """Seconds per decode step that masks add at `batch` rows: fill every row's bitmask and
    sample with it, minus sampling without (matchers held mid-document, in a string)."""
    tok = engine.model.tokenizer
    prefix = tok('{"name": "Ada', add_special_tokens=False)["input_ids"]
    vocab = engine.model.cfg.vocab_size
    seqs = []
    for i in range(batch):
        matcher = grammar.matcher()
        assert all(matcher.accept(t) for t in prefix)
        req = GenerationRequest(f"m{i}", (1,), SamplingParams(temperature=0.0), 1,
                                constraint=matcher)  # fmt: skip
        seqs.append(Sequence(request=req, tokens=[1], depth=1))
    logits = torch.randn(batch, vocab)
    params = [s.request.params for s in seqs]
    gens: list[torch.Generator | None] = [None] * batch

    def timed(masked: bool) -> float:
        t = time.perf_counter()
        for _ in range(repeats):
            masks = Engine._masks(seqs, vocab) if masked else None
            sample_rows(logits, params, gens, masks=masks)
        return (time.perf_counter() - t) / repeats

    timed(True)
    return max(0.0, timed(True) - timed(False))


def step_seconds(engine: Engine, ids: list[list[int]], depth: int, batch: int) -> float:
    """The plain decode step at `batch` rows (the engine's EWMA after a short run)."""
    rows = (ids * batch)[:batch]
    run(engine, rows, depth, 24, None)
    return engine.stats().decode_step_seconds


def markdown(result: dict[str, Any]) -> str:
    lines = [
        "| exit | constrained | valid | field acc. vs full-depth constrained | field acc. vs "
        "facts | tokens/s |",
        "|---:|:---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['depth']} | {'yes' if r['constrained'] else 'no'} | {r['valid']:.0%} | "
            f"{r['accuracy_vs_full']:.0%} | {r['accuracy_vs_facts']:.0%} | "
            f"{r['tokens_per_s']:.1f} |"
        )
    lines += ["", "| batch | plain decode step (ms) | mask overhead per step (ms) | share |",
              "|---:|---:|---:|---:|"]  # fmt: skip
    for o in result["mask_overhead"]:
        lines.append(f"| {o['batch']} | {o['step_ms']:.2f} | {o['mask_ms']:.3f} | "
                     f"{o['share']:.1%} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot", file=sys.stderr)
        return
    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    for constrained, style in ((True, "o-"), (False, "s--")):
        rows = [r for r in result["rows"] if r["constrained"] == constrained]
        label = "schema" if constrained else "free"
        ax[0].plot([r["depth"] for r in rows], [r["valid"] for r in rows], style, label=label)
        ax[1].plot([r["depth"] for r in rows], [r["accuracy_vs_full"] for r in rows], style,
                   label=label)  # fmt: skip
    ax[0].set(xlabel="exit (layers)", ylabel="schema-valid answers", ylim=(-0.05, 1.05))
    ax[1].set(xlabel="exit (layers)", ylabel="fields as full depth (constrained)",
              ylim=(-0.05, 1.05))  # fmt: skip
    for a in ax:
        a.legend()
        a.grid(alpha=0.3)
    fig.suptitle(f"Structured outputs by exit: {result['model']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="default", help="model spec (models.load)")
    ap.add_argument("--prompts", type=int, default=36, help="extraction prompts")
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--repeats", type=int, default=50, help="mask timing repeats")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    ap.add_argument("--out-dir", default="docs/results", help="structured.{json,md,png} here")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = on_own_thread(lambda: models.load(args.model))
    engine = on_own_thread(lambda: Engine(model, EngineConfig(kv_cache_memory=1 << 29)))
    eos = set(model.cfg.eos_token_ids)
    if model.tokenizer.eos_token_id is not None:
        eos.add(model.tokenizer.eos_token_id)
    grammars = Grammars(model.tokenizer, model.cfg.vocab_size, eos)
    t = time.perf_counter()
    grammar = grammars.compile_now(StructuredSpec.schema(SCHEMA, "schema"))
    compile_s = time.perf_counter() - t
    people = facts(args.prompts)
    ids = prompts(model, people)
    exits = sorted(set(model.exits) | {model.num_layers})
    answers: dict[tuple[int, bool], list[dict[str, Any] | None]] = {}
    rates: dict[tuple[int, bool], float] = {}
    for depth in reversed(exits):  # full depth first: the reference
        for constrained in (True, False):
            texts, rate = run(engine, ids, depth, args.max_tokens,
                              grammar if constrained else None)  # fmt: skip
            answers[depth, constrained] = [parse(x) for x in texts]
            rates[depth, constrained] = rate
            print(f"exit {depth} {'schema' if constrained else 'free'}: {rate:.1f} tok/s",
                  file=sys.stderr)  # fmt: skip
    full = answers[exits[-1], True]
    rows = [
        {
            "depth": d,
            "constrained": c,
            "valid": sum(a is not None for a in answers[d, c]) / len(ids),
            "accuracy_vs_full": accuracy(answers[d, c], full),
            "accuracy_vs_facts": accuracy(answers[d, c], list(people)),
            "tokens_per_s": rates[d, c],
        }
        for d in exits
        for c in (True, False)
    ]
    overhead = []
    for batch in (1, 16):
        step = step_seconds(engine, ids, exits[-1], batch)
        mask = mask_overhead(engine, grammar, batch, args.repeats)
        overhead.append({"batch": batch, "step_ms": step * 1e3, "mask_ms": mask * 1e3,
                         "share": mask / step if step else 0.0})  # fmt: skip
    result = {
        "model": args.model,
        "prompts": len(ids),
        "max_tokens": args.max_tokens,
        "schema": SCHEMA,
        "compile_s": compile_s,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "rows": rows,
        "mask_overhead": overhead,
    }
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "structured.json").write_text(json.dumps(result, indent=2) + "\n")
    table = markdown(result)
    (out / "structured.md").write_text(table)
    plot(result, out / "structured.png")
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
