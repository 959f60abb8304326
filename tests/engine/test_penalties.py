"""Logit biases and penalties (sampling.process_logits), batched, against a per-row,
per-token reference written from the OpenAI and vLLM definitions."""

from __future__ import annotations

import asyncio

import torch

from server.engine.sampling import process_logits, sample_rows
from server.engine.types import SamplingParams, TokenEvent
from tests.engine.test_core import (  # noqa: F401  (tiny is a fixture)
    collect,
    make_engine,
    prompts,
    reference,
    request,
    tiny,
)

V = 50


def naive(logits: torch.Tensor, p: SamplingParams, prompt: list[int], out: list[int]):
    x = logits.float().clone()
    for t in range(V):
        if p.repetition_penalty != 1.0 and (t in prompt or t in out):
            x[t] = x[t] / p.repetition_penalty if x[t] > 0 else x[t] * p.repetition_penalty
        c = out.count(t)
        x[t] -= p.frequency_penalty * c + p.presence_penalty * (1.0 if c else 0.0)
    for t, b in p.logit_bias:
        x[t] += b
    return x


def test_batched_processing_matches_the_reference_row_by_row() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, V, generator=g) * 3
    params = [
        SamplingParams(),  # untouched
        SamplingParams(frequency_penalty=0.7, presence_penalty=-0.4),
        SamplingParams(repetition_penalty=1.3, logit_bias=((3, 5.0), (7, -100.0))),
        SamplingParams(repetition_penalty=0.8, frequency_penalty=-2.0, presence_penalty=2.0),
        SamplingParams(logit_bias=((0, 100.0), (49, -1.5))),
    ]
    prompts = [[1, 2], [4, 4, 9], [3, 8, 8], [], [10]]
    outputs = [[5], [4, 4, 4, 12], [], [1, 1, 2, 30, 30, 30], []]
    got = process_logits(logits, params, prompts, outputs)
    assert got.shape == (5, V)
    for j, p in enumerate(params):
        want = naive(logits[j], p, prompts[j], outputs[j])
        torch.testing.assert_close(got[j], want, rtol=0, atol=1e-5)
    assert torch.equal(got[0], logits[0])


def test_bias_and_penalties_change_greedy_choices() -> None:
    logits = torch.zeros(3, V)
    logits[:, 5] = 1.0  # every row's argmax is 5
    params = [
        SamplingParams(temperature=0, logit_bias=((9, 2.0),)),
        SamplingParams(temperature=0, presence_penalty=1.5),
        SamplingParams(temperature=0),
    ]
    tokens = sample_rows(logits, params, [None] * 3, [[], [], []], [[], [5], [5]])
    assert tokens == [9, 0, 5]  # biased to 9; 5 penalised below 0 (ties -> lowest id)


def test_the_engine_applies_them_in_a_mixed_batch(tiny) -> None:  # noqa: F811
    """Through the engine: a bias forces a token, a repetition penalty of 1e9 never repeats
    one, and an untouched greedy row beside them is unchanged (a mixed batch)."""
    path, hf = tiny
    engine = make_engine(path, kv_cache_memory=1 << 22)
    ps = prompts(3, seed=3)

    async def main() -> list[list[TokenEvent]]:
        jobs = [
            collect(engine, request("bias", ps[0], 4, 6, logit_bias=((77, 100.0),))),
            collect(engine, request("rep", ps[1], 4, 12, repetition_penalty=1e9)),
            collect(engine, request("plain", ps[2], 4, 6)),
        ]
        return await asyncio.gather(*jobs)

    bias, rep, plain = ([e.token_id for e in evs] for evs in asyncio.run(main()))
    assert bias == [77] * 6
    seen = set(ps[1])
    for tok in rep:  # every logit a repeat would have was divided (or multiplied) by 1e9
        assert tok not in seen
        seen.add(tok)
    assert plain == reference(hf, ps[2], 4, 6)
