"""In-flight control: a running request that falls behind its deadline is lowered to a
shallower exit through the real engine; its later tokens carry the new depth and its
blocks in the dropped layers are freed while it runs."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

import models
from server.engine.core import Engine, EngineConfig
from server.engine.types import GenerationRequest, SamplingParams, TokenEvent
from server.policy.deadline import DeadlineController
from server.policy.latency import LatencyProfile

EXITS = (8, 16, 24, 32)
STEPS = LatencyProfile.from_json(
    {
        "prefill_ms_per_token": {str(d): 0.01 for d in EXITS},
        "decode_ms_per_step": {str(d): 1.0 * d / 8 for d in EXITS},
    },
    EXITS,
)


def test_pick_is_the_deepest_shallower_exit_that_makes_the_deadline() -> None:
    ctl = DeadlineController(None, EXITS, STEPS)
    # 10 tokens left at 4 ms each (depth 32): 40 ms
    assert ctl.pick(32, 4.0, 10, 40.0) == 32  # on time: stays
    assert ctl.pick(32, 4.0, 10, 35.0) == 24  # 3 ms/token at 24 -> 30 ms
    assert ctl.pick(32, 4.0, 10, 20.0) == 16
    assert ctl.pick(32, 4.0, 10, 9.0) == 8  # nothing makes it: the shallowest
    assert ctl.pick(16, 2.0, 10, -5.0) == 8  # already late


def test_a_fast_request_is_not_lowered_before_its_own_step_is_measured() -> None:
    """The profile says 4 ms a token at depth 32; this request makes 1 ms. After its first
    token 9 are left and 19 ms: the profile's step would lower it, its own never does."""
    now = [0.0]
    lowered: list[int] = []

    class Engine:
        def lower_depth(self, request_id: str, depth: int) -> None:
            lowered.append(depth)

    ctl = DeadlineController(Engine(), EXITS, STEPS, clock=lambda: now[0])  # type: ignore[arg-type]
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    req = GenerationRequest("fast", (5, 6), params, 32, deadline=0.020, arrival=0.0)

    async def events() -> Any:
        for k in range(10):
            now[0] = 0.001 * (k + 1)  # a token each millisecond
            yield TokenEvent("fast", 7, finish_reason="length" if k == 9 else None, depth=32)

    async def follow() -> list[TokenEvent]:
        return [ev async for ev in ctl.follow(req, events())]

    assert len(asyncio.run(follow())) == 10
    assert lowered == [] and ctl.lowered == 0


def make_request(rid: str, deadline_s: float | None, max_tokens: int = 150) -> GenerationRequest:
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    deadline = None if deadline_s is None else time.monotonic() + deadline_s
    return GenerationRequest(rid, tuple(range(3, 43)), params, 4, deadline, time.monotonic())


@pytest.fixture
def engine(tiny_dir: Path) -> Any:
    eng = Engine(models.load(tiny_dir), EngineConfig(kv_cache_memory=1 << 22))
    eng.start()
    yield eng
    eng.stop()


def test_a_late_request_is_lowered_and_frees_its_dropped_layers(engine: Engine) -> None:
    profile = LatencyProfile.from_json(
        {"prefill_ms_per_token": {"2": 0.01, "4": 0.02}, "decode_ms_per_step": {"2": 1, "4": 2}},
        (2, 4),
    )
    ctl = DeadlineController(engine, (2, 4), profile)
    seen: list[TokenEvent] = []
    freed: list[tuple[int, ...]] = []

    async def go(req: GenerationRequest) -> None:
        async for ev in ctl.follow(req, engine.submit(req)):
            seen.append(ev)
            s = engine.stats()
            if s.running == 1 and s.depths_running == {2: 1}:  # lowered, still running
                freed.append(s.kv_bytes_per_layer)

    asyncio.run(go(make_request("late", deadline_s=0.0)))  # behind from its first token
    depths = [ev.depth for ev in seen]
    assert len(seen) == 150 and seen[-1].finish_reason == "length"
    assert depths[0] == 4 and depths[-1] == 2 and depths == sorted(depths, reverse=True)
    assert ctl.lowered == 1  # once: never deeper, never asked twice
    assert freed, "the engine never reported the request running at depth 2"
    assert all(b[0] > 0 and b[1] > 0 and b[2] == 0 and b[3] == 0 for b in freed)
    deadline = time.monotonic() + 5
    while engine.stats().kv_blocks_used and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.stats().kv_blocks_used == 0

    seen.clear()
    asyncio.run(go(make_request("on-time", deadline_s=60.0, max_tokens=20)))
    assert [ev.depth for ev in seen] == [4] * 20 and ctl.lowered == 1
