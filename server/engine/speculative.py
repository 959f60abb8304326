"""Lossless self-speculative decoding: a checkpoint drafts with its own shallow exit.

One cycle for a group of sequences at depth d, drafting at exit e < d with k drafts:
  0) (balcony) the draft exit's own layer needs KV for every token so far: a row holds
     that layer's blocks beside its own (KVCacheManager.add_layer), and the tokens the
     layer has not seen (the prompt, tokens decoded plainly) are run through base layers
     [0, e), which only read their cached KV, then through the exit layer, which writes
     its own: the base's KV is never recomputed
  1) draft: k forwards of layers [0, e) (+ exit e's own layer, balcony) + the head, each
     feeding the previous draft token; the base's exit-e residual of every input is kept,
     and every layer writes its KV as usual
  2) verify: ONE forward of base layers [e, d) (+ d's own exit layer) over those k kept
     residuals (positions p..p+k-1), reusing the drafts' layer-[0, e) KV instead of
     recomputing it -> k target distributions
  3) accept the longest prefix of drafts the target agrees with (greedy: equal argmax;
     sampling: the standard rule min(1, p/q), resampling from max(0, p - q) on rejection),
     then the target's own token at the first disagreement
  4) roll back: KV written for rejected positions is simply never attended (every step
     writes its positions before attending, and positions beyond a row's length are masked)
     and blocks beyond the kept length are freed; the draft layer's KV stays valid up to
     the kept length (its inputs there were all accepted tokens)

Greedy output is token-for-token the full model's; sampled output has its distribution.

Cost model (decode is memory-bound, so a step costs the weight bytes it reads): with draft
cost c_d = bytes(e)/bytes(d) (exit e's own layer included), verify cost
c_v = (bytes(d) - e layers)/bytes(d) and a per-token acceptance rate a, a cycle emits
E = (1 - a^k) / (1 - a) tokens for k*c_d + c_v full steps; the speed-up is
E / (k*c_d + c_v). `Speculator.choose` maximises it over exits and k using acceptance rates
measured online; `Speculator.plan` splits a decode batch into the rows that speculate this
turn and the rest, `Speculator.cycle` runs steps 0)-3); the engine appends the tokens and
rolls back (step 4).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from models.llama import SortedModel
from models.weights import pack, project
from server.engine.attention import PagedAttention
from server.engine.kv_cache import KVCacheManager
from server.engine.sampling import argmax, distribution, draw, token_logprob
from server.engine.scheduler import Sequence
from server.engine.types import SamplingParams, TokenLogprob


@dataclass(frozen=True)
class SpecConfig:
    mode: str = "off"  # "auto" | "off"
    exit: int | None = None  # draft exit; None = chosen from measured acceptance
    k: int | None = None  # drafts per cycle; None = chosen
    max_k: int = 8
    prior_acceptance: float = 0.6  # before anything is measured at an exit
    min_speedup: float = 1.05  # below this predicted gain a sequence decodes plainly
    # Drafts choose among the first `draft_vocab` token ids only (BPE ids follow merge
    # order, roughly frequency): on a small model the shared head is a large share of a
    # draft step. Verification always uses the full head, so output is unchanged. 0 = all.
    draft_vocab: int = 0
    # speculation pays while decode is memory-bound; bigger batches already share each
    # weight read across their rows, so they decode plainly
    max_batch: int = 4


@dataclass
class SpecStats:
    """Counters per draft exit, for the cost model and the metrics."""

    drafted: dict[int, int] = field(default_factory=dict)
    accepted: dict[int, int] = field(default_factory=dict)
    cycles: dict[int, int] = field(default_factory=dict)
    emitted: dict[int, int] = field(default_factory=dict)

    def record(self, exit_: int, drafted: int, accepted: int, emitted: int) -> None:
        for d, v in ((self.drafted, drafted), (self.accepted, accepted), (self.emitted, emitted)):
            d[exit_] = d.get(exit_, 0) + v
        self.cycles[exit_] = self.cycles.get(exit_, 0) + 1


def expected_tokens(acceptance: float, k: int) -> float:
    """Tokens emitted per cycle when each draft is accepted with probability `acceptance`."""
    a = min(max(acceptance, 0.0), 0.999)
    return (1.0 - a**k) / (1.0 - a)


class Speculator:
    """Chooses the draft exit and k, and keeps acceptance statistics."""

    def __init__(self, model: SortedModel, cfg: SpecConfig) -> None:
        self.model = model
        self.cfg = cfg
        self.stats = SpecStats()
        self._ewma: dict[int, float] = {}  # exit -> per-draft acceptance rate
        v = model.cfg.vocab_size
        self.draft_vocab = (
            cfg.draft_vocab if 0 < cfg.draft_vocab < v and not model.exit_heads else v
        )
        # rows [0, draft_vocab) of the shared head (a packed copy on CPU, else a view)
        self.draft_head = pack(model.lm_head.data[: self.draft_vocab])

    def draft_logits(self, h: Tensor, exit_: int) -> Tensor:
        """Logits over the draft vocabulary at exit e. h: (B, 1, H) -> (B, V_draft)."""
        if self.draft_vocab == self.model.cfg.vocab_size:
            return self.model.head(h, [exit_] * h.shape[0])[:, 0]
        return project(h[:, 0], self.draft_head, norm=self.model.norm,
                       eps=self.model.cfg.rms_norm_eps)  # fmt: skip

    def head_bytes(self, depth: int, draft: bool) -> int:
        w = self.model.head_weight(depth)
        rows = self.draft_vocab if draft else w.shape[0]
        return rows * w.shape[1] * w.element_size()

    def acceptance(self, exit_: int) -> float:
        return self._ewma.get(exit_, self.cfg.prior_acceptance)

    def observe(self, exit_: int, drafted: int, accepted: int, emitted: int) -> None:
        self.stats.record(exit_, drafted, accepted, emitted)
        if drafted:
            rate = accepted / drafted
            old = self._ewma.get(exit_)
            self._ewma[exit_] = rate if old is None else 0.9 * old + 0.1 * rate

    def speedup(self, exit_: int, depth: int, k: int) -> float:
        """Predicted tokens/s relative to plain decoding, from weight bytes read."""
        m = self.model
        full = m.weight_bytes(depth)
        head, draft_head = self.head_bytes(exit_, False), self.head_bytes(exit_, True)
        draft = (m.weight_bytes(exit_) - head + draft_head) / full
        verify = (full - exit_ * m.layer_bytes()) / full  # base [e, d), d's exit layer, head
        return expected_tokens(self.acceptance(exit_), k) / (k * draft + verify)

    def choose(self, depth: int) -> tuple[int, int] | None:
        """(exit, k) with the best predicted speed-up for a sequence at `depth`, or None
        when plain decoding is predicted to be as fast."""
        if self.cfg.mode != "auto":
            return None
        exits = [e for e in self.model.exits if e < depth]
        if self.cfg.exit is not None:
            exits = [self.cfg.exit] if self.cfg.exit < depth else []
        ks = [self.cfg.k] if self.cfg.k is not None else list(range(1, self.cfg.max_k + 1))
        best, choice = 0.0, None
        for e in exits:
            for k in ks:
                s = self.speedup(e, depth, k)
                if s > best:
                    best, choice = s, (e, k)
        if choice is None or (best < self.cfg.min_speedup and self.cfg.exit is None):
            return None
        return choice

    def plan(
        self, seqs: list[Sequence], cache: KVCacheManager, max_model_len: int
    ) -> tuple[list[Sequence], dict[tuple[int, int], list[Sequence]]]:
        """Split a decode batch.

        Returns:
            the rows that decode plainly, and the rows that draft + verify this step grouped
            by (exit, k); the latter hold KV blocks for their k drafts already.
        """
        plain: list[Sequence] = []
        groups: dict[tuple[int, int], list[Sequence]] = {}
        if self.cfg.mode != "auto" or len(seqs) > self.cfg.max_batch:
            return seqs, groups
        for seq in seqs:
            choice = self.choose(seq.depth)
            left = min(seq.request.params.max_tokens - seq.num_generated,
                       max_model_len - len(seq.tokens))  # fmt: skip
            # penalties and biases change each token's choice, and a grammar's mask would
            # have to be checked against every draft: those rows decode plainly
            if (
                choice is None
                or left < 2
                or seq.request.params.processes_logits
                or seq.request.constraint is not None
            ):
                plain.append(seq)
                continue
            exit_, k = choice[0], min(choice[1], left)
            if not self._draft_layer(seq, exit_, cache) or not cache.allocate(
                seq, seq.depth, len(seq.tokens) + k - 1
            ):
                plain.append(seq)  # no room for the drafts' KV: one token at a time
                continue
            groups.setdefault((exit_, k), []).append(seq)
        return plain, groups

    def _draft_layer(self, seq: Sequence, exit_: int, cache: KVCacheManager) -> bool:
        """Make `seq` hold exit `exit_`'s own layer (balcony), dropping another draft exit's;
        False when there is no room for it."""
        layer = cache.cfg.exit_kv_layer(exit_)
        if seq.draft_exit == exit_ or layer is None:
            return True
        old = cache.cfg.exit_kv_layer(seq.draft_exit) if seq.draft_exit is not None else None
        if old is not None:
            cache.drop_layer(seq, old)
        seq.draft_exit, seq.draft_computed = None, 0
        if not cache.add_layer(seq, layer):
            return False
        seq.draft_exit = exit_
        return True

    def cycle(
        self, seqs: list[Sequence], exit_: int, k: int, cache: KVCacheManager
    ) -> list[tuple[Sequence, list[tuple[int, TokenLogprob | None]]]]:
        """One draft + verify cycle for rows deeper than `exit_` (steps 1-3 above).

        Returns:
            each row (deepest first) with the tokens to emit and their logprobs (None unless
            asked for); the caller appends them and rolls the row back (step 4).
        """
        model, dev = self.model, self.model.device
        seqs = sorted(seqs, key=lambda s: -s.depth)
        starts = [len(s.tokens) - 1 for s in seqs]
        if model.exit_layer(exit_) is not None:
            for seq in seqs:
                self._fill_draft_layer(seq, exit_, cache)
        drafts, qs, kept = self._draft(seqs, exit_, k, cache)
        # 2) verify: layers [e, d) over the kept residuals, reusing layers [0, e)'s KV
        depths = [s.depth for s in seqs]
        positions = torch.tensor(starts, device=dev)[:, None] + torch.arange(k, device=dev)
        kv = PagedAttention(cache, seqs, depths, starts, k)
        h = model.hidden(None, positions, depths, kv, start_layer=exit_, h=torch.cat(kept, 1))
        target = model.head(h, depths)  # (B, k, V)
        # 3) accept
        out = []
        for r, seq in enumerate(seqs):
            p = seq.request.params
            tokens = accept(drafts[r], qs[r], target[r], p, seq.generator)
            accepted = len(tokens) if tokens == drafts[r] else len(tokens) - 1
            self.observe(exit_, k, accepted, len(tokens))
            lps = torch.log_softmax(target[r].float(), -1) if p.logprobs is not None else None
            out.append((seq, [(tok, None if lps is None or p.logprobs is None else
                               token_logprob(lps[i], tok, p.logprobs))
                              for i, tok in enumerate(tokens)]))  # fmt: skip
        return out

    def _draft(
        self, seqs: list[Sequence], exit_: int, k: int, cache: KVCacheManager
    ) -> tuple[list[list[int]], list[list[Tensor | None]], list[Tensor]]:
        """1) k draft tokens per row at exit e; layers [0, e) write their KV for positions
        p..p+k-1. Returns the drafts, their distributions (None when greedy) and the exit-e
        residual of each input: k x (B, 1, H)."""
        model, dev, b = self.model, self.model.device, len(seqs)
        starts = [len(s.tokens) - 1 for s in seqs]
        inputs = [s.tokens[-1] for s in seqs]
        drafts: list[list[int]] = [[] for _ in seqs]
        qs: list[list[Tensor | None]] = [[] for _ in seqs]
        kept = []
        for j in range(k):
            ids = torch.tensor([[t] for t in inputs], device=dev)
            positions = torch.tensor(starts, device=dev)[:, None] + j
            kv = PagedAttention(cache, seqs, [exit_] * b, [p + j for p in starts], 1)
            h = model.hidden(ids, positions, [exit_] * b, kv, exit_layers=False)
            kept.append(h)  # the base's residual: verification continues it
            h = model.exit_hidden(h, positions, exit_, kv)
            logits = self.draft_logits(h, exit_)  # (B, V_draft)
            for r, seq in enumerate(seqs):
                p = seq.request.params
                tok, q = draft_token(logits[r], p, seq.generator, model.cfg.vocab_size)
                drafts[r].append(tok)
                qs[r].append(q)
                inputs[r] = tok
        return drafts, qs, kept

    def _fill_draft_layer(self, seq: Sequence, exit_: int, cache: KVCacheManager) -> None:
        """0) exit e's own layer gets KV for the tokens before the first draft's input that
        it has not seen: base layers [0, e) rerun over them reading (not writing) their
        cached KV, the exit layer writes its own."""
        assert seq.draft_exit == exit_, "plan gave the row its draft layer"
        start, end = seq.draft_computed, len(seq.tokens) - 1
        if start >= end:
            return
        dev = self.model.device
        ids = torch.tensor([seq.tokens[start:end]], device=dev)  # (1, T)
        positions = torch.arange(start, end, device=dev)[None]
        kv = PagedAttention(cache, [seq], [exit_], [start], end - start, read_only_below=exit_)
        self.model.hidden(ids, positions, [exit_], kv)
        seq.draft_computed = end


def draft_token(
    logits: Tensor, p: SamplingParams, g: torch.Generator | None, vocab_size: int
) -> tuple[int, Tensor | None]:
    """A draft token from exit logits over the first V_draft ids; with sampling, also its
    distribution q over the whole vocabulary (zero beyond V_draft)."""
    if p.greedy:
        return argmax(logits)[0], None
    q = torch.zeros(vocab_size, device=logits.device)
    q[: logits.shape[-1]] = distribution(logits, p)
    return draw(q, g), q


def accept(
    drafts: list[int],
    qs: list[Tensor | None],
    target_logits: Tensor,
    p: SamplingParams,
    g: torch.Generator | None,
) -> list[int]:
    """Tokens to emit: the accepted drafts, then the target's token at the first rejection.

    Args:
        drafts: k draft tokens; qs: their draft distributions (None when greedy).
        target_logits: (k, V), row i = the full model's logits for the token after input i.
    Returns:
        1..k tokens; exactly k when every draft was accepted (no bonus token).
    """
    out: list[int] = []
    for i, d in enumerate(drafts):
        if p.greedy:
            y = argmax(target_logits[i])[0]
            out.append(y)
            if y != d:
                return out
            continue
        q = qs[i]
        assert q is not None
        pt = distribution(target_logits[i], p)
        u = float(torch.rand((), generator=g))
        if u * float(q[d]) <= float(pt[d]):  # accept with probability min(1, p/q)
            out.append(d)
            continue
        residual = (pt - q).clamp_min(0)
        total = float(residual.sum())
        dist = residual / total if total > 0 else pt
        out.append(draw(dist, g))
        return out
    return out
