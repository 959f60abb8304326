"""Balcony checkpoints (one decoder layer of its own per exit) through the engine: loading,
parity with the dense reference, mixed batches, KV accounting and freeing, depth lowering,
and self-speculative decoding that drafts with an exit layer."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

import models
from models import kernels
from models.checkpoint import EXIT_LAYERS
from models.generate import greedy_generate
from server.engine.core import Engine, EngineConfig
from server.engine.scheduler import Sequence
from server.engine.speculative import SpecConfig
from server.engine.types import GenerationRequest, SamplingParams, TokenEvent
from tests.conftest import make_hf_model
from tests.engine.test_speculative import run as run_staggered

L = 4
EXITS = [1, 2, 4]


def write_balcony(path: Path, seed: int = 3, agree: bool = False) -> Path:
    """A 4-layer random model with exits 1, 2 and 4: exit layers 1 and 2 are random
    decoder layers (HF names under `exits.{e}.`), full depth is the base. `agree`: layers
    past 0 and the exit layers write little into the residual stream, so the exits agree
    with full depth often (a draft is accepted about half the time)."""
    hf = make_hf_model(seed=seed, num_hidden_layers=L)
    if agree:
        with torch.no_grad():
            for layer in hf.model.layers[1:]:
                layer.self_attn.o_proj.weight.mul_(0.15)
                layer.mlp.down_proj.weight.mul_(0.15)
    hf.save_pretrained(str(path), safe_serialization=True)
    g = torch.Generator().manual_seed(seed + 1)
    tensors = {}
    for e in EXITS[:-1]:
        for name, w in hf.model.layers[e].state_dict().items():
            scale = (0.02 if w.dim() == 1 else 0.08) * (0.05 if agree else 1.0)
            noise = torch.randn(w.shape, generator=g) * scale
            tensors[f"exits.{e}.{name}"] = (w + noise).contiguous()
    save_file(tensors, str(path / EXIT_LAYERS))
    (path / "soft.json").write_text(
        json.dumps({"format": "soft-checkpoint/1", "method": "balcony", "exits": EXITS})
    )
    return path


@pytest.fixture(scope="module")
def balcony(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_balcony(tmp_path_factory.mktemp("balcony") / "m")


@pytest.fixture(scope="module")
def model(balcony: Path) -> models.SortedModel:
    return models.load(balcony, device="cpu")


@pytest.fixture(scope="module")
def agreeing(tmp_path_factory: pytest.TempPathFactory) -> models.SortedModel:
    return models.load(write_balcony(tmp_path_factory.mktemp("agree") / "m", agree=True))


def greedy(rid: str, prompt: list[int], depth: int, n: int, **kw: Any) -> GenerationRequest:
    params = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, **kw)
    return GenerationRequest(rid, tuple(prompt), params, depth)


def prompts(k: int, seed: int = 5) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, 30, (k,), generator=g).tolist()
    return [torch.randint(3, 256, (n,), generator=g).tolist() for n in lengths]


def run(engine: Engine, reqs: list[GenerationRequest]) -> list[list[TokenEvent]]:
    """The speculative tests' staggered submission, with the engine started around it."""
    with engine.running():
        return run_staggered(engine, reqs)


def reference(model: models.SortedModel, prompt: list[int], depth: int, n: int) -> list[int]:
    return greedy_generate(model, torch.tensor(prompt), depth, n)


def tokens(events: list[TokenEvent]) -> list[int]:
    return [e.token_id for e in events if e.token_id is not None]


