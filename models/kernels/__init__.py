"""soft-serve's CPU kernels (cpu.cpp): a decoder layer's matrix products over fp32
activations, reading fp32, bf16, int8 or Q4 weights, with RMSNorm / SwiGLU / the residual
add fused in, and rotary embeddings in place.

The shared library is this machine's build of cpu.cpp, compiled on first use with its C++
compiler (`g++`, or `$CXX`; `-march=native`, AVX2 + FMA required) and cached under
`$SOFT_CACHE_DIR/kernels/` (models/kernels/build.py; a build takes ~2 s), or, where there
is no compiler (the Docker image), the portable build shipped beside cpu.cpp
(`SOFT_KERNELS=prebuilt` asks for that one only). Where neither loads (no compiler and
none shipped, no AVX2/FMA, not x86-64) or `SOFT_KERNELS=0` is set, `available()` is False
and the model runs on torch's own kernels instead, with the reason in
`unavailable_reason()`. The ctypes structs below mirror cpu.cpp's; their sizes and
offsets are checked against the library's own (`soft_abi_layout`) when it loads.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import platform
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from models.kernels import build
from models.paths import cache_dir

log = logging.getLogger(__name__)

# what the weight types are called in cpu.cpp
F32, BF16, I8, Q4 = 0, 1, 2, 3
Q4_BLOCK = 32  # values per (scale, minimum): GGUF's Q4_0 / Q4_1 block
BF16_PANEL = 16  # output rows per panel of a bf16 matrix's k-major copy
# the input modes of soft_linear
PLAIN, RMS_NORM, SWIGLU = 0, 1, 2


class _Weight(ctypes.Structure):
    _fields_ = [
        ("type", ctypes.c_int32),
        ("n", ctypes.c_int32),
        ("k", ctypes.c_int32),
        ("data", ctypes.c_void_p),
        ("scale", ctypes.c_void_p),
        ("minimum", ctypes.c_void_p),
        ("panels", ctypes.c_void_p),
    ]


class _Layer(ctypes.Structure):
    _fields_ = [
        ("qkv", ctypes.POINTER(_Weight)),
        ("o", ctypes.POINTER(_Weight)),
        ("gate_up", ctypes.POINTER(_Weight)),
        ("down", ctypes.POINTER(_Weight)),
        ("qkv_bias", ctypes.c_void_p),
        ("input_norm", ctypes.c_void_p),
        ("post_norm", ctypes.c_void_p),
        ("eps", ctypes.c_float),
        ("heads", ctypes.c_int32),
        ("kv_heads", ctypes.c_int32),
        ("head_dim", ctypes.c_int32),
    ]


class _Paged(ctypes.Structure):
    _fields_ = [
        ("k", ctypes.c_void_p),
        ("v", ctypes.c_void_p),
        ("half", ctypes.c_int32),
        ("block_size", ctypes.c_int32),
        ("max_blocks", ctypes.c_int32),
        ("table", ctypes.c_void_p),
        ("write_block", ctypes.c_void_p),
        ("write_offset", ctypes.c_void_p),
        ("length", ctypes.c_void_p),
        ("scale", ctypes.c_float),
    ]


# the KV cache element types the decode kernels read and write
KV_DTYPES = (torch.float32, torch.float16)

_reason: str | None = None
_path: Path | None = None


@functools.cache
def _cpu_flags() -> frozenset[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def _library() -> Path:
    """This machine's build (compiled once, cached), else the portable one shipped."""
    shipped, cxx = build.shipped(), build.compiler()
    if os.environ.get("SOFT_KERNELS") == "prebuilt" or cxx is None:
        if shipped.exists():
            return shipped
        raise RuntimeError(
            f"no C++ compiler (g++ or $CXX) on PATH and no {shipped.name} shipped"
            if cxx is None
            else f"SOFT_KERNELS=prebuilt but no {shipped.name} was shipped"
        )
    try:
        return build.native(cache_dir() / "kernels", cxx, _cpu_flags())
    except (OSError, RuntimeError, subprocess.SubprocessError):
        if shipped.exists():
            log.warning("could not build %s for this CPU; using %s", build.SOURCE.name, shipped)
            return shipped
        raise


