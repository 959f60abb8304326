"""`python -m loadtest`: schedules (exact with seeds, rates over long horizons), the option
parsers and CLI errors (exit 2), the report on synthetic records (exact percentiles and
attainment, valid PNGs), and real runs of a few seconds against local HTTP servers: an
OpenAI imitation with soft-serve's headers, and the real soft-serve on a tiny model.
Every target is 127.0.0.1 (LOADTEST_LOCAL_ONLY=1 makes the CLI refuse anything else)."""

from __future__ import annotations

import asyncio
import json
import math
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from loadtest.__main__ import LOCAL_ONLY_ENV, build_parser, load_test, main
from loadtest.client import ClientConfig, OpenAIClient, RequestRecord, check_target
from loadtest.output import write_report
from loadtest.report import load_records, summarize
from loadtest.runner import RunConfig, run
from loadtest.schedule import (
    BudgetClass,
    SpecError,
    Workload,
    arrival_times,
    constant_profile,
    parse_budget_mix,
    parse_budget_ms,
    parse_ramp,
    parse_range,
    parse_steps,
    plan_requests,
    ramp_profile,
    step_profile,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def local_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(LOCAL_ONLY_ENV, "1")


# -- schedules -------------------------------------------------------------------------------
def test_constant_schedule_is_exact() -> None:
    times = arrival_times(constant_profile(4.0, 2.0), "constant", seed=0)
    assert times.tolist() == [0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75]
    assert arrival_times(constant_profile(4.0, 2.0), "constant", 0, max_requests=3).tolist() == [
        0.0,
        0.25,
        0.5,
    ]


def test_poisson_schedule_is_seeded_sorted_and_bounded() -> None:
    profile = constant_profile(10.0, 5.0)
    a, b = arrival_times(profile, "poisson", 7), arrival_times(profile, "poisson", 7)
    assert a.tolist() == b.tolist()
    assert a.tolist() != arrival_times(profile, "poisson", 8).tolist()
    assert np.all(np.diff(a) > 0) and a[0] >= 0 and a[-1] < 5.0
    assert arrival_times(profile, "poisson", 7, max_requests=5).tolist() == a[:5].tolist()


def test_poisson_rate_over_a_long_horizon() -> None:
    times = arrival_times(constant_profile(50.0, 2000.0), "poisson", seed=1)
    expected = 50.0 * 2000.0
    assert abs(len(times) - expected) < 4 * math.sqrt(expected)  # 4 sigma
    gaps = np.diff(times)
    assert gaps.mean() == pytest.approx(1 / 50.0, rel=0.01)
    assert gaps.std() == pytest.approx(1 / 50.0, rel=0.02)  # exponential: std = mean


def test_step_schedule_exact_counts_and_poisson_rates() -> None:
    profile = step_profile(2.0, [(8.0, 10.0), (0.0, 15.0), (4.0, 18.0), (9.0, 30.0)], 20.0)
    assert [profile.rate_at(t) for t in (0, 9.9, 10, 14.9, 15, 17, 18, 19.9, 20)] == [
        2,
        2,
        8,
        8,
        0,
        0,
        4,
        4,
        0,
    ]
    times = arrival_times(profile, "constant", seed=0)
    counts = np.histogram(times, bins=[0, 10, 15, 18, 20])[0].tolist()
    assert counts == [20, 40, 0, 8]
    assert times[20] == pytest.approx(10.0) and times[-1] == pytest.approx(19.75)
    long = step_profile(20.0, [(80.0, 500.0)], 1000.0)
    counts = np.histogram(arrival_times(long, "poisson", seed=3), bins=[0, 500, 1000])[0]
    assert abs(counts[0] - 10_000) < 4 * 100 and abs(counts[1] - 40_000) < 4 * 200


def test_ramp_schedule_follows_the_cumulative_rate() -> None:
    # rate t/10 on [0, 100): Λ(t) = t²/20, so the k-th evenly spaced arrival is at √(20k)
    times = arrival_times(ramp_profile(0.0, 10.0, 100.0), "constant", seed=0)
    assert len(times) == 500
    assert times == pytest.approx(np.sqrt(20.0 * np.arange(500)), abs=1e-9)
    down = arrival_times(ramp_profile(10.0, 0.0, 100.0), "constant", seed=0)
    assert len(down) == 500 and down[1] == pytest.approx(100 - math.sqrt(100**2 - 20), abs=1e-9)
    poisson = arrival_times(ramp_profile(0.0, 100.0, 1000.0), "poisson", seed=2)
    halves = np.histogram(poisson, bins=[0, 500, 1000])[0]  # expected 12 500 and 37 500
    assert abs(halves[0] - 12_500) < 4 * math.sqrt(12_500)
    assert abs(halves[1] - 37_500) < 4 * math.sqrt(37_500)


def test_plan_draws_the_mix_reproducibly() -> None:
    workload = Workload(
        budgets=parse_budget_mix("250ms:0.3,1s:0.4,none:0.3"),
        prompt_tokens=(16, 128),
        max_tokens=(16, 16),
        stream_fraction=0.5,
        chat_fraction=0.25,
    )
    times = np.arange(20_000) * 0.01
    plan = plan_requests(times, workload, seed=0)
    assert plan == plan_requests(times, workload, seed=0)
    assert [p.index for p in plan[:3]] == [0, 1, 2] and plan[5].at == pytest.approx(0.05)
    share = {
        label: sum(p.budget.label == label for p in plan) / len(plan)
        for label in ("250ms", "1s", "none")
    }
    assert share == pytest.approx({"250ms": 0.3, "1s": 0.4, "none": 0.3}, abs=0.015)
    assert {p.prompt_tokens for p in plan} == set(range(16, 129))
    assert {p.max_tokens for p in plan} == {16}
    assert sum(p.stream for p in plan) / len(plan) == pytest.approx(0.5, abs=0.015)
    assert sum(p.chat for p in plan) / len(plan) == pytest.approx(0.25, abs=0.015)


def test_warmup_and_steady_mark_background_requests() -> None:
    def plan(*extra: str) -> list[Any]:
        args = build_parser().parse_args(
            ["--url", "http://127.0.0.1:1", "--schedule", "constant", "--rate", "10"]
            + ["--duration", "3", "--timeout", "2", *extra]
        )
        return load_test(args).plan()

    # constant 10/s: arrivals at 0, 0.1, ...; measured are those in [1, 3)
    p = plan("--warmup", "1")
    assert len(p) == 30 and [q.index for q in p if q.measured] == list(range(10, 30))
    # --steady: a tail of --timeout seconds at the same rate, unmeasured
    p = plan("--warmup", "1", "--steady")
    assert len(p) == 50 and sum(q.measured for q in p) == 20
    assert all(not q.measured for q in p if q.at >= 3.0) and p[-1].at == pytest.approx(4.9)
    # --max-requests caps the measured ones; steady keeps its tail, plain runs stop there
    p = plan("--max-requests", "5", "--steady")
    assert [q.index for q in p if q.measured] == [0, 1, 2, 3, 4] and len(p) == 50
    assert len(plan("--max-requests", "5")) == 5
    assert len(plan()) == 30 and all(q.measured for q in plan())


# -- parsers and the command line ------------------------------------------------------------
def test_budget_mix_parser() -> None:
    assert parse_budget_mix("250ms:0.3,1s:0.4,none:0.3") == (
        BudgetClass("250ms", 250.0, 0.3),
        BudgetClass("1s", 1000.0, 0.4),
        BudgetClass("none", None, 0.3),
    )
    assert parse_budget_mix("1.5s:1, 800:3") == (
        BudgetClass("1.5s", 1500.0, 0.25),
        BudgetClass("800", 800.0, 0.75),
    )
    assert [parse_budget_ms(x) for x in ("250ms", "1.5s", "40", "None", ".5s")] == [
        250.0,
        1500.0,
        40.0,
        None,
        500.0,
    ]
    for bad in ("250ms", "fast:1", "250ms:x", "250ms:-1", "250ms:0", "1s:1,1S:1", ":1", "0ms:1"):
        with pytest.raises(SpecError):
            parse_budget_mix(bad)


def test_range_step_and_ramp_parsers() -> None:
    assert parse_range("16:128", "--prompt-tokens") == (16, 128)
    assert parse_range("32", "--max-tokens") == (32, 32)
    assert parse_steps("2@10,8@20s") == ((2.0, 10.0), (8.0, 20.0))
    assert parse_ramp("1:10") == (1.0, 10.0)
    for bad_range in ("0:4", "9:3", "a:b", ""):
        with pytest.raises(SpecError):
            parse_range(bad_range, "--max-tokens")
    for bad_steps in ("2", "2@x", "2@10,3@5", "-1@3"):
        with pytest.raises(SpecError):
            parse_steps(bad_steps)
    for bad_ramp in ("1", "a:2", "0:0", "-1:4"):
        with pytest.raises(SpecError):
            parse_ramp(bad_ramp)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--rate", "0"], "--rate"),
        (["--duration", "-1"], "--duration"),
        (["--max-requests", "0"], "--max-requests"),
        (["--concurrency", "0"], "--concurrency"),
        (["--budget-mix", "250ms"], "BUDGET:WEIGHT"),
        (["--budget-mix", "soon:1"], "250ms"),
        (["--prompt-tokens", "10:5"], "--prompt-tokens"),
        (["--stream-fraction", "2"], "--stream-fraction"),
        (["--step", "8@10"], "--schedule step"),
        (["--schedule", "step"], "--step"),
        (["--schedule", "ramp", "--ramp", "5"], "START:END"),
        (["--schedule", "sometimes"], "invalid choice"),
        (["--rate", "fast"], "invalid float"),
        (["--url", "ftp://127.0.0.1"], "--url"),
        (["--url", "http://example.com:8000"], "loopback"),
    ],
)
def test_cli_rejects_bad_input_with_exit_2(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--url", "http://127.0.0.1:9", "--out", str(tmp_path), *args])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # nothing ran, nothing written


def test_cli_help_explains_every_option(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--schedule", "--step", "--ramp", "--budget-mix", "--overflow", "--out"):
        assert flag in text
    assert "exit status" in text


def test_check_target_is_only_strict_in_local_only_mode() -> None:
    check_target("http://example.com:8000", local_only=False)  # product use: any URL
    for url in ("http://127.0.0.1:8000", "http://localhost:1/v1", "http://[::1]:80"):
        check_target(url, local_only=True)
    with pytest.raises(SpecError, match="loopback"):
        check_target("http://10.0.0.1:8000", local_only=True)


# -- the report ------------------------------------------------------------------------------
def make_record(index: int, **kw: Any) -> RequestRecord:
    base: dict[str, Any] = dict(
        index=index,
        scheduled_s=index * 0.1,
        endpoint="completions",
        stream=False,
        budget="50ms",
        budget_ms=50.0,
        prompt_tokens_target=16,
        max_tokens=8,
        sent_s=index * 0.1,
        status=200,
        completion_tokens=8,
    )
    base.update(kw)
    return RequestRecord(**base)


def synthetic_records() -> list[RequestRecord]:
    # 100 successes with latencies 1..100 ms: depth 2 for the first 50, depth 4 after;
    # streaming ones carry 2 inter-token gaps each
    records = [
        make_record(
            k,
            latency_ms=float(k + 1),
            depth=2 if k < 50 else 4,
            predicted_ms=float(k + 1) * 1.1,
            stream=k % 2 == 0,
            ttft_ms=float(k + 1) / 2 if k % 2 == 0 else None,
            itl_ms=[1.0, 3.0] if k % 2 == 0 else [],
        )
        for k in range(100)
    ]
    records += [
        make_record(100, status=429, error="http", latency_ms=1.0),
        make_record(101, status=503, error="http", latency_ms=1.0),
        make_record(102, status=500, error="http", latency_ms=1.0, budget="none", budget_ms=None),
        make_record(103, status=None, error="timeout", latency_ms=60_000.0),
        make_record(104, sent_s=None, status=None, error="dropped"),
        make_record(105, budget="none", budget_ms=None, latency_ms=7.0, delay_ms=12.0),
    ]
    return records


def test_summary_percentiles_attainment_and_errors_are_exact() -> None:
    s = summarize(synthetic_records(), elapsed_s=10.0, duration_s=10.5)
    assert (s.scheduled, s.sent, s.ok, s.errors, s.dropped, s.delayed) == (106, 105, 101, 4, 1, 1)
    assert s.errors_by_status == {"429": 1, "500": 1, "503": 1}
    assert s.errors_by_kind == {"timeout": 1}
    assert s.shed == 2
    assert s.offered_rps == pytest.approx(106 / 10.5) and s.throughput_rps == pytest.approx(10.1)
    assert s.output_tokens_per_s == pytest.approx(101 * 8 / 10.0)
    assert s.prediction_error == pytest.approx(0.1)
    assert s.delay_ms.count == 1 and s.delay_ms.max == 12.0
    assert s.lag_ms.count == 105 and s.lag_ms.max == 0.0  # sent on time (the hold is not lag)

    by_depth = {g.key: g for g in s.by_depth}
    assert list(by_depth) == ["2", "4", "n/a"]
    d2, d4 = by_depth["2"], by_depth["4"]
    # numpy linear percentiles of 1..50: p50 = 25.5, p90 = 45.1, p99 = 49.51
    assert (d2.latency_ms.p50, d2.latency_ms.p90, d2.latency_ms.p99) == pytest.approx(
        (25.5, 45.1, 49.51)
    )
    assert (d4.latency_ms.p50, d4.latency_ms.max, d4.latency_ms.mean) == pytest.approx(
        (75.5, 100.0, 75.5)
    )
    assert (d2.attainment.met, d2.attainment.missed, d2.attainment.attainment) == (50, 0, 1.0)
    assert (d4.attainment.met, d4.attainment.missed, d4.attainment.attainment) == (0, 50, 0.0)
    assert d2.ttft_ms.count == 25 and d2.itl_ms.count == 50 and d2.itl_ms.p50 == 2.0

    lat = s.latency_ms  # 1..100 plus the 7 ms request without a budget
    expected = np.percentile(np.r_[np.arange(1.0, 101.0), 7.0], [50, 95, 99])
    assert lat.count == 101 and [lat.p50, lat.p95, lat.p99] == pytest.approx(expected.tolist())

    a = s.attainment  # budget 50ms: 1..50 met, 51..100 missed, 429/503/timeout failed
    assert (a.met, a.missed, a.failed) == (50, 50, 3)
    assert a.attainment == 0.5 and a.attainment_incl_failed == pytest.approx(50 / 103)
    budgets = {g.key: g for g in s.by_budget}
    assert budgets["none"].attainment.attainment is None and budgets["none"].ok == 1


def test_report_files_json_markdown_and_valid_pngs(tmp_path: Path) -> None:
    records = synthetic_records()
    summary = summarize(records, elapsed_s=10.0)
    files = write_report(tmp_path / "run", records, summary, {"url": "x"}, lambda t: 10.0)
    assert sorted(p.name for p in files.plots) == [
        "attainment.png",
        "depth_over_time.png",
        "latency_by_depth.png",
        "throughput.png",
    ]
    for png in files.plots:
        check_png(png)
    data = json.loads(files.json.read_text())
    assert data["summary"]["ok"] == 101 and len(data["records"]) == 106
    assert load_records(files.json) == records
    text = files.markdown.read_text()
    assert "| 2 | 50 | 50 | 25.5 |" in text and "HTTP 429 | 1" in text
    # a run where nothing succeeded (server down) still gets its report
    down = [make_record(k, status=None, error="connect", latency_ms=1.0) for k in range(3)]
    empty = write_report(tmp_path / "down", down, summarize(down, 1.0), {})
    for png in empty.plots:
        check_png(png)


def check_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR", path
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert width >= 300 and height >= 200, path


# -- real runs against local servers ---------------------------------------------------------
class LocalServer:
    """An ASGI app served by uvicorn in a thread on a free 127.0.0.1 port."""

    def __init__(self, app: Any) -> None:
        import uvicorn

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(
            uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=1)
        )
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True
        )

    def __enter__(self) -> LocalServer:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "server did not start"
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.sock.close()


