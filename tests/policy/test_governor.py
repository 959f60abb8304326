"""The load governor: a scripted load trace moves the cap exactly, with hysteresis."""

from __future__ import annotations

from dataclasses import replace

from server.engine.types import EngineStats
from server.policy.governor import Governor, GovernorConfig
from server.policy.latency import LatencyProfile

EXITS = (8, 16, 24, 32)
# a step costs 4 ms per 8 layers, whatever the batch: one exit deeper doubles from depth 8
PROFILE = LatencyProfile.from_json(
    {
        "prefill_ms_per_token": {str(d): 0.01 for d in EXITS},
        "decode_ms_per_step": {str(d): 4.0 * d / 8 for d in EXITS},
    },
    EXITS,
)
CONFIG = GovernorConfig(queue_high=4, queue_low=0, tpot_ms=20.0, down_s=1.0, up_s=5.0)


def stats(waiting: int, step_ms: float, depths: dict[int, int] | None = None) -> EngineStats:
    depths = {8: 4} if depths is None else depths
    return EngineStats(
        running=sum(depths.values()), waiting=waiting, batch_size=sum(depths.values()),
        kv_blocks_total=1, kv_blocks_used=0, kv_bytes_per_layer=(), kv_bytes_total=0,
        decode_step_seconds=step_ms / 1000.0, steps=1, preemptions=0, depths_running=depths,
    )  # fmt: skip


def load_at(t: float) -> EngineStats:
    """calm 0-2 s; queue over the mark 2-6 s; around the mark 6-8 s (5 and 3 waiting,
    alternately); calm after 8 s, the batch at depth 8 stepping in 5 ms."""
    if t < 2:
        return stats(0, 10.0, {32: 2})
    if t < 6:
        return stats(6, 30.0, {32: 8})
    if t < 8:
        return stats(5 if int(t * 4) % 2 == 0 else 3, 12.0)
    return stats(0, 5.0)


def test_scripted_trace_lowers_holds_and_restores_without_flapping() -> None:
    gov = Governor(EXITS, 32, PROFILE, CONFIG)
    changes, cap = [], gov.cap
    for i in range(0, 30 * 4):
        t = i / 4
        new = gov.observe(load_at(t), now=t)
        if new != cap:
            changes.append((t, new))
            cap = new
    # overload from 2 s: held 1 s -> 32 * 0.7 -> 16, 1 s later -> 8 (the floor);
    # the noisy 6-8 s neither lowers (already at the floor) nor raises (3 still wait);
    # the last overload is at 7.5 s: one exit every 5 s of calm from there
    assert changes == [(3.0, 16), (4.0, 8), (12.5, 16), (17.5, 24), (22.5, 32)]
    assert gov.changes == 5


def test_noise_around_the_overload_mark_moves_the_cap_once_per_dwell() -> None:
    gov = Governor(EXITS, 32, PROFILE, CONFIG)
    caps = [gov.observe(stats(5 if i % 2 == 0 else 3, 12.0), now=i / 4) for i in range(40)]
    # 5 waiting only every other tick: an overload streak never lasts down_s
    assert set(caps) == {32} and gov.changes == 0


def test_step_time_alone_signals_overload_and_blocks_a_restore() -> None:
    gov = Governor(EXITS, 32, PROFILE, CONFIG)
    assert [gov.observe(stats(0, 25.0, {32: 8}), now=t) for t in (0.0, 0.5, 1.0)] == [32, 32, 16]
    # calm queue, but one exit deeper (depth 24) would step in 14 * 24/16 = 21 ms > 0.7 * 20
    assert [gov.observe(stats(0, 14.0, {16: 8}), now=t) for t in (7.0, 20.0)] == [16, 16]
    # a lighter batch: 8 * 24/16 = 12 ms <= 14 -> one exit up, then the next after up_s
    assert [gov.observe(stats(0, 8.0, {16: 8}), now=t) for t in (21.0, 25.0, 26.0)] == [24, 24, 32]
    # an idle engine (nothing running) restores whatever its last step time was
    gov = Governor(EXITS, 32, PROFILE, GovernorConfig(tpot_ms=20.0, min_depth=16, down_s=0))
    assert gov.observe(stats(9, 0.0), now=0.0) == 16 == gov.observe(stats(9, 0.0), now=1.0)
    assert gov.observe(stats(0, 99.0, {}), now=7.0) == 24


def test_prefill_stalls_count_in_the_time_per_token() -> None:
    gov = Governor(EXITS, 32, PROFILE, CONFIG)
    # a 12 ms decode step, but newcomers' prefills stretch each row's token to 25 ms
    stalled = replace(stats(0, 12.0, {32: 8}), token_interval_seconds=0.025)
    assert [gov.observe(stalled, now=t) for t in (0.0, 0.5, 1.0)] == [32, 32, 16]
    quick = replace(stats(0, 12.0, {32: 8}), token_interval_seconds=0.013)
    gov = Governor(EXITS, 32, PROFILE, CONFIG)
    assert [gov.observe(quick, now=t) for t in (0.0, 0.5, 1.0)] == [32, 32, 32]


def test_default_tpot_is_two_one_row_steps_of_the_default_depth() -> None:
    assert Governor(EXITS, 24, PROFILE, GovernorConfig()).tpot_ms == 24.0
    assert Governor(EXITS, 24, PROFILE, GovernorConfig()).levels == (8, 16, 24)


def test_restore_waits_until_the_deeper_exit_is_sustainable() -> None:
    need = {16: 0.9}  # the arrivals at depth 16 would need 90 % of the engine's time

    def utilization(depth: int) -> float | None:
        return need.get(depth)

    gov = Governor(EXITS, 32, PROFILE, CONFIG, utilization=utilization)
    assert [gov.observe(stats(9, 0.0), now=t) for t in (0.0, 1.0, 2.0)] == [32, 16, 8]
    # calm for longer than up_s, a step that would fit: still held at 8 while 16 is too full
    assert [gov.observe(stats(0, 5.0), now=t) for t in (8.0, 20.0)] == [8, 8]
    need[16] = 0.5
    assert gov.observe(stats(0, 5.0), now=21.0) == 16
    # unknown (no requests seen yet) does not hold it back; >= 1 disables the check
    need.clear()
    assert gov.observe(stats(0, 5.0, {16: 4}), now=27.0) == 24
    no_check = replace(CONFIG, max_utilization=1.0)
    off = Governor(EXITS, 32, PROFILE, no_check, utilization=lambda d: 5.0)
    assert [off.observe(stats(9, 0.0), now=t) for t in (0.0, 1.0)] == [32, 16]
    assert off.observe(stats(0, 5.0), now=7.0) == 24


def test_arrivals_beyond_the_engines_time_lower_the_cap_before_a_queue_shows() -> None:
    need = {32: 1.2, 16: 0.6}
    gov = Governor(EXITS, 32, PROFILE, CONFIG, utilization=need.get)
    # no queue, a quick step: only the arrivals say overload; held down_s, then 32 -> 16
    assert [gov.observe(stats(0, 5.0, {32: 2}), now=t) for t in (0.0, 0.5, 1.0)] == [32, 32, 16]
    assert gov.observe(stats(0, 5.0, {16: 2}), now=2.5) == 16  # 0.6 of the time: calm
    idle = Governor(EXITS, 32, PROFILE, CONFIG, utilization=need.get)
    assert [idle.observe(stats(0, 0.0, {}), now=t) for t in (0.0, 2.0)] == [32, 32]  # idle
