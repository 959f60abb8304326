"""Weight formats and the one verb that multiplies by them.

A `Weight` is a matrix a forward multiplies by: a float tensor (maybe in oneDNN's packed
layout), a `PackedWeight` (fp32 in oneDNN's layout plus the plain one for soft-serve's
kernels), or weight-only int8 / int4 / bf16 (`Int8Weight`, `Int4Weight`, `Bf16Weight`).
`linear` and `project` are the only readers; each container carries `kernel`, its values
in the layout soft-serve's CPU kernels read (models.kernels; None where they are not
built), and `project` sends a product there or to torch by the container it is given.

A model's matrices are chosen once: `LayerWeights.prepare` and `head_weight` put the
float checkpoint into one `Quantization`'s formats (the mode's name parsed once:
models/quantization.py) when models.llama.SortedModel.prepare runs at load, and
`ModelWeights.packed` adds the serving layouts (oneDNN's blocked one, the kernels' fused
decode layers) when the engine asks for it. The forward reads only what they built.

The quantized formats:
- int8: per-output-channel symmetric, `w = q * scale`, q in [-127, 127].
- int4: groups of 32 input values, asymmetric like GGUF's Q4_1: `w = q * d + m` per
  group, q in [0, 15]; torch's layout keeps it as `(q - 8) * scale + zero`. A Q4_0 /
  Q4_1 GGUF's blocks map onto it code for code (`Int4Codes.from_gguf`): Q4_1 `q * d + m`
  is scale d, zero m + 8d; Q4_0 `(q - 8) * d` is scale d, zero 0. The scales are rounded
  to bf16 (torch's kernel's dtype), the only change to the file's values.
- bf16: the matrix rounded to bfloat16 with fp32 activations (what llama.cpp's BF16 files
  do on CPUs without AVX512-BF16, where bf16 arithmetic is emulated); soft-serve's
  kernels only (they keep a k-major copy for products over several rows, which round the
  activations to bf16 on a CPU with AVX512-BF16: models.kernels.panel_pairs); torch's path
  (rows needing gradients) widens it to fp32 for each product.
On soft-serve's kernels the int8 and int4 products run at every batch size: over few rows
the activations are rounded to int8 per 32 values (GGUF's Q8_0, as llama.cpp multiplies
its Q8_0 / Q4 files) and multiplied in integers; from `kernels.panel_rows()` rows on, the
weights' bf16 panels meet x itself (or x rounded to bf16 on a CPU with AVX512-BF16), 2-3x
faster than torch's weight-only kernels from 16 to 256 rows here. Where the kernels are
not built, torch's kernels (`torch.ops.aten._weight_int8pack_mm`,
`_weight_int4pack_mm_for_cpu`) run them instead:
their vectorized loops read bf16 activations and scales, so x is cast to bf16 and the
output rounded once to bf16.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from models import kernels
from models.kernels import KernelWeight, LayerKernels, LayerStack
from models.quantization import Quantization

GROUP_SIZE = 32  # int4 values per (scale, zero): GGUF's Q4 block, torch's smallest group
# torch's weight-only kernels' vectorized loops read bf16 activations and scales
KERNEL_DTYPE = torch.bfloat16
_ALIGN = 64  # bytes: the int8 kernel uses aligned loads on its activation rows
# the head's format per mode: an int4 head costs SmolLM2 ~4x the logits error of its int4
# layers (llama.cpp's Q4 files keep the head at Q8_0 / Q6_K for the same reason)
HEAD_QUANTIZATION = {
    Quantization.INT8: Quantization.INT8,
    Quantization.INT4: Quantization.INT8,
    Quantization.BF16: Quantization.BF16,
}
# products over at most this many rows run on soft-serve's kernels (models.kernels) where
# the matrix has one: fp32 ones beat oneDNN's packed GEMM up to batch 4 on this project's
# CPUs; bf16 ones (k-major panels past one row) beat widening the matrix to fp32 for
# oneDNN at every batch (1.2-1.9x at 64-256 rows), int8 / int4 ones torch's weight-only
# kernels (2x at 16-256 rows), so those always run there (docs/performance.md,
# benchmarks/kernels.py). A row's numbers depend on what shares its batch only where the
# kernels change paths: int8 / int4 from kernels.panel_rows() rows on (fp32 activations,
# or bf16 ones where kernels.panel_pairs()), bf16 from two rows where panel_pairs()
KERNEL_ROWS = {kernels.F32: 4, kernels.BF16: 1 << 30, kernels.I8: 1 << 30, kernels.Q4: 1 << 30}
# the batch size oneDNN picks its blocked layout for: measured best for batch 1-16 decode
_PACK_HINT = {torch.float32: 16, torch.bfloat16: 1}


def _kernel_input(x: Tensor) -> Tensor:
    """x (..., in) as the (M, in) contiguous, aligned bf16 matrix torch's kernels read."""
    a = x.reshape(-1, x.shape[-1]).to(KERNEL_DTYPE).contiguous()
    return a if a.data_ptr() % _ALIGN == 0 else a.clone()