def imitation_app(token_ms: float = 2.0, shed_every: int = 7) -> Any:
    """An OpenAI imitation with soft-serve's headers: depth 2 for budgets ≤ 300 ms (tokens
    twice as fast), 4 otherwise; every `shed_every`-th request gets 429 + Retry-After."""
    app = FastAPI()
    app.state.seen = {"requests": 0, "shed": 0, "budgets": []}

    async def serve(request: Request, chat: bool) -> Response:
        seen = app.state.seen
        body = await request.json()
        seen["requests"] += 1
        budget = request.headers.get("x-latency-budget")
        seen["budgets"].append(budget)
        if seen["requests"] % shed_every == 0:
            seen["shed"] += 1
            error = {"error": {"message": "overloaded", "type": "x", "param": None, "code": None}}
            return JSONResponse(error, status_code=429, headers={"Retry-After": "1"})
        depth = 2 if budget is not None and float(budget.removesuffix("ms")) <= 300 else 4
        n, delay = body["max_tokens"], token_ms * depth / 4000.0
        headers = {"x-soft-depth": str(depth), "x-soft-predicted-ms": f"{n * delay * 1000:.1f}"}
        usage = {"prompt_tokens": 9, "completion_tokens": n, "total_tokens": n + 9}

        def choice(k: int) -> dict[str, Any]:
            finish = "length" if k == n - 1 else None
            if chat:
                return {"index": 0, "delta": {"content": f" t{k}"}, "finish_reason": finish}
            return {"index": 0, "text": f" t{k}", "finish_reason": finish}

        if body.get("stream"):

            async def events() -> AsyncIterator[str]:
                for k in range(n):
                    await asyncio.sleep(delay)
                    yield f"data: {json.dumps({'choices': [choice(k)]})}\n\n"
                if (body.get("stream_options") or {}).get("include_usage"):
                    yield f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n"
                yield "data: [DONE]\n\n"

            return StreamingResponse(events(), media_type="text/event-stream", headers=headers)
        await asyncio.sleep(delay * n)
        text = "".join(f" t{k}" for k in range(n))
        first = {"index": 0, "finish_reason": "length"}
        first.update(
            {"message": {"role": "assistant", "content": text}} if chat else {"text": text}
        )
        soft = {"depth": depth, "budget_ms": None, "predicted_ms": 1.0}
        return JSONResponse({"choices": [first], "usage": usage, "soft": soft}, headers=headers)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await serve(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        return await serve(request, chat=True)

    return app


@pytest.fixture(scope="module")
def imitation() -> Iterator[tuple[str, Any]]:
    app = imitation_app()
    with LocalServer(app) as server:
        yield server.url, app


def test_cli_run_against_an_openai_imitation(
    imitation: tuple[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url, app = imitation
    before = dict(app.state.seen, budgets=list(app.state.seen["budgets"]))
    out = tmp_path / "run"
    t0 = time.monotonic()
    code = main(
        ["--url", url, "--schedule", "poisson", "--rate", "12", "--duration", "3"]
        + ["--max-requests", "200", "--concurrency", "16", "--seed", "0", "--out", str(out)]
        + ["--budget-mix", "250ms:0.3,1s:0.4,none:0.3", "--prompt-tokens", "4:16"]
        + ["--max-tokens", "4:12", "--stream-fraction", "0.5", "--chat-fraction", "0.3"]
    )
    assert code == 0 and time.monotonic() - t0 < 15
    captured = capsys.readouterr()
    assert "# Load test" in captured.out and "[loadtest] t=" in captured.err

    data = json.loads((out / "report.json").read_text())
    s, records = data["summary"], data["records"]
    sent = app.state.seen["requests"] - before["requests"]
    shed = app.state.seen["shed"] - before["shed"]
    assert s["scheduled"] == len(records) == s["sent"] == sent > 15
    assert s["errors_by_status"] == {"429": shed} and s["shed"] == shed > 0
    assert s["ok"] == sent - shed and s["errors_by_kind"] == {}
    assert max(r["scheduled_s"] for r in records) < 3.0
    # budgets went out as headers, exactly as the plan drew them
    budgets = app.state.seen["budgets"][len(before["budgets"]) :]
    want = {"250ms": "250ms", "1s": "1000ms", "none": None}
    assert sorted(map(str, budgets)) == sorted(str(want[r["budget"]]) for r in records)
    ok = [r for r in records if r["ok"]]
    for r in ok:
        assert r["depth"] == (2 if r["budget"] == "250ms" else 4)
        assert r["completion_tokens"] == r["max_tokens"] and r["finish_reason"] == "length"
        if r["stream"]:
            assert 0 < r["ttft_ms"] <= r["latency_ms"] and len(r["itl_ms"]) == r["max_tokens"] - 1
        else:
            assert r["ttft_ms"] is None and r["itl_ms"] == []
    assert {r["endpoint"] for r in ok} == {"chat", "completions"}
    assert {r["stream"] for r in ok} == {True, False}
    assert {g["key"] for g in s["by_depth"]} <= {"2", "4", "n/a"}
    assert s["attainment"]["met"] + s["attainment"]["missed"] == sum(
        r["budget"] != "none" for r in ok
    )
    for name in ("latency_by_depth", "attainment", "depth_over_time", "throughput"):
        check_png(out / f"{name}.png")
    assert (out / "summary.md").read_text() in captured.out


def test_concurrency_limit_delays_or_drops(imitation: tuple[str, Any]) -> None:
    url, _ = imitation
    workload = Workload(max_tokens=(40, 40), stream_fraction=0.0, chat_fraction=0.0)
    plan = plan_requests(np.zeros(6), workload, seed=0)  # 6 at once, 1 slot

    async def go(overflow: str) -> list[RequestRecord]:
        client = OpenAIClient(ClientConfig(url, timeout_s=10, max_connections=1))
        try:
            config = RunConfig(duration_s=0.1, concurrency=1, overflow=overflow, drain_s=10)  # type: ignore[arg-type]
            return (await run(plan, client, config, progress_out=None)).records
        finally:
            await client.aclose()

    delayed = asyncio.run(go("delay"))
    assert all(r.sent_s is not None for r in delayed)
    assert sum(r.delay_ms > 0 for r in delayed) == 5  # all but the first waited
    sends = sorted(r.sent_s or 0.0 for r in delayed)
    assert all(b - a >= 0.015 for a, b in zip(sends, sends[1:], strict=False))  # one at a time
    dropped = asyncio.run(go("drop"))
    assert [r.error for r in dropped].count("dropped") == 5
    assert summarize(dropped, 1.0).dropped == 5


def test_steady_tail_runs_until_the_measured_requests_end(imitation: tuple[str, Any]) -> None:
    url, _ = imitation
    workload = Workload(max_tokens=(4, 4), stream_fraction=0.0, chat_fraction=0.0)
    times = np.arange(100) * 0.05  # 20/s for 5 s
    plan = [replace(p, measured=0.1 <= p.at < 0.5) for p in plan_requests(times, workload, 0)]

    async def go() -> Any:
        client = OpenAIClient(ClientConfig(url, timeout_s=10, max_connections=8))
        try:
            config = RunConfig(duration_s=0.5, concurrency=8, drain_s=4.5, steady=True)
            return await run(plan, client, config, progress_out=None)
        finally:
            await client.aclose()

    t0 = time.monotonic()
    result = asyncio.run(go())
    assert time.monotonic() - t0 < 3.0  # the tail stopped once the measured ones were done
    assert [r.index for r in result.records] == list(range(2, 10))  # only the measured
    assert all(r.sent_s is not None and r.error in (None, "http") for r in result.records)
    assert 2 <= result.background < 90  # the warm-up's two and a short tail


def test_run_stops_by_itself_when_the_server_hangs(tmp_path: Path) -> None:
    app = FastAPI()

    @app.post("/v1/completions")
    async def hang() -> None:
        await asyncio.sleep(5)

    with LocalServer(app) as server:
        t0 = time.monotonic()
        code = main(
            ["--url", server.url, "--rate", "5", "--duration", "0.5", "--timeout", "0.5"]
            + ["--chat-fraction", "0", "--quiet", "--out", str(tmp_path)]
        )
        took = time.monotonic() - t0
    assert code == 1 and took < 8  # no request succeeded; bounded by duration + timeout
    s = json.loads((tmp_path / "report.json").read_text())["summary"]
    assert s["ok"] == 0 and set(s["errors_by_kind"]) <= {"timeout", "cancelled"}
    assert sum(s["errors_by_kind"].values()) == s["sent"] == s["scheduled"]


def test_cli_run_against_the_real_soft_serve(tmp_path: Path) -> None:
    """The real server app (server.http.app.create_app, real engine) on a tiny random model."""
    pytest.importorskip("torch")
    from server.http.app import create_app
    from server.settings import Settings
    from tests.fakes import PROFILE, make_served_checkpoint

    ckpt = make_served_checkpoint(tmp_path / "tiny", profile=PROFILE)
    settings = {"model": str(ckpt), "kv_cache_memory": 64 << 20, "policy": "load"}
    app = create_app(Settings.model_validate(settings))
    with LocalServer(app) as server:
        import httpx

        deadline = time.monotonic() + 60  # the model loads in the background
        while httpx.get(server.url + "/health").status_code != 200:
            assert time.monotonic() < deadline, "soft-serve never became ready"
            time.sleep(0.05)
        out = tmp_path / "run"
        code = main(
            ["--url", server.url, "--model", "tiny", "--rate", "4", "--duration", "3"]
            + ["--budget-mix", "30ms:0.5,none:0.5", "--prompt-tokens", "4:12"]
            + ["--max-tokens", "4:8", "--seed", "1", "--quiet", "--out", str(out)]
        )
        metrics = httpx.get(server.url + "/metrics").text
    assert code == 0
    # --policy load: a light load leaves the cap at full depth; outcomes counted per depth
    assert "soft_depth_cap 4.0" in metrics
    assert 'soft_latency_budget_depth_total{depth="2",outcome="infeasible"}' in metrics
    data = json.loads((out / "report.json").read_text())
    s, records = data["summary"], data["records"]
    assert s["ok"] == s["sent"] == s["scheduled"] > 3
    for r in records:
        # x-latency-budget reached the policy: the tight budget gets the shallow exit
        assert r["depth"] == (2 if r["budget"] == "30ms" else 4)
        assert r["predicted_ms"] is not None and r["prompt_tokens"] > 0
        assert 0 < r["completion_tokens"] <= r["max_tokens"]
        if r["stream"]:
            assert r["ttft_ms"] is not None
    for name in ("latency_by_depth", "attainment", "depth_over_time", "throughput"):
        check_png(out / f"{name}.png")
