"""The depth-aware prefix cache: keying by content, nesting by depth (a prompt's KV
computed at depth d serves every later request at depth <= d), eviction under pressure,
reference counts under abort, greedy output unchanged, and a soak that leaves nothing held.
"""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import pytest

import models
from server.engine.core import Engine, EngineConfig, kv_cache_dtype
from server.engine.kv_cache import KVCacheConfig, KVCacheManager
from server.engine.speculative import SpecConfig
from server.engine.types import GenerationRequest, SamplingParams, TokenEvent
from tests.conftest import make_hf_model, save_checkpoint
from tests.engine.test_exit_layers import write_balcony

BS = 16
L = 4


def manager(num_blocks: int = 64, exit_layers: tuple[int, ...] = (), **kw: bool) -> KVCacheManager:
    return KVCacheManager(KVCacheConfig(L, 2, 8, num_blocks, BS, exit_layers=exit_layers), **kw)


def ids(n: int, seed: int = 0) -> list[int]:
    return random.Random(seed).choices(range(3, 250), k=n)


def admit_and_compute(cache: KVCacheManager, seq: str, depth: int, tokens: list[int]) -> int:
    """Admit `seq`, then publish as if its prefill had run: the cached tokens it found."""
    cached = cache.admit(seq, depth, tokens)
    assert cached is not None
    cache.publish(seq, depth, tokens, len(tokens))
    return cached


def assert_idle_and_consistent(cache: KVCacheManager) -> None:
    """Nothing held, every reference count 0, and every cached block either idle or free
    of nothing else: the pool is whole."""
    assert cache.num_used == 0 and sum(cache.bytes_per_layer()) == 0
    assert all(cache.refcount(b) == 0 for b in range(cache.cfg.num_blocks))
    idle = set(cache.prefix.idle) if cache.prefix is not None else set()
    assert len(idle) == cache.num_cached
    assert sorted([*cache._free, *idle]) == list(range(cache.cfg.num_blocks))


# -- keying ------------------------------------------------------------------------------------
def test_equal_prompts_share_full_blocks_and_leave_the_last_token_to_compute() -> None:
    cache = manager()
    prompt = ids(50)  # 3 full blocks + 2 tokens
    assert admit_and_compute(cache, "a", 4, prompt) == 0
    assert admit_and_compute(cache, "b", 4, prompt) == 48
    for layer in range(4):  # the same physical blocks, held twice, never written by b
        assert cache.tables("a")[layer][:3] == cache.tables("b")[layer][:3]
        assert cache.tables("a")[layer][3] != cache.tables("b")[layer][3]
        assert all(cache.refcount(x) == 2 for x in cache.tables("b")[layer][:3])
    # a prompt of exactly 3 blocks finds only 2: its last token must run to give logits
    assert admit_and_compute(cache, "c", 4, prompt[:48]) == 32
    for seq in "abc":
        cache.free(seq)
    assert_idle_and_consistent(cache)


def test_one_changed_token_stops_the_match_at_its_block() -> None:
    cache = manager()
    prompt = ids(70)
    admit_and_compute(cache, "a", 4, prompt)
    changed = list(prompt)
    changed[37] += 1  # in block 2
    assert cache.cached_tokens(changed, 4) == 32
    assert admit_and_compute(cache, "b", 4, changed) == 32
    # the same tokens at another offset are another prefix: no match
    assert cache.cached_tokens([5, *prompt], 4) == 0
    cache.free("a")
    cache.free("b")
    assert_idle_and_consistent(cache)


# -- nesting by depth ----------------------------------------------------------------------------
def test_a_prefix_computed_deeper_serves_shallower_requests_not_deeper_ones() -> None:
    cache = manager()
    prompt = ids(40)
    admit_and_compute(cache, "deep", 3, prompt)
    assert cache.cached_by_depth(prompt, (1, 2, 3, 4)) == {1: 32, 2: 32, 3: 32, 4: 0}
    assert admit_and_compute(cache, "shallow", 1, prompt) == 32
    assert cache.tables("shallow")[0][:2] == cache.tables("deep")[0][:2]
    assert set(cache.tables("shallow")) == {0}
    assert admit_and_compute(cache, "full", 4, prompt) == 0  # layer 3 was never computed
    # ... and now it is: depth 4 finds it
    assert cache.cached_tokens(prompt, 4) == 32
    for seq in ("deep", "shallow", "full"):
        cache.free(seq)
    assert_idle_and_consistent(cache)


