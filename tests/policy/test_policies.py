"""Depth policy: budget parsing, latency profiles, exact choices on synthetic profiles."""

from __future__ import annotations

import itertools
import math
import time
from pathlib import Path
from typing import Any

import pytest

import models
from server.policy.latency import LatencyProfile
from server.policy.policies import (
    DepthRequest,
    FixedPolicy,
    LoadPolicy,
    PolicyError,
    make_policy,
)
from server.policy.predictor import SCALE_TAU_S
from server.profile import startup_profile

EXITS = (8, 16, 24, 32)
# prefill 0.1 ms/token/8 layers, a step 1 ms per 8 layers: depth d costs d/8 units
PROFILE = LatencyProfile.from_json(
    {
        "prefill_ms_per_token": {str(d): 0.1 * d / 8 for d in EXITS},
        "decode_ms_per_step": {str(d): 1.0 * d / 8 for d in EXITS},
    },
    EXITS,
)


def alone_ms(profile: LatencyProfile, depth: int, prompt_len: int, max_tokens: int) -> float:
    """One request at `depth` alone on the device: its prefill and max_tokens steps."""
    return profile.prefill_ms(depth, prompt_len) + max_tokens * profile.step_ms(depth)


def test_profile_predicts_prefill_plus_steps() -> None:
    # depth 32: 4 units -> prefill 0.4 ms/token, step 4 ms
    assert alone_ms(PROFILE, 32, prompt_len=100, max_tokens=10) == pytest.approx(40 + 40)
    assert alone_ms(PROFILE, 8, prompt_len=100, max_tokens=10) == pytest.approx(10 + 10)


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
    # the least-squares line through (8, 3), (16, 2), (32, 5): 1.5 + 0.0982 ms per layer
    assert steps == pytest.approx([16 / 7, 43 / 14, 27 / 7, 65 / 14])
    with pytest.raises(ValueError, match="decode_ms_per_step"):
        LatencyProfile.from_json({"prefill_ms_per_token": {"8": 1}}, EXITS)
    with pytest.raises(ValueError, match="prefill_ms_per_token"):
        LatencyProfile.from_json(
            {"prefill_ms_per_token": {"x": 1}, "decode_ms_per_step": {}}, EXITS
        )


def test_budget_policy_exact_choices() -> None:
    pol = make_policy("budget", EXITS, 32, PROFILE)
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
    assert make_policy("budget", EXITS, 16, PROFILE).choose(DepthRequest(5, 5)).depth == 16
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


def test_startup_profile_through_the_engine(tiny_dir: Path) -> None:
    from server.engine.core import Engine, EngineConfig

    model = models.load(tiny_dir)
    engine = Engine(model, EngineConfig(kv_cache_memory=1 << 22))
    engine.start()
    t0 = time.perf_counter()
    prof = startup_profile(engine, model.exits, seconds=0.5, prompt_len=32)
    assert time.perf_counter() - t0 < 30
    assert prof.source == "measured" and set(prof.decode_ms_per_step) == {2, 4}
    assert 0 < prof.step_ms(2) <= prof.step_ms(4)
    assert 0 < alone_ms(prof, 2, 32, 8) <= alone_ms(prof, 4, 32, 8)
    back = LatencyProfile.from_json(prof.to_json(), model.exits)
    assert back.step_ms(4) == pytest.approx(prof.step_ms(4), abs=1e-3)
    deadline = time.monotonic() + 5  # the stats snapshot follows the last step
    while engine.stats().kv_blocks_used and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.stats().kv_blocks_used == 0  # every probe request freed its blocks


# -- load-aware predictions (live EngineStats), SLOs, strict mode ---------------------------
# per_row 0.5 ms per 8 layers: a batch of three depth-32 rows steps in 4 + 2 + 2 = 8 ms
LOADED = LatencyProfile.from_json(
    {
        "prefill_ms_per_token": {str(d): 0.1 * d / 8 for d in EXITS},
        "decode_ms_per_step": {str(d): 1.0 * d / 8 for d in EXITS},
        "decode_ms_per_row": {str(d): 0.5 * d / 8 for d in EXITS},
    },
    EXITS,
)


