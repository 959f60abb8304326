"""Parity of the dynamic-depth runner with transformers, at every depth."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import models
from models import kernels
from models.generate import DenseKVCache, greedy_generate
from models.weights import PackedWeight, _onednn
from tests.conftest import make_hf_model, save_checkpoint


def truncated_logits(hf: Any, ids: torch.Tensor, depth: int) -> torch.Tensor:
    """transformers' model cut to `depth` layers + final norm + lm_head."""
    m = copy.deepcopy(hf)
    m.model.layers = nn.ModuleList(list(m.model.layers)[:depth])
    m.config.num_hidden_layers = depth
    with torch.no_grad():
        return m(ids).logits


CONFIGS = {
    "llama-gqa-untied": {},
    "llama-mha-tied": {"num_key_value_heads": 4, "tie_word_embeddings": True},
    "llama3-rope": {
        "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                            "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                            "original_max_position_embeddings": 64},
    },
    "linear-rope": {"rope_parameters": {"rope_type": "linear", "rope_theta": 10000.0,
                                        "factor": 2.0}},
    "yarn-rope": {"rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                      "original_max_position_embeddings": 64}},
    "qwen2-bias": {"model_type": "qwen2"},
    "mistral": {"model_type": "mistral", "sliding_window": None},
    "head-dim": {"head_dim": 32},
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_logits_match_transformers_at_every_depth(name: str, tmp_path: Path) -> None:
    hf = make_hf_model(seed=1, **copy.deepcopy(CONFIGS[name]))
    model = models.load(save_checkpoint(hf, tmp_path / name), device="cpu")
    ids = torch.randint(3, 256, (2, 40), generator=torch.Generator().manual_seed(0))
    for depth in range(1, model.num_layers + 1):
        ours = model.logits(ids, depth)
        ref = truncated_logits(hf, ids, depth)
        assert ours.shape == (2, 40, 256)
        diff = (ours - ref).abs().max().item()
        assert diff <= 1e-4, f"{name} depth {depth}: max abs diff {diff}"


def test_incremental_decode_equals_full_forward(tiny_dir: Path) -> None:
    model = models.load(tiny_dir, device="cpu")
    ids = torch.randint(3, 256, (1, 24), generator=torch.Generator().manual_seed(3))
    for depth in (1, 2, 4):
        full = model.logits(ids, depth)[0]  # (T, V)
        cache = DenseKVCache(model.num_layers, model.scale)
        with torch.inference_mode():
            pos = torch.arange(16).view(1, -1)
            steps = [model.head(model.hidden(ids[:, :16], pos, [depth], cache), [depth])[0]]
            for t in range(16, 24):
                h = model.hidden(ids[:, t : t + 1], torch.tensor([[t]]), [depth], cache)
                steps.append(model.head(h, [depth])[0])
        inc = torch.cat(steps)
        assert (inc - full).abs().max().item() <= 1e-4
        assert cache.length(depth - 1) == 24
        assert all(k is None for k in cache.k[depth:]), "layers >= depth must stay untouched"


def test_mixed_depth_batch_equals_each_row_alone(tiny_dir: Path) -> None:
    model = models.load(tiny_dir, device="cpu")
    ids = torch.randint(3, 256, (3, 12), generator=torch.Generator().manual_seed(4))
    depths = [4, 3, 1]
    pos = torch.arange(12).expand(3, 12)
    with torch.inference_mode():
        mixed = model.head(model.hidden(ids, pos, depths), depths)
    for row, d in enumerate(depths):
        alone = model.logits(ids[row : row + 1], d)[0]
        assert (mixed[row] - alone).abs().max().item() <= 1e-5


def test_greedy_generate_matches_transformers_generate(tiny_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = models.load(tiny_dir, device="cpu")
    hf = AutoModelForCausalLM.from_pretrained(str(tiny_dir), dtype=torch.float32).eval()
    ids = torch.randint(3, 256, (1, 10), generator=torch.Generator().manual_seed(5))
    for depth in (2, 4):
        m = copy.deepcopy(hf)
        m.model.layers = nn.ModuleList(list(m.model.layers)[:depth])
        m.config.num_hidden_layers = depth
        ref = m.generate(ids, max_new_tokens=12, do_sample=False, min_new_tokens=12,
                         eos_token_id=None, pad_token_id=0)[0, 10:].tolist()  # fmt: skip
        assert greedy_generate(model, ids[0], depth, 12) == ref


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_close_to_fp32(tiny_dir: Path, dtype: torch.dtype) -> None:
    ref = models.load(tiny_dir, device="cpu")
    half = models.load(tiny_dir, device="cpu", dtype=dtype)
    assert half.dtype == dtype
    ids = torch.randint(3, 256, (1, 16), generator=torch.Generator().manual_seed(6))
    a, b = ref.logits(ids, 4), half.logits(ids, 4).float()
    rel = ((a - b).norm() / a.norm()).item()
    assert rel < 0.02, f"relative error {rel}"


def test_weight_bytes_scale_with_depth(tiny_dir: Path) -> None:
    model = models.load(tiny_dir, device="cpu")
    per_layer = model.weight_bytes(2) - model.weight_bytes(1)
    assert per_layer > 0
    assert model.weight_bytes(4) - model.weight_bytes(2) == 2 * per_layer


@pytest.mark.slow
def test_default_model_matches_transformers_at_a_few_depths() -> None:
    from transformers import AutoModelForCausalLM

    from models.loader import BASE_NAME, resolve

    directory = resolve(BASE_NAME)
    model = models.load(BASE_NAME, device="cpu")
    hf = AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32).eval()
    ids = torch.tensor([model.tokenizer.encode("The capital of France is Paris, and the")])
    for depth in (8, 20, 30):
        diff = (model.logits(ids, depth) - truncated_logits(hf, ids, depth)).abs().max().item()
        assert diff <= 1e-3, f"depth {depth}: {diff}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_weights_give_the_same_logits(tiny_dir: Path, dtype: torch.dtype) -> None:
    plain = models.load(tiny_dir, device="cpu", dtype=dtype)
    packed = models.load(tiny_dir, device="cpu", dtype=dtype)
    sizes = [packed.weight_bytes(d) for d in (1, 4)]
    packed.pack()
    packed.pack()  # idempotent
    # packed where oneDNN runs, left as they are elsewhere; the logits agree either way
    onednn = _onednn(dtype)  # bf16 packing needs AVX512-BW/VL/DQ or AVX-NE-CONVERT
    # fp32 matrices keep their plain layout beside oneDNN's for soft-serve's kernels
    both = dtype == torch.float32 and kernels.available()
    for w in (packed.weights.layers[0].wqkv, packed.weights.head):
        assert isinstance(w, PackedWeight) == both
        assert (w.packed if isinstance(w, PackedWeight) else w).is_mkldnn == onednn
    assert [packed.weight_bytes(d) for d in (1, 4)] == sizes
    ids = torch.randint(3, 256, (2, 12), generator=torch.Generator().manual_seed(8))
    for depth in (1, 2, 4):
        a, b = plain.logits(ids, depth).float(), packed.logits(ids, depth).float()
        rel = ((a - b).norm() / a.norm()).item()
        assert rel < (1e-5 if dtype == torch.float32 else 1e-2), f"depth {depth}: {rel}"