def test_an_exit_with_a_layer_of_its_own_needs_that_layer_cached() -> None:
    # balcony: exit 2 runs layers 0, 1 and its own cache layer L + 0
    cache = manager(exit_layers=(2,))
    prompt = ids(40)
    admit_and_compute(cache, "full", 4, prompt)
    assert cache.cached_tokens(prompt, 2) == 0  # the base's layers 0, 1 are there, L + 0 not
    assert cache.cached_tokens(prompt, 1) == 32  # exit 1 has no layer of its own here
    assert admit_and_compute(cache, "exit", 2, prompt) == 0
    assert cache.cached_tokens(prompt, 2) == 32
    # with no whole match it computed layers 0 and 1 again, in blocks of its own (the
    # cache keeps the first copy of each)
    assert cache.tables("exit")[0][0] != cache.tables("full")[0][0]
    cache.free("full")
    cache.free("exit")
    assert_idle_and_consistent(cache)


def test_lowering_a_depth_keeps_the_shared_prefix_blocks() -> None:
    cache = manager()
    prompt = ids(40)
    admit_and_compute(cache, "a", 4, prompt)
    admit_and_compute(cache, "b", 4, prompt)
    shared = cache.tables("b")[0][:2]
    cache.lower_depth("b", 2)
    assert set(cache.tables("b")) == {0, 1} and cache.tables("b")[0][:2] == shared
    assert all(cache.refcount(x) == 2 for x in shared)
    assert all(cache.refcount(x) == 1 for x in cache.tables("a")[3])
    cache.free("a")
    cache.free("b")
    assert_idle_and_consistent(cache)


# -- pressure and reference counts ---------------------------------------------------------------
def test_idle_cached_blocks_are_evicted_least_recently_used_first_under_pressure() -> None:
    cache = manager(num_blocks=12)  # 3 blocks a layer x 4 layers: one 40-token prompt
    first, second = ids(40, seed=1), ids(40, seed=2)
    admit_and_compute(cache, "a", 4, first)
    cache.free("a")
    assert cache.num_used == 0 and cache.num_cached == 8 and cache.num_available == 12
    assert cache.cached_tokens(first, 4) == 32
    # another prompt needs every block: the idle cached ones are taken, deepest layer and
    # last block first
    assert admit_and_compute(cache, "b", 4, second) == 0
    assert cache.cached_tokens(first, 4) == 0 and cache.prefix is not None
    assert cache.prefix.evictions == 8
    assert cache.admit("c", 4, first) is None  # no room: nothing changed
    assert "c" not in cache._tables
    cache.free("b")
    assert_idle_and_consistent(cache)


def test_partial_eviction_keeps_the_shallow_layers_usable() -> None:
    cache = manager(num_blocks=14)
    prompt = ids(40, seed=3)
    admit_and_compute(cache, "a", 4, prompt)
    cache.free("a")  # 8 cached idle, 4 + 2 free
    assert cache.allocate("x", 1, 16 * 8)  # 8 blocks: 6 free + the 2 least recent idle
    # the second block's layers 3 and 2 went (deepest first): depth 2 still finds both
    # blocks, deeper rows only the first
    assert cache.cached_by_depth(prompt, (2, 3, 4)) == {2: 32, 3: 16, 4: 16}
    cache.free("x")
    assert_idle_and_consistent(cache)


def test_reference_counts_under_abort_and_preemption() -> None:
    cache = manager()
    prompt = ids(40)
    for seq in ("a", "b", "c"):
        admit_and_compute(cache, seq, 4, prompt)
    block = cache.tables("a")[2][0]
    assert cache.refcount(block) == 3
    cache.free("b")  # aborted
    assert cache.refcount(block) == 2
    cache.free("b")  # idempotent
    assert cache.refcount(block) == 2
    cache.free("a")
    cache.free("c")
    assert cache.refcount(block) == 0 and block in cache.prefix.idle  # type: ignore[union-attr]
    assert admit_and_compute(cache, "a", 4, prompt) == 32  # readmitted: found again
    cache.free("a")
    assert_idle_and_consistent(cache)