def make_stats(depths: dict[int, int], waiting: int = 0, step_ms: float | None = None,
               interval_ms: float = 0.0, admit_per_s: float = 0.0) -> Any:  # fmt: skip
    from server.engine.types import EngineStats

    rows = [d for d, n in depths.items() for _ in range(n)]
    step = LOADED.batch_step_ms(rows) if step_ms is None else step_ms
    return EngineStats(
        running=len(rows), waiting=waiting, batch_size=len(rows), kv_blocks_total=100,
        kv_blocks_used=0, kv_bytes_per_layer=(), kv_bytes_total=0,
        decode_step_seconds=step / 1000.0, steps=10, preemptions=0, depths_running=depths,
        token_interval_seconds=interval_ms / 1000.0, admit_per_second=admit_per_s,
        rows_left=tuple((d, 10**6) for d in rows),  # they outlast any request here
    )  # fmt: skip


def test_batch_step_cost_model_and_json_round_trip() -> None:
    assert LOADED.batch_step_ms([]) == 0
    assert LOADED.batch_step_ms([32]) == pytest.approx(4.0)
    assert LOADED.batch_step_ms([8, 32, 32]) == pytest.approx(4.0 + 2.0 + 0.5)
    back = LatencyProfile.from_json({**LOADED.to_json(), "measured": {"x": 1}}, EXITS)
    assert back.batch_step_ms([16, 24]) == pytest.approx(LOADED.batch_step_ms([16, 24]))
    assert "decode_ms_per_row" not in PROFILE.to_json()  # old profiles stay as they were


def test_budget_policy_predicts_on_the_batch_it_joins() -> None:
    # three depth-32 rows running: step(d) = 8 + d/16, prefill 0.25 d (20 tokens),
    # 10 tokens -> total 80 + 0.875 d: 32 -> 108, 24 -> 101, 16 -> 94, 8 -> 87
    stats = make_stats({32: 3})
    pol = make_policy("budget", EXITS, 32, LOADED, stats=lambda: stats)
    for budget, depth in {108: 32, 107: 24, 101: 24, 100: 16, 94: 16, 90: 8, 87: 8}.items():
        c = pol.choose(DepthRequest(20, 10, budget_ms=budget))
        assert (c.depth, c.feasible) == (depth, True), budget
        assert c.predicted_ms == pytest.approx(80 + 0.875 * depth)
        assert c.target_ms == budget
    c = pol.choose(DepthRequest(20, 10, budget_ms=86))
    assert (c.depth, c.feasible) == (8, False)
    # two waiting ahead: + their prefills (0.5 d): 32 -> 124, 24 -> 113, 16 -> 102, 8 -> 91
    queued = make_stats({32: 3}, waiting=2)
    pol = make_policy("budget", EXITS, 32, LOADED, stats=lambda: queued)
    assert [pol.choose(DepthRequest(20, 10, budget_ms=b)).depth for b in (124, 113, 105, 91)] == [
        32, 24, 16, 8,
    ]  # fmt: skip
    assert pol.choose(DepthRequest(20, 10)).depth == 32  # no budget: the default


def test_rows_about_to_finish_leave_the_batch_in_the_prediction() -> None:
    from dataclasses import replace

    # the three depth-32 rows have 2 tokens left: 2 steps of 8 + 8/16 ms beside them,
    # then 8 steps alone at step(8) = 1 ms; prefill 0.25 x 8 = 2 ms
    leaving = replace(make_stats({32: 3}), rows_left=((32, 2), (32, 2), (32, 2)))
    pol = make_policy("budget", EXITS, 32, LOADED, stats=lambda: leaving)
    assert pol.predict(8, DepthRequest(20, 10), leaving).total_ms == pytest.approx(
        2 + 2 * 8.5 + 8 * 1.0
    )
    # one stays for 5 more: 2 steps beside all three (8.5), 3 beside one (4 + 0.5), 5 alone
    mixed = replace(make_stats({32: 3}), rows_left=((32, 2), (32, 5), (32, 2)))
    p = pol.predict(8, DepthRequest(20, 10), mixed)
    assert p.total_ms == pytest.approx(2 + 2 * 8.5 + 3 * 4.5 + 5 * 1.0)
    assert p.tpot_ms == pytest.approx((2 * 8.5 + 3 * 4.5 + 5 * 1.0) / 10)
    # rows staying longer than it: the whole batch throughout, as without the counts
    staying = replace(make_stats({32: 3}), rows_left=((32, 50),) * 3)
    assert pol.predict(8, DepthRequest(20, 10), staying).total_ms == pytest.approx(87.0)


