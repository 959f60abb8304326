"""Weight-only int8 / int4 matrices: kernel numerics, the quantized runner, GGUF Q4 blocks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import models
from models import loader
from models.quantization import Quantization
from models.weights import GROUP_SIZE, Int4Codes, Int4Weight, Int8Weight, quantize
from tests.conftest import make_hf_model


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_linear_matches_dequantized_reference(mode: str) -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(96, 128, generator=g) * 0.05
    q = quantize(w, Quantization(mode))
    deq = q.dequantize()
    assert deq.shape == w.shape and q.shape == w.shape
    # rounding error of the weights themselves: at most half a step
    if mode == "int8":
        step = w.abs().amax(1, keepdim=True) / 127
    else:
        groups = w.view(96, -1, GROUP_SIZE)
        step = ((groups.amax(-1) - groups.amin(-1)) / 15).repeat_interleave(GROUP_SIZE, 1)
    assert ((deq - w).abs() <= 0.6 * step).all()
    for rows in (1, 5, 16):  # decode, odd and fused batch sizes; 3-d input too
        x = torch.randn(rows, 3, 128, generator=g)
        bias = torch.randn(96, generator=g)
        y = models.weights.linear(x, q, bias)
        assert y.shape == (rows, 3, 96) and y.dtype == torch.float32
        # the same math on the same values: bf16 activations, fp32 sums, one bf16 rounding
        ref = x.bfloat16().float() @ deq.T
        assert ((y - bias) - ref).abs().max().item() <= 2**-8 * ref.abs().max().item()


def test_int4_codes_survive_packing_exactly() -> None:
    g = torch.Generator().manual_seed(1)
    q = torch.randint(0, 16, (48, 64), generator=g, dtype=torch.uint8)
    scale = (torch.rand(48, 64 // GROUP_SIZE, generator=g) + 0.5).bfloat16().float()
    zero = (torch.randn(48, 64 // GROUP_SIZE, generator=g)).bfloat16().float()
    codes = Int4Codes(q, scale, zero - 8 * scale)  # zero exactly bf16: nothing rounds
    assert torch.equal(Int4Weight.from_codes(codes).dequantize(), codes.dequantize())


def test_bad_quantization_mode_is_a_clear_error(tiny_dir: Path) -> None:
    assert Quantization.parse("none") is Quantization.parse(None) is Quantization.NONE
    with pytest.raises(ValueError, match="int8, int4, bf16, none; got 'int3'"):
        models.load(tiny_dir, device="cpu", quantization="int3")
    with pytest.raises(ValueError, match="in % 32 == 0"):
        Int4Weight.quantize(torch.randn(16, 40))


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_model_logits_close_to_fp32(tiny_dir: Path, mode: str) -> None:
    fp32 = models.load(tiny_dir, device="cpu")
    qm = models.load(tiny_dir, device="cpu", quantization=mode)
    assert qm.quantization == mode
    assert isinstance(qm.weights.layers[0].wqkv, Int8Weight if mode == "int8" else Int4Weight)
    assert isinstance(qm.weights.head, Int8Weight)  # the head is int8 in both modes
    assert qm.embed.dtype == torch.float32  # the embedding stays a float table
    qm.pack()  # the engine packs afterwards: quantized matrices stay as they are
    assert isinstance(qm.weights.layers[3].w_down, Int8Weight if mode == "int8" else Int4Weight)
    ids = torch.randint(3, 256, (2, 12), generator=torch.Generator().manual_seed(5))
    # random gaussian weights are int4's worst case (~9 % rms error per matrix)
    bound = {"int8": 0.03, "int4": 0.3}[mode]
    for depth in (1, 2, 4):
        err = rel_err(qm.logits(ids, depth), fp32.logits(ids, depth))
        assert err < bound, f"{mode} depth {depth}: relative logits error {err:.3f}"


def test_quantized_mixed_depth_batch_equals_each_row_alone(tiny_dir: Path) -> None:
    model = models.load(tiny_dir, device="cpu", quantization="int4")
    ids = torch.randint(3, 256, (3, 10), generator=torch.Generator().manual_seed(6))
    depths = [4, 3, 1]
    pos = torch.arange(10).expand(3, 10)
    with torch.inference_mode():
        mixed = model.head(model.hidden(ids, pos, depths), depths)
        # two groups (decode rows + a prompt) share each layer's products
        h1, h2 = model.hidden_groups(
            [
                (model.embed_ids(ids[:2, -1:]), pos[:2, -1:], [4, 2], None),
                (model.embed_ids(ids[2:]), pos[2:], [3], None),
            ]  # fmt: skip
        )
    for row, d in enumerate(depths):
        alone = model.logits(ids[row : row + 1], d)[0]
        assert (mixed[row] - alone).abs().max().item() <= 1e-4
    alone = model.head(model.hidden(ids[2:], pos[2:], [3]), [3])
    assert (model.head(h2, [3]) - alone).abs().max().item() <= 1e-4
    assert h1.shape == (2, 1, 64)


def test_weight_bytes_shrink_with_quantization(tiny_dir: Path) -> None:
    fp32 = models.load(tiny_dir, device="cpu")
    i8 = models.load(tiny_dir, device="cpu", quantization="int8")
    i4 = models.load(tiny_dir, device="cpu", quantization="int4")
    cfg = fp32.cfg
    h, f, v = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    qkv = (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim
    mats = qkv * h + h * h + 2 * f * h + h * f  # elements per layer
    rows = qkv + h + 2 * f + h
    norms = 2 * h
    head8 = v * h + 2 * v  # int8 codes + bf16 scale per row
    for d in (1, 4):
        assert fp32.weight_bytes(d) == d * (4 * mats + 4 * norms) + 4 * v * h + h
        assert i8.weight_bytes(d) == d * (mats + 2 * rows + 4 * norms) + head8 + h
        # int4: half a byte per value + a bf16 scale and zero per group of 32
        assert i4.weight_bytes(d) == d * (mats // 2 + mats // 32 * 4 + 4 * norms) + head8 + h
    assert 3.0 < fp32.weight_bytes(4) / i8.weight_bytes(4) < 4.0
    assert i4.weight_bytes(4) < i8.weight_bytes(4)


# -- GGUF ------------------------------------------------------------------------------
def _llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """How llama.cpp's convert_hf_to_gguf.py stores q/k rows (for its rope)."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def write_tiny_gguf(hf: Any, path: Path, kind: str) -> Path:
    """A llama GGUF of `hf`'s weights, every matrix in `kind` (Q4_0 / Q4_1) blocks."""
    import gguf

    c = hf.config
    qtype = getattr(gguf.GGMLQuantizationType, kind)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(c.vocab_size)
    sd = {k: v.detach().float().numpy() for k, v in hf.state_dict().items()}

    def mat(name: str, value: np.ndarray) -> None:
        w.add_tensor(name, gguf.quants.quantize(value, qtype), raw_dtype=qtype)

    mat("token_embd.weight", sd["model.embed_tokens.weight"])
    mat("output.weight", sd["lm_head.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    for i in range(c.num_hidden_layers):
        p, b = f"model.layers.{i}.", f"blk.{i}."
        w.add_tensor(b + "attn_norm.weight", sd[p + "input_layernorm.weight"])
        w.add_tensor(b + "ffn_norm.weight", sd[p + "post_attention_layernorm.weight"])
        mat(b + "attn_q.weight", _llama_cpp_permute(sd[p + "self_attn.q_proj.weight"],
                                                    c.num_attention_heads))  # fmt: skip
        mat(b + "attn_k.weight", _llama_cpp_permute(sd[p + "self_attn.k_proj.weight"],
                                                    c.num_key_value_heads))  # fmt: skip
        mat(b + "attn_v.weight", sd[p + "self_attn.v_proj.weight"])
        mat(b + "attn_output.weight", sd[p + "self_attn.o_proj.weight"])
        mat(b + "ffn_gate.weight", sd[p + "mlp.gate_proj.weight"])
        mat(b + "ffn_up.weight", sd[p + "mlp.up_proj.weight"])
        mat(b + "ffn_down.weight", sd[p + "mlp.down_proj.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1"])
def test_gguf_q4_blocks_round_trip(tmp_path: Path, kind: str) -> None:
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    hf = make_hf_model(seed=2)
    path = write_tiny_gguf(hf, tmp_path / f"tiny.{kind}.gguf", kind)
    # transformers' own reading of the file: dequantized, q/k rows un-permuted
    theirs = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=hf)["tensors"]
    cfg = models.ModelConfig.from_hf(hf.config)
    ours = loader.gguf_int4_weights(path, cfg)
    assert len(ours) == 4 * cfg.num_layers + 1  # every matrix from the file's blocks

    def check(name: str, ref: torch.Tensor) -> None:
        got = ours[name].dequantize()
        # the same codes; only d / m (fp16 in the file) are rounded to the kernel's bf16,
        # which moves a value by far less than a tenth of its group's step
        step = ref.view(ref.shape[0], -1, GROUP_SIZE)
        step = (step.amax(-1) - step.amin(-1)).repeat_interleave(GROUP_SIZE, 1) / 15
        assert ((got - ref).abs() <= 0.1 * step + 1e-6).all(), name

    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        check(
            f"layers.{i}.wqkv", torch.cat([theirs[p + f"self_attn.{x}_proj.weight"] for x in "qkv"])
        )
        check(f"layers.{i}.wo", theirs[p + "self_attn.o_proj.weight"])
        check(f"layers.{i}.w_gate_up", torch.cat([theirs[p + "mlp.gate_proj.weight"],
                                                  theirs[p + "mlp.up_proj.weight"]]))  # fmt: skip
        check(f"layers.{i}.w_down", theirs[p + "mlp.down_proj.weight"])
    check("head", theirs["lm_head.weight"])

    # whole model: the file's int4 blocks vs transformers' dequantized fp32 weights
    fp32 = loader.build(cfg, hf.config, dict(theirs), str(path))
    q = loader.build(cfg, hf.config, dict(theirs), str(path))
    q.prepare(Quantization.INT4, ours)
    assert q.weights.head is ours["head"]  # a Q4 head in the file is served as it is
    ids = torch.randint(3, 256, (2, 12), generator=torch.Generator().manual_seed(7))
    for depth in (2, 4):  # (soft-serve's kernels: int8 activations, 1.6-1.8 % here)
        err = rel_err(q.logits(ids, depth), fp32.logits(ids, depth))
        assert err < 0.02, f"depth {depth}: {err:.4f}"


def test_gguf_file_of_a_spec(tmp_path: Path) -> None:
    assert loader._gguf_file(tmp_path / "m.gguf") == tmp_path / "m.gguf"
    assert loader._gguf_file(str(tmp_path)) is None
    assert loader._gguf_file(loader.BASE_NAME) == loader.smollm2_gguf()


def test_delta_is_merged_before_quantizing(
    tiny_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from models.checkpoint import DELTA, SoftConfig, save_delta, write_soft_json

    delta_dir = tmp_path / "delta"
    delta_dir.mkdir()
    name = "model.layers.0.self_attn.q_proj.weight"
    a, b = torch.randn(4, 64), torch.randn(64, 4)
    save_delta(delta_dir / DELTA, {}, {name: (a, b)}, scale=0.25)
    write_soft_json(delta_dir, SoftConfig(method="soft", exits=(2, 4), base_model=str(tiny_dir)))
    # even with the base weights in a GGUF, a delta means floats first: no blocks are used
    monkeypatch.setattr(loader, "_gguf_file", lambda spec: tmp_path / "base.gguf")

    def no_blocks(*args: object) -> None:
        raise AssertionError("GGUF blocks used although a delta had to be merged")

    monkeypatch.setattr(loader, "gguf_int4_weights", no_blocks)
    merged = models.load(delta_dir, device="cpu").layers[0].wqkv
    for mode in ("int8", "int4"):
        q = models.load(delta_dir, device="cpu", quantization=mode).weights.layers[0].wqkv
        assert torch.equal(q.dequantize(), quantize(merged, Quantization(mode)).dequantize())


@pytest.mark.slow
def test_smollm2_q4_1_gguf_served_from_its_blocks() -> None:
    fp32 = models.load(loader.BASE_NAME, device="cpu")
    q = models.load(loader.BASE_NAME, device="cpu", quantization="int4")
    assert isinstance(q.weights.layers[0].wqkv, Int4Weight)
    assert isinstance(q.weights.head, Int8Weight)  # token_embd is Q8_0 in this file
    ids = fp32.tokenizer("The capital of France is", return_tensors="pt").input_ids
    for depth in (20, 30):
        assert rel_err(q.logits(ids, depth), fp32.logits(ids, depth)) < 0.05