def test_the_cache_switched_off_shares_nothing() -> None:
    cache = manager(prefix_cache=False)
    prompt = ids(40)
    admit_and_compute(cache, "a", 4, prompt)
    assert admit_and_compute(cache, "b", 4, prompt) == 0
    assert cache.cached_tokens(prompt, 4) == 0 and cache.num_cached == 0
    cache.free("a")
    cache.free("b")
    assert cache.num_used == 0 and len(cache._free) == cache.cfg.num_blocks


def test_publishing_waits_for_whole_blocks_whose_kv_is_final() -> None:
    cache = manager()
    prompt = ids(20)
    cache.admit("a", 4, prompt)
    cache.publish("a", 4, prompt, 15)  # block 0 not complete
    assert cache.num_cached == 0
    cache.publish("a", 4, prompt, 20)
    assert cache.num_cached == 4  # block 0 in each of the 4 layers
    cache.free("a")
    assert_idle_and_consistent(cache)


# -- the engine --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    hf = make_hf_model(seed=11, num_hidden_layers=L)
    return save_checkpoint(
        hf,
        tmp_path_factory.mktemp("prefix") / "m",
        {"format": "soft-checkpoint/1", "method": "soft", "exits": [1, 2, 3, 4]},
    )


@pytest.fixture(scope="module")
def balcony(tmp_path_factory: pytest.TempPathFactory) -> models.SortedModel:
    return models.load(write_balcony(tmp_path_factory.mktemp("prefix-balcony") / "m", agree=True))


def greedy(rid: str, prompt: list[int], depth: int, n: int = 6, **kw: object) -> GenerationRequest:
    params = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, **kw)  # type: ignore[arg-type]
    return GenerationRequest(rid, tuple(prompt), params, depth)


def one_by_one(engine: Engine, reqs: list[GenerationRequest]) -> list[list[TokenEvent]]:
    """Each request after the previous one finished (so each can find what it left)."""

    async def main() -> list[list[TokenEvent]]:
        out = []
        for r in reqs:
            out.append([e async for e in engine.submit(r)])
        return out

    with engine.running():
        return asyncio.run(main())


def tokens(events: list[TokenEvent]) -> list[int]:
    return [e.token_id for e in events if e.token_id is not None]


def conversation(depths: list[int], system: int = 40) -> list[GenerationRequest]:
    shared = ids(system, seed=9)
    return [greedy(f"r{i}", shared + ids(5 + 3 * i, seed=20 + i), d) for i, d in enumerate(depths)]


def test_greedy_output_is_identical_with_and_without_the_cache_at_every_depth(tiny: Path) -> None:
    # deep first, then every shallower depth on the same system prompt, then deeper again
    reqs = conversation([4, 1, 2, 3, 4, 2, 3])
    model = models.load(tiny, device="cpu")
    on = one_by_one(Engine(model, EngineConfig(kv_cache_memory=1 << 22)), reqs)
    off = one_by_one(Engine(model, EngineConfig(kv_cache_memory=1 << 22, prefix_cache=False)), reqs)
    for r, a, b in zip(reqs, on, off, strict=True):
        assert tokens(a) == tokens(b), r.request_id
        assert b[0].cached_tokens == 0
    # 40 shared tokens = 2 whole blocks, found by every request after the first (each is
    # at a depth <= 4, which computed them), but not by anyone without the cache
    assert [a[0].cached_tokens for a in on] == [0, 32, 32, 32, 32, 32, 32]
    assert all(e.cached_tokens is None for a in on for e in a[1:])


def test_greedy_exit_layer_rows_reuse_only_what_their_exit_computed(
    balcony: models.SortedModel,
) -> None:
    reqs = conversation([4, 2, 2, 1, 4, 1])
    on = one_by_one(Engine(balcony, EngineConfig(kv_cache_memory=1 << 22)), reqs)
    off = one_by_one(
        Engine(balcony, EngineConfig(kv_cache_memory=1 << 22, prefix_cache=False)), reqs
    )
    for r, a, b in zip(reqs, on, off, strict=True):
        assert tokens(a) == tokens(b), r.request_id
    # exit 2 has a layer of its own: the first exit-2 request computes it, the next reuses
    assert [a[0].cached_tokens for a in on] == [0, 0, 32, 0, 32, 32]