def test_expected_newcomers_take_the_depths_recent_requests_got() -> None:
    stats = make_stats({})
    pol = make_policy("budget", EXITS, 32, LOADED, stats=lambda: stats)
    assert isinstance(pol, FixedPolicy)
    now = [0.0]
    pol.predictor.clock = lambda: now[0]
    assert pol.predictor._newcomers(2, 8) == [8, 8]  # nothing chosen yet: its own depth
    pol.choose(DepthRequest(20, 10, pinned_depth=8))
    for _ in range(3):
        pol.choose(DepthRequest(20, 10))  # no budget: the default, 32
    assert pol.predictor._newcomers(4, 8) == [8, 32, 32, 32]  # quantiles of 1 x 8, 3 x 32
    assert pol.predictor._newcomers(1, 8) == [32] and pol.predictor._newcomers(0, 8) == []
    # a depth-8 request that expects one newcomer decodes beside a depth-32 row
    assert pol.predictor._decode_ms(8, 10, [], busy=2) == pytest.approx(
        10 * LOADED.batch_step_ms([8, 32])
    )
    now[0] = 1000.0  # long ago: forgotten
    pol.choose(DepthRequest(20, 10, pinned_depth=16))
    assert pol.predictor._newcomers(2, 8) == [16, 16]


def test_queue_wait_follows_the_measured_drain_rate() -> None:
    # 3 running, 4 waiting, 5 slots: this request is 3 places beyond the free slots, and
    # the queue drains at 10/s; the turn in progress (8 ms, as profiled) is half over on
    # average
    queued = make_stats({32: 3}, waiting=4, admit_per_s=10.0, interval_ms=8.0)
    pol = make_policy("budget", EXITS, 32, LOADED, stats=lambda: queued, max_num_seqs=5)
    c = pol.choose(DepthRequest(20, 10))
    assert c.queue_ms == pytest.approx(4.0 + 300.0)
    # room for it and everyone ahead: the turn, then the prefills of those ahead (8 ms each)
    roomy = make_stats({32: 3}, waiting=4, admit_per_s=10.0, interval_ms=8.0)
    pol = make_policy("budget", EXITS, 32, LOADED, stats=lambda: roomy, max_num_seqs=8)
    assert pol.choose(DepthRequest(20, 10)).queue_ms == pytest.approx(4.0 + 4 * 8.0)
    # a full batch with nobody waiting: the next admission
    full = make_stats({32: 8}, admit_per_s=4.0)
    pol = make_policy("budget", EXITS, 32, LOADED, stats=lambda: full, max_num_seqs=8)
    assert pol.choose(DepthRequest(20, 10)).queue_ms == pytest.approx(250.0)
    # the wait counts against every exit alike: 300 + (80 + 0.875 d) -> 408, 401, 394, 387
    drain = make_stats({32: 3}, waiting=4, admit_per_s=10.0)
    pol = make_policy("budget", EXITS, 32, LOADED, stats=lambda: drain, max_num_seqs=5)
    budgets = (408, 401, 394, 387, 386)
    assert [pol.choose(DepthRequest(20, 10, budget_ms=b)).depth for b in budgets] == [
        32, 24, 16, 8, 8,
    ]  # fmt: skip
    assert not pol.choose(DepthRequest(20, 10, budget_ms=386)).feasible