def test_the_engine_sizes_its_cache_for_the_exit_layers(model: models.SortedModel) -> None:
    engine = Engine(model, EngineConfig(kv_cache_memory=1 << 22))
    cfg = engine.cache.cfg
    assert model.method == "balcony" and model.num_kv_layers == L + 2
    assert cfg.exit_layers == (1, 2) and cfg.num_kv_layers == L + 2
    assert [cfg.exit_kv_layer(e) for e in EXITS] == [model.kv_layer(1), model.kv_layer(2), None]
    assert cfg.layers(1) == (0, 4) and cfg.layers(2) == (0, 1, 5) and cfg.layers(4) == (0, 1, 2, 3)
    # a row at exit e holds e + 1 layers' blocks: KV per token says so
    per_layer = cfg.block_bytes // cfg.block_size
    assert [engine.cache.bytes_per_token(d) for d in EXITS] == [2 * per_layer, 3 * per_layer,
                                                                4 * per_layer]  # fmt: skip
    assert model.weight_bytes(2) - model.weight_bytes(1) == model.layer_bytes()
    assert model.weight_bytes(4) - model.weight_bytes(2) == model.layer_bytes()


def test_engine_output_equals_greedy_generate_at_every_exit_in_mixed_batches(
    model: models.SortedModel,
) -> None:
    ps = prompts(12, seed=1)
    depths = [EXITS[i % 3] for i in range(len(ps))]
    engine = Engine(model, EngineConfig(kv_cache_memory=1 << 22))
    batches: list[dict[int, int]] = []
    original = engine.runner.forward

    def spy(groups: list[Any]) -> Any:  # which depths share a forward
        mix: dict[int, int] = {}
        for g in groups:
            for d in g.depths:
                mix[d] = mix.get(d, 0) + 1
        batches.append(mix)
        return original(groups)

    engine.runner.forward = spy  # type: ignore[method-assign]
    reqs = [greedy(f"r{i}", p, d, 8) for i, (p, d) in enumerate(zip(ps, depths, strict=True))]
    for r, events in zip(reqs, run(engine, reqs), strict=True):
        assert tokens(events) == reference(model, list(r.prompt_ids), r.depth, 8), r.request_id
        assert all(e.depth == r.depth for e in events)
    assert any(len(mix) == 3 for mix in batches)  # exits 1, 2 and full depth in one forward
    assert engine.cache.num_used == 0


def test_an_exit_row_holds_blocks_in_e_plus_one_layers_and_frees_them(
    model: models.SortedModel,
) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    from server.metrics import Metrics

    engine = Engine(model, EngineConfig(kv_cache_memory=1 << 22))
    cache = engine.cache
    a = Sequence(greedy("a", [5] * 40, 2, 4), [5] * 40, 2)
    b = Sequence(greedy("b", [5] * 40, 4, 4), [5] * 40, 4)
    assert cache.allocate(a, 2, 40) and cache.allocate(b, 4, 40)
    assert sorted(cache.tables(a)) == [0, 1, 5] and sorted(cache.tables(b)) == [0, 1, 2, 3]
    assert cache.seq_bytes(a) * 4 == cache.seq_bytes(b) * 3  # (2 + 1) / 4 of full depth
    stats = engine.snapshot()
    blocks = 3 * cache.cfg.block_bytes  # 40 tokens: 3 blocks a layer
    assert stats.kv_bytes_per_layer == (2 * blocks, 2 * blocks, blocks, blocks)
    assert stats.kv_bytes_per_exit_layer == {1: 0, 2: blocks}
    assert stats.kv_bytes_total == 7 * blocks == cache.seq_bytes(a) + cache.seq_bytes(b)
    metrics = Metrics(model.exits)
    metrics.update(stats, depth_cap=4)
    samples = {
        s.labels["layer"]: s.value
        for fam in text_string_to_metric_families(metrics.render().decode())
        for s in fam.samples
        if s.name == "soft_kv_cache_bytes"
    }
    assert samples["exit2"] == blocks and samples["exit1"] == 0 and samples["3"] == blocks
    cache.lower_depth(a, 1)  # a plain drop: exit 1's own layer was never held
    assert sorted(cache.tables(a)) == [0]
    cache.free(a)
    cache.free(b)
    assert cache.num_used == 0 and sum(cache.bytes_per_layer()) == 0