def test_prompt_logprobs_requests_compute_the_whole_prompt(tiny: Path) -> None:
    shared = ids(40, seed=4)
    engine = Engine(models.load(tiny, device="cpu"), EngineConfig(kv_cache_memory=1 << 22))
    a, b = one_by_one(engine, [greedy("a", shared, 4), greedy("b", shared, 4, prompt_logprobs=1)])
    assert b[0].cached_tokens == 0 and b[0].prompt_logprobs is not None
    assert len(b[0].prompt_logprobs) == len(shared)


def test_engine_stats_count_queries_and_hits_per_depth(tiny: Path) -> None:
    engine = Engine(models.load(tiny, device="cpu"), EngineConfig(kv_cache_memory=1 << 22))
    reqs = conversation([4, 2, 2])
    one_by_one(engine, reqs)
    s = engine.snapshot()
    n = [len(r.prompt_ids) for r in reqs]
    assert s.prefix_queries == {4: n[0], 2: n[1] + n[2]} and s.prefix_hits == {4: 0, 2: 64}
    assert s.prefix_cached_blocks > 0 and s.kv_blocks_used == 0
    assert engine.cached_tokens(reqs[0].prompt_ids, (1, 4)) == {1: 32, 4: 32 + 0}


def test_soak_mixing_depths_aborts_lowering_speculation_and_eviction_leaves_nothing_held(
    balcony: models.SortedModel,
) -> None:
    """Many requests over a few shared system prompts in a pool too small to keep them
    all: random depths, cancellations mid-stream, depths lowered mid-request, full-depth
    rows speculating at exit 2. Afterwards no block is held and the pool is whole."""
    spec = SpecConfig(mode="auto", exit=2, k=3, max_batch=64)
    block = KVCacheConfig(L, balcony.cfg.num_kv_heads, balcony.cfg.head_dim, 1,
                          dtype=kv_cache_dtype(balcony)).block_bytes  # fmt: skip
    engine = Engine(balcony, EngineConfig(kv_cache_memory=90 * block, speculative=spec))
    rng = random.Random(0)
    systems = [ids(rng.randint(20, 60), seed=100 + k) for k in range(4)]

    async def one(i: int) -> list[TokenEvent]:
        await asyncio.sleep(0.003 * i)
        prompt = rng.choice(systems) + ids(rng.randint(1, 20), seed=i)
        req = greedy(f"s{i}", prompt, rng.choice([1, 2, 4, 4]), rng.randint(2, 12))
        events: list[TokenEvent] = []
        stream = engine.submit(req)
        async for e in stream:
            events.append(e)
            if len(events) == 2 and i % 5 == 0:
                engine.lower_depth(req.request_id, 1)
            if len(events) == 3 and i % 7 == 0:
                engine.abort(req.request_id)
        return events

    async def main() -> list[list[TokenEvent]]:
        return await asyncio.gather(*(one(i) for i in range(60)))

    with engine.running():
        results = asyncio.run(main())
    assert all(r[-1].finish_reason in ("length", "abort") for r in results)
    assert any(r[0].cached_tokens for r in results)  # the shared prompts were found
    assert engine.cache.prefix is not None and engine.cache.prefix.evictions > 0
    assert_idle_and_consistent(engine.cache)
    assert engine.snapshot().kv_blocks_used == 0


def test_a_request_that_cannot_reuse_still_gets_identical_output_under_eviction(
    tiny: Path,
) -> None:
    # a pool that holds one request at a time: every admission evicts the last one's blocks
    model = models.load(tiny, device="cpu")
    block = KVCacheConfig(L, model.cfg.num_kv_heads, model.cfg.head_dim, 1,
                          dtype=kv_cache_dtype(model)).block_bytes  # fmt: skip
    reqs = conversation([4, 4, 2, 4], system=40)
    engine = Engine(model, EngineConfig(kv_cache_memory=4 * 5 * block))
    small = one_by_one(engine, reqs)
    off = one_by_one(Engine(model, EngineConfig(kv_cache_memory=1 << 22, prefix_cache=False)), reqs)
    assert [tokens(a) for a in small] == [tokens(b) for b in off]
    assert engine.cache.prefix is not None and engine.cache.prefix.evictions > 0
    assert_idle_and_consistent(engine.cache)