def test_requests_expected_to_arrive_fill_the_batch_it_decodes_in() -> None:
    from server.policy.predictor import ARRIVAL_TAU_S

    idle = make_stats({})
    pol = make_policy("budget", EXITS, 32, LOADED, stats=lambda: idle, max_num_seqs=4)
    assert isinstance(pol, FixedPolicy)
    now = [0.0]
    pol.predictor.clock = lambda: now[0]
    assert pol.choose(DepthRequest(20, 10)).predicted_ms == pytest.approx(8 + 10 * 4)  # alone
    for _ in range(998):  # a burst: 1000 requests within the decay time
        pol.choose(DepthRequest(20, 10))
    assert pol.predictor.arrival_rate() == pytest.approx(999 / ARRIVAL_TAU_S)
    # 200/s x ~0.05 s of service: a full batch of 4 depth-32 rows (step 4 + 3 x 2 ms)
    assert pol.choose(DepthRequest(20, 10)).predicted_ms == pytest.approx(8 + 10 * 10)
    now[0] = 60.0  # the burst is long gone: alone again
    assert pol.choose(DepthRequest(20, 10)).predicted_ms == pytest.approx(8 + 10 * 4)


def test_calibration_learns_from_service_time_not_the_queue() -> None:
    from server.policy.predictor import CALIBRATION_RATE as R

    queued = make_stats({32: 3}, waiting=4, admit_per_s=10.0)
    pol = make_policy("budget", EXITS, 32, LOADED, stats=lambda: queued, max_num_seqs=5)
    assert isinstance(pol, FixedPolicy)
    c = pol.choose(DepthRequest(20, 10))  # 300 ms queue + 108 ms service
    assert (c.queue_ms, c.predicted_ms) == (pytest.approx(300.0), pytest.approx(408.0))
    pol.observe(c, 2000.0 + 108.0, queue_ms=2000.0)  # waited longer, served as predicted
    assert pol.predictor.calibration == pytest.approx(1.0)
    pol.observe(c, 300.0 + 129.6, queue_ms=300.0)  # served 1.2x slower
    assert pol.predictor.calibration == pytest.approx(1.2**R)
    c = pol.choose(DepthRequest(20, 10))
    assert c.predicted_ms == pytest.approx(300.0 + 108 * 1.2**R)  # the queue is not scaled
    pol.observe(c, c.predicted_ms)  # no measured wait: the predicted one is taken
    assert pol.predictor.calibration == pytest.approx(1.2**R)


def test_measured_step_time_scales_predictions() -> None:
    stats = make_stats({32: 3}, step_ms=16.0)  # the device runs 2x slower than profiled
    pol = make_policy("budget", EXITS, 32, LOADED, stats=lambda: stats)
    now = [0.0]
    pol.predictor.clock = lambda: now[0]  # one request a second: arrivals do not fill the batch
    first = pol.choose(DepthRequest(20, 10)).predicted_ms
    # depth 32: prefill 8, step 10; a first look takes the scale half of the way to 2
    assert first == pytest.approx((8 + 10 * 10) * 1.5)
    # a look 0.1 s later moves it by 1 - exp(-0.1 / SCALE_TAU_S) of the rest
    now[0] += 0.1
    second = pol.choose(DepthRequest(20, 10)).predicted_ms
    assert second == pytest.approx(108 * (1.5 + 0.5 * (1 - math.exp(-0.1 / SCALE_TAU_S))))
    for _ in range(30):  # a look a second: within seconds whatever the request rate
        now[0] += 1.0
        pol.choose(DepthRequest(20, 10))
    assert pol.choose(DepthRequest(20, 10)).predicted_ms == pytest.approx(2 * 108, rel=1e-3)


def test_prefill_stalls_of_the_running_batch_stretch_the_prediction() -> None:
    # the batch's rows wait 1.5x their decode step per token (newcomers' prefills share
    # their turns): the time per token, not the step, scales the profile
    step = LOADED.batch_step_ms([32, 32, 32])  # 8 ms; with this request 10 ms
    stats = make_stats({32: 3}, interval_ms=1.5 * step)
    pol = make_policy("budget", EXITS, 32, LOADED, stats=lambda: stats)
    ticks = itertools.count()
    pol.predictor.clock = lambda: float(next(ticks))  # a request a second: arrivals do not fill it
    for _ in range(60):
        c = pol.choose(DepthRequest(20, 10))
    # half the turn in progress (12 ms) first, then prefill 8 and 10 steps of 10, x 1.5
    assert c.predicted_ms == pytest.approx(6 + 1.5 * (8 + 10 * 10), rel=1e-3)
    # without a measured interval the decode step scales it
    plain = make_stats({32: 3}, step_ms=2 * step)
    pol = make_policy("budget", EXITS, 32, LOADED, stats=lambda: plain)
    pol.predictor.clock = lambda: float(next(ticks))
    for _ in range(60):
        c = pol.choose(DepthRequest(20, 10))
    assert c.predicted_ms == pytest.approx(2 * 108, rel=1e-3)


