"""soft-serve's CPU kernels (models/kernels): each product against a plain reference, the
fused modes, rotary, decode attention over a paged cache, the fused decode layer, and the
build's fallbacks."""

from __future__ import annotations

import ctypes
import dataclasses
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import models
from models import kernels
from models.kernels import KernelWeight, build
from models.llama import rotate
from models.weights import Int4Weight, Int8Weight
from server.engine.attention import PagedAttention
from server.engine.kv_cache import KVCacheConfig, KVCacheManager
from server.engine.scheduler import Sequence
from server.engine.types import GenerationRequest, SamplingParams

CAN_BUILD = shutil.which("g++") is not None and {"avx2", "fma"} <= kernels._cpu_flags()
needs = pytest.mark.skipif(not CAN_BUILD, reason="no g++ or no AVX2/FMA here")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def q8_activations(x: torch.Tensor) -> torch.Tensor:
    """x as the int8 kernels see it: int8 per 32 values, d = max|x| / 127, round to even."""
    blocks = x.reshape(*x.shape[:-1], -1, 32)
    d = blocks.abs().amax(-1, keepdim=True) / 127
    q = torch.where(d > 0, torch.round(blocks / torch.where(d > 0, d, 1)), 0)
    return (q * d).reshape(x.shape)


def expected(kind: str, w: KernelWeight, x: torch.Tensor) -> torch.Tensor:
    """What `kernels.linear` computes for the rows x (one chunk of at most 64), in fp32.
    int8 / Q4 weights over few rows: exactly the dequantized matrix times the int8-rounded
    x (Q4's minimums included: they meet the rounded x too); on the panels (bf16 past one
    row, int8 / Q4 from `panel_rows`): times x itself, or, where the panels multiply in
    bf16 (`panel_pairs`), times x rounded to bf16, Q4's dequantized weights in bf16 too."""
    integer = kind in ("int8", "q4")
    on_panels = len(x) >= kernels.panel_rows(w.kind) if integer else kind == "bf16" and len(x) > 1
    wd = w.dequantize()
    if not on_panels:
        return (q8_activations(x) if integer else x) @ wd.T
    if kernels.panel_pairs():
        x = x.bfloat16().float()
        wd = wd.bfloat16().float() if kind == "q4" else wd
    return x @ wd.T


@needs
def test_the_kernels_build_and_load_here() -> None:
    assert kernels.available(), kernels.unavailable_reason()
    assert kernels.unavailable_reason() is None


