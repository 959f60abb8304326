"""Weight-only int8 / int4 / bf16 matrices and their CPU matmul.

A quantized matrix replaces a float `(out, in)` weight; only `models.llama.linear` and
`project` read it. Each carries `kernel`, the same values in the layout soft-serve's own
CPU kernels read (models.kernels; None where they are not built). The int8 and int4
products run there at every batch size: the activations are rounded to int8 per 32
values (GGUF's Q8_0, as llama.cpp multiplies its Q8_0 / Q4 files) and multiplied in
integers, 2x faster than torch's weight-only kernels from 16 to 256 rows here. Where the
kernels are not built, torch's kernels (`torch.ops.aten._weight_int8pack_mm`,
`_weight_int4pack_mm_for_cpu`) run them instead: their vectorized loops read bf16
activations and scales, so x is cast to bf16 and the output rounded once to bf16.

- int8: per-output-channel symmetric, `w = q * scale`, q in [-127, 127].
- int4: groups of 32 input values, asymmetric like GGUF's Q4_1: `w = q * d + m` per
  group, q in [0, 15]; torch's layout keeps it as `(q - 8) * scale + zero`. A Q4_0 /
  Q4_1 GGUF's blocks map onto it code for code (`Int4Codes.from_gguf`): Q4_1 `q * d + m`
  is scale d, zero m + 8d; Q4_0 `(q - 8) * d` is scale d, zero 0. The scales are rounded
  to bf16 (torch's kernel's dtype), the only change to the file's values.
- bf16: the matrix rounded to bfloat16 with fp32 activations (what llama.cpp's BF16 files
  do on CPUs without AVX512-BF16, where bf16 arithmetic is emulated); soft-serve's
  kernels only (they keep a k-major copy for products over several rows); torch's path
  (rows needing gradients) widens it to fp32 for each product.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from models import kernels
from models.kernels import KernelWeight

MODES = ("int8", "int4", "bf16")
GROUP_SIZE = 32  # int4 values per (scale, zero): GGUF's Q4 block, torch's smallest group
# the kernels' vectorized loops read bf16 activations and scales
KERNEL_DTYPE = torch.bfloat16
_ALIGN = 64  # bytes: the int8 kernel uses aligned loads on its activation rows


def quantization_mode(value: str | None) -> str | None:
    """ "int8" | "int4" | "bf16", or None for float weights ("none" / None)."""
    if value is None or value == "none":
        return None
    if value not in MODES:
        raise ValueError(f"quantization must be one of int8, int4, bf16, none; got {value!r}")
    return value


def _kernel_input(x: Tensor) -> Tensor:
    """x (..., in) as the (M, in) contiguous, aligned bf16 matrix the kernels read."""
    a = x.reshape(-1, x.shape[-1]).to(KERNEL_DTYPE).contiguous()
    return a if a.data_ptr() % _ALIGN == 0 else a.clone()


def _bf16(t: Tensor) -> Tensor:
    """Values as the kernel will see them (rounded to bf16), kept in fp32."""
    return t.to(KERNEL_DTYPE).float()


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
        """x (..., in) @ w^T (+ bias) -> (..., out) in x's dtype."""
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
        """x (..., in) @ w^T (+ bias) -> (..., out) in x's dtype."""
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


def _kernels(shape: torch.Size, kind: int) -> bool:
    return kernels.available() and kernels.supports(shape, kind)


QuantizedWeight = Int8Weight | Int4Weight | Bf16Weight


def quantize(w: Tensor, mode: str) -> QuantizedWeight:
    """A float (out, in) matrix as `mode` ("int8" | "int4" | "bf16") weights."""
    if mode == "int8":
        return Int8Weight.quantize(w)
    if mode == "int4":
        return Int4Weight.quantize(w)
    if mode == "bf16":
        return Bf16Weight.quantize(w)
    raise ValueError(f"quantization must be int8, int4 or bf16, got {mode!r}")