def test_slo_headers_choose_by_first_token_and_per_token_time() -> None:
    queued = make_stats({32: 3}, waiting=2)  # ttft 0.75 d, step 8 + d/16
    pol = make_policy("budget", EXITS, 32, LOADED, stats=lambda: queued)
    assert pol.choose(DepthRequest(20, 10, tpot_ms=9.5)).depth == 24
    assert pol.choose(DepthRequest(20, 10, tpot_ms=9.0)).depth == 16
    assert pol.choose(DepthRequest(20, 10, ttft_ms=13)).depth == 16
    c = pol.choose(DepthRequest(20, 10, ttft_ms=13, tpot_ms=8.6))
    assert (c.depth, c.feasible) == (8, True) and c.target_ms == pytest.approx(13 + 10 * 8.6)
    c = pol.choose(DepthRequest(20, 10, ttft_ms=1))
    assert (c.depth, c.feasible) == (8, False)
    both = DepthRequest(20, 10, budget_ms=50, ttft_ms=13, tpot_ms=9.0)
    assert both.target_ms == 50  # the tighter of the budget and the SLOs' sum (13 + 90)


def test_strict_mode_refuses_what_no_exit_meets() -> None:
    pol = make_policy("budget", EXITS, 32, PROFILE)
    with pytest.raises(PolicyError, match="no exit meets") as e:
        pol.choose(DepthRequest(20, 10, budget_ms=5, strict=True))
    assert e.value.param == "x-latency-budget"
    assert pol.choose(DepthRequest(20, 10, budget_ms=24, strict=True)).depth == 16


def test_load_policy_caps_requests_without_a_budget_and_bounds_budgets() -> None:
    from server.policy.governor import Governor, GovernorConfig

    stats = make_stats({32: 2}, waiting=9)
    clock = iter(float(t) for t in range(100))
    pol = make_policy("load", EXITS, 32, LOADED, stats=lambda: stats)
    assert isinstance(pol, LoadPolicy)
    pol.governor = Governor(EXITS, 32, LOADED, GovernorConfig(down_s=1), clock=lambda: next(clock))
    generous = DepthRequest(20, 10, budget_ms=10_000)
    assert pol.choose(generous).depth == 32  # t=0: overload starts; not capped yet
    assert pol.choose(DepthRequest(20, 10)).depth == 16  # t=1: held 1 s -> 32 * 0.7 -> 16
    # under the cap, a budget picks among the exits up to it (a deeper row would set every
    # companion's step); a pin still wins
    c = pol.choose(generous)  # t=2: still overloaded: lowered again, 16 * 0.7 -> 8
    assert c.depth == pol.governor.cap == 8 and c.feasible
    assert pol.choose(DepthRequest(20, 10, pinned_depth=32)).depth == 32
    assert make_policy("fixed", EXITS, 32, LOADED, stats=lambda: stats).depth_cap() == 32


def test_load_policy_utilization_of_the_recent_arrivals_at_a_depth() -> None:
    idle = make_stats({})
    pol = make_policy("load", EXITS, 32, LOADED, stats=lambda: idle)
    assert isinstance(pol, LoadPolicy)
    pol.predictor.clock = lambda: 0.0
    assert (
        pol.predictor.utilization(16) is None
    )  # nothing seen yet: the governor does not wait on it
    for _ in range(40):  # 40 requests within the decay time: 8/s
        pol.choose(DepthRequest(20, 10))
    # at depth 16: prefill 20 x 0.2 = 4 ms, then 10 rows of a full batch of 32, each
    # (2 + 31 x 1) / 32 ms: 14.3125 ms of engine time per request, x 8/s
    assert pol.predictor.utilization(16) == pytest.approx(8 * 14.3125 / 1000)
    assert pol.governor.utilization is not None
    assert pol.governor.utilization(32) == pytest.approx(pol.predictor.utilization(32))


