"""Self-speculative decoding: greedy identity, KV rollback, the acceptance rule."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch

import models
from server.engine.core import Engine, EngineConfig
from server.engine.speculative import SpecConfig, Speculator, accept, expected_tokens
from server.engine.types import GenerationRequest, SamplingParams, TokenEvent
from tests.conftest import make_hf_model, save_checkpoint

SOFT = {"format": "soft-checkpoint/1", "method": "soft", "exits": [1, 2, 3, 4]}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    hf = make_hf_model(seed=11, num_hidden_layers=4)
    return save_checkpoint(hf, tmp_path_factory.mktemp("spec") / "m", SOFT)


def run(engine: Engine, reqs: list[GenerationRequest]) -> list[list[TokenEvent]]:
    async def one(r: GenerationRequest, delay: float) -> list[TokenEvent]:
        await asyncio.sleep(delay)
        return [e async for e in engine.submit(r)]

    async def main() -> list[list[TokenEvent]]:
        return await asyncio.gather(*(one(r, 0.002 * i) for i, r in enumerate(reqs)))

    return asyncio.run(main())


def greedy(rid: str, prompt: list[int], depth: int, n: int) -> GenerationRequest:
    params = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
    return GenerationRequest(rid, tuple(prompt), params, depth)


def prompts(k: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(5)
    lengths = torch.randint(2, 30, (k,), generator=g).tolist()
    return [torch.randint(3, 256, (n,), generator=g).tolist() for n in lengths]


@pytest.mark.parametrize(("exit_", "k", "vocab"), [(1, 3, 0), (2, 4, 64), (3, 2, 0)])
def test_greedy_is_identical_to_plain_decoding_on_50_prompts(
    tiny: Path, exit_: int, k: int, vocab: int
) -> None:
    model = models.load(tiny, device="cpu")
    plain = Engine(model, EngineConfig(kv_cache_memory=1 << 23))
    cfg = SpecConfig(mode="auto", exit=exit_, k=k, draft_vocab=vocab, max_batch=64)
    spec = Engine(model, EngineConfig(kv_cache_memory=1 << 23, speculative=cfg))
    plain.start()
    spec.start()
    ps = prompts(50)
    # full-depth rows speculate; shallow rows (depth <= exit) decode plainly beside them
    depths = [4 if i % 5 else max(1, exit_) for i in range(50)]
    reqs = [greedy(f"r{i}", p, d, 12) for i, (p, d) in enumerate(zip(ps, depths, strict=True))]
    ref = run(plain, reqs)
    got = run(spec, reqs)
    for r, a, b in zip(reqs, ref, got, strict=True):
        assert [e.token_id for e in b] == [e.token_id for e in a], r.request_id
        assert b[-1].finish_reason == "length" and len(b) == 12
    stats = spec.speculator.stats
    assert stats.cycles.get(exit_, 0) > 0 and stats.drafted[exit_] >= stats.accepted[exit_]
    assert spec.cache.num_used == 0 and plain.cache.num_used == 0


def test_rollback_leaves_no_stale_or_leaked_blocks(tiny: Path) -> None:
    model = models.load(tiny, device="cpu")
    engine = Engine(model, EngineConfig(kv_cache_memory=1 << 23,
                    speculative=SpecConfig(mode="auto", exit=1, k=6, max_batch=64)))  # fmt: skip
    held: list[tuple[int, int]] = []
    original = engine._speculate

    def checked(seqs: list, exit_: int, k: int) -> None:
        original(seqs, exit_, k)
        for s in seqs:
            if s.finish_reason is None:  # exactly the blocks its kept tokens need
                tables = engine.cache.tables(s)
                held.append((len(tables[0]), engine.cache.blocks_for(len(s.tokens))))
                assert s.num_computed == len(s.tokens) - 1

    engine._speculate = checked  # type: ignore[method-assign]
    engine.start()
    run(engine, [greedy(f"x{i}", p, 4, 40) for i, p in enumerate(prompts(6))])
    assert held and all(have == need for have, need in held)
    assert engine.cache.num_used == 0


def test_stop_token_inside_accepted_drafts_ends_the_request(tiny: Path) -> None:
    model = models.load(tiny, device="cpu")
    plain = Engine(model, EngineConfig(kv_cache_memory=1 << 22))
    plain.start()
    p = prompts(1)[0]
    ref = [e.token_id for e in run(plain, [greedy("a", p, 4, 20)])[0]]
    stop = ref[5]
    spec = Engine(model, EngineConfig(kv_cache_memory=1 << 22,
                  speculative=SpecConfig(mode="auto", exit=3, k=8)))  # fmt: skip
    spec.start()
    params = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True, stop_token_ids=(stop,))
    events = run(spec, [GenerationRequest("b", tuple(p), params, 4)])[0]
    assert [e.token_id for e in events] == ref[: ref.index(stop) + 1]
    assert events[-1].finish_reason == "stop" and spec.cache.num_used == 0


def test_acceptance_rule_preserves_the_target_distribution() -> None:
    # one position, vocab 4: draft from q, accept/resample against p -> the output is ~ p
    p_logits = torch.tensor([2.0, 1.0, 0.0, -1.0])
    q = torch.tensor([0.1, 0.2, 0.3, 0.4])
    params = SamplingParams(temperature=1.0)
    g = torch.Generator().manual_seed(0)
    counts = torch.zeros(4)
    n = 20000
    for _ in range(n):
        d = int(torch.multinomial(q, 1, generator=g))
        out = accept([d], [q], p_logits[None], params, g)
        counts[out[0]] += 1
    target = torch.softmax(p_logits, -1)
    assert torch.allclose(counts / n, target, atol=0.015), (counts / n, target)


def test_sampled_speculation_with_a_draft_vocabulary_runs_and_frees(tiny: Path) -> None:
    model = models.load(tiny, device="cpu")
    cfg = SpecConfig(mode="auto", exit=2, k=3, draft_vocab=32)
    engine = Engine(model, EngineConfig(kv_cache_memory=1 << 22, speculative=cfg))
    engine.start()
    params = SamplingParams(max_tokens=16, temperature=0.8, top_p=0.95, seed=3, ignore_eos=True)
    reqs = [GenerationRequest(f"s{i}", (5, 6, 7), params, 4) for i in range(2)]
    a, b = run(engine, reqs)
    assert [e.token_id for e in a] == [e.token_id for e in b]  # same seed, same tokens
    assert len(a) == 16 and engine.cache.num_used == 0
    assert engine.speculator.stats.cycles[2] > 0


def test_greedy_acceptance_takes_the_longest_agreeing_prefix() -> None:
    target = torch.full((4, 10), -5.0)
    for i, tok in enumerate([3, 7, 1, 9]):
        target[i, tok] = 5.0
    params = SamplingParams(temperature=0.0)
    assert accept([3, 7, 1, 9], [None] * 4, target, params, None) == [3, 7, 1, 9]
    assert accept([3, 7, 2, 9], [None] * 4, target, params, None) == [3, 7, 1]
    assert accept([4, 7, 1, 9], [None] * 4, target, params, None) == [3]


def test_cost_model_picks_cheap_exits_when_they_agree(tiny: Path) -> None:
    assert expected_tokens(0.0, 4) == pytest.approx(1.0)
    assert expected_tokens(0.5, 3) == pytest.approx(1.75)
    model = models.load(tiny, device="cpu")
    spec = Speculator(model, SpecConfig(mode="auto"))
    for _ in range(50):  # exit 1 always agrees, exit 2 never does
        spec.observe(1, 4, 4, 4)
        spec.observe(2, 4, 0, 1)
    exit_, k = spec.choose(4) or (0, 0)
    assert exit_ == 1 and k > 1
    assert spec.speedup(1, 4, k) > 1.0
    bad = Speculator(model, SpecConfig(mode="auto"))
    for e in (1, 2, 3):
        for _ in range(50):
            bad.observe(e, 4, 0, 1)
    assert bad.choose(4) is None  # nothing agrees: plain decoding
    assert Speculator(model, SpecConfig(mode="off")).choose(4) is None


def test_large_decode_batches_decode_plainly(tiny: Path) -> None:
    model = models.load(tiny, device="cpu")
    engine = Engine(model, EngineConfig(speculative=SpecConfig(mode="auto", exit=2, k=3)))
    from server.engine.scheduler import Sequence

    seqs = [Sequence(greedy(f"b{i}", [5, 6], 4, 8), [5, 6], 4) for i in range(5)]
    plain, groups = engine.speculator.plan(seqs, engine.cache, engine.max_model_len)
    assert plain == seqs and not groups  # 5 rows > max_batch 4
    plain, groups = engine.speculator.plan(seqs[:4], engine.cache, engine.max_model_len)
    assert not plain and [len(g) for g in groups.values()] == [4]


def test_speculation_is_visible_in_metrics(tiny: Path) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    from server.metrics import Metrics

    model = models.load(tiny, device="cpu")
    cfg = SpecConfig(mode="auto", exit=2, k=3)
    engine = Engine(model, EngineConfig(kv_cache_memory=1 << 22, speculative=cfg))
    engine.start()
    run(engine, [greedy("m", [5, 6, 7], 4, 12)])
    engine._stats = engine.snapshot()
    counters = engine.stats().speculation[2]
    assert counters.cycles > 0 and counters.cycles < counters.drafted <= 3 * counters.cycles
    metrics = Metrics(model.exits)
    metrics.update(engine.stats(), depth_cap=4)
    samples = {
        (s.name, s.labels.get("exit")): s.value
        for fam in text_string_to_metric_families(metrics.render().decode())
        for s in fam.samples
    }
    assert samples[("soft_spec_acceptance_ratio", "2")] == counters.accepted / counters.drafted
    assert samples[("soft_spec_tokens_per_verify", "2")] == counters.emitted / counters.cycles
