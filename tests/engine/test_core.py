"""The engine: greedy parity with transformers at every exit in mixed-depth continuous
batches, cancellation, preemption, seeded sampling, logprobs."""

from __future__ import annotations

import asyncio
import copy
import math
import time
from pathlib import Path

import pytest
import torch
from torch import nn

import models
from models import kernels
from server.engine.core import Engine, EngineConfig, kv_cache_dtype, on_own_thread
from server.engine.kv_cache import KVCacheConfig
from server.engine.types import GenerationRequest, QueueFull, SamplingParams, TokenEvent
from tests.conftest import make_hf_model, save_checkpoint

L = 4


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    hf = make_hf_model(seed=7, num_hidden_layers=L)
    path = save_checkpoint(
        hf,
        tmp_path_factory.mktemp("engine") / "m",
        {"format": "soft-checkpoint/1", "method": "soft", "exits": [1, 2, 3, 4]},
    )
    return path, hf


def reference(hf: object, prompt: list[int], depth: int, n: int) -> list[int]:
    m = copy.deepcopy(hf)
    m.model.layers = nn.ModuleList(list(m.model.layers)[:depth])  # type: ignore[attr-defined]
    m.config.num_hidden_layers = depth  # type: ignore[attr-defined]
    out = m.generate(
        torch.tensor([prompt]),
        max_new_tokens=n,
        min_new_tokens=n,  # type: ignore[attr-defined]
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
    )
    return out[0, len(prompt) :].tolist()


def request(rid: str, prompt: list[int], depth: int, n: int = 8, **sp: object) -> GenerationRequest:
    params = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, **sp)  # type: ignore[arg-type]
    return GenerationRequest(rid, tuple(prompt), params, depth)


async def collect(engine: Engine, req: GenerationRequest, delay: float = 0.0) -> list[TokenEvent]:
    await asyncio.sleep(delay)
    return [e async for e in engine.submit(req)]


def prompts(k: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randint(3, 256, (int(torch.randint(3, 40, (1,), generator=g)),), generator=g).tolist()
        for _ in range(k)
    ]


def make_engine(path: Path, **cfg: object) -> Engine:
    engine = Engine(models.load(path, device="cpu"), EngineConfig(**cfg))  # type: ignore[arg-type]
    engine.start()
    return engine


def test_greedy_matches_transformers_mixed_depths_together_and_staggered(tiny) -> None:
    path, hf = tiny
    engine = make_engine(path, kv_cache_memory=1 << 22)
    ps = prompts(8)
    depths = [4, 1, 3, 2, 4, 2, 1, 3]

    async def main() -> list[list[TokenEvent]]:
        jobs = [
            collect(engine, request(f"r{i}", p, d, 10), delay=0.0 if i < 4 else 0.01 * i)
            for i, (p, d) in enumerate(zip(ps, depths, strict=True))
        ]
        return await asyncio.gather(*jobs)

    results = asyncio.run(main())
    for p, d, events in zip(ps, depths, results, strict=True):
        tokens = [e.token_id for e in events]
        assert tokens == reference(hf, p, d, 10), f"depth {d}"
        assert events[-1].finish_reason == "length" and all(e.depth == d for e in events)
    assert engine.stats().kv_blocks_used == 0 or engine.cache.num_used == 0
    assert engine.cache.num_used == 0
    stats = engine.stats()  # staggered arrivals: some decode turns also ran a prefill
    assert stats.steps > 0 and stats.token_interval_seconds > 0


def test_newcomer_prefill_shares_the_decode_forward_and_stays_exact(tiny) -> None:
    path, hf = tiny
    engine = make_engine(path, kv_cache_memory=1 << 22)
    kinds: list[tuple[bool, ...]] = []
    forward = engine.runner.forward
    engine.runner.forward = lambda groups: (
        kinds.append(tuple(g.prefill for g in groups)),
        forward(groups),
    )[1]  # type: ignore[method-assign]
    ps = prompts(3, seed=5)

    async def main() -> list[list[TokenEvent]]:
        first = engine.submit(request("a", ps[0], 4, 30))
        events = [await anext(first)]  # a is decoding now
        late = [
            collect(engine, request("b", ps[1], 2, 6)),
            collect(engine, request("c", ps[2], 3, 6)),
        ]
        rest = asyncio.gather(*late)
        events += [e async for e in first]
        return [events, *await rest]

    results = asyncio.run(main())
    engine.stop()
    for p, d, n, events in zip(ps, (4, 2, 3), (30, 6, 6), results, strict=True):
        assert [e.token_id for e in events] == reference(hf, p, d, n), f"depth {d}"
    assert any(True in k and False in k for k in kinds), kinds  # prefill + decode together
    assert engine.cache.num_used == 0


