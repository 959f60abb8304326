"""Fixtures: tiny random LLaMA-family checkpoints written to disk (2-4 layers, hidden 64)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def tiny_hf_config(**overrides: Any) -> Any:
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    model_type = overrides.pop("model_type", "llama")
    base: dict[str, Any] = dict(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    base.update(overrides)
    cls = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}[model_type]
    return cls(**base)


def make_hf_model(seed: int = 0, **overrides: Any) -> Any:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = tiny_hf_config(**overrides)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    with torch.no_grad():  # random init is tiny; widen it so layers matter
        for p in model.parameters():
            if p.dim() == 1 and "norm" in "".join(n for n, q in model.named_parameters() if q is p):
                p.uniform_(0.8, 1.2)
            elif p.dim() >= 1:
                p.normal_(0.0, 0.08)
    return model


def save_checkpoint(model: Any, path: Path, soft: dict[str, Any] | None = None) -> Path:
    import json

    model.save_pretrained(str(path), safe_serialization=True)
    if soft is not None:
        (path / "soft.json").write_text(json.dumps(soft))
    return path


@pytest.fixture
def tiny_dir(tmp_path: Path) -> Path:
    """A 4-layer random LLaMA checkpoint with exits [2, 4]."""
    model = make_hf_model()
    return save_checkpoint(
        model, tmp_path / "tiny", {"format": "soft-checkpoint/1", "method": "soft", "exits": [2, 4]}
    )
