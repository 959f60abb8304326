"""Grammar masks in the engine: applied after penalties and biases and before sampling,
logprobs the model's own, constrained and free rows at different depths in one step, the
matcher advanced on every token, "stop" when the grammar completes."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import jsonschema
import pytest
import torch

import models
from server.engine.core import Engine, EngineConfig
from server.engine.sampling import TokenMasks, bitmask_words, sample_rows, unpack_bitmask
from server.engine.speculative import SpecConfig, Speculator
from server.engine.types import GenerationRequest, SamplingParams, TokenEvent
from server.serving.protocol import StructuredSpec
from server.serving.structured import Grammar, Grammars
from tests.fakes import make_served_checkpoint

V = 384
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "city": {"enum": ["Paris", "Rome"]},
    },
    "required": ["name", "age", "city"],
}


class AllowOnly:
    """A TokenConstraint that allows a fixed set of tokens and ends after `length` ones."""

    def __init__(self, allowed: set[int], length: int = 1000) -> None:
        self.allowed, self.length, self.seen = allowed, length, []  # type: ignore[var-annotated]

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        bitmask[row] = 0
        for t in self.allowed:
            word = int(bitmask[row, t // 32]) | (1 << (t % 32))
            bitmask[row, t // 32] = word - (1 << 32) if word >= 1 << 31 else word

    def accept(self, token_id: int) -> bool:
        self.seen.append(token_id)
        return token_id in self.allowed

    def is_terminated(self) -> bool:
        return len(self.seen) >= self.length


def masks_for(rows: list[int], allowed: list[set[int]], vocab: int = V) -> TokenMasks:
    bitmask = torch.zeros(len(rows), bitmask_words(vocab), dtype=torch.int32)
    for r, a in enumerate(allowed):
        AllowOnly(a).fill_bitmask(bitmask, r)
    return TokenMasks(rows, bitmask)


def test_unpack_bitmask_reads_bit_t_of_word_t_div_32() -> None:
    masks = masks_for([0], [{0, 31, 32, 63, 383}])
    allowed = unpack_bitmask(masks.bitmask, V)
    assert allowed.shape == (1, V)
    assert torch.nonzero(allowed[0]).flatten().tolist() == [0, 31, 32, 63, 383]
    assert masks.allows(0, 31) and not masks.allows(0, 30)


def test_masked_rows_choose_only_allowed_tokens_others_unchanged() -> None:
    torch.manual_seed(0)
    logits = torch.randn(4, V)
    greedy = SamplingParams(temperature=0.0)
    hot = SamplingParams(temperature=1.5, top_p=0.9, top_k=50)
    params = [greedy, greedy, hot, hot]
    gens = [None, None, torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)]
    masks = masks_for([0, 2], [{5, 7}, {11, 13, 17}])
    free = sample_rows(logits, params, gens)
    gens = [None, None, torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)]
    toks = sample_rows(logits, params, gens, masks=masks)
    assert toks[0] == (5 if logits[0, 5] > logits[0, 7] else 7)
    assert toks[2] in {11, 13, 17}
    assert toks[1] == free[1] == int(logits[1].argmax())  # a free row is untouched
    assert toks[3] == free[3]  # same seed, same draw: the mask is per row


def test_mask_applies_after_logit_bias_and_penalties() -> None:
    logits = torch.zeros(2, V)
    logits[:, 9] = 5.0
    # row 0: a +100 bias on a disallowed token cannot pick it; row 1: the bias picks
    # among the allowed ones, and a penalty on the repeated token moves the choice
    biased = SamplingParams(temperature=0.0, logit_bias=((9, 100.0), (4, 3.0)))
    penalised = SamplingParams(temperature=0.0, frequency_penalty=2.0, presence_penalty=2.0)
    masks = masks_for([0, 1], [{3, 4}, {20, 21}])
    logits[1, 20], logits[1, 21] = 3.0, 2.0
    toks = sample_rows(
        logits, [biased, penalised], [None, None], [[1], [1]], [[], [20, 20]], masks=masks
    )
    assert toks == [4, 21]


def test_a_row_whose_mask_allows_nothing_is_left_for_the_engine_to_end() -> None:
    logits = torch.randn(1, V)
    toks = sample_rows(logits, [SamplingParams(temperature=0.0)], [None],
                       masks=masks_for([0], [set()]))  # fmt: skip
    assert toks == [int(logits[0].argmax())]


# -- the engine, on a tiny random checkpoint ------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return models.load(make_served_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny"))


@pytest.fixture(scope="module")
def grammars(tiny: Any) -> Grammars:
    eos = set(tiny.cfg.eos_token_ids) | {tiny.tokenizer.eos_token_id}
    return Grammars(tiny.tokenizer, tiny.cfg.vocab_size, eos)


def compiled(grammars: Grammars, kind: str, source: Any) -> Grammar:
    text = source if isinstance(source, str) else json.dumps(source)
    return grammars.compile_now(StructuredSpec(kind, text, kind))  # type: ignore[arg-type]


def run_all(
    model: Any, requests: list[GenerationRequest], **config: Any
) -> dict[str, list[TokenEvent]]:
    """Every request submitted before the loop starts (so they share its first steps)."""
    engine = Engine(model, EngineConfig(kv_cache_memory=4 << 20, **config))

    async def main() -> dict[str, list[TokenEvent]]:
        streams = {r.request_id: engine.submit(r) for r in requests}
        engine.start()

        async def drain(it: Any) -> list[TokenEvent]:
            return [e async for e in it]

        got = await asyncio.gather(*(drain(s) for s in streams.values()))
        return dict(zip(streams, got, strict=True))

    try:
        return asyncio.run(main())
    finally:
        engine.stop()


def text_of(model: Any, events: list[TokenEvent]) -> str:
    ids = [e.token_id for e in events if e.token_id is not None]
    return str(model.tokenizer.decode(ids, skip_special_tokens=True))


def request(i: int, model: Any, depth: int, constraint: Any = None, **params: Any) -> Any:
    prompt = tuple(model.tokenizer("Name, age and city:")["input_ids"])
    params.setdefault("max_tokens", 64)
    return GenerationRequest(f"r{i}", prompt, SamplingParams(**params), depth,
                             constraint=constraint)  # fmt: skip


def test_mixed_constrained_free_and_depths_in_one_batch(tiny: Any, grammars: Grammars) -> None:
    g = compiled(grammars, "json", SCHEMA)
    reqs = [
        request(
            i,
            tiny,
            depth=(2, 4)[i % 2],
            constraint=g.matcher() if i < 4 else None,
            temperature=(0.0, 1.0)[i // 2 % 2],
            seed=i,
            ignore_eos=i >= 4,
        )  # fmt: skip
        for i in range(6)
    ]
    out = run_all(tiny, reqs)
    for i, r in enumerate(reqs):
        events = out[r.request_id]
        assert {e.depth for e in events} == {r.depth}
        if i < 4:  # constrained: a whole, valid document, ended by the grammar
            assert events[-1].finish_reason == "stop"
            jsonschema.validate(json.loads(text_of(tiny, events)), SCHEMA)
        else:  # free rows of a random model: max_tokens of noise
            assert events[-1].finish_reason == "length"
            assert len(events) == 64


def test_every_sampled_output_is_valid_even_for_a_random_model(
    tiny: Any, grammars: Grammars
) -> None:
    g = compiled(grammars, "json", SCHEMA)
    reqs = [request(i, tiny, depth=2, constraint=g.matcher(), temperature=1.2, seed=100 + i,
                    top_p=0.95) for i in range(8)]  # fmt: skip
    out = run_all(tiny, reqs)
    for r in reqs:
        jsonschema.validate(json.loads(text_of(tiny, out[r.request_id])), SCHEMA)


def test_choice_stops_when_the_grammar_completes_even_with_ignore_eos(
    tiny: Any, grammars: Grammars
) -> None:
    g = compiled(grammars, "choice", json.dumps(["yes", "no", "maybe"]))
    reqs = [request(i, tiny, 4, g.matcher(), temperature=1.0, seed=i, ignore_eos=True)
            for i in range(4)]  # fmt: skip
    out = run_all(tiny, reqs)
    for r in reqs:
        events = out[r.request_id]
        assert events[-1].finish_reason == "stop"
        assert text_of(tiny, events) in {"yes", "no", "maybe"}
        assert len(events) < 64


def test_the_matcher_sees_every_token_and_logprobs_are_unmasked(tiny: Any) -> None:
    allow = AllowOnly({40, 41, 42}, length=5)
    out = run_all(tiny, [request(0, tiny, 4, allow, temperature=0.0, logprobs=3)])
    events = out["r0"]
    assert [e.token_id for e in events] == allow.seen
    assert len(events) == 5 and events[-1].finish_reason == "stop"
    assert all(e.token_id in {40, 41, 42} for e in events)
    # the model's own distribution: its top alternatives are not limited to the mask
    tops = {t for e in events if e.logprob is not None for t, _ in e.logprob.top}
    assert tops - {40, 41, 42}


def test_a_grammar_that_allows_nothing_ends_the_sequence_with_an_error(tiny: Any) -> None:
    out = run_all(tiny, [request(0, tiny, 4, AllowOnly(set()), temperature=0.0)])
    assert [(e.token_id, e.finish_reason) for e in out["r0"]] == [(None, "error")]


def test_constrained_rows_do_not_speculate(tiny: Any, grammars: Grammars) -> None:
    g = compiled(grammars, "json", SCHEMA)
    spec = Speculator(tiny, SpecConfig(mode="auto", exit=2, k=2))
    engine = Engine(tiny, EngineConfig(kv_cache_memory=4 << 20))
    from server.engine.scheduler import Sequence

    seqs = []
    for i, c in enumerate((g.matcher(), None)):
        r = request(i, tiny, 4, c, temperature=0.0)
        s = Sequence(request=r, tokens=list(r.prompt_ids), depth=4)
        assert engine.cache.allocate(s, 4, len(s.tokens))
        seqs.append(s)
    plain, groups = spec.plan(seqs, engine.cache, 256)
    assert plain == [seqs[0]]
    assert [s for g_ in groups.values() for s in g_] == [seqs[1]]


def test_greedy_constrained_output_matches_speculation_off(tiny: Any, grammars: Grammars) -> None:
    g = compiled(grammars, "json", SCHEMA)
    off = run_all(tiny, [request(0, tiny, 4, g.matcher(), temperature=0.0)])
    on = run_all(tiny, [request(0, tiny, 4, g.matcher(), temperature=0.0)],
                 speculative=SpecConfig(mode="auto", exit=2, k=2))  # fmt: skip
    assert text_of(tiny, on["r0"]) == text_of(tiny, off["r0"])


def test_state_is_per_sequence(tiny: Any, grammars: Grammars) -> None:
    g = compiled(grammars, "regex", r"[a-c]{3}")
    a, b = g.matcher(), g.matcher()
    ids = tiny.tokenizer("abc", add_special_tokens=False)["input_ids"]
    assert all(a.accept(t) for t in ids)
    assert not b.is_terminated() and b.accept(ids[0])
