"""soft.json validation, clear errors for bad checkpoints, delta and early-exit loading."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import models
from models.checkpoint import (
    DELTA,
    EXIT_HEADS,
    CheckpointError,
    SoftConfig,
    read_soft_json,
    save_delta,
    write_soft_json,
)
from tests.conftest import make_hf_model, save_checkpoint


def write(directory: Path, **fields: object) -> None:
    data = {"format": "soft-checkpoint/1", "method": "soft", "exits": [2, 4]}
    data.update(fields)
    (directory / "soft.json").write_text(json.dumps(data))


def test_round_trip(tmp_path: Path) -> None:
    cfg = SoftConfig(method="soft", exits=(1, 3), base_model="x", training={"steps": 3},
                     latency_profile={"decode_ms": [1.0]})  # fmt: skip
    write_soft_json(tmp_path, cfg)
    assert read_soft_json(tmp_path, 4) == cfg
    assert json.loads((tmp_path / "soft.json").read_text())["format"] == "soft-checkpoint/1"


@pytest.mark.parametrize(
    ("fields", "field", "says"),
    [
        ({"format": "soft-checkpoint/9"}, "format", "soft-checkpoint/1"),
        ({"method": "magic"}, "method", "early-exit"),
        ({"exits": [2, 9]}, "exits", "1..4"),
        ({"exits": [0, 2]}, "exits", "1..4"),
        ({"exits": [4, 2]}, "exits", "sorted"),
        ({"exits": [2, 2, 4]}, "exits", "duplicates"),
        ({"exits": []}, "exits", "non-empty"),
        ({"exits": [1.5, 2]}, "exits", "integers"),
        ({"training": [1]}, "training", "object"),
    ],
)
def test_bad_soft_json_names_file_and_field(
    tiny_dir: Path, fields: dict, field: str, says: str
) -> None:
    write(tiny_dir, **fields)
    with pytest.raises(CheckpointError) as e:
        models.load(tiny_dir, device="cpu")
    msg = str(e.value)
    assert str(tiny_dir / "soft.json") in msg and f"'{field}'" in msg and says in msg


def test_invalid_json(tiny_dir: Path) -> None:
    (tiny_dir / "soft.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        models.load(tiny_dir, device="cpu")


def test_missing_weights(tiny_dir: Path) -> None:
    for f in tiny_dir.glob("*.safetensors"):
        f.unlink()
    with pytest.raises(CheckpointError, match=r"no \*\.safetensors"):
        models.load(tiny_dir, device="cpu")


def test_pickle_weights_are_refused(tiny_dir: Path) -> None:
    for f in tiny_dir.glob("*.safetensors"):
        f.unlink()
    (tiny_dir / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(CheckpointError, match="safetensors only"):
        models.load(tiny_dir, device="cpu")


def test_unsupported_architecture(tmp_path: Path) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    m = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64))
    m.save_pretrained(str(tmp_path))
    with pytest.raises(models.UnsupportedModel, match="model_type 'gpt2' is not supported"):
        models.load(tmp_path, device="cpu")


def test_missing_directory_says_nothing_is_downloaded() -> None:
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        models.load("meta-llama/Llama-2-7b-hf", device="cpu")


def test_directory_without_soft_json_is_base_with_every_depth(tiny_dir: Path) -> None:
    (tiny_dir / "soft.json").unlink()
    m = models.load(tiny_dir, device="cpu")
    assert m.method == "base" and m.exits == (1, 2, 3, 4) and m.num_layers == 4


def test_exits_and_method_are_read(tiny_dir: Path) -> None:
    m = models.load(tiny_dir, device="cpu")
    assert m.method == "soft" and m.exits == (2, 4)


def test_early_exit_heads_are_used(tiny_dir: Path) -> None:
    from safetensors.torch import save_file

    write(tiny_dir, method="early-exit")
    with pytest.raises(CheckpointError, match=EXIT_HEADS):
        models.load(tiny_dir, device="cpu")
    head = torch.randn(256, 64)
    save_file({"exits.2.lm_head.weight": head, "exits.2.norm.weight": torch.ones(64)},
              str(tiny_dir / EXIT_HEADS))  # fmt: skip
    plain = models.load(tiny_dir, device="cpu")
    assert set(plain.exit_heads) == {2}
    ids = torch.randint(3, 256, (1, 8))
    with torch.inference_mode():
        h = plain.hidden(ids, torch.arange(8).view(1, -1), [2])
        from models.weights import rms_norm

        expected = rms_norm(h, torch.ones(64), plain.cfg.rms_norm_eps) @ head.T
    assert torch.allclose(plain.logits(ids, 2), expected, atol=1e-5)
    # full depth keeps the model's own head
    (tiny_dir / "soft.json").unlink()
    assert torch.allclose(plain.logits(ids, 4), models.load(tiny_dir, device="cpu").logits(ids, 4))


def test_delta_checkpoint_applies_lora_and_full_tensors(tiny_dir: Path, tmp_path: Path) -> None:
    base = models.load(tiny_dir, device="cpu")
    delta_dir = tmp_path / "delta"
    delta_dir.mkdir()
    name = "model.layers.0.self_attn.q_proj.weight"
    a, b = torch.randn(4, 64), torch.randn(64, 4)  # rank 4: A (r, in), B (out, r)
    norm = torch.full((64,), 0.5)
    save_delta(delta_dir / DELTA, {"model.norm.weight": norm}, {name: (a, b)}, scale=0.25)
    write_soft_json(delta_dir, SoftConfig(method="soft", exits=(2, 4), base_model=str(tiny_dir)))
    tuned = models.load(delta_dir, device="cpu")
    assert tuned.exits == (2, 4)
    assert torch.allclose(tuned.norm, norm)
    q_rows = base.cfg.num_heads * base.cfg.head_dim
    expected = base.layers[0].wqkv[:q_rows] + 0.25 * (b @ a)
    assert torch.allclose(tuned.layers[0].wqkv[:q_rows], expected, atol=1e-5)
    assert torch.equal(tuned.layers[0].wqkv[q_rows:], base.layers[0].wqkv[q_rows:])


def test_delta_without_base_model_is_refused(tmp_path: Path) -> None:
    save_delta(tmp_path / DELTA, {}, {}, scale=1.0)
    write(tmp_path)
    with pytest.raises(CheckpointError, match="'base_model'"):
        models.load(tmp_path, device="cpu")


def test_shape_mismatch_names_the_weight(tmp_path: Path) -> None:
    hf = make_hf_model()
    d = save_checkpoint(hf, tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg["intermediate_size"] = 96
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="w_gate_up"):
        models.load(d, device="cpu")
