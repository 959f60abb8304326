"""The depth policy on a balcony checkpoint (exits with a decoder layer of their own): the
profile measured through the engine, its fits in the layers a token runs, budgets, the
governor and the deadline controller, unchanged."""

from __future__ import annotations

import asyncio
import time

import pytest

import models
from server.engine.core import Engine, EngineConfig
from server.engine.types import GenerationRequest, SamplingParams, TokenEvent
from server.policy.deadline import DeadlineController
from server.policy.governor import Governor, GovernorConfig
from server.policy.latency import LatencyProfile, fill
from server.policy.policies import DepthRequest, LoadPolicy, make_policy
from server.profile import in_depth, startup_profile
from tests.engine.test_exit_layers import write_balcony


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Engine:
    model = models.load(write_balcony(tmp_path_factory.mktemp("balcony") / "m"))
    eng = Engine(model, EngineConfig(kv_cache_memory=1 << 22))
    eng.start()
    yield eng
    eng.stop()


def layers_run(d: int) -> int:
    return d + (d in (1, 2))  # the fixture's exits 1 and 2 run their own layer too


def test_fits_are_linear_in_the_layers_a_token_runs() -> None:
    # 1 ms fixed + 0.5 ms a layer: exit 1 runs 2 layers, exit 2 runs 3, full depth 4
    step = {d: 1.0 + 0.5 * layers_run(d) for d in (1, 2, 4)}
    assert in_depth(step, layers_run) == pytest.approx(step)
    assert in_depth(step) != pytest.approx(step)  # a line in depth misses them
    # an exit that was not measured is interpolated in its layers too
    assert fill((1, 2, 3, 4), {1: step[1], 4: step[4]}, layers_run) == pytest.approx(
        {1: 2.0, 2: 2.5, 3: 2.5, 4: 3.0}
    )


def test_the_measured_profile_and_every_policy_work_on_exit_layers(engine: Engine) -> None:
    model = engine.model
    prof = startup_profile(engine, model.exits, seconds=0.5, prompt_len=24)
    assert set(prof.decode_ms_per_step) == {1, 2, 4}
    assert 0 < prof.step_ms(1) <= prof.step_ms(2) <= prof.step_ms(4)
    stats = engine.stats
    budget = make_policy("budget", model.exits, 4, prof, stats=stats)
    alone = {d: budget.predictor.predict(d, 20, 10).total_ms for d in model.exits}
    assert budget.choose(DepthRequest(20, 10, budget_ms=alone[4] * 10)).depth == 4
    c = budget.choose(DepthRequest(20, 10, budget_ms=alone[1] * 0.5))
    assert c.depth == 1 and not c.feasible  # nothing meets it: the shallowest exit
    load = make_policy("load", model.exits, 4, prof, stats=stats)
    assert isinstance(load, LoadPolicy) and load.governor.levels == (1, 2, 4)
    clock = iter(float(t) for t in range(100))
    load.governor = Governor(model.exits, 4, prof, GovernorConfig(down_s=1),
                             clock=lambda: next(clock))  # fmt: skip
    assert load.choose(DepthRequest(20, 10)).depth == 4


def test_a_late_request_is_lowered_to_an_exit_layer_and_finishes(engine: Engine) -> None:
    profile = LatencyProfile.from_json(
        {"prefill_ms_per_token": {"1": 0.01, "2": 0.015, "4": 0.02},
         "decode_ms_per_step": {"1": 1, "2": 1.5, "4": 2}},
        (1, 2, 4),
    )  # fmt: skip
    ctl = DeadlineController(engine, (1, 2, 4), profile)
    params = SamplingParams(max_tokens=60, temperature=0.0, ignore_eos=True)
    req = GenerationRequest("late", tuple(range(3, 43)), params, 4, time.monotonic(),
                            time.monotonic())  # fmt: skip
    seen: list[TokenEvent] = []
    held: list[dict[int, int]] = []

    async def go() -> None:
        async for ev in ctl.follow(req, engine.submit(req)):
            seen.append(ev)
            s = engine.stats()
            if s.running == 1 and s.depths_running == {1: 1}:
                held.append(s.kv_bytes_per_exit_layer)

    asyncio.run(go())
    depths = [ev.depth for ev in seen]
    assert len(seen) == 60 and seen[-1].finish_reason == "length"
    assert depths[0] == 4 and depths[-1] == 1 and depths == sorted(depths, reverse=True)
    assert held and all(h[1] > 0 and h[2] == 0 for h in held)  # exit 1's own layer holds KV
    deadline = time.monotonic() + 5
    while engine.stats().kv_blocks_used and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.stats().kv_blocks_used == 0