# cpu.cpp's structs in the order soft_abi_layout reports them
_MIRRORS = (_Weight, _Layer, _Paged)


def _layout() -> list[int]:
    """The ctypes structs' layout as soft_abi_layout reports cpu.cpp's: per struct, its
    size, then each field's offset."""
    out: list[int] = []
    for struct in _MIRRORS:
        out.append(ctypes.sizeof(struct))
        out.extend(getattr(struct, name).offset for name, *_ in struct._fields_)
    return out


def layout_mismatch(lib: ctypes.CDLL) -> str | None:
    """How the ctypes structs differ from the library's own, None when they agree."""
    buf = (ctypes.c_int64 * 64)()
    n = lib.soft_abi_layout(buf, len(buf))
    theirs, ours = list(buf[: min(n, len(buf))]), _layout()
    if theirs == ours:
        return None
    return (f"the ctypes structs in {__file__} do not match {build.SOURCE.name}'s: sizes and "
            f"offsets {ours} here, {theirs} in the library")  # fmt: skip


@functools.cache
def _lib() -> ctypes.CDLL | None:
    global _reason
    if os.environ.get("SOFT_KERNELS", "1") == "0":
        _reason = "SOFT_KERNELS=0"
        return None
    if platform.machine() not in ("x86_64", "AMD64"):
        _reason = f"the kernels are x86-64 code; this is {platform.machine()}"
        return None
    missing = {"avx2", "fma", "f16c"} - _cpu_flags()
    if missing:
        _reason = f"this CPU lacks {', '.join(sorted(missing))}"
        return None
    try:
        path = _library()
        lib = ctypes.CDLL(str(path))
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        _reason = f"could not build {build.SOURCE.name}: {e}"
        log.warning("soft-serve CPU kernels unavailable, using torch's: %s", _reason)
        return None
    lib.soft_abi_layout.argtypes = [ctypes.POINTER(ctypes.c_int64), ctypes.c_int]
    lib.soft_abi_layout.restype = ctypes.c_int
    mismatch = layout_mismatch(lib)
    assert mismatch is None, mismatch  # cpu.cpp and this file were edited apart
    global _path
    _path = path
    p, i, f = ctypes.c_void_p, ctypes.c_int, ctypes.c_float
    lib.soft_linear.argtypes = [p, i, i, ctypes.POINTER(_Weight), p, p, i, i, p, f, i, i]
    lib.soft_linear.restype = i
    lib.soft_stream_read.argtypes = [p, p, i, i]
    lib.soft_stream_read.restype = ctypes.c_uint64
    for name in ("soft_fma_peak", "soft_bf16_peak"):
        getattr(lib, name).argtypes = [ctypes.c_long, i]
        getattr(lib, name).restype = ctypes.c_double
    for name in (
        "soft_i8_panel_rows",
        "soft_q4_panel_rows",
        "soft_vector_lanes",
        "soft_panel_pairs",
    ):
        getattr(lib, name).argtypes = []
        getattr(lib, name).restype = i
    lib.soft_rope.argtypes = [p, i, i, i, i, p, p, i]
    lib.soft_rope.restype = None
    lib.soft_attend_decode.argtypes = [p, i, p, i, p, i, i, i, i, i, p, p, i, i, p, i, p, p, p,
                                       f, p, i]  # fmt: skip
    lib.soft_attend_decode.restype = i
    lib.soft_decode_layers.argtypes = [p, i, i, p, p, p, p, ctypes.POINTER(_Paged),
                                       ctypes.c_int64, ctypes.c_int64, p, p, f, p, i]  # fmt: skip
    lib.soft_decode_layers.restype = i
    return lib


def available() -> bool:
    """The kernels are built and loaded for this machine (builds them on first call)."""
    return _lib() is not None