def _bf16(t: Tensor) -> Tensor:
    """Values as the kernel will see them (rounded to bf16), kept in fp32."""
    return t.to(KERNEL_DTYPE).float()


def _kernels(shape: torch.Size, kind: int) -> bool:
    return kernels.available() and kernels.supports(shape, kind)


# -- the formats --------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class Int8Weight:
    """Per-output-channel symmetric int8 weights."""

    qweight: Tensor  # (out, in) int8
    scales: Tensor  # (out,) bf16: w = qweight * scale
    kernel: KernelWeight | None = None  # the same values for models.kernels

    @classmethod
    def quantize(cls, w: Tensor) -> Int8Weight:
        """Round a float (out, in) matrix to int8 with one scale per output row."""
        w = w.detach().float()
        if w.dim() != 2 or w.shape[1] % 8:
            raise ValueError(f"int8 weights need a 2-d (out, in) matrix with in % 8 == 0, "
                             f"got {tuple(w.shape)}")  # fmt: skip
        scale = _bf16((w.abs().amax(dim=1) / 127).clamp(min=1e-12))  # (out,)
        q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8).contiguous()
        kernel = KernelWeight.int8(q, scale) if _kernels(q.shape, kernels.I8) else None
        return cls(q, scale.to(KERNEL_DTYPE), kernel)

    @property
    def shape(self) -> torch.Size:
        return self.qweight.shape

    @property
    def nbytes(self) -> int:
        return self.qweight.nbytes + self.scales.nbytes

    def dequantize(self) -> Tensor:
        """The fp32 (out, in) matrix this container multiplies by."""
        return self.qweight.float() * self.scales.float()[:, None]

    def matmul(self, x: Tensor, bias: Tensor | None = None) -> Tensor:
        """x (..., in) @ w^T (+ bias) -> (..., out) in x's dtype, on torch's kernel."""
        y = torch.ops.aten._weight_int8pack_mm(_kernel_input(x), self.qweight, self.scales)
        y = y.to(x.dtype).view(*x.shape[:-1], -1)
        return y if bias is None else y + bias


