"""A compact LLaMA-family forward written for serving at any depth.

Sub-model d = layers [0, d) -> final RMSNorm -> shared LM head (or, for `early-exit`
checkpoints, the exit's own norm and head; for `balcony` checkpoints, layers [0, d) ->
the exit's own decoder layer -> the shared norm and head). The forward runs a batch whose
rows may have different depths: rows are ordered by depth, deepest first, so at layer i
the rows still running are a prefix `[:n_i]` of the batch and no gather is ever needed; a
row that has reached its exit simply stops being updated.

Attention goes through a `KVStore` the caller owns (the engine's paged cache); the runner
only calls it for the layers a row actually runs, so nothing is ever touched at layers >= d.

The model holds the checkpoint's float weights; the forward multiplies only by the
matrices models.weights prepared from them (`SortedModel.weights`: fp32, or weight-only
int8 / int4 / bf16, chosen once by `prepare`; oneDNN's and soft-serve's kernels' layouts
added once by `pack`), and never chooses a format itself.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models import kernels
from models.checkpoint import SoftConfig, base_config
from models.kernels import PagedKV
from models.quantization import Quantization
from models.weights import (
    KERNEL_ROWS,
    LAYER_MATRICES,
    LayerWeights,
    ModelWeights,
    QuantizedWeight,
    head_weight,
    kernel_of,
    nbytes,
    project,
)

SUPPORTED_TYPES = ("llama", "mistral", "qwen2")
# rope variants whose frequencies do not depend on the sequence length at run time
STATIC_ROPE = ("default", "linear", "llama3", "yarn")


class UnsupportedModel(ValueError):
    """The config describes a model this runner cannot serve faithfully."""


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int  # the context window we serve (sliding window caps it)
    tie_word_embeddings: bool
    attention_bias: bool
    model_type: str
    rope_type: str
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]

    @classmethod
    def from_hf(cls, hf: Any, source: str = "config.json") -> ModelConfig:
        """Build from a transformers `PretrainedConfig`; refuse what we would serve wrongly."""
        mt = getattr(hf, "model_type", None)
        if mt not in SUPPORTED_TYPES:
            raise UnsupportedModel(
                f"{source}: model_type {mt!r} is not supported; soft-serve runs the "
                f"LLaMA block ({', '.join(SUPPORTED_TYPES)})"
            )
        act = getattr(hf, "hidden_act", "silu")
        if act != "silu":
            raise UnsupportedModel(f"{source}: hidden_act {act!r}; only SwiGLU (silu) is supported")
        if getattr(hf, "mlp_bias", False):
            raise UnsupportedModel(f"{source}: mlp_bias=true is not supported")
        rope = dict(getattr(hf, "rope_parameters", None) or {})
        rope_type = rope.get("rope_type", "default")
        if rope_type not in STATIC_ROPE:
            raise UnsupportedModel(
                f"{source}: rope_type {rope_type!r} is not supported ({', '.join(STATIC_ROPE)})"
            )
        heads = hf.num_attention_heads
        kv_heads = getattr(hf, "num_key_value_heads", None) or heads
        head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // heads
        max_pos = hf.max_position_embeddings
        if mt == "mistral" and getattr(hf, "sliding_window", None):
            # beyond the window the model attends differently; serve only where we are exact
            max_pos = min(max_pos, hf.sliding_window)
        if mt == "qwen2" and getattr(hf, "use_sliding_window", False) and hf.sliding_window:
            max_pos = min(max_pos, hf.sliding_window)
        eos = getattr(hf, "eos_token_id", None)
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        return cls(
            vocab_size=hf.vocab_size,
            hidden_size=hf.hidden_size,
            intermediate_size=hf.intermediate_size,
            num_layers=hf.num_hidden_layers,
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            rms_norm_eps=hf.rms_norm_eps,
            max_position_embeddings=max_pos,
            tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
            # qwen2 always has q/k/v biases; llama/mistral carry the flag
            attention_bias=mt == "qwen2" or bool(getattr(hf, "attention_bias", False)),
            model_type=mt,
            rope_type=rope_type,
            bos_token_id=getattr(hf, "bos_token_id", None),
            eos_token_ids=eos_ids,
        )


def rope_frequencies(hf: Any) -> tuple[Tensor, float]:
    """inv_freq (head_dim/2,) and the attention scaling, exactly as transformers computes
    them for this config (default, linear, llama3, yarn)."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope = dict(getattr(hf, "rope_parameters", None) or {})
    rope_type = rope.get("rope_type", "default")
    if rope_type == "default":
        base = rope.get("rope_theta", getattr(hf, "rope_theta", 10000.0))
        dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
        return inv_freq, 1.0
    inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](hf, "cpu")
    return inv_freq.float(), float(scaling)


