"""Depth policy: budget parsing, latency profiles, exact choices on synthetic profiles."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

import models
from server.policy import (
    BudgetPolicy,
    DepthRequest,
    FixedPolicy,
    LatencyProfile,
    PolicyError,
    make_policy,
    measure_profile,
    parse_budget,
)

EXITS = (8, 16, 24, 32)
# prefill 0.1 ms/token/8 layers, a step 1 ms per 8 layers: depth d costs d/8 units
PROFILE = LatencyProfile.from_json(
    {
        "prefill_ms_per_token": {str(d): 0.1 * d / 8 for d in EXITS},
        "decode_ms_per_step": {str(d): 1.0 * d / 8 for d in EXITS},
    },
    EXITS,
)


@pytest.mark.parametrize(
    "value, ms",
    [("250ms", 250.0), ("1.5s", 1500.0), ("250", 250.0), (" 40 MS ", 40.0), ("2S", 2000.0),
     (".5s", 500.0), ("0.25", 0.25)],
)  # fmt: skip
def test_parse_budget(value: str, ms: float) -> None:
    assert parse_budget(value) == pytest.approx(ms)


@pytest.mark.parametrize(
    "value", ["", "ms", "-1", "0", "0ms", "1.5m", "fast", "1e3", "nan", "1 s s"]
)
def test_parse_budget_rejects(value: str) -> None:
    with pytest.raises(PolicyError) as e:
        parse_budget(value)
    assert e.value.param == "x-latency-budget"


def test_profile_predicts_prefill_plus_steps() -> None:
    # depth 32: 4 units -> prefill 0.4 ms/token, step 4 ms
    assert PROFILE.predict_ms(32, prompt_len=100, max_tokens=10) == pytest.approx(40 + 40)
    assert PROFILE.predict_ms(8, prompt_len=100, max_tokens=10) == pytest.approx(10 + 10)


def test_profile_fills_missing_exits_linearly_and_monotonic() -> None:
    p = LatencyProfile.from_json(
        {
            "prefill_ms_per_token": {"8": 1.0, "32": 4.0},
            "decode_ms_per_step": {"8": 2.0, "32": 8.0},
        },
        EXITS,
    )
    assert p.step_ms(16) == pytest.approx(4.0) and p.step_ms(24) == pytest.approx(6.0)
    assert p.prefill_ms(16, 10) == pytest.approx(20.0)
    noisy = LatencyProfile.from_points(EXITS, {8: 0}, {8: 1.0}, {8: 3.0, 16: 2.0, 32: 5.0}, "t")
    steps = [noisy.step_ms(d) for d in EXITS]
    assert steps == sorted(steps) and min(steps) >= 0
    with pytest.raises(ValueError, match="decode_ms_per_step"):
        LatencyProfile.from_json({"prefill_ms_per_token": {"8": 1}}, EXITS)
    with pytest.raises(ValueError, match="prefill_ms_per_token"):
        LatencyProfile.from_json(
            {"prefill_ms_per_token": {"x": 1}, "decode_ms_per_step": {}}, EXITS
        )


def test_budget_policy_exact_choices() -> None:
    pol = BudgetPolicy(EXITS, 32, PROFILE)
    # prompt 20, 10 tokens: depth d predicts (0.1*20 + 10) * d/8 = 12 * d/8 ms
    expect = {1000: 32, 48: 32, 47.9: 24, 36: 24, 35: 16, 24: 16, 23: 8, 12: 8}
    for budget, depth in expect.items():
        c = pol.choose(DepthRequest(20, 10, budget_ms=budget))
        assert c.depth == depth and c.feasible and c.budget_ms == budget, budget
        assert c.predicted_ms == pytest.approx(12 * depth / 8)
    c = pol.choose(DepthRequest(20, 10, budget_ms=5))
    assert c.depth == 8 and not c.feasible  # nothing fits: the shallowest, flagged
    assert pol.choose(DepthRequest(20, 10)).depth == 32  # no budget: the default
    assert pol.choose(DepthRequest(20, 10, budget_ms=1, pinned_depth=24)).depth == 24
    assert BudgetPolicy(EXITS, 16, PROFILE).choose(DepthRequest(5, 5)).depth == 16
    assert pol.depth_cap() == 32


def test_fixed_policy_ignores_budgets_but_honours_pins() -> None:
    pol = make_policy("fixed", EXITS, 24, PROFILE)
    assert isinstance(pol, FixedPolicy) and pol.name == "fixed"
    c = pol.choose(DepthRequest(20, 10, budget_ms=1))
    assert c.depth == 24 and c.budget_ms == 1
    assert pol.choose(DepthRequest(20, 10, pinned_depth=8)).depth == 8


def test_pin_must_be_an_exit() -> None:
    pol = make_policy("budget", EXITS, 32, PROFILE)
    with pytest.raises(PolicyError, match="8, 16, 24, 32"):
        pol.choose(DepthRequest(1, 1, pinned_depth=12))
    with pytest.raises(ValueError, match="not an exit"):
        make_policy("budget", EXITS, 12, PROFILE)
    with pytest.raises(ValueError, match="unknown policy"):
        make_policy("random", EXITS, 32, PROFILE)


def test_measure_profile_through_the_engine(tiny_dir: Path) -> None:
    from server.engine import Engine, EngineConfig

    model = models.load(tiny_dir)
    engine = Engine(model, EngineConfig(kv_cache_memory=1 << 22))
    engine.start()
    t0 = time.perf_counter()
    prof = measure_profile(engine, model.exits, seconds=0.5, prompt_len=32)
    assert time.perf_counter() - t0 < 30
    assert prof.source == "measured" and set(prof.decode_ms_per_step) == {2, 4}
    assert 0 <= prof.step_ms(2) <= prof.step_ms(4)
    assert 0 < prof.predict_ms(2, 32, 8) <= prof.predict_ms(4, 32, 8)
    back = LatencyProfile.from_json(prof.to_json(), model.exits)
    assert back.step_ms(4) == pytest.approx(prof.step_ms(4), abs=1e-3)
    deadline = time.monotonic() + 5  # the stats snapshot follows the last step
    while engine.stats().kv_blocks_used and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.stats().kv_blocks_used == 0  # every probe request freed its blocks
