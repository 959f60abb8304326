"""Token selection per sequence: greedy, temperature, top-k, top-p, seeded, logprobs.

Each sequence samples with its own `torch.Generator`, so a seeded request draws the same
tokens whatever else shares its batch.
"""

from __future__ import annotations

import torch
from torch import Tensor

from server.engine.types import SamplingParams, TokenLogprob


def make_generator(params: SamplingParams, device: torch.device) -> torch.Generator | None:
    if params.greedy:
        return None
    g = torch.Generator(device=device)
    if params.seed is not None:
        g.manual_seed(params.seed)
    else:
        g.seed()
    return g


def distribution(logits: Tensor, params: SamplingParams) -> Tensor:
    """The sampling distribution (V,) of one row of logits after temperature, top-k, top-p."""
    x = logits.float() / params.temperature
    if 0 < params.top_k < x.shape[-1]:
        kth = torch.topk(x, params.top_k).values[-1]
        x = x.masked_fill(x < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_x, order = torch.sort(x, descending=True)
        probs = torch.softmax(sorted_x, dim=-1)
        drop = probs.cumsum(-1) - probs >= params.top_p  # keep the first token past p
        x = x.scatter(0, order, sorted_x.masked_fill(drop, float("-inf")))
    return torch.softmax(x, dim=-1)


def draw(probs: Tensor, generator: torch.Generator | None) -> int:
    """One token from the distribution `probs` (V,) by inverting its CDF with one uniform
    draw: exact, and ~30x cheaper than `torch.multinomial` over a 50k vocabulary (which
    draws an exponential per token)."""
    cdf = probs.float().cumsum(-1)
    u = torch.rand((), generator=generator, device=probs.device) * cdf[-1]
    # the first token whose cumulative mass exceeds u: never a zero-probability token
    i = int(torch.searchsorted(cdf, u, right=True))
    if i >= probs.shape[-1]:  # u rounded up to the total: the last token with mass
        i = int(torch.nonzero(probs).max())
    return i


def sample(logits: Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """Pick the next token from one row of logits (V,)."""
    if params.greedy:
        return int(logits.argmax())
    return draw(distribution(logits, params), generator)


def sample_rows(
    logits: Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]
) -> list[int]:
    """Next token for each row of (B, V) logits; greedy rows share one argmax."""
    greedy = logits.argmax(-1).tolist()
    return [
        greedy[j] if p.greedy else sample(logits[j], p, g)
        for j, (p, g) in enumerate(zip(params, generators, strict=True))
    ]


def token_logprob(logprobs_row: Tensor, token: int, top: int) -> TokenLogprob:
    """The model's log-probability of `token` and its `top` alternatives. logprobs_row: (V,)."""
    alts: tuple[tuple[int, float], ...] = ()
    if top > 0:
        values, ids = torch.topk(logprobs_row, top)
        alts = tuple(zip(ids.tolist(), values.tolist(), strict=True))
    return TokenLogprob(token, float(logprobs_row[token]), alts)


def prompt_logprobs(logits: Tensor, prompt: list[int], top: int) -> tuple[TokenLogprob | None, ...]:
    """Log-probabilities of each prompt token given its prefix; the first is None.
    logits: (T, V) from the prefill, row t predicting token t + 1."""
    lp = torch.log_softmax(logits[:-1].float(), dim=-1)
    out: list[TokenLogprob | None] = [None]
    out.extend(token_logprob(lp[t], prompt[t + 1], top) for t in range(len(prompt) - 1))
    return tuple(out)