class KVStore(Protocol):
    """Where attention keys/values live between steps (the engine's paged cache). A store
    may also offer `paged(layer) -> PagedKV | None` (models.kernels): the cache of a
    forward whose rows each add one token, as soft-serve's fused decode layer reads it."""

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Store this step's k, v for the first n rows at `layer`, attend over everything
        cached for those rows at that layer.

        Args:
            layer: decoder layer index, always < the rows' depths.
            q: (n, T, Hq, D) rotary-applied queries; k, v: (n, T, Hkv, D).
        Returns:
            (n, T, Hq, D) attention output.
        """
        ...


# a forward over several groups of rows pads their tokens to a multiple of this: each
# distinct row count is a GEMM primitive oneDNN creates and caches, and decode rows plus
# prompt tokens would otherwise give thousands (the soak test's RSS grew by ~450 MiB)
FUSED_ROWS = 16


def rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    # x: (n, T, H, D); cos/sin: (n, T, 1, D); the "rotate half" layout of HF checkpoints
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def causal_attention(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    """Attention over this call's own tokens only (no cache). (n,T,H,D) in and out."""
    n_rep = q.shape[2] // k.shape[2]
    if n_rep > 1:
        k = k.repeat_interleave(n_rep, dim=2)
        v = v.repeat_interleave(n_rep, dim=2)
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        is_causal=q.shape[1] > 1,
        scale=scale,
    )
    return out.transpose(1, 2)


def _rows(kv: KVStore | None, start: int, end: int) -> KVStore | None:
    """The store for rows [start, end) of a group: the store itself when it is the whole
    group from row 0, else its `rows(start, end)` view (stores that run exit layers on a
    subset of rows must offer one)."""
    if kv is None or start == 0:
        return kv
    narrow = getattr(kv, "rows", None)
    assert narrow is not None, f"{type(kv).__name__} cannot run exit layers on rows {start}:"
    return narrow(start, end)  # type: ignore[no-any-return]