def test_finished_and_cancelled_exit_rows_free_every_block(model: models.SortedModel) -> None:
    engine = Engine(model, EngineConfig(kv_cache_memory=1 << 22))

    async def main() -> tuple[list[TokenEvent], list[TokenEvent]]:
        done = [e async for e in engine.submit(greedy("done", [7, 8, 9], 1, 6))]
        cut = []
        async for e in engine.submit(greedy("cut", list(range(3, 40)), 2, 200)):
            cut.append(e)
            if len(cut) == 3:
                engine.abort("cut")  # what a client's disconnect does
        return done, cut

    with engine.running():
        done, cut = asyncio.run(main())
    assert len(done) == 6 and done[-1].finish_reason == "length"
    assert cut[-1].finish_reason == "abort" and len(cut) < 200
    assert engine.cache.num_used == 0 and sum(engine.cache.bytes_per_layer()) == 0


def drive(engine: Engine, seq: Sequence, until: int) -> None:
    """Run the step loop's turns by hand until `seq` holds `until` tokens (or finished)."""
    while len(seq.tokens) < until and seq.finish_reason is None:
        engine.step()


def new_seq(prompt: list[int], depth: int, n: int, rid: str = "s") -> Sequence:
    return Sequence(greedy(rid, prompt, depth, n), list(prompt), depth)


@pytest.mark.parametrize(("old", "new"), [(4, 2), (4, 1), (2, 1)])
def test_lowering_to_an_exit_layer_re_prefills_and_continues_as_a_fresh_request(
    model: models.SortedModel, old: int, new: int
) -> None:
    engine = Engine(model, EngineConfig(kv_cache_memory=1 << 22))
    for p in prompts(3, seed=9):
        seq = new_seq(p, old, 16)
        engine.scheduler.waiting.append(seq)
        drive(engine, seq, len(p) + 5)  # 5 tokens at the old depth
        assert seq.tokens[len(p) :] == reference(model, p, old, 5)
        assert engine.scheduler.lower_depth(seq.id, new)
        # no KV in exit `new`'s own layer: every block is freed, it is prefilled again
        assert seq.num_computed == 0 and engine.cache.num_used == 0
        assert seq in engine.scheduler.waiting and engine.scheduler.num_preemptions == 0
        so_far = list(seq.tokens)
        drive(engine, seq, len(p) + 16)
        assert seq.finish_reason == "length"
        assert seq.tokens[len(so_far) :] == reference(model, so_far, new, 16 - 5)
        assert engine.cache.num_used == 0


def test_lowering_a_full_checkpoint_row_to_a_depth_without_an_exit_layer_drops_layers(
    model: models.SortedModel,
) -> None:
    engine = Engine(model, EngineConfig(kv_cache_memory=1 << 22))
    seq = new_seq(list(range(3, 30)), 4, 10)
    engine.scheduler.waiting.append(seq)
    drive(engine, seq, 27 + 3)
    computed = seq.num_computed
    assert engine.scheduler.lower_depth(seq.id, 3)  # depth 3 is no exit: base layers only
    assert seq.num_computed == computed and sorted(engine.cache.tables(seq)) == [0, 1, 2]
    drive(engine, seq, 27 + 10)
    assert seq.finish_reason == "length" and engine.cache.num_used == 0


# -- self-speculative decoding with exit layers ----------------------------------------------
def spec_engine(model: models.SortedModel, exit_: int, k: int, kv_cache_dtype: str = "auto",
                **kw: Any) -> Engine:  # fmt: skip
    cfg = SpecConfig(mode="auto", exit=exit_, k=k, **({"max_batch": 64} | kw))
    return Engine(model, EngineConfig(kv_cache_memory=1 << 23, speculative=cfg,
                                      kv_cache_dtype=kv_cache_dtype))  # fmt: skip