@dataclass(frozen=True)
class Int4Codes:
    """int4 weights before packing: `w = q * scale + minimum`, one scale/min per group.
    Rows can be reordered or stacked here (fusing q|k|v, un-permuting GGUF's q/k rows)."""

    q: Tensor  # (out, in) uint8 in [0, 15]
    scale: Tensor  # (out, in / G) fp32
    minimum: Tensor  # (out, in / G) fp32

    @classmethod
    def from_gguf(cls, data: np.ndarray, kind: str) -> Int4Codes:
        """Decode a GGUF tensor's Q4_0 / Q4_1 blocks (`GGUFReader` tensor data: (out,
        bytes per row) uint8). Q4_0 block: fp16 d, 16 bytes of nibbles; Q4_1: fp16 d,
        fp16 m, 16 bytes; byte j holds value j (low nibble) and value j + 16 (high)."""
        header = {"Q4_0": 2, "Q4_1": 4}.get(kind)
        if header is None:
            raise ValueError(f"not an int4 GGUF block type: {kind}")
        raw = torch.from_numpy(np.array(data, dtype=np.uint8))  # a copy: GGUF data is read-only
        rows = raw.shape[0]
        blocks = raw.view(rows, -1, header + GROUP_SIZE // 2)  # (out, in / 32, bytes)
        d = blocks[..., 0:2].contiguous().view(torch.float16)[..., 0].float()
        if kind == "Q4_1":
            m = blocks[..., 2:4].contiguous().view(torch.float16)[..., 0].float()
        else:
            m = -8 * d
        nibbles = blocks[..., header:]
        q = torch.cat([nibbles & 0xF, nibbles >> 4], dim=-1).reshape(rows, -1)
        return cls(q, d, m)

    @staticmethod
    def cat(parts: Sequence[Int4Codes]) -> Int4Codes:
        """Stack along the output dimension (fused projections)."""
        return Int4Codes(
            *(torch.cat([getattr(p, f) for p in parts]) for f in ("q", "scale", "minimum"))
        )

    def rows(self, index: Tensor) -> Int4Codes:
        return Int4Codes(self.q[index], self.scale[index], self.minimum[index])

    def dequantize(self) -> Tensor:
        g = self.q.shape[1] // self.scale.shape[1]
        return self.q.float() * self.scale.repeat_interleave(g, 1) + self.minimum.repeat_interleave(
            g, 1
        )


@dataclass(frozen=True, eq=False)
class Int4Weight:
    """Group-wise asymmetric int4 weights in torch's CPU int4pack layout."""

    packed: Tensor  # (out, in / 2) uint8, the kernel's layout (depends on the CPU's ISA)
    scales_zeros: Tensor  # (in / G, out, 2) bf16: w = (q - 8) * scale + zero
    in_features: int
    group_size: int = GROUP_SIZE
    kernel: KernelWeight | None = None  # the same values as Q4 blocks for models.kernels

    @classmethod
    def from_codes(cls, codes: Int4Codes) -> Int4Weight:
        out, k = codes.q.shape
        g = k // codes.scale.shape[1]
        if out % 16 or k % g or g not in (32, 64, 128, 256):
            raise ValueError(f"int4 weights need out % 16 == 0 and groups of 32..256 along "
                             f"in; got {(out, k)} with groups of {g}")  # fmt: skip
        scale, zero = _bf16(codes.scale), _bf16(codes.minimum + 8 * codes.scale)
        sz = torch.stack([scale, zero], dim=-1).transpose(0, 1)  # (in / G, out, 2)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.q.to(torch.int32), 1)
        kernel = None
        if g == kernels.Q4_BLOCK and _kernels(codes.q.shape, kernels.Q4):
            kernel = KernelWeight.q4(codes.q, scale, zero - 8 * scale)  # the values torch's has
        return cls(packed, sz.to(KERNEL_DTYPE).contiguous(), k, g, kernel)

    @classmethod
    def quantize(cls, w: Tensor, group_size: int = GROUP_SIZE) -> Int4Weight:
        """Round a float (out, in) matrix to int4 groups with min/max scaling (as Q4_1)."""
        w = w.detach().float()
        if w.dim() != 2 or w.shape[1] % group_size:
            raise ValueError(f"int4 weights need a 2-d (out, in) matrix with in % "
                             f"{group_size} == 0, got {tuple(w.shape)}")  # fmt: skip
        out, k = w.shape
        groups = w.view(out, k // group_size, group_size)
        lo, hi = groups.amin(dim=-1), groups.amax(dim=-1)
        scale = _bf16(((hi - lo) / 15).clamp(min=1e-12))
        # the codes are chosen against the bf16 scale and zero the kernel will use
        minimum = _bf16(lo + 8 * scale) - 8 * scale
        q = torch.round((groups - minimum[..., None]) / scale[..., None]).clamp(0, 15)
        return cls.from_codes(Int4Codes(q.to(torch.uint8).view(out, k), scale, minimum))

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.packed.shape[0], self.in_features))

    @property
    def nbytes(self) -> int:
        return self.packed.nbytes + self.scales_zeros.nbytes

    def dequantize(self) -> Tensor:
        """The fp32 (out, in) matrix this container multiplies by. The packed layout is
        the kernel's own, so this multiplies an identity through the kernel's fp32 loop:
        exact, but O(out * in^2) — for tests and debugging."""
        eye = torch.eye(self.in_features)
        wt = torch.ops.aten._weight_int4pack_mm_for_cpu(
            eye, self.packed, self.group_size, self.scales_zeros.float()
        )  # (in, out)
        return wt.T.contiguous()

    def matmul(self, x: Tensor, bias: Tensor | None = None) -> Tensor:
        """x (..., in) @ w^T (+ bias) -> (..., out) in x's dtype, on torch's kernel."""
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(
            _kernel_input(x), self.packed, self.group_size, self.scales_zeros
        )
        y = y.to(x.dtype).view(*x.shape[:-1], -1)
        return y if bias is None else y + bias