class Layer(nn.Module):
    """One decoder block's float weights as the checkpoint has them, with fused projections
    (qkv, gate|up): fewer kernels per token. The forward reads the `LayerWeights` prepared
    from them (models.weights); once quantized or packed ones take the four matrices'
    place, these are released (None) to free their memory."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        hq, hkv, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        qkv = (hq + 2 * hkv) * d
        self.input_norm = nn.Parameter(torch.empty(cfg.hidden_size), requires_grad=False)
        self.wqkv: nn.Parameter | None = nn.Parameter(torch.empty(qkv, cfg.hidden_size), False)
        self.bqkv = nn.Parameter(torch.empty(qkv), False) if cfg.attention_bias else None
        self.wo: nn.Parameter | None = nn.Parameter(torch.empty(cfg.hidden_size, hq * d), False)
        self.post_norm = nn.Parameter(torch.empty(cfg.hidden_size), False)
        self.w_gate_up: nn.Parameter | None = nn.Parameter(
            torch.empty(2 * cfg.intermediate_size, cfg.hidden_size), False
        )
        self.w_down: nn.Parameter | None = nn.Parameter(
            torch.empty(cfg.hidden_size, cfg.intermediate_size), False
        )

    def floats(self) -> dict[str, Tensor | None]:
        """The weights by name, as `LayerWeights.prepare` reads them."""
        return {"wqkv": self.wqkv, "wo": self.wo, "w_gate_up": self.w_gate_up,
                "w_down": self.w_down, "bqkv": self.bqkv, "input_norm": self.input_norm,
                "post_norm": self.post_norm}  # fmt: skip

    def release_matrices(self) -> None:
        """Drop the float matrices: quantized ones took their place."""
        self.wqkv = self.wo = self.w_gate_up = self.w_down = None


@dataclass(frozen=True)
class ExitHead:
    """An early-exit baseline's own head for one exit (float; the forward multiplies by
    its prepared format, `ModelWeights.exit_heads`)."""

    norm: Tensor  # (H,)
    weight: Tensor  # (V, H)


class SortedModel(nn.Module):
    """A LLaMA-family decoder that can stop after any depth d in 1..L."""

    def __init__(self, cfg: ModelConfig, inv_freq: Tensor, rope_scaling: float) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Parameter(torch.empty(cfg.vocab_size, cfg.hidden_size), False)
        self.layers = nn.ModuleList(Layer(cfg) for _ in range(cfg.num_layers))
        self.norm = nn.Parameter(torch.empty(cfg.hidden_size), False)
        self.lm_head = (
            self.embed
            if cfg.tie_word_embeddings
            else nn.Parameter(torch.empty(cfg.vocab_size, cfg.hidden_size), False)
        )
        self.inv_freq = inv_freq.float()  # (D/2,) kept fp32 whatever the weights' dtype
        self.rope_scaling = rope_scaling
        self.scale = cfg.head_dim**-0.5
        self._rope: tuple[Tensor, Tensor] | None = None  # cos, sin by position (rope())
        self.exit_heads: dict[int, ExitHead] = {}
        # balcony: exit depth (as a string key) -> its own decoder layer, run after base
        # layers [0, e); its KV lives at cache layer `kv_layer(e)`, past the base's layers
        self.exit_layers = nn.ModuleDict()
        # the matrices the forward multiplies by, in their formats: set by `prepare`
        # (models.load calls it), put in their serving layouts by `pack`; until then the
        # float parameters as they are
        self._weights: ModelWeights | None = None
        # set by models.load(): what soft.json says, the tokenizer, where it came from
        self.soft: SoftConfig = base_config(cfg.num_layers)
        self.tokenizer: Any = None
        self.source = ""

    # -- properties of the public API --------------------------------------------------
    @property
    def num_layers(self) -> int:
        return self.cfg.num_layers

    @property
    def exits(self) -> tuple[int, ...]:
        return self.soft.exits

    @property
    def method(self) -> str:
        return self.soft.method

    @property
    def device(self) -> torch.device:
        return self.embed.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.dtype

    @property
    def weights(self) -> ModelWeights:
        """Every matrix the forward multiplies by (models.weights)."""
        return self._weights if self._weights is not None else self._prepared(Quantization.NONE)

    @property
    def quantization(self) -> Quantization:
        """The weights' format (never AUTO)."""
        return self.weights.quantization

    @property
    def num_kv_layers(self) -> int:
        """Layers that hold KV: the base's, then one per exit layer (balcony)."""
        return self.cfg.num_layers + len(self.exit_layers)

    def kv_layer(self, depth: int) -> int:
        """The cache layer of the exit layer at `depth` (balcony checkpoints only)."""
        exits = sorted(int(e) for e in self.exit_layers)
        return self.cfg.num_layers + exits.index(depth)

    def exit_layer(self, depth: int) -> Layer | None:
        """The exit's own decoder layer, None where sub-model `depth` has none."""
        layer = self.exit_layers[str(depth)] if str(depth) in self.exit_layers else None
        assert layer is None or isinstance(layer, Layer)
        return layer

    def layers_run(self, depth: int) -> int:
        """Decoder layers a token at `depth` runs: d, plus the exit's own (balcony)."""
        return depth + (self.exit_layer(depth) is not None)

    def layer_bytes(self) -> int:
        """Bytes of one decoder layer's weights (every layer, exit layers too, alike),
        quantized matrices at their quantized size."""
        return self.weights.layers[0].nbytes

    def weight_bytes(self, depth: int) -> int:
        """Bytes of weights read for one token at `depth` (layers [0, d), the exit layer
        if any, final norm + head, quantized ones at their quantized size; the embedding
        row read is negligible)."""
        w = self.weights
        head = w.exit_heads.get(depth, w.head)
        return self.layers_run(depth) * self.layer_bytes() + nbytes(head) + self.norm.numel()

    # -- the weights' formats -------------------------------------------------------------
    def prepare(
        self, mode: Quantization, prebuilt: Mapping[str, QuantizedWeight] | None = None
    ) -> None:
        """Choose the weights' format, once: every layer matrix (wqkv, wo, w_gate_up,
        w_down) in `mode`'s (weight-only int8 / int4 / bf16, models.weights; NONE: the
        float parameters as they are) and the heads as `HEAD_QUANTIZATION[mode]` says. The
        embedding stays a float table (a tied head gets its own copy), norms and biases
        stay float. A quantized mode runs on the CPU only and frees the float matrices
        it replaced; preparing such a model again (or a packed one) keeps what it has.

        Args:
            mode: the format; AUTO is resolved for the model's device.
            prebuilt: containers to use as they are, by name ("layers.3.wqkv", "head"),
                e.g. built from a GGUF's own blocks; the rest is quantized from the floats.
        """
        mode = mode.resolve(self.device)
        done = self._weights
        if done is not None and (done.quantization is not Quantization.NONE or done.is_packed):
            assert done.quantization is mode, f"prepared as {done.quantization} already"
            return
        self._weights = self._prepared(mode, prebuilt)
        if mode is not Quantization.NONE:
            self._release_matrices()

    def _release_matrices(self) -> None:
        for layer in [*self.layers, *self.exit_layers.values()]:
            assert isinstance(layer, Layer)
            layer.release_matrices()

    def _prepared(
        self, mode: Quantization, prebuilt: Mapping[str, QuantizedWeight] | None = None
    ) -> ModelWeights:
        prebuilt = prebuilt or {}

        def layer(prefix: str, module: nn.Module) -> LayerWeights:
            assert isinstance(module, Layer)
            own = {name: prebuilt[f"{prefix}.{name}"] for name in LAYER_MATRICES
                   if f"{prefix}.{name}" in prebuilt}  # fmt: skip
            return LayerWeights.prepare(module.floats(), mode, own)

        return ModelWeights(
            quantization=mode,
            layers=tuple(layer(f"layers.{i}", m) for i, m in enumerate(self.layers)),
            exit_layers={int(e): layer(f"exit_layers.{e}", m) for e, m in self.exit_layers.items()},
            head=head_weight(self.lm_head, mode, prebuilt.get("head")),
            exit_heads={d: head_weight(eh.weight, mode) for d, eh in self.exit_heads.items()},
        )

    def pack(self) -> None:
        """Put every matrix a decode step reads into the layouts the CPU kernels want:
        oneDNN's blocked one, plus, for fp32 where soft-serve's kernels are built, the
        plain matrix beside it for products over a few rows, and each layer's fused decode
        call (models.weights.ModelWeights.packed). Idempotent; nothing changes off CPU or
        without oneDNN; quantized matrices stay as they are (they carry their own kernel
        layout). The float layer matrices are released: the packed layouts took their
        place (the plain one the kernels read is the same storage), so only this runner
        reads them afterwards. The serving engine calls it."""
        c = self.cfg
        self._weights = self.weights.packed(c.rms_norm_eps, (c.num_heads, c.num_kv_heads,
                                                             c.head_dim))  # fmt: skip
        self._release_matrices()

    def head_weight(self, depth: int) -> Tensor:
        eh = self.exit_heads.get(depth)
        return eh.weight if eh is not None else self.lm_head

    # -- forward pieces ----------------------------------------------------------------
    def rope(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """cos, sin: (B, T, 1, D) for integer positions (B, T), read from tables of every
        position so far (a decode step's rows would otherwise cost five small ops)."""
        cos, sin = self._rope_tables(int(positions.max()) + 1 if positions.numel() else 1,
                                     positions.device)  # fmt: skip
        return cos[positions][:, :, None].to(dtype), sin[positions][:, :, None].to(dtype)

    def _rope_tables(self, n: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """cos, sin (P, D) fp32 for positions [0, P), P >= n: grown by doubling."""
        have = self._rope
        if have is None or have[0].shape[0] < n or have[0].device != device:
            size = max(n, 256, 2 * have[0].shape[0] if have is not None else 0)
            freqs = torch.arange(size, device=device).float()[:, None] * self.inv_freq.to(device)
            emb = torch.cat((freqs, freqs), dim=-1)  # (P, D)
            self._rope = have = (emb.cos() * self.rope_scaling, emb.sin() * self.rope_scaling)
        return have

    def layer_forward(
        self,
        i: int,
        hs: Sequence[Tensor],
        cos: Sequence[Tensor],
        sin: Sequence[Tensor],
        kvs: Sequence[KVStore | None],
        w: LayerWeights | None = None,
    ) -> list[Tensor]:
        """One decoder block over groups of rows, each group's h (n, T, H) with its own
        T, rotary tables and KV store: the matrix products run once over every group's
        tokens together (the weights are read once), attention runs per group. `w` is
        base layer i by default, or an exit layer whose cache layer is i. Returns each
        group's new residual stream."""
        w = w if w is not None else self.weights.layers[i]
        cfg = self.cfg
        if (
            w.fused is not None
            and len(hs) == 1
            and hs[0].shape[1] == 1
            and len(hs[0]) <= w.max_rows
        ):
            paged = getattr(kvs[0], "paged", None)
            cache: PagedKV | None = paged(i) if paged is not None else None
            if cache is not None:  # decode rows: the whole layer in one call (models.kernels)
                n = len(hs[0])
                h = hs[0].reshape(n, cfg.hidden_size).clone()
                c, s = cos[0].reshape(n, -1), sin[0].reshape(n, -1)
                kernels.decode_layer(h, w.fused, c, s, cache)
                return [h.view(n, 1, -1)]
        shapes = [h.shape[:2] for h in hs]
        sizes = [n * t for n, t in shapes]
        pad = 0
        if len(hs) > 1:  # rows padded to a multiple of FUSED_ROWS: few distinct GEMM shapes
            pad = -sum(sizes) % FUSED_ROWS
            rows = [h.reshape(-1, cfg.hidden_size) for h in hs]
            flat = torch.cat([*rows, rows[0].new_zeros(pad, cfg.hidden_size)])
        else:  # a copy: the kernels add residuals in place, the caller keeps its h
            flat = hs[0].reshape(-1, cfg.hidden_size).clone()
        eps = cfg.rms_norm_eps
        qkv = project(flat, w.wqkv, w.bqkv, norm=w.input_norm, eps=eps)
        heads = cfg.num_heads + cfg.num_kv_heads  # rotary on queries and keys together
        fused_rope = (kernels.available() and qkv.dtype == torch.float32 and qkv.is_cpu
                      and not qkv.requires_grad)  # fmt: skip
        if fused_rope:  # in place over every group's rows at once: (tokens, D) tables
            d = cfg.head_dim
            if len(hs) == 1:
                tables = [ts[0].reshape(-1, d).contiguous() for ts in (cos, sin)]
            else:
                tables = [torch.cat([*(t.reshape(-1, d) for t in ts), qkv.new_zeros(pad, d)])
                          for ts in (cos, sin)]  # fmt: skip
            kernels.rope_(qkv, heads, d, *tables)
        qkvs = qkv.split([*sizes, pad])
        outs = []
        kv_width = cfg.num_kv_heads * cfg.head_dim
        for (n, t), qkv_g, c, sn, kv in zip(shapes, qkvs[: len(hs)], cos, sin, kvs, strict=True):
            qk, v = qkv_g.split([heads * cfg.head_dim, kv_width], dim=-1)
            qk = qk.view(n, t, heads, cfg.head_dim)  # (n, T, Hq + Hkv, D)
            if not fused_rope:
                qk = rotate(qk, c, sn)
            q, k = qk.split([cfg.num_heads, cfg.num_kv_heads], dim=2)
            v = v.view(n, t, cfg.num_kv_heads, cfg.head_dim)
            a = kv.attend(i, q, k, v) if kv is not None else causal_attention(q, k, v, self.scale)
            outs.append(a.reshape(n * t, -1))
        if pad:
            outs.append(flat.new_zeros(pad, outs[0].shape[-1]))
        attn = torch.cat(outs) if len(outs) > 1 else outs[0]
        flat = project(attn, w.wo, residual=flat)
        gate_up = project(flat, w.w_gate_up, norm=w.post_norm, eps=eps)
        flat = project(gate_up, w.w_down, swiglu=True, residual=flat)
        ys = flat.split([*sizes, pad])[: len(hs)]
        return [y.view(n, t, -1) for y, (n, t) in zip(ys, shapes, strict=True)]

    def hidden(
        self,
        input_ids: Tensor | None,
        positions: Tensor,
        depths: Sequence[int],
        kv: KVStore | None = None,
        start_layer: int = 0,
        h: Tensor | None = None,
        exit_layers: bool = True,
    ) -> Tensor:
        """Run rows to their own exits.

        Args:
            input_ids: (B, T) token ids (ignored when `h` is given).
            positions: (B, T) absolute positions of those tokens.
            depths: per row, non-increasing (deepest rows first).
            kv: the cache to attend through; None = causal attention over T alone.
            start_layer, h: resume from the residual stream after `start_layer` layers
                (h: (B, T, H)), e.g. to verify drafted tokens from a shallow exit.
            exit_layers: run balcony exit layers at the rows' exits (see hidden_groups).
        Returns:
            (B, T, H) residual stream of each row after its last layer (before the norm).
        """
        if h is None:
            assert input_ids is not None, "give input_ids or h"
            h = self.embed_ids(input_ids)
        return self.hidden_groups([(h, positions, depths, kv)], start_layer, exit_layers)[0]

    def embed_ids(self, input_ids: Tensor) -> Tensor:
        """(B, T) token ids -> (B, T, H) the residual stream before layer 0."""
        return F.embedding(input_ids, self.embed)

    def hidden_groups(
        self,
        groups: Sequence[tuple[Tensor, Tensor, Sequence[int], KVStore | None]],
        start_layer: int = 0,
        exit_layers: bool = True,
    ) -> list[Tensor]:
        """`hidden` for several groups of rows in one pass, e.g. a decode batch (T = 1)
        and newcomers' prompts (T = their length): each group is (h (B, T, H) after
        `start_layer` layers, positions (B, T), depths deepest first, KV store). The
        groups share every matrix product (`layer_forward`). Rows at an exit with its own
        layer (balcony) run it last, unless `exit_layers` is False (then h is the base's
        residual stream at the exit, e.g. to continue it deeper). Returns each group's h."""
        weights = self.weights
        hs = [h for h, _, _, _ in groups]
        rope = [self.rope(pos, h.dtype) for h, pos, _, _ in groups]
        active = [len(d) for _, _, d, _ in groups]
        for _, _, depths, _ in groups:
            assert all(a >= b for a, b in zip(depths, depths[1:], strict=False)), (
                "rows must be deepest first"
            )
            assert depths[0] <= self.cfg.num_layers and depths[-1] >= start_layer, depths
        first, stop = start_layer, max(d[0] for _, _, d, _ in groups)
        if len(groups) == 1:  # a decode batch alone: every layer in one call, if it can
            h = self._decode_stack(weights, hs[0], *rope[0], groups[0][2], groups[0][3], first,
                                   stop)  # fmt: skip
            if h is not None:
                hs[0], first = h, stop
        for i in range(first, stop):
            run = []  # the groups with rows at layer i: rows [:active] of each
            for g, (_, _, depths, _) in enumerate(groups):
                while active[g] and depths[active[g] - 1] <= i:  # rows past their exit
                    active[g] -= 1
                if active[g]:
                    run.append(g)
            outs = self.layer_forward(
                i,
                [hs[g][: active[g]] for g in run],
                [rope[g][0][: active[g]] for g in run],
                [rope[g][1][: active[g]] for g in run],
                [groups[g][3] for g in run],
                weights.layers[i],
            )
            for g, out in zip(run, outs, strict=True):
                if active[g] == hs[g].shape[0]:
                    hs[g] = out
                else:
                    hs[g][: active[g]] = out
        if weights.exit_layers and exit_layers:
            self._run_exit_layers(weights, groups, hs, rope)
        return hs

    def decode_logits(self, ids: Tensor, positions: Tensor, depths: Sequence[int],
                      kv: KVStore | None) -> Tensor | None:  # fmt: skip
        """A decode batch alone, ids and positions (n, 1), depths deepest first, to each
        row's logits (n, V) in one `kernels.decode_layers` call: its layers, the final norm
        and the head, whose first bytes are fetched while the last layer ends. None where
        that cannot run (a row at an exit with a layer or head of its own, a head without
        a kernel layout for this many rows, or what `_decode_stack` cannot run): then
        `hidden_groups` and `head`, which compute the same numbers."""
        w, n = self.weights, len(depths)
        head = kernel_of(w.head)
        if w.exit_heads or any(d in w.exit_layers for d in depths) or head is None:
            return None
        if n > KERNEL_ROWS[head.kind]:  # `project` would multiply by torch's
            return None
        h = self.embed_ids(ids)
        cos, sin = self.rope(positions, h.dtype)
        logits = torch.empty(n, self.cfg.vocab_size)
        out = kernels.Head(head, self.norm, self.cfg.rms_norm_eps, logits)
        if self._decode_stack(w, h, cos, sin, depths, kv, 0, depths[0], out) is None:
            return None
        return logits

    def _decode_stack(self, weights: ModelWeights, h: Tensor, cos: Tensor, sin: Tensor,
                      depths: Sequence[int], kv: KVStore | None, start: int, stop: int,
                      head: kernels.Head | None = None) -> Tensor | None:  # fmt: skip
        """Layers [start, stop) for decode rows h (n, 1, H) in one `kernels.decode_layers`
        call, each row to its own exit (then `head`'s product, if given); None where that
        cannot run (prefill rows, no paged fp32 or fp16 cache, a layer without kernel
        layouts, more rows than they take)."""
        stack, n = weights.stack, len(h)
        if stack is None or stop <= start or h.shape[1] != 1 or n > stack.max_rows:
            return None
        paged = getattr(kv, "paged", None)
        cache: PagedKV | None = paged(start) if paged is not None else None
        if cache is None:
            return None
        rows = [sum(d > i for d in depths) for i in range(start, stop)]
        out = h.reshape(n, -1).clone()
        kernels.decode_layers(out, stack, start, rows, cos.reshape(n, -1), sin.reshape(n, -1),
                              cache, head)  # fmt: skip
        return out.view(n, 1, -1)

    def exit_hidden(self, h: Tensor, positions: Tensor, depth: int, kv: KVStore | None) -> Tensor:
        """Exit `depth`'s own layer over the base's residual stream at that exit, h
        (B, T, H) for rows all at `depth`, attending at cache layer `kv_layer(depth)`;
        h itself where the exit has no layer. Returns a new tensor (h is kept: the
        speculator verifies deeper from it)."""
        layer = self.weights.exit_layers.get(depth)
        if layer is None:
            return h
        cos, sin = self.rope(positions, h.dtype)
        return self.layer_forward(self.kv_layer(depth), [h], [cos], [sin], [kv], w=layer)[0]

    def _run_exit_layers(
        self,
        weights: ModelWeights,
        groups: Sequence[tuple[Tensor, Tensor, Sequence[int], KVStore | None]],
        hs: list[Tensor],
        rope: Sequence[tuple[Tensor, Tensor]],
    ) -> None:
        """Balcony: rows at an exit with its own layer run it, in place of hs. Rows of one
        depth are contiguous (deepest first); all groups' rows at an exit share one pass."""
        for e, layer in weights.exit_layers.items():
            spans = []  # (group, first row, end row) of the rows at exit e
            for g, (_, _, depths, _) in enumerate(groups):
                rows = [j for j, d in enumerate(depths) if d == e]
                if rows:
                    spans.append((g, rows[0], rows[-1] + 1))
            if not spans:
                continue
            outs = self.layer_forward(
                self.kv_layer(e),
                [hs[g][a:b] for g, a, b in spans],
                [rope[g][0][a:b] for g, a, b in spans],
                [rope[g][1][a:b] for g, a, b in spans],
                [_rows(groups[g][3], a, b) for g, a, b in spans],
                w=layer,
            )
            for (g, a, b), out in zip(spans, outs, strict=True):
                hs[g][a:b] = out

    def head(self, h: Tensor, depths: Sequence[int]) -> Tensor:
        """Final norm + LM head at each row's exit. h: (B, T, H) -> (B, T, V) logits."""
        w, eps = self.weights, self.cfg.rms_norm_eps
        if not w.exit_heads:
            return project(h, w.head, norm=self.norm, eps=eps)
        out = h.new_empty(*h.shape[:2], self.cfg.vocab_size)
        for d in sorted(set(depths)):
            rows = [j for j, dj in enumerate(depths) if dj == d]
            eh = self.exit_heads.get(d)
            norm, weight = (eh.norm, w.exit_heads[d]) if eh is not None else (self.norm, w.head)
            out[rows] = project(h[rows], weight, norm=norm, eps=eps)
        return out

    @torch.inference_mode()
    def logits(self, input_ids: Tensor, depth: int) -> Tensor:
        """Full forward of sub-model `depth`, no cache. (B, T) ids -> (B, T, V) logits."""
        if not 1 <= depth <= self.cfg.num_layers:
            raise ValueError(f"depth must be in 1..{self.cfg.num_layers}, got {depth}")
        input_ids = input_ids.to(self.device)
        b, t = input_ids.shape
        positions = torch.arange(t, device=self.device).expand(b, t)
        depths = [depth] * b
        return self.head(self.hidden(input_ids, positions, depths), depths)

    def extra_repr(self) -> str:
        c = self.cfg
        return (
            f"{c.model_type}: L={c.num_layers}, hidden={c.hidden_size}, heads={c.num_heads}/"
            f"{c.num_kv_heads}, method={self.method}, exits={list(self.exits)}"
        )