@pytest.mark.parametrize(("exit_", "k", "vocab"), [(1, 3, 0), (2, 4, 64)])
def test_greedy_speculation_with_an_exit_layer_is_identical_on_50_prompts(
    agreeing: models.SortedModel, exit_: int, k: int, vocab: int
) -> None:
    model = agreeing
    ps = prompts(50)
    # full-depth rows speculate; rows at the exits decode plainly beside them; lengths
    # differ so the batch shrinks past max_batch: rows decode plainly, then draft again
    depths = [4 if i % 5 else EXITS[i % 2] for i in range(50)]
    lengths = [8 + (i % 7) * 2 for i in range(50)]
    reqs = [greedy(f"r{i}", p, d, n) for i, (p, d, n) in enumerate(zip(ps, depths, lengths,
                                                                        strict=True))]  # fmt: skip
    plain = Engine(model, EngineConfig(kv_cache_memory=1 << 23))
    spec = spec_engine(model, exit_, k, draft_vocab=vocab, max_batch=8)
    ref = run(plain, reqs)
    got = run(spec, reqs)
    for r, a, b in zip(reqs, ref, got, strict=True):
        assert tokens(b) == tokens(a), r.request_id
        assert b[-1].finish_reason == "length" and len(b) == r.params.max_tokens
    for r, a in list(zip(reqs, ref, strict=True))[:10]:
        assert tokens(a) == reference(model, list(r.prompt_ids), r.depth, r.params.max_tokens)
    st = spec.speculator.stats
    assert st.cycles.get(exit_, 0) > 0 and st.drafted[exit_] > st.accepted[exit_] > 0
    assert spec.cache.num_used == 0 and plain.cache.num_used == 0


def test_the_draft_layer_reads_the_base_kv_and_keeps_its_own(model: models.SortedModel) -> None:
    engine = spec_engine(model, 2, 3, kv_cache_dtype="float32")  # KV compared to 1e-5 below
    p = prompts(1, seed=4)[0]
    seq = new_seq(p, 4, 30)
    engine.scheduler.waiting.append(seq)
    drive(engine, seq, len(p) + 1)  # prefilled at full depth: exit 2's layer saw nothing
    cache = engine.cache
    assert seq.draft_exit is None and not cache.holds(seq, model.kv_layer(2))
    base = {i: (cache.k[cache.tables(seq)[i]].clone(), cache.v[cache.tables(seq)[i]].clone())
            for i in range(L)}  # fmt: skip
    upto = seq.num_computed
    drive(engine, seq, len(seq.tokens) + 1)  # one cycle: fill, draft, verify
    assert seq.draft_exit == 2 and cache.holds(seq, model.kv_layer(2))
    assert seq.draft_computed == seq.num_computed == len(seq.tokens) - 1
    for i, (k, v) in base.items():  # the base's KV of the tokens before the cycle: unchanged
        blocks = cache.tables(seq)[i][: len(k)]
        got_k = cache.k[blocks].reshape(-1, *k.shape[2:])[:upto]
        got_v = cache.v[blocks].reshape(-1, *v.shape[2:])[:upto]
        assert torch.equal(got_k, k.reshape(-1, *k.shape[2:])[:upto]), i
        assert torch.equal(got_v, v.reshape(-1, *v.shape[2:])[:upto]), i
        assert len(cache.tables(seq)[i]) == cache.blocks_for(len(seq.tokens))
    # the draft layer's KV equals exit 2's own layer's KV of a fresh run at exit 2
    own = Engine(model, EngineConfig(kv_cache_memory=1 << 22, kv_cache_dtype="float32"))
    ref = new_seq(seq.tokens[: seq.draft_computed], 2, 2, rid="ref")
    own.scheduler.waiting.append(ref)
    own.step()  # its prefill writes exit 2's layer for those tokens
    n = seq.draft_computed
    mine = cache.k[cache.tables(seq)[model.kv_layer(2)]].reshape(-1, *cache.k.shape[2:])[:n]
    theirs = own.cache.k[own.cache.tables(ref)[model.kv_layer(2)]]
    assert torch.allclose(mine, theirs.reshape(-1, *cache.k.shape[2:])[:n], atol=1e-5)
    drive(engine, seq, len(p) + 30)
    assert seq.tokens[len(p) :] == reference(model, p, 4, 30)
    assert cache.num_used == 0