def test_preemption_under_tiny_cache_still_exact(tiny) -> None:
    path, hf = tiny
    # 24 blocks of 16 tokens: a few sequences at once, the rest queue or get preempted
    model = models.load(path, device="cpu")

    block = KVCacheConfig(L, model.cfg.num_kv_heads, model.cfg.head_dim, 1,
                          dtype=kv_cache_dtype(model)).block_bytes  # fmt: skip
    engine = make_engine(path, kv_cache_memory=24 * block)
    ps = prompts(6, seed=1)
    depths = [4, 4, 2, 4, 3, 1]

    async def main() -> list[list[TokenEvent]]:
        return await asyncio.gather(
            *[
                collect(engine, request(f"p{i}", p, d, 20))
                for i, (p, d) in enumerate(zip(ps, depths, strict=True))
            ]
        )

    results = asyncio.run(main())
    for p, d, events in zip(ps, depths, results, strict=True):
        assert [e.token_id for e in events] == reference(hf, p, d, 20)
    assert engine.cache.num_used == 0
    assert engine.stats().preemptions > 0


def test_kv_bytes_are_proportional_to_depth(tiny) -> None:
    path, _ = tiny
    engine = Engine(models.load(path, device="cpu"), EngineConfig(kv_cache_memory=1 << 22))
    from server.engine.scheduler import Sequence

    full = Sequence(request("a", [5] * 40, 4), [5] * 40, 4)
    half = Sequence(request("b", [5] * 40, 2), [5] * 40, 2)
    assert engine.cache.allocate(full, 4, 40) and engine.cache.allocate(half, 2, 40)
    assert engine.cache.seq_bytes(half) * 2 == engine.cache.seq_bytes(full)
    per_layer = engine.cache.bytes_per_layer()
    assert per_layer[0] == per_layer[1] == 2 * per_layer[2] == 2 * per_layer[3]
    engine.cache.lower_depth(full, 1)
    assert engine.cache.seq_bytes(full) == engine.cache.seq_bytes(half) // 2
    engine.cache.free(full)
    engine.cache.free(half)
    assert engine.cache.num_used == 0 and sum(engine.cache.bytes_per_layer()) == 0


def test_cancel_frees_blocks_and_others_continue(tiny) -> None:
    path, hf = tiny
    engine = make_engine(path, kv_cache_memory=1 << 22)
    p = prompts(2, seed=2)

    async def main() -> tuple[list[TokenEvent], int]:
        keep = asyncio.create_task(collect(engine, request("keep", p[0], 3, 30)))
        stream = engine.submit(request("gone", p[1], 4, 200))
        got = 0
        async for _ in stream:
            got += 1
            if got == 3:
                break
        await stream.aclose()  # what a disconnect does
        return await keep, got

    events, got = asyncio.run(main())
    assert got == 3
    assert [e.token_id for e in events] == reference(hf, p[0], 3, 30)
    for _ in range(50):
        if engine.cache.num_used == 0:
            break
        import time

        time.sleep(0.02)
    assert engine.cache.num_used == 0


def test_seeded_sampling_repeats_regardless_of_batch(tiny) -> None:
    path, _ = tiny
    engine = make_engine(path, kv_cache_memory=1 << 22)
    sp = dict(temperature=0.9, top_p=0.9, top_k=50, seed=1234)

    def sampled(rid: str) -> GenerationRequest:
        return GenerationRequest(
            rid, (5, 6, 7, 8), SamplingParams(max_tokens=12, ignore_eos=True, **sp), 4
        )  # type: ignore[arg-type]

    async def main() -> tuple[list[int], list[int]]:
        alone = [e.token_id for e in await collect(engine, sampled("a"))]
        others = [collect(engine, request(f"o{i}", q, 2, 12)) for i, q in enumerate(prompts(5))]
        res = await asyncio.gather(collect(engine, sampled("b")), *others)
        return alone, [e.token_id for e in res[0]]

    alone, crowded = asyncio.run(main())
    assert alone == crowded


def test_logprobs_and_prompt_logprobs(tiny) -> None:
    path, _ = tiny
    model = models.load(path, device="cpu")
    engine = Engine(model, EngineConfig(kv_cache_memory=1 << 22))
    engine.start()
    prompt = [5, 9, 17, 33, 2]
    req = request("lp", prompt, 3, 2, logprobs=2, prompt_logprobs=1)
    events = asyncio.run(collect(engine, req))
    full = torch.log_softmax(model.logits(torch.tensor([prompt + [events[0].token_id]]), 3)[0], -1)
    plp = events[0].prompt_logprobs
    assert plp is not None and len(plp) == len(prompt) and plp[0] is None
    for t in range(1, len(prompt)):
        entry = plp[t]
        assert entry is not None and entry.token_id == prompt[t]
        assert abs(entry.logprob - full[t - 1, prompt[t]].item()) < 1e-4
        assert len(entry.top) == 1
    first = events[0].logprob
    assert first is not None and len(first.top) == 2
    assert abs(first.logprob - full[len(prompt) - 1, first.token_id].item()) < 1e-4
    assert first.top[0][0] == first.token_id  # greedy: the chosen token is the top one