def weights(kind: str, n: int, k: int) -> KernelWeight:
    g = torch.Generator().manual_seed(n * k)
    w = torch.randn(n, k, generator=g) * 0.05
    if kind == "f32":
        return KernelWeight.dense(w)
    if kind == "bf16":
        return KernelWeight.dense(w.bfloat16())
    if kind == "int8":
        q = Int8Weight.quantize(w)
        assert q.kernel is not None
        return q.kernel
    q = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
    return KernelWeight.q4(q, torch.rand(n, k // 32, generator=g) * 0.01,
                           torch.randn(n, k // 32, generator=g) * 0.05)  # fmt: skip


@needs
def test_int4_kernel_layout_holds_the_values_torchs_does() -> None:
    w = Int4Weight.quantize(torch.randn(32, 64))
    assert w.kernel is not None
    assert torch.allclose(w.kernel.dequantize(), w.dequantize(), atol=1e-6)


@needs
@pytest.mark.parametrize("kind", ["f32", "bf16", "int8", "q4"])
@pytest.mark.parametrize("rows", [1, 2, 3, 5, 7, 16, 64, 70])  # 70: past one 64-row chunk
@pytest.mark.parametrize("n", [38, 24])
@pytest.mark.parametrize("k", [96, 576])
def test_products_match_the_dequantized_reference(kind: str, rows: int, n: int, k: int) -> None:
    # 38 outputs: a partial last tile of 4 output rows and a partial panel of 16 alone (the
    # AVX-512 loop takes panels in pairs); 24: a pair whose second panel is partial.
    # k = 96: three blocks of 32 (the VNNI loop takes two a pass: an odd one alone); 576:
    # 18 blocks (Q4's minimums in 16 lanes: a partial second vector)
    w = weights(kind, n, k)
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(rows))
    bias = torch.randn(n)
    ref = torch.cat([expected(kind, w, part) for part in x.split(64)]) + bias  # 64-row chunks
    got = kernels.linear(x, w, bias=bias)
    assert got.shape == (rows, n)
    assert rel(got, ref) < 1e-5, kind


@needs
def test_the_fma_peak_is_a_positive_rate() -> None:
    assert 0 < kernels.fma_peak(1, 100_000) < 1e5  # GFLOP/s: above zero, below any CPU's


@needs
def test_the_bf16_peak_is_a_rate_exactly_where_the_panels_multiply_in_bf16() -> None:
    peak = kernels.bf16_peak(1, 100_000)
    if kernels.panel_pairs():
        assert peak is not None and 0 < peak < 1e5
    else:
        assert peak is None


@needs
def test_the_panels_vector_width_is_the_cpus() -> None:
    # the -march=native build uses AVX-512 exactly where this CPU has it; the portable
    # build (SOFT_KERNELS=prebuilt) AVX2 only
    native = "avx512f" in open("/proc/cpuinfo").read().split()
    portable = os.environ.get("SOFT_KERNELS") == "prebuilt"
    assert kernels.vector_lanes() == (16 if native and not portable else 8)


@needs
def test_no_rows_is_an_empty_product() -> None:
    w = weights("int8", 8, 64)
    assert kernels.linear(torch.empty(0, 64), w).shape == (0, 8)
    assert kernels.linear(torch.empty(2, 0, 64), w).shape == (2, 0, 8)


@needs
@pytest.mark.parametrize("kind", ["f32", "bf16", "int8"])
def test_fused_norm_swiglu_and_residual_modes(kind: str) -> None:
    n, k = 20, 64
    w = weights(kind, n, k)
    x = torch.randn(3, k)
    norm = torch.rand(k) + 0.5
    ref = expected(kind, w, F.rms_norm(x, (k,), norm, 1e-5))
    assert rel(kernels.linear(x, w, mode=kernels.RMS_NORM, norm=norm, eps=1e-5), ref) < 1e-5
    gu = torch.randn(3, 2 * k)
    ref = expected(kind, w, F.silu(gu[:, :k]) * gu[:, k:])
    assert rel(kernels.linear(gu, w, mode=kernels.SWIGLU), ref) < 1e-5
    res = torch.randn(3, n)
    expect = res + expected(kind, w, x)
    out = kernels.linear(x, w, out=res)
    assert out is res and rel(res, expect) < 1e-5


@needs
def test_rope_matches_rotate() -> None:
    m, heads, d = 5, 4, 16
    x = torch.randn(m, heads * d + 8)  # 8 more columns (values) stay as they are
    cos, sin = torch.randn(m, d), torch.randn(m, d)
    ref = rotate(x[:, : heads * d].view(m, 1, heads, d), cos.view(m, 1, 1, d),
                 sin.view(m, 1, 1, d)).reshape(m, -1)  # fmt: skip
    tail = x[:, heads * d :].clone()
    kernels.rope_(x, heads, d, cos, sin)
    assert torch.allclose(x[:, : heads * d], ref, atol=1e-6)
    assert torch.equal(x[:, heads * d :], tail)


def test_shapes_the_kernels_refuse() -> None:
    assert kernels.supports((8, 48), kernels.F32) and not kernels.supports((8, 40), kernels.F32)
    assert not kernels.supports((8, 48), kernels.I8)  # int8 activations: blocks of 32
    assert Int8Weight.quantize(torch.randn(8, 48)).kernel is None  # torch's kernel then


def test_switched_off_by_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SOFT_KERNELS", "0")
    kernels._lib.cache_clear()
    try:
        assert not kernels.available()
        assert kernels.unavailable_reason() == "SOFT_KERNELS=0"
    finally:
        monkeypatch.undo()
        kernels._lib.cache_clear()


@needs
def test_a_failed_build_falls_back_with_its_reason(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("CXX", "/bin/false")
    monkeypatch.setenv("SOFT_CACHE_DIR", str(tmp_path))  # no cached library to reuse
    kernels._lib.cache_clear()
    try:
        assert not kernels.available()
        assert "could not build cpu.cpp" in (kernels.unavailable_reason() or "")
    finally:
        monkeypatch.undo()
        kernels._lib.cache_clear()
    assert kernels.available()


@needs
def test_the_ctypes_structs_match_cpu_cpp() -> None:
    lib = kernels._lib()
    assert lib is not None
    assert kernels.layout_mismatch(lib) is None
    assert kernels._layout()[0] == ctypes.sizeof(kernels._Weight)


@needs
def test_without_a_compiler_the_shipped_build_runs(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """What the image does: no compiler at run time, the portable build shipped in the
    wheel beside cpu.cpp (models/kernels/build.py) is loaded instead."""
    cxx = build.compiler()
    assert cxx is not None
    shipped = build.compile_to(tmp_path / "soft_cpu-test.so", cxx, build.PORTABLE)
    monkeypatch.setattr(build, "shipped", lambda: shipped)
    monkeypatch.setattr(build, "compiler", lambda: None)
    monkeypatch.setenv("SOFT_CACHE_DIR", str(tmp_path / "cache"))  # nothing built here
    kernels._lib.cache_clear()
    try:
        assert kernels.available(), kernels.unavailable_reason()
        assert kernels.library() == shipped
        w = weights("int8", 32, 64)
        x = torch.randn(3, 64)
        assert rel(kernels.linear(x, w), q8_activations(x) @ w.dequantize().T) < 1e-5
        monkeypatch.setattr(build, "shipped", lambda: tmp_path / "none.so")
        kernels._lib.cache_clear()
        assert not kernels.available()
        assert "no C++ compiler" in (kernels.unavailable_reason() or "")
    finally:
        monkeypatch.undo()
        kernels._lib.cache_clear()
    assert kernels.available()


def _cache_with_rows(
    lengths: list[int], layers: int = 2, kv_heads: int = 2, head_dim: int = 16,
    block_size: int = 4, dtype: torch.dtype = torch.float32,
) -> tuple[KVCacheManager, list[Sequence]]:  # fmt: skip
    """A cache whose rows hold `lengths` tokens of random keys/values at every layer."""
    blocks = sum(-(-(n + 1) // block_size) for n in lengths) * layers
    cfg = KVCacheConfig(num_layers=layers, num_kv_heads=kv_heads, head_dim=head_dim,
                        num_blocks=blocks, block_size=block_size, dtype=dtype)  # fmt: skip
    cache = KVCacheManager(cfg)
    torch.manual_seed(0)
    cache.k.normal_()
    cache.v.normal_()
    seqs = []
    for j, n in enumerate(lengths):
        req = GenerationRequest(f"r{j}", (5,) * n, SamplingParams(max_tokens=4), layers)
        s = Sequence(req, [5] * n, layers)
        assert cache.allocate(s, layers, n + 1)
        seqs.append(s)
    return cache, seqs


@needs
@pytest.mark.parametrize("head_dim", [16, 80])  # 80: 64 output values a pass, then 16
@pytest.mark.parametrize("block_size", [4, 16])  # 16: 8 keys at a time in one block
# keys 8 at a time: a partial block, one under 8, two blocks; chunks of 128 tokens: three
# (the last partial), exactly one, one and a token, beside a short row
@pytest.mark.parametrize("lengths", [[9, 3, 14], [300, 128, 129, 5]])
@pytest.mark.parametrize("dtype", kernels.KV_DTYPES)  # an fp16 cache: widened as it is read
def test_decode_attention_matches_the_torch_path(
    monkeypatch: pytest.MonkeyPatch, head_dim: int, block_size: int, lengths: list[int],
    dtype: torch.dtype,
) -> None:  # fmt: skip
    n = len(lengths)
    q = torch.randn(n, 1, 6, head_dim)  # 6 query heads over 2 kv heads
    k, v = torch.randn(n, 1, 2, head_dim), torch.randn(n, 1, 2, head_dim)
    outs, caches = [], []
    for fused in (True, False):
        cache, seqs = _cache_with_rows(lengths, head_dim=head_dim, block_size=block_size,
                                       dtype=dtype)  # fmt: skip
        if not fused:
            monkeypatch.setattr(kernels, "attends", lambda *a: False)
        kv = PagedAttention(cache, seqs, [2] * n, [n for n in lengths], 1)
        outs.append(kv.attend(1, q, k, v))
        caches.append((cache.k.clone(), cache.v.clone()))
    assert rel(outs[0], outs[1]) < 1e-5
    assert torch.equal(caches[0][0], caches[1][0]) and torch.equal(caches[0][1], caches[1][1])


@needs
def test_a_rows_attention_does_not_depend_on_the_other_rows() -> None:
    # how a row's tokens are split into tasks depends on its length alone: the same numbers
    # alone and beside others (what self-speculation's greedy identity rests on)
    lengths = [300, 40, 7]
    q = torch.randn(3, 1, 6, 16)
    k, v = torch.randn(3, 1, 2, 16), torch.randn(3, 1, 2, 16)
    cache, seqs = _cache_with_rows(lengths, block_size=16)
    together = PagedAttention(cache, seqs, [2] * 3, lengths, 1).attend(1, q, k, v)
    for r in range(3):
        alone = PagedAttention(cache, seqs[r : r + 1], [2], lengths[r : r + 1], 1)
        assert torch.equal(
            alone.attend(1, q[r : r + 1], k[r : r + 1], v[r : r + 1]), together[r : r + 1]
        )


@needs
@pytest.mark.parametrize("quantization", [None, "int8"])
@pytest.mark.parametrize("dtype", kernels.KV_DTYPES)
def test_decode_step_in_one_call_matches_layer_by_layer_and_torch(
    tiny_dir: Path, quantization: str | None, dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The whole stack in one call (kernels.decode_layers), one fused call per layer
    (kernels.decode_layer) and torch's ops agree, rows leaving at their own exits."""
    model = models.load(tiny_dir, device="cpu", quantization=quantization)
    model.pack()
    assert model.weights.stack is not None
    assert all(layer.fused is not None for layer in model.weights.layers)
    n_layers, c = model.num_layers, model.cfg
    depths = [n_layers, n_layers // 2]  # deepest first; the second row leaves halfway
    h = torch.randn(2, 1, c.hidden_size)
    pos = torch.tensor([[9], [3]])
    packed = model.weights
    without_stack = dataclasses.replace(packed, stack=None)
    unfused = dataclasses.replace(packed, stack=None, layers=tuple(
        dataclasses.replace(layer, fused=None) for layer in packed.layers))  # fmt: skip
    calls: list[list[int]] = []
    one_call = kernels.decode_layers

    def spy(
        h: torch.Tensor, st: kernels.LayerStack, first: int, rows: list[int], *a: object
    ) -> None:
        calls.append(rows)
        one_call(h, st, first, rows, *a)  # type: ignore[arg-type]

    monkeypatch.setattr(kernels, "decode_layers", spy)
    results, caches = [], []
    for path in ("stack", "layer", "torch"):
        cache, seqs = _cache_with_rows([9, 3], n_layers, c.num_kv_heads, c.head_dim, dtype=dtype)
        model._weights = {"stack": packed, "layer": without_stack, "torch": unfused}[path]
        kv = PagedAttention(cache, seqs, depths, [9, 3], 1)
        with torch.inference_mode():
            results.append(model.hidden(None, pos, depths, kv, h=h.clone()))
        caches.append(cache.k.clone())
    model._weights = packed
    assert calls == [[2] * (n_layers // 2) + [1] * (n_layers - n_layers // 2)]
    assert torch.equal(results[0], results[1]) and torch.equal(caches[0], caches[1])
    assert rel(results[0], results[2]) < 1e-5 and rel(caches[0], caches[2]) < 1e-5


@needs
@pytest.mark.parametrize("quantization", [None, "int8"])
def test_a_decode_batchs_logits_in_one_call_match_the_stack_then_the_head(
    tiny_dir: Path, quantization: str | None
) -> None:
    """decode_logits (layers, final norm and head in one decode_layers call) computes the
    numbers hidden_groups + head do, rows at their own exits, and writes the same cache."""
    model = models.load(tiny_dir, device="cpu", quantization=quantization)
    model.pack()
    n_layers, c = model.num_layers, model.cfg
    depths = [n_layers, n_layers, n_layers // 2]
    ids, pos = torch.tensor([[7], [11], [3]]), torch.tensor([[9], [5], [3]])
    results, caches = [], []
    for fused in (True, False):
        cache, seqs = _cache_with_rows([9, 5, 3], n_layers, c.num_kv_heads, c.head_dim)
        kv = PagedAttention(cache, seqs, depths, [9, 5, 3], 1)
        with torch.inference_mode():
            if fused:
                logits = model.decode_logits(ids, pos, depths, kv)
                assert logits is not None
            else:
                h = model.hidden_groups([(model.embed_ids(ids), pos, depths, kv)])[0]
                logits = model.head(h, depths)[:, 0]
        results.append(logits)
        caches.append(cache.k.clone())
    assert results[0].shape == (3, c.vocab_size)
    assert torch.equal(results[0], results[1]) and torch.equal(caches[0], caches[1])


@needs
def test_decode_layers_refuses_what_it_cannot_run(tiny_dir: Path) -> None:
    model = models.load(tiny_dir, device="cpu")
    model.pack()
    stack = model.weights.stack
    assert stack is not None
    n_layers, c = model.num_layers, model.cfg
    cache, seqs = _cache_with_rows([9, 3], n_layers, c.num_kv_heads, c.head_dim)
    kv = PagedAttention(cache, seqs, [n_layers] * 2, [9, 3], 1).paged(0)
    assert kv is not None
    h, cs = torch.randn(2, c.hidden_size), torch.randn(2, c.head_dim)
    with pytest.raises(RuntimeError, match="soft_decode_layers failed"):  # 3 rows of 2
        kernels.decode_layers(h, stack, 0, [3] * n_layers, cs, cs, kv)
    with pytest.raises(AssertionError):  # past the last layer
        kernels.decode_layers(h, stack, 1, [2] * n_layers, cs, cs, kv)


def test_the_weight_stream_reads_every_word_of_every_buffer_once() -> None:
    # what the kernels benchmark times as a decode step's best stream: the sum mod 2**64
    # of the 64-bit words proves each buffer was read whole, tails included, once
    g = torch.Generator().manual_seed(5)
    buffers = [torch.randint(-128, 128, (n,), dtype=torch.int8, generator=g)
               for n in (8, 120, 4096, 576 * 960 + 8)]  # fmt: skip
    words = np.concatenate([b.numpy().view(np.uint64) for b in buffers])
    expect = int(words.sum(dtype=np.uint64))  # numpy wraps mod 2**64
    for threads in (1, 2, 3):
        assert kernels.stream_read(buffers, threads) == expect
