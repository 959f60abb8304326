"""Metrics: every name of ARCHITECTURE.md, per-depth labels, 1 ms buckets, parseable."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from server.engine.types import EngineStats
from server.metrics import Metrics, RequestRecord

NAMES = [
    "soft_request_latency_seconds", "soft_time_to_first_token_seconds",
    "soft_inter_token_latency_seconds", "soft_request_queue_seconds", "soft_requests_total",
    "soft_generated_tokens_total", "soft_prompt_tokens_total", "soft_latency_budget_total",
    "soft_num_requests_running", "soft_num_requests_waiting", "soft_kv_cache_usage_ratio",
    "soft_kv_cache_bytes", "soft_depth_cap", "soft_batch_size",
]  # fmt: skip


def stats(**kw: object) -> EngineStats:
    base: dict[str, object] = dict(
        running=3, waiting=2, batch_size=3, kv_blocks_total=100, kv_blocks_used=25,
        kv_bytes_per_layer=(4096, 4096, 1024, 0), kv_bytes_total=9216,
        decode_step_seconds=0.01, steps=10, preemptions=0,
    )  # fmt: skip
    base.update(kw)
    return EngineStats(**base)  # type: ignore[arg-type]


def samples(m: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for fam in text_string_to_metric_families(m.render().decode()):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_every_metric_is_exposed_with_its_labels() -> None:
    m = Metrics(exits=(2, 4))
    m.update(stats(), depth_cap=4)
    text = m.render().decode()
    for name in NAMES:
        assert f"# HELP {name} " in text, name
    s = samples(m)
    assert s[("soft_kv_cache_usage_ratio", ())] == 0.25
    assert s[("soft_kv_cache_bytes", (("layer", "2"),))] == 1024
    assert s[("soft_num_requests_waiting", ())] == 2 and s[("soft_depth_cap", ())] == 4
    # pre-created per-exit series: dashboards see every depth from the start
    assert s[("soft_request_latency_seconds_count", (("depth", "2"),))] == 0
    assert ("soft_time_to_first_token_seconds_bucket", (("depth", "4"), ("le", "0.001"))) in s


def test_observe_fills_per_depth_histograms_and_counters() -> None:
    m = Metrics(exits=(2, 4))
    m.observe(RequestRecord(depth=2, finish_reason="stop", prompt_tokens=5, generated_tokens=3,
                            latency=0.0123, ttft=0.004, inter_token=(0.002, 0.003),
                            queue=0.0005))  # fmt: skip
    m.observe_budget(2, "met")
    m.observe(RequestRecord(depth=4, finish_reason="length", prompt_tokens=7,
                            generated_tokens=1, latency=2.0, ttft=1.0))  # fmt: skip
    s = samples(m)
    assert s[("soft_requests_total", (("depth", "2"), ("finish_reason", "stop")))] == 1
    assert s[("soft_generated_tokens_total", (("depth", "2"),))] == 3
    assert s[("soft_prompt_tokens_total", ())] == 12
    assert s[("soft_inter_token_latency_seconds_count", (("depth", "2"),))] == 2
    assert s[("soft_request_latency_seconds_bucket", (("depth", "2"), ("le", "0.025")))] == 1
    assert s[("soft_request_latency_seconds_bucket", (("depth", "2"), ("le", "0.01")))] == 0
    assert s[("soft_request_queue_seconds_bucket", (("le", "0.001"),))] == 1
    assert s[("soft_latency_budget_total", (("outcome", "met"),))] == 1
    assert s[("soft_latency_budget_total", (("outcome", "missed"),))] == 0


def test_registries_are_independent() -> None:
    a, b = Metrics(), Metrics()
    a.observe(RequestRecord(depth=1, finish_reason="stop", prompt_tokens=1, generated_tokens=1,
                            latency=0.1, ttft=0.1))  # fmt: skip
    assert ("soft_requests_total", (("depth", "1"), ("finish_reason", "stop"))) not in samples(b)


def test_prefix_cache_counters_follow_the_engine_totals_per_depth() -> None:
    m = Metrics((2, 4))
    assert samples(m)[("soft_prefix_cache_hits_total", (("depth", "2"),))] == 0  # pre-created
    for hits in (0, 32, 96):  # since start, scraped three times
        m.update(stats(prefix_queries={2: 100 + hits, 4: 50}, prefix_hits={2: hits},
                       prefix_cached_blocks=7), depth_cap=4)  # fmt: skip
    got = samples(m)
    assert got[("soft_prefix_cache_queries_total", (("depth", "2"),))] == 196
    assert got[("soft_prefix_cache_hits_total", (("depth", "2"),))] == 96
    assert got[("soft_prefix_cache_queries_total", (("depth", "4"),))] == 50
    assert got[("soft_prefix_cache_blocks", ())] == 7


def test_draft_tokens_are_a_counter_that_follows_the_engine_total() -> None:
    from server.engine.types import SpecCounters

    m = Metrics((2, 4))
    for drafted in (6, 6, 15):  # the engine's count since start, scraped three times
        m.update(stats(speculation={2: SpecCounters(drafted, 3, 2, 5)}), depth_cap=4)
    got = samples(m)
    assert got[("soft_spec_draft_tokens_total", (("exit", "2"),))] == 15.0
    assert got[("soft_spec_acceptance_ratio", (("exit", "2"),))] == 3 / 15