def test_stop_tokens_and_eos(tiny) -> None:
    path, hf = tiny
    engine = make_engine(path, kv_cache_memory=1 << 22)
    p = prompts(1, seed=3)[0]
    ref = reference(hf, p, 4, 6)
    req = request("s", p, 4, 6, stop_token_ids=(ref[2],))
    events = asyncio.run(collect(engine, req))
    assert [e.token_id for e in events] == ref[: ref.index(ref[2]) + 1]
    assert events[-1].finish_reason == "stop"


def test_impossible_and_queue_full(tiny) -> None:
    path, _ = tiny
    engine = Engine(
        models.load(path, device="cpu"), EngineConfig(kv_cache_memory=1 << 22, max_queue=2)
    )

    async def main() -> None:
        with pytest.raises(ValueError, match="context window is 256"):
            engine.submit(request("long", [5] * 250, 4, 10))
        with pytest.raises(ValueError, match="empty"):
            engine.submit(request("empty", [], 4, 10))
        # token names, not ids (a tokenizer's output passed whole), or ids past the vocabulary
        for bad in (["input_ids"], [5, 1 << 20], [5, -1], [5.0]):
            with pytest.raises(ValueError, match="prompt token ids must be integers"):
                engine.submit(request("bad", bad, 4, 1))
        engine.submit(request("q1", [5], 4, 1))
        engine.submit(request("q2", [5], 4, 1))
        with pytest.raises(QueueFull):
            engine.submit(request("q3", [5], 4, 1))

    asyncio.run(main())


def test_queue_drain_rate_is_measured_only_while_requests_wait(tiny) -> None:
    path, _ = tiny
    engine = make_engine(path, kv_cache_memory=1 << 22, max_num_seqs=2)
    p = prompts(6, seed=5)

    async def main() -> None:
        await asyncio.gather(*(collect(engine, request(f"a{i}", q, 4, 6)) for i, q in
                               enumerate(p)))  # fmt: skip

    time.sleep(0.15)  # the idle loop refreshes the snapshot
    assert engine.stats().admit_per_second == 0.0  # nobody has waited yet
    asyncio.run(main())  # six arrive together, two fit the batch: four wait for a slot
    time.sleep(0.15)
    engine.stop()
    assert engine.meter.idled  # out of work: the step/interval averages restart with the next spell
    rate = engine.stats().admit_per_second
    assert rate > 0 and engine.meter.backlog_s > 0
    assert rate == pytest.approx(engine.meter.admitted / engine.meter.backlog_s)
    assert 5.0 <= engine.meter.admitted <= 6.0  # six admissions, decayed by under a second
    # the arithmetic: decayed sums of admissions and seconds, time constant ADMIT_TAU_S
    from server.engine.stats import ADMIT_TAU_S

    engine.meter.admitted = engine.meter.backlog_s = 0.0
    engine.meter.count_admissions(3, 1.0)
    engine.meter.count_admissions(0, ADMIT_TAU_S)
    keep = math.exp(-1.0)
    assert engine.meter.admitted / engine.meter.backlog_s == pytest.approx(
        3 * keep / (keep + ADMIT_TAU_S)
    )


def test_snapshot_lists_the_tokens_each_row_has_left(tiny) -> None:
    from server.engine.scheduler import Sequence

    path, _ = tiny
    engine = Engine(models.load(path, device="cpu"), EngineConfig(kv_cache_memory=1 << 22))
    run = Sequence(request("r", [5, 6], 4, n=10), [5, 6, 7, 8, 9], 4, num_generated=3)
    wait = Sequence(request("w", [5], 2, n=6), [5], 2)
    engine.scheduler.running.append(run)
    engine.scheduler.waiting.append(wait)
    stats = engine.snapshot()
    assert stats.rows_left == ((4, 7), (2, 6))  # running first, then the queue in order
    assert stats.depths_running == {4: 1} and stats.waiting == 1


def test_lower_depth_mid_request_frees_layers(tiny) -> None:
    path, hf = tiny
    engine = make_engine(path, kv_cache_memory=1 << 22)
    p = prompts(1, seed=4)[0]

    async def main() -> list[TokenEvent]:
        events = []
        async for e in engine.submit(request("dn", p, 4, 12)):
            events.append(e)
            if len(events) == 3:
                engine.lower_depth("dn", 2)
        return events

    events = asyncio.run(main())
    depths = [e.depth for e in events]
    assert depths[0] == 4 and depths[-1] == 2 and depths == sorted(depths, reverse=True)
    assert engine.cache.num_used == 0