def test_lowering_a_speculating_row_to_its_draft_exit_keeps_the_draft_kv(
    model: models.SortedModel,
) -> None:
    engine = spec_engine(model, 2, 3)
    p = prompts(1, seed=6)[0]
    seq = new_seq(p, 4, 24)
    engine.scheduler.waiting.append(seq)
    drive(engine, seq, len(p) + 6)
    assert seq.draft_exit == 2 and seq.draft_computed == seq.num_computed
    computed = seq.num_computed
    assert engine.scheduler.lower_depth(seq.id, 2)
    # exit 2's layer already holds KV for every computed token: no re-prefill
    assert seq.num_computed == computed and seq in engine.scheduler.running
    assert sorted(engine.cache.tables(seq)) == [0, 1, model.kv_layer(2)]
    assert seq.draft_exit is None
    so_far = list(seq.tokens)
    drive(engine, seq, len(p) + 24)
    assert seq.tokens[len(so_far) :] == reference(model, so_far, 2, len(p) + 24 - len(so_far))
    assert engine.cache.num_used == 0


def test_sampled_speculation_with_an_exit_layer_is_seeded_and_frees(
    model: models.SortedModel,
) -> None:
    engine = spec_engine(model, 1, 3, draft_vocab=32)
    params = SamplingParams(max_tokens=16, temperature=0.8, top_p=0.95, seed=3, ignore_eos=True)
    reqs = [GenerationRequest(f"s{i}", (5, 6, 7), params, 4) for i in range(2)]
    a, b = run(engine, reqs)
    assert tokens(a) == tokens(b) and len(a) == 16  # same seed, same tokens
    assert engine.speculator.stats.cycles[1] > 0 and engine.cache.num_used == 0


def test_the_cost_model_counts_the_exit_layer(model: models.SortedModel) -> None:
    from server.engine.speculative import expected_tokens

    engine = spec_engine(model, 2, 3)
    spec = engine.speculator
    spec._ewma[2] = 1.0  # every draft accepted
    layer, head = model.layer_bytes(), spec.head_bytes(4, False)
    full = model.weight_bytes(4)
    draft = model.weight_bytes(2)  # base [0, 2) + exit 2's own layer + head
    assert draft == 3 * layer + head + model.norm.numel()
    verify = full - 2 * layer  # base [2, 4) + head
    want = expected_tokens(1.0, 3) / ((3 * draft + verify) / full)
    assert spec.speedup(2, 4, 3) == pytest.approx(want)


def test_rows_at_an_exit_with_its_own_layer_decode_through_the_stack_then_the_head(
    model: models.SortedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    # decode_logits (layers and head in one kernel call) declines a batch with a row at an
    # exit that has its own layer; the runner then runs that layer between them
    model.pack()
    got: list[bool] = []
    real = model.decode_logits

    def spy(*a: Any) -> torch.Tensor | None:
        out = real(*a)
        got.append(out is not None)
        return out

    monkeypatch.setattr(model, "decode_logits", spy)
    p = prompts(1, seed=8)[0]
    for depth, fused in ((L, kernels.available()), (2, False)):
        got.clear()
        engine = Engine(model, EngineConfig(kv_cache_memory=1 << 22))
        seq = new_seq(p, depth, 6)
        engine.scheduler.waiting.append(seq)
        drive(engine, seq, len(p) + 6)
        assert seq.tokens[len(p) :] == reference(model, p, depth, 6)
        assert got == [fused] * 5, depth  # the first token came from the prefill