def unavailable_reason() -> str | None:
    """Why `available()` is False, None when it is True."""
    _lib()
    return _reason


def library() -> Path | None:
    """The shared library loaded (this machine's build or the shipped one), None when
    `available()` is False."""
    _lib()
    return _path


def _ptr(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _half(cache_k: Tensor, cache_v: Tensor) -> int:
    """The C side's flag for a KV cache's element type: 1 for fp16, 0 for fp32."""
    assert cache_k.dtype in KV_DTYPES and cache_v.dtype == cache_k.dtype, cache_k.dtype
    return int(cache_k.dtype == torch.float16)


@dataclass(eq=False)
class KernelWeight:
    """An (out, in) matrix in the layout cpu.cpp reads; `linear` multiplies by it.

    fp32 / bf16: the matrix itself (row-major); bf16, int8 and Q4 keep a k-major bf16 copy
    in panels of 16 output rows beside it for products over several rows (bf16) or many
    (int8 and Q4, `panel_rows`: int8 values and Q4 codes are exact in bf16); its bytes are
    counted once in `nbytes`: a product reads one or the other. Where the kernels multiply
    in bf16 (`panel_pairs`), the panels hold two adjacent columns a lane and Q4's hold its
    dequantized weights in bf16 instead of its codes. int8: values + one fp32
    scale per row (w = q * scale). Q4: GGUF's block layout, 32 values per block in 16
    bytes (byte j holds value j in its low nibble, j + 16 in its high one), w = q * scale +
    minimum per block.
    """

    kind: int
    data: Tensor
    shape: torch.Size
    scale: Tensor | None = None
    minimum: Tensor | None = None
    # bf16 / int8 / Q4 (codes): the matrix again, in bf16, in panels of BF16_PANEL output rows,
    # (ceil(out / 16), in, 16), zero-padded: what products over several rows read (made
    # when missing)
    panels: Tensor | None = None
    _c: _Weight = field(init=False, repr=False)

    def __post_init__(self) -> None:
        n, k = self.shape
        if self.kind != F32 and self.panels is None:  # int8 values, Q4 codes: exact in bf16
            pairs = panel_pairs()
            if self.kind == Q4:
                values = self.dequantize() if pairs else self.codes()
            else:
                values = self.data
            self.panels = _panels(values.to(torch.bfloat16), pairs)
        self._c = _Weight(self.kind, n, k, _ptr(self.data), _ptr(self.scale), _ptr(self.minimum),
                          _ptr(self.panels))  # fmt: skip

    @property
    def nbytes(self) -> int:
        extra = [t for t in (self.scale, self.minimum) if t is not None]
        return self.data.nbytes + sum(t.nbytes for t in extra)

    @classmethod
    def dense(cls, w: Tensor) -> KernelWeight:
        """An fp32 or bf16 matrix as it is (contiguous)."""
        kind = {torch.float32: F32, torch.bfloat16: BF16}[w.dtype]
        return cls(kind, w.detach().contiguous(), w.shape)

    @classmethod
    def int8(cls, q: Tensor, scale: Tensor) -> KernelWeight:
        """int8 values (out, in) and one scale per output row."""
        return cls(I8, q.contiguous(), q.shape, scale=scale.float().contiguous())

    @classmethod
    def q4(cls, q: Tensor, scale: Tensor, minimum: Tensor) -> KernelWeight:
        """int4 codes q (out, in) in [0, 15] and per-block scale / minimum (out, in / 32)."""
        n, k = q.shape
        blocks = q.to(torch.uint8).view(n, k // Q4_BLOCK, 2, Q4_BLOCK // 2)
        packed = (blocks[:, :, 0] | (blocks[:, :, 1] << 4)).reshape(n, k // 2).contiguous()
        return cls(Q4, packed, q.shape, scale=scale.float().contiguous(),
                   minimum=minimum.float().contiguous())  # fmt: skip

    def codes(self) -> Tensor:
        """Q4: the (out, in) codes 0..15 (uint8) its blocks hold."""
        assert self.kind == Q4
        n, k = self.shape
        b = self.data.view(n, k // Q4_BLOCK, Q4_BLOCK // 2)
        return torch.stack([b & 0xF, b >> 4], dim=2).reshape(n, k)

    def dequantize(self) -> Tensor:
        """The fp32 (out, in) matrix this multiplies by."""
        if self.kind in (F32, BF16):
            return self.data.float()
        if self.kind == I8:
            assert self.scale is not None
            return self.data.float() * self.scale[:, None]
        assert self.scale is not None and self.minimum is not None
        n, k = self.shape
        q = self.codes().view(n, k // Q4_BLOCK, Q4_BLOCK).float()
        return (q * self.scale[..., None] + self.minimum[..., None]).reshape(n, k)


def _panels(w: Tensor, pairs: bool = False) -> Tensor:
    """(out, in) -> (ceil(out / BF16_PANEL), in, BF16_PANEL): each panel's weights k-major;
    with `pairs`, (ceil(out / BF16_PANEL), in / 2, BF16_PANEL, 2): columns 2j and 2j + 1 of
    an output side by side."""
    n, k = w.shape
    p = -(-n // BF16_PANEL)
    padded = w.new_zeros(p * BF16_PANEL, k)
    padded[:n] = w
    if pairs:
        return padded.view(p, BF16_PANEL, k // 2, 2).transpose(1, 2).contiguous()
    return padded.view(p, BF16_PANEL, k).transpose(1, 2).contiguous()


def supports(shape: torch.Size | tuple[int, ...], kind: int) -> bool:
    """An (out, in) matrix of `kind` has a shape the kernels take: in % 16 == 0 for fp32 /
    bf16, in % 32 == 0 for int8 / Q4 (their activations are quantized in blocks of 32)."""
    return shape[1] % (16 if kind in (F32, BF16) else Q4_BLOCK) == 0


def fma_peak(threads: int, iters: int = 20_000_000) -> float:
    """This machine's fp32 FMA peak over `threads` threads, GFLOP/s (a register-only loop
    of 12 independent chains per thread, each vector_lanes() wide): the ceiling of products
    over many rows."""
    lib = _lib()
    assert lib is not None, unavailable_reason()
    return float(lib.soft_fma_peak(iters, threads))


def bf16_peak(threads: int, iters: int = 20_000_000) -> float | None:
    """This machine's bf16 dot-product peak over `threads` threads, GFLOP/s (12
    independent chains of `vdpbf16ps`, 64 flops each): the ceiling of the products on the
    panels where they multiply in bf16 (panel_pairs); None where they do not."""
    lib = _lib()
    assert lib is not None, unavailable_reason()
    peak = float(lib.soft_bf16_peak(iters, threads))
    return peak if peak > 0 else None


def stream_read(buffers: Sequence[Tensor], threads: int) -> int:
    """Read `buffers` (contiguous CPU tensors, each a multiple of 8 bytes) in order with
    plain vector loads, each split over `threads` threads with a barrier after it, as a
    decode step reads its products: timed, the stream a step's weights can at best get.
    Returns the sum of their 64-bit words mod 2**64 (what keeps the loads)."""
    lib = _lib()
    assert lib is not None, unavailable_reason()
    for t in buffers:
        assert t.is_contiguous() and t.is_cpu and t.nbytes % 8 == 0, (t.shape, t.dtype)
    n = len(buffers)
    ptrs = (ctypes.c_void_p * n)(*(t.data_ptr() for t in buffers))
    sizes = (ctypes.c_int64 * n)(*(t.nbytes for t in buffers))
    return int(lib.soft_stream_read(ptrs, sizes, n, threads))


def vector_lanes() -> int:
    """fp32 lanes of the vectors the panel products use: 16 where the kernels were built
    for a CPU with AVX-512 (-march=native on one), else 8 (AVX2)."""
    lib = _lib()
    assert lib is not None, unavailable_reason()
    return int(lib.soft_vector_lanes())


def panel_pairs() -> bool:
    """Whether products on the panels round the activations to bf16 and multiply with
    AVX-512 BF16 (`vdpbf16ps`: two products a lane an instruction; bf16_peak), as a build
    for a CPU with it does; else they multiply x itself in fp32. False where the kernels
    are unavailable."""
    lib = _lib()
    return lib is not None and bool(lib.soft_panel_pairs())


def panel_rows(kind: int) -> int:
    """From how many rows `linear` multiplies int8 / Q4 weights by x itself (fp32, on the
    matrix's k-major panels); over fewer rows x is rounded to int8 per 32 values first
    (GGUF's Q8_0 activations: integer products, faster there)."""
    lib = _lib()
    assert lib is not None, unavailable_reason()
    return int(lib.soft_i8_panel_rows() if kind == I8 else lib.soft_q4_panel_rows())


def linear(
    x: Tensor,
    w: KernelWeight,
    *,
    mode: int = PLAIN,
    norm: Tensor | None = None,
    eps: float = 0.0,
    bias: Tensor | None = None,
    out: Tensor | None = None,
) -> Tensor:
    """f(x) @ w^T (+ bias) for fp32 x (..., in) (SWIGLU: (..., 2 in)), where f is
    PLAIN (x), RMS_NORM (x / rms(x) * norm, eps) or SWIGLU (silu(x[..., :in]) *
    x[..., in:]). int8 / Q4 weights multiply x quantized to int8 per 32 values (GGUF's
    Q8_0 activations) below `panel_rows` rows, x itself from there on. With `out`
    (..., out) the product is added to it in place (a residual add) and `out` is returned."""
    lib = _lib()
    assert lib is not None, unavailable_reason()
    n, k = w.shape
    width = 2 * k if mode == SWIGLU else k
    assert x.dtype == torch.float32 and x.shape[-1] == width, (x.dtype, x.shape, w.shape)
    x2 = x.reshape(-1, width)
    if x2.stride(1) != 1 or x2.stride(0) < width:
        x2 = x2.contiguous()
    m = x2.shape[0]
    if m == 0:  # no rows: nothing to multiply (the C side refuses an empty product)
        return x.new_empty(*x.shape[:-1], n) if out is None else out
    if out is None:
        y = torch.empty(*x.shape[:-1], n)
        acc = 0
    else:
        assert out.dtype == torch.float32 and out.is_contiguous() and out.shape[-1] == n
        y, acc = out, 1
    for t, size in ((norm, k), (bias, n)):
        assert t is None or (t.dtype == torch.float32 and t.is_contiguous() and t.numel() == size)
    rc = lib.soft_linear(x2.data_ptr(), m, x2.stride(0), ctypes.byref(w._c), _ptr(bias),
                         y.data_ptr(), n, mode, _ptr(norm), eps, acc,
                         torch.get_num_threads())  # fmt: skip
    if rc != 0:
        raise RuntimeError(f"soft_linear failed ({rc}) for x {tuple(x.shape)}, w {tuple(w.shape)}")
    return y


def rope_(x: Tensor, heads: int, head_dim: int, cos: Tensor, sin: Tensor) -> None:
    """Rotary embedding in place on the first `heads` heads of each row of x (M, ld)
    fp32 (rows contiguous in their heads), cos / sin (M, head_dim) fp32 contiguous."""
    lib = _lib()
    assert lib is not None, unavailable_reason()
    m = x.shape[0]
    assert x.dtype == torch.float32 and x.stride(-1) == 1 and x.dim() == 2
    assert cos.shape == (m, head_dim) and cos.is_contiguous() and sin.is_contiguous()
    lib.soft_rope(x.data_ptr(), m, x.stride(0), heads, head_dim, cos.data_ptr(), sin.data_ptr(),
                  torch.get_num_threads())  # fmt: skip


def attends(q: Tensor, cache_k: Tensor) -> bool:
    """`attend_decode` takes queries like q (n, 1, Hq, D) over a cache like cache_k."""
    d, hq, hkv = q.shape[-1], q.shape[-2], cache_k.shape[-2]
    return (
        available() and q.dtype == torch.float32 and cache_k.dtype in KV_DTYPES and q.shape[1] == 1
        and q.is_cpu and cache_k.is_contiguous() and d % 8 == 0 and hq % hkv == 0
    )  # fmt: skip


def attend_decode(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cache_k: Tensor,
    cache_v: Tensor,
    table: Tensor,
    write_block: Tensor,
    write_offset: Tensor,
    length: Tensor,
    scale: float,
) -> Tensor:
    """One new token per row over a paged KV cache: row r's k, v (n, 1, Hkv, D) go into
    cache block `write_block[r]` at `write_offset[r]`, then its query (n, 1, Hq, D)
    attends over its first `length[r]` tokens, found through `table` (n, max_blocks)
    block ids, in cache_k / cache_v (blocks, block_size, Hkv, D). int64 indices, fp32
    queries, keys and values, the cache fp32 or fp16 (`KV_DTYPES`). Returns (n, 1, Hq, D)."""
    lib = _lib()
    assert lib is not None, unavailable_reason()
    n, _, hq, d = q.shape
    hkv = k.shape[2]
    for t in (q, k, v):  # rows may be strided (views into the fused qkv), heads packed
        assert t.stride(3) == 1 and t.stride(2) == d, t.stride()
    assert table.dtype == torch.int64 and table.is_contiguous() and table.shape[0] == n
    idx = [t.reshape(n).contiguous() for t in (write_block, write_offset, length)]
    out = torch.empty(n, 1, hq, d)
    rc = lib.soft_attend_decode(
        q.data_ptr(), q.stride(0), k.data_ptr(), k.stride(0), v.data_ptr(), v.stride(0), n, hq,
        hkv, d,
        cache_k.data_ptr(), cache_v.data_ptr(), _half(cache_k, cache_v),
        cache_k.shape[1], table.data_ptr(),
        table.shape[1], *(t.data_ptr() for t in idx), scale, out.data_ptr(),
        torch.get_num_threads(),
    )  # fmt: skip
    if rc != 0:
        raise MemoryError(f"soft_attend_decode: out of memory for {n} rows")
    return out


@dataclass(frozen=True, eq=False)
class PagedKV:
    """One forward's paged KV cache at one layer, as `decode_layer` reads it: rows that
    each write one token (row r at `write_offset[r]` of block `write_block[r]`) and
    attend over their first `length[r]` tokens, in blocks `table[r]`."""

    k: Tensor  # (blocks, block_size, Hkv, D) fp32 or fp16 (KV_DTYPES)
    v: Tensor
    table: Tensor  # (rows, max_blocks) int64
    write_block: Tensor  # (rows,) int64
    write_offset: Tensor  # (rows,) int64
    length: Tensor  # (rows,) int64
    scale: float
    # how many values `table` and `write_block` advance per cache layer, for
    # `decode_layers` (which starts at this layer and runs on through the next ones)
    layer_strides: tuple[int, int] = (0, 0)


@dataclass(eq=False)
class LayerKernels:
    """A decoder layer's matrices and norms as `decode_layer` reads them."""

    matrices: tuple[KernelWeight, KernelWeight, KernelWeight, KernelWeight]  # qkv o gate|up down
    tensors: tuple[Tensor | None, Tensor, Tensor]  # qkv bias, input norm, post norm (fp32)
    eps: float
    heads: tuple[int, int, int]  # query heads, kv heads, head dim
    _c: _Layer = field(init=False, repr=False)

    def __post_init__(self) -> None:
        qkv, o, gu, down = (ctypes.pointer(m._c) for m in self.matrices)
        bias, n1, n2 = self.tensors
        self._c = _Layer(qkv, o, gu, down, _ptr(bias), _ptr(n1), _ptr(n2), self.eps, *self.heads)


@dataclass(eq=False)
class LayerStack:
    """A model's decoder layers of one shape as `decode_layers` reads them: layer i is the
    one at cache layer i. `max_rows`: the most decode rows it runs them for."""

    layers: tuple[LayerKernels, ...]
    max_rows: int
    _c: ctypes.Array[_Layer] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._c = (_Layer * len(self.layers))(*(layer._c for layer in self.layers))


def decode_layers(
    h: Tensor,
    stack: LayerStack,
    first: int,
    rows: list[int],
    cos: Tensor,
    sin: Tensor,
    kv: PagedKV,
    head: Head | None = None,
) -> None:
    """A decode step through layers first, first + 1, ... (one per entry of `rows`) in one
    call, in place on the residual stream h (n, hidden) fp32 contiguous: layer first + i
    runs `decode_layer` on rows [0, rows[i]) (deepest first: a row past its exit keeps
    its h from there). `kv` is the cache at layer `first`, with its `layer_strides`. With
    a `head`, every row's logits after it in the same call (into `head.logits`)."""
    assert 0 <= first and first + len(rows) <= len(stack.layers), (first, len(rows))
    layers = ctypes.byref(stack._c, first * ctypes.sizeof(_Layer))
    _decode(h, layers, rows, cos, sin, kv, head)


def decode_layer(h: Tensor, layer: LayerKernels, cos: Tensor, sin: Tensor, kv: PagedKV) -> None:
    """One decoder layer for n rows of one token each, in place on the residual stream h
    (n, hidden) fp32 contiguous: the fused calls of `linear`, `rope_` and `attend_decode`
    in one, cos / sin (n, head_dim)."""
    _decode(h, ctypes.byref(layer._c), [h.shape[0]], cos, sin, kv)


@dataclass(frozen=True, eq=False)
class Head:
    """The product a decode step ends in (`decode_layers`): logits (n, V) fp32 contiguous
    = RMSNorm(h; norm, eps) @ weight^T."""

    weight: KernelWeight
    norm: Tensor  # (hidden,) fp32 contiguous
    eps: float
    logits: Tensor


def _decode(h: Tensor, layers: object, rows: list[int], cos: Tensor, sin: Tensor,
            kv: PagedKV, head: Head | None = None) -> None:  # fmt: skip
    lib = _lib()
    assert lib is not None, unavailable_reason()
    n = h.shape[0]
    assert h.is_contiguous() and h.dtype == torch.float32 and cos.is_contiguous()
    assert sin.is_contiguous() and kv.table.shape[0] >= n
    for t in (kv.write_block, kv.write_offset, kv.length):
        assert t.dtype == torch.int64 and t.stride(0) == 1
    assert kv.table.dtype == torch.int64 and kv.table.is_contiguous()
    paged = _Paged(kv.k.data_ptr(), kv.v.data_ptr(), _half(kv.k, kv.v),
                   kv.k.shape[1], kv.table.shape[1],
                   kv.table.data_ptr(), kv.write_block.data_ptr(), kv.write_offset.data_ptr(),
                   kv.length.data_ptr(), kv.scale)  # fmt: skip
    counts = (ctypes.c_int * len(rows))(*rows)
    head_args: tuple[object, int | None, float, int | None] = (None, None, 0.0, None)
    if head is not None:
        v = head.weight.shape[0]
        assert head.logits.shape == (n, v) and head.logits.dtype == torch.float32
        assert head.logits.is_contiguous() and head.norm.dtype == torch.float32
        assert head.norm.is_contiguous() and head.norm.numel() == h.shape[1]
        head_args = (ctypes.byref(head.weight._c), head.norm.data_ptr(), head.eps,
                     head.logits.data_ptr())  # fmt: skip
    rc = lib.soft_decode_layers(h.data_ptr(), n, len(rows), layers, counts, cos.data_ptr(),
                                sin.data_ptr(), ctypes.byref(paged), *kv.layer_strides,
                                *head_args, torch.get_num_threads())  # fmt: skip
    if rc != 0:
        raise RuntimeError(f"soft_decode_layers failed ({rc}) for {n} rows, {len(rows)} layers")