def test_engine_restarts_after_stop_and_on_own_thread_hands_back(tiny) -> None:
    path, hf = tiny
    engine = on_own_thread(lambda: make_engine(path))  # built on a thread that ends
    p = prompts(1, seed=5)[0]
    ref = reference(hf, p, 4, 6)
    for rid in ("before", "after"):
        tokens = [e.token_id for e in asyncio.run(collect(engine, request(rid, p, 4, 6)))]
        assert tokens == ref
        engine.stop()
        assert engine._thread is None
        engine.start()
    engine.stop()
    with pytest.raises(ZeroDivisionError):
        on_own_thread(lambda: 1 // 0)


def test_admitted_together_prefill_in_one_padded_forward(tiny) -> None:
    path, hf = tiny
    engine = Engine(models.load(path, device="cpu"), EngineConfig(kv_cache_memory=1 << 22))
    groups: list[int] = []
    prefill = engine.runner.prefill_group
    engine.runner.prefill_group = lambda seqs: (groups.append(len(seqs)), prefill(seqs))[1]  # type: ignore[method-assign]
    g = torch.Generator().manual_seed(9)
    ps = [torch.randint(3, 256, (n,), generator=g).tolist() for n in (12, 10, 11, 9)]
    depths = [2, 4, 1, 3]

    async def main() -> list[list[TokenEvent]]:
        reqs = [request(f"p{i}", p, d, 6) for i, (p, d) in enumerate(zip(ps, depths, strict=True))]
        streams = [engine.submit(r) for r in reqs]  # queued before the loop starts
        engine.start()

        async def drain(s: object) -> list[TokenEvent]:
            return [e async for e in s]  # type: ignore[attr-defined]

        return await asyncio.gather(*(drain(s) for s in streams))

    results = asyncio.run(main())
    engine.stop()
    assert groups == [4]  # one forward for all four prompts (9 to 12 tokens), each once
    for p, d, events in zip(ps, depths, results, strict=True):
        assert [e.token_id for e in events] == reference(hf, p, d, 6), f"depth {d}"
    assert engine.cache.num_used == 0


def test_the_kv_cache_is_fp16_where_the_kernels_attend_and_as_asked_elsewhere(tiny) -> None:
    path, hf = tiny
    model = models.load(path, device="cpu")
    auto = torch.float16 if kernels.available() else torch.float32
    assert kv_cache_dtype(model) == auto
    assert kv_cache_dtype(model, "float32") == torch.float32
    with pytest.raises(ValueError, match="kv_cache_dtype must be auto or one of"):
        kv_cache_dtype(model, "fp8")
    memory = 1 << 22
    half = Engine(model, EngineConfig(kv_cache_memory=memory))
    full = Engine(model, EngineConfig(kv_cache_memory=memory, kv_cache_dtype="float32"))
    assert half.cache.k.dtype == half.cache.v.dtype == auto
    assert full.cache.k.dtype == torch.float32
    # the same memory holds twice the blocks in fp16
    assert half.cache.cfg.num_blocks == full.cache.cfg.num_blocks * (4 // auto.itemsize)
    p = prompts(1, seed=3)[0]
    for engine in (half, full):
        with engine.running():
            events = asyncio.run(collect(engine, request("a", p, L, 12)))
        assert [e.token_id for e in events] == reference(hf, p, L, 12)


def test_a_forwards_events_wake_the_event_loop_once(tiny) -> None:
    # waking a loop from the step thread costs a write to its self-pipe: one per forward,
    # not one per row and token
    path, _ = tiny
    engine = make_engine(path, kv_cache_memory=1 << 22)
    wakes: list[int] = []
    forwards: list[int] = []
    forward = engine.runner.forward
    engine.runner.forward = lambda groups: (forwards.append(1), forward(groups))[1]  # type: ignore[method-assign]

    async def main() -> list[list[TokenEvent]]:
        loop = asyncio.get_running_loop()
        real = loop.call_soon_threadsafe

        def counted(*a: object, **kw: object) -> object:
            wakes.append(1)
            return real(*a, **kw)  # type: ignore[arg-type]

        loop.call_soon_threadsafe = counted  # type: ignore[method-assign]
        ps = prompts(6, seed=9)
        return await asyncio.gather(*(collect(engine, request(f"r{i}", p, L, 20))
                                      for i, p in enumerate(ps)))  # fmt: skip

    results = asyncio.run(main())
    engine.stop()
    assert all(len(r) == 20 for r in results)
    assert len(wakes) <= len(forwards) < 6 * 20  # 120 wake-ups, one a row and token, before