@dataclass(frozen=True, eq=False)
class Bf16Weight:
    """A matrix rounded to bfloat16 and multiplied with fp32 activations."""

    weight: Tensor  # (out, in) bf16
    kernel: KernelWeight | None = None  # the same tensor, for models.kernels

    @classmethod
    def quantize(cls, w: Tensor) -> Bf16Weight:
        if not _kernels(w.shape, kernels.BF16):
            raise ValueError(
                f"bf16 weights run on soft-serve's CPU kernels, which are not available for "
                f"a {tuple(w.shape)} matrix here ({kernels.unavailable_reason() or 'its shape'}); "
                f"use --quantization none or int8"
            )
        b = w.detach().to(torch.bfloat16).contiguous()
        return cls(b, KernelWeight.dense(b))

    @property
    def shape(self) -> torch.Size:
        return self.weight.shape

    @property
    def nbytes(self) -> int:
        return self.weight.nbytes

    def dequantize(self) -> Tensor:
        return self.weight.float()

    def matmul(self, x: Tensor, bias: Tensor | None = None) -> Tensor:
        """x (..., in) @ w^T (+ bias) in x's dtype, the matrix widened for this product."""
        return F.linear(x, self.weight.to(x.dtype), bias)


@dataclass(frozen=True, eq=False)
class PackedWeight:
    """A float matrix in two layouts: oneDNN's blocked one for products over many rows,
    the plain one (`kernel`, the same storage as the checkpoint's tensor) for soft-serve's
    kernels over a few (models.kernels). What `pack_matrix` makes of fp32 matrices where
    the kernels are built."""

    packed: Tensor
    kernel: KernelWeight

    @property
    def shape(self) -> torch.Size:
        return self.kernel.shape

    @property
    def nbytes(self) -> int:
        """Bytes one product reads (one of the two layouts)."""
        return self.kernel.nbytes

    def matmul(self, x: Tensor, bias: Tensor | None = None) -> Tensor:
        return linear(x, self.packed, bias)


QuantizedWeight = Int8Weight | Int4Weight | Bf16Weight
# a matrix `linear` can multiply by: float (maybe oneDNN-packed, maybe with a plain copy
# for soft-serve's kernels) or int8 / int4 / bf16
Weight = Tensor | QuantizedWeight | PackedWeight


def quantize(w: Tensor, mode: Quantization) -> QuantizedWeight:
    """A float (out, in) matrix as `mode` (int8 | int4 | bf16) weights."""
    if mode is Quantization.INT8:
        return Int8Weight.quantize(w)
    if mode is Quantization.INT4:
        return Int4Weight.quantize(w)
    assert mode is Quantization.BF16, f"{mode} is not a quantized format"
    return Bf16Weight.quantize(w)


def nbytes(w: Weight) -> int:
    """Bytes one product by `w` reads."""
    return w.numel() * w.element_size() if isinstance(w, Tensor) else w.nbytes


def kernel_of(w: Weight) -> KernelWeight | None:
    """`w` in soft-serve's kernels' layout, None where it has none (a plain tensor)."""
    return None if isinstance(w, Tensor) else w.kernel