def test_observed_latency_calibrates_the_prediction() -> None:
    from server.policy.predictor import CALIBRATION_RATE as R

    stats = make_stats({32: 3})
    pol = make_policy("budget", EXITS, 32, LOADED, stats=lambda: stats)
    assert isinstance(pol, FixedPolicy)
    ticks = iter(range(0, 10**6, 100))  # requests 100 s apart: no arrivals to expect
    pol.predictor.clock = lambda: float(next(ticks))
    c = pol.choose(DepthRequest(20, 10))
    assert c.predicted_ms == pytest.approx(108)
    pol.observe(c, 129.6)  # 1.2x the prediction: CALIBRATION_RATE of the log-error is learnt
    assert pol.choose(DepthRequest(20, 10)).predicted_ms == pytest.approx(108 * 1.2**R)
    before = pol.predictor.calibration
    pinned = pol.choose(DepthRequest(20, 10, pinned_depth=32))
    pol.observe(pinned, 1e6)  # pinned: not the policy's choice, nothing learnt
    assert pol.predictor.calibration == before
    pol.observe(pol.choose(DepthRequest(20, 10)), 1e6)  # one outlier: at most (4/3) ** R
    assert pol.predictor.calibration == pytest.approx(before * (4 / 3) ** R)
    for _ in range(2000):  # requests keep taking 1.5x the uncalibrated 108 ms
        pol.observe(pol.choose(DepthRequest(20, 10)), 162.0)
    assert pol.choose(DepthRequest(20, 10)).predicted_ms == pytest.approx(162, rel=1e-3)
    # every exit's prediction scales alike: 87 (depth 8) x 1.5 = 130.5 fits 131, 16 does not
    assert pol.choose(DepthRequest(20, 10, budget_ms=131)).depth == 8
    for _ in range(500):  # an endless overload cannot push it past 2x
        pol.observe(pol.choose(DepthRequest(20, 10)), 1e9)
    assert pol.predictor.calibration == 2.0
    alone = make_policy("budget", EXITS, 32, LOADED)  # no engine: nothing to calibrate on
    alone.observe(alone.choose(DepthRequest(20, 10)), 500.0)
    assert alone.choose(DepthRequest(20, 10)).predicted_ms == pytest.approx(8 + 10 * 4)


def test_plan_is_choose_without_counting_the_request() -> None:
    # the batch above: 32 -> 108, 24 -> 101, 16 -> 94, 8 -> 87 ms (the playground's slider)
    stats = make_stats({32: 3})
    pol = make_policy("budget", EXITS, 32, LOADED, stats=lambda: stats)
    plan = pol.plan(DepthRequest(20, 10, budget_ms=101))
    assert (plan.depth, plan.feasible, plan.depth_cap) == (24, True, 32)
    assert {d: round(p.total_ms, 3) for d, p in plan.predictions.items()} == {
        8: 87.0, 16: 94.0, 24: 101.0, 32: 108.0,
    }  # fmt: skip
    assert pol.predictor.arrival_rate() == 0.0  # not an arrival: polling is not load
    for budget in (108, 107, 94, 90, 86, None):
        req = DepthRequest(20, 10, budget_ms=budget)
        planned = pol.plan(req)
        chosen = pol.choose(req)
        assert (planned.depth, planned.feasible) == (chosen.depth, chosen.feasible), budget
        assert planned.predictions[chosen.depth].total_ms == pytest.approx(chosen.predicted_ms)
    # strict mode refuses in `choose`; the plan still says what best effort would get
    assert pol.plan(DepthRequest(20, 10, budget_ms=1, strict=True)).depth == 8
    with pytest.raises(PolicyError):
        pol.plan(DepthRequest(20, 10, pinned_depth=12))
    fixed = make_policy("fixed", EXITS, 24, LOADED, stats=lambda: stats)
    assert fixed.plan(DepthRequest(20, 10, budget_ms=1)).depth == 24  # budgets: reported only
