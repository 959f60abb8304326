"""benchmarks/kv_cache.py: teacher-forced answers through the engine's decode path."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

import models
from benchmarks.kv_cache import answer_logits, compare, markdown
from models.training.data import IGNORE, Example
from server.engine.core import Engine, EngineConfig


def example(index: int, prompt: int, answer: int, seed: int) -> Example:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 200, (prompt + answer,), generator=g).tolist()
    return Example(tuple(ids), tuple([IGNORE] * prompt + ids[prompt:]), prompt, index)


@pytest.mark.parametrize("depth", [2, 4])
def test_the_decode_paths_answer_logits_are_the_dense_forwards(tiny_dir: Path, depth: int) -> None:
    model = models.load(tiny_dir, device="cpu", quantization="none")
    engine = Engine(model, EngineConfig(kv_cache_memory=1 << 22, prefix_cache=False,
                                        kv_cache_dtype="float32"))  # fmt: skip
    ex = example(0, 7, 20, seed=1)
    logits, targets = answer_logits(engine, ex, depth)
    dense = model.logits(torch.tensor([ex.input_ids]), depth)[0]  # (T, V): t predicts t + 1
    assert targets == list(ex.input_ids[7:])
    assert torch.allclose(logits, dense[6:-1].float(), atol=1e-3, rtol=1e-3)
    assert engine.cache.num_used == 0  # its blocks went back


def test_the_comparison_reports_each_caches_ce_and_their_agreement(tiny_dir: Path) -> None:
    model = models.load(tiny_dir, device="cpu", quantization="none")
    examples = [example(i, 5 + i, 12, seed=i) for i in range(3)]
    rows = compare(model, examples, [4])
    (row,) = rows
    assert row["depth"] == 4 and row["tokens"] == 3 * 12
    nll = 0.0
    for ex in examples:  # the dense forward's CE over the same answer tokens
        lp = torch.log_softmax(model.logits(torch.tensor([ex.input_ids]), 4)[0].float(), -1)
        nll -= sum(lp[t - 1, ex.input_ids[t]].item() for t in range(ex.prompt_len, len(ex.labels)))
    assert math.isclose(row["ce_float32"], nll / row["tokens"], rel_tol=1e-4)
    assert abs(row["ce_float16"] - row["ce_float32"]) < 1e-2
    assert 0.9 <= row["top1_agreement"] <= 1.0 and row["max_logit_gap"] >= 0.0
    settings = {"records": 3, "data": "x", "max_length": 256, "quantization": "none",
                "torch_threads": 1, "load_average": [0.0, 0.0]}  # fmt: skip
    table = markdown({"rows": rows, **settings})
    assert "| 4 | 36 |" in table