# -- oneDNN's layout -----------------------------------------------------------------------
@functools.cache
def _onednn(dtype: torch.dtype = torch.float32) -> bool:
    """oneDNN can run and pack `dtype` matrices here (fp32 everywhere it is built; packed
    bf16 only on CPUs with AVX512-BW/VL/DQ or AVX-NE-CONVERT). Asked lazily, on the thread
    that first computes (usually the engine's): a probe at import would give the importing
    thread an OpenMP pool, which slows the engine's (see server/engine/)."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        x, w = torch.ones(2, 3), torch.ones(4, 3)
        packed = torch.ops.mkldnn._reorder_linear_weight(w.to(dtype), _PACK_HINT[dtype])
        y = torch.ops.mkldnn._linear_pointwise(x.to(dtype), packed, None, "none", [], "")
        return bool(torch.equal(y.float(), F.linear(x, w)))
    except (RuntimeError, AttributeError, NotImplementedError):
        return False


def pack(w: Tensor) -> Tensor:
    """`w` (out, in) in the CPU GEMM library's own blocked layout (oneDNN), or `w` itself
    where that does not apply (other devices and dtypes, no oneDNN). A packed matrix is
    opaque: only `linear` reads it. On this project's CPUs packed weights stream 1.3-2x
    faster than plain ones at batch 1-16, bf16 most of all (docs/performance.md)."""
    if w.is_mkldnn or w.device.type != "cpu" or w.dtype not in _PACK_HINT:
        return w
    if not _onednn(w.dtype):
        return w
    return torch.ops.mkldnn._reorder_linear_weight(w.contiguous(), _PACK_HINT[w.dtype])


def pack_matrix(w: Weight) -> Weight:
    """A matrix in its serving layouts: a float one packed (`pack`), with the plain matrix
    beside it where soft-serve's kernels take it (`PackedWeight`); the other formats
    carry their kernel layout already and stay as they are."""
    if not isinstance(w, Tensor):
        return w
    w = w.detach()
    p = pack(w)
    if w.device.type == "cpu" and w.dtype == torch.float32 and kernels.available():
        if kernels.supports(w.shape, kernels.F32):
            return PackedWeight(p, KernelWeight.dense(w))
    return p


# -- the verb ------------------------------------------------------------------------------
def linear(x: Tensor, w: Weight, bias: Tensor | None = None) -> Tensor:
    """x (..., in) @ w^T. Quantized `w` runs its own kernel; a packed `w` and plain fp32 on
    CPU go through oneDNN directly (it reads fp32 weights ~2x faster than the BLAS behind
    F.linear here); everything else is F.linear."""
    if not isinstance(w, Tensor):
        return w.matmul(x, bias)
    if w.is_mkldnn or (x.dtype == torch.float32 and x.device.type == "cpu" and _onednn()):
        return torch.ops.mkldnn._linear_pointwise(x, w, bias, "none", [], "")
    return F.linear(x, w, bias)


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """One fused kernel. fp32: bit-identical to transformers' formula. Half precision: it
    normalises in fp32 like transformers, then scales before the one rounding to x's
    dtype (transformers rounds, then scales): within one ulp, and 8 kernels fewer."""
    return F.rms_norm(x, weight.shape, weight, eps)


def project(
    x: Tensor,
    w: Weight,
    bias: Tensor | None = None,
    *,
    norm: Tensor | None = None,
    eps: float = 0.0,
    swiglu: bool = False,
    residual: Tensor | None = None,
) -> Tensor:
    """f(x) @ w^T (+ bias), f being RMSNorm with `norm` (and `eps`), SwiGLU over x's two
    halves (`swiglu`: silu(gate) * up) or nothing; with `residual`, residual + that (in
    place on the kernels' path: use the returned tensor). One fused call on soft-serve's
    kernels where `w` has a kernel layout and x is a few fp32 rows (KERNEL_ROWS) needing no
    gradient; torch's ops otherwise."""
    kw = kernel_of(w)
    if (
        kw is not None
        and x.dtype == torch.float32
        and not x.requires_grad
        and x.numel() <= KERNEL_ROWS[kw.kind] * x.shape[-1]
    ):
        mode = kernels.RMS_NORM if norm is not None else kernels.SWIGLU if swiglu else kernels.PLAIN
        return kernels.linear(x, kw, mode=mode, norm=norm, eps=eps, bias=bias, out=residual)
    if norm is not None:
        x = rms_norm(x, norm, eps)
    elif swiglu:
        gate, up = x.chunk(2, dim=-1)
        x = F.silu(gate) * up
    y = linear(x, w, bias)
    return y if residual is None else residual + y


# -- a model's matrices, chosen once --------------------------------------------------------
# a decoder layer's matrices, by their names in models.llama.Layer
LAYER_MATRICES = ("wqkv", "wo", "w_gate_up", "w_down")


@dataclass(frozen=True, eq=False)
class LayerWeights:
    """One decoder layer as its forward reads it (models.llama.SortedModel.layer_forward):
    the four fused matrices in their formats, the float norms and bias."""

    wqkv: Weight  # (Hq*D + 2*Hkv*D, H): q|k|v
    wo: Weight  # (H, Hq*D)
    w_gate_up: Weight  # (2F, H): gate|up
    w_down: Weight  # (H, F)
    bqkv: Tensor | None  # (Hq*D + 2*Hkv*D,) or None
    input_norm: Tensor  # (H,)
    post_norm: Tensor  # (H,)
    # the whole layer for kernels.decode_layer(s) and the most decode rows it runs it
    # for; set by `packed` where every matrix has a kernel layout and the norms are fp32
    fused: LayerKernels | None = None
    max_rows: int = 0

    @classmethod
    def prepare(
        cls,
        floats: Mapping[str, Tensor | None],
        mode: Quantization,
        prebuilt: Mapping[str, QuantizedWeight] | None = None,
    ) -> LayerWeights:
        """A layer's float weights (LAYER_MATRICES, "bqkv", "input_norm", "post_norm") with
        its matrices in `mode`'s format: `prebuilt` ones by matrix name (e.g. from a
        GGUF's own blocks) as they are, the rest quantized; NONE keeps the tensors."""
        prebuilt = prebuilt or {}

        def matrix(name: str) -> Weight:
            w = floats[name]
            assert w is not None, f"{name}: no float matrix to prepare (released already)"
            if mode is Quantization.NONE:
                return w
            q = prebuilt.get(name) or quantize(w.detach(), mode)
            assert tuple(q.shape) == tuple(w.shape), (name, q.shape, w.shape)
            return q

        input_norm, post_norm = floats["input_norm"], floats["post_norm"]
        assert input_norm is not None and post_norm is not None
        return cls(matrix("wqkv"), matrix("wo"), matrix("w_gate_up"), matrix("w_down"),
                   floats["bqkv"], input_norm, post_norm)  # fmt: skip

    @property
    def matrices(self) -> tuple[Weight, Weight, Weight, Weight]:
        return self.wqkv, self.wo, self.w_gate_up, self.w_down

    @property
    def nbytes(self) -> int:
        """Bytes of the layer's weights one token reads (matrices in their format)."""
        floats = [t for t in (self.bqkv, self.input_norm, self.post_norm) if t is not None]
        return sum(nbytes(w) for w in self.matrices) + sum(nbytes(t) for t in floats)

    def packed(self, eps: float, heads: tuple[int, int, int]) -> LayerWeights:
        """This layer in its serving layouts (`pack_matrix`), with its fused decode layer
        where every matrix has a kernel layout. heads: query heads, kv heads, head dim."""
        wqkv, wo, w_gate_up, w_down = (pack_matrix(w) for w in self.matrices)
        ks = [kernel_of(w) for w in (wqkv, wo, w_gate_up, w_down)]
        fused, max_rows = None, 0
        if None not in ks and self.input_norm.dtype == torch.float32:
            qkv, o, gate_up, down = (k for k in ks if k is not None)
            bias = None if self.bqkv is None else self.bqkv.detach()
            fused = LayerKernels((qkv, o, gate_up, down),
                                 (bias, self.input_norm.detach(), self.post_norm.detach()),
                                 eps, heads)  # fmt: skip
            max_rows = min(KERNEL_ROWS[k.kind] for k in (qkv, o, gate_up, down))
        return dataclasses.replace(self, wqkv=wqkv, wo=wo, w_gate_up=w_gate_up, w_down=w_down,
                                   fused=fused, max_rows=max_rows)  # fmt: skip


def head_weight(w: Tensor, mode: Quantization, prebuilt: QuantizedWeight | None = None) -> Weight:
    """An LM head (V, H) in `mode`'s head format (HEAD_QUANTIZATION): `prebuilt` as it is
    when given, else quantized; NONE keeps the tensor."""
    if mode is Quantization.NONE:
        return w
    return prebuilt or quantize(w.detach(), HEAD_QUANTIZATION[mode])


@dataclass(frozen=True, eq=False)
class ModelWeights:
    """Every matrix a forward multiplies by, in the formats chosen for the model: what
    models.llama.SortedModel reads (its float parameters are the checkpoint's)."""

    quantization: Quantization  # never AUTO
    layers: tuple[LayerWeights, ...]  # base layer i
    exit_layers: Mapping[int, LayerWeights]  # balcony: the exit depth's own layer
    head: Weight  # the shared LM head
    exit_heads: Mapping[int, Weight]  # early-exit baselines: the exit's own head
    # set by `packed` where every base layer has a fused decode layer: a decode step's
    # layers in one kernels.decode_layers call
    stack: LayerStack | None = None
    is_packed: bool = False

    def packed(self, eps: float, heads: tuple[int, int, int]) -> ModelWeights:
        """Every matrix a decode step reads in the layouts the CPU kernels want (see
        `pack_matrix`; nothing changes off CPU or without oneDNN), the layers' fused decode
        layers and their stack. Idempotent. heads: query heads, kv heads, head dim."""
        if self.is_packed:
            return self
        layers = tuple(layer.packed(eps, heads) for layer in self.layers)
        fused = [layer.fused for layer in layers]
        stack = None
        if all(f is not None for f in fused):
            stack = LayerStack(tuple(f for f in fused if f is not None),
                               min(layer.max_rows for layer in layers))  # fmt: skip
        return ModelWeights(
            self.quantization,
            layers,
            {e: layer.packed(eps, heads) for e, layer in self.exit_layers.items()},
            pack_matrix(self.head),
            {d: pack_matrix(w) for d, w in self.exit_heads.items()},
            stack,
            is_packed=True,
        )
