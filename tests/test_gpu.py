"""The CUDA path (run on a GPU machine: `pytest -m gpu`, or benchmarks/gpu_check.sh)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import models

pytestmark = pytest.mark.gpu


def test_cuda_logits_match_cpu_at_every_depth(tiny_dir: Path) -> None:
    assert torch.cuda.is_available(), "this test needs a CUDA device"
    cpu = models.load(tiny_dir, device="cpu")
    for dtype, tol in ((torch.float32, 1e-3), (torch.bfloat16, 0.05)):
        gpu = models.load(tiny_dir, device="cuda", dtype=dtype)
        ids = torch.randint(3, 256, (2, 24), generator=torch.Generator().manual_seed(0))
        for depth in range(1, cpu.num_layers + 1):
            a, b = cpu.logits(ids, depth), gpu.logits(ids, depth).float().cpu()
            rel = ((a - b).norm() / a.norm()).item()
            assert rel < tol, f"{dtype} depth {depth}: relative error {rel}"


def test_cuda_engine_greedy_matches_the_reference_loop() -> None:
    from benchmarks.gpu_check import main

    assert main(["--shape", "tiny", "--device", "cuda", "--tokens", "8",
                 "--out", "/tmp/gpu_check_test.json"]) == 0  # fmt: skip
