"""The model work of one loop turn: the admitted sequences' prompts and the running batch's
next token in as few forwards as possible.

Rows are grouped (a padded group of fresh prompts of similar length, a prompt resumed
after preemption alone, or the decode batch: attention runs once per group), the groups
packed into forwards of at most PREFILL_GROUP_TOKENS prompt tokens (the matrix products
run over every token of a forward at once, so each weight is read once per forward), rows
ordered deepest first: layer i runs on the rows whose depth is > i, each row leaves at its
own exit, and one norm + head call covers every row's last token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from models.llama import SortedModel
from server.engine.attention import PagedAttention
from server.engine.kv_cache import KVCacheManager
from server.engine.sampling import prompt_logprobs
from server.engine.scheduler import Sequence
from server.engine.types import TokenLogprob

# a batched prefill computes at most this many padded tokens per real one, and a forward
# takes at most this many prompt tokens: past a few hundred rows the weights' reads are
# already shared, and bigger activations only grow the allocator's high-water mark (soak
# test)
PAD_LIMIT = 1.25
PREFILL_GROUP_TOKENS = 256


@dataclass(frozen=True)
class Group:
    """Rows that share one forward's attention call: a prefill group or the decode batch."""

    seqs: list[Sequence]  # deepest first
    ids: Tensor  # (B, T) token ids, padded
    positions: Tensor  # (B, T)
    depths: list[int]
    kv: PagedAttention
    lengths: list[int]  # real tokens per row (the last one's logits are sampled)
    prefill: bool


@dataclass(frozen=True)
class GroupOutput:
    """What one group's rows need to pick their next tokens."""

    group: Group
    logits: Tensor  # (B, V): each row's last real token
    # per row: the prompt's logprobs when asked for and this is its first prefill
    prompt_logprobs: list[tuple[TokenLogprob | None, ...] | None]


def prefill_groups(seqs: list[Sequence]) -> list[list[Sequence]]:
    """The admitted sequences in prefill groups: fresh ones together in padded groups of
    similar length (attention runs once per group), the rest one by one."""
    fresh = sorted((s for s in seqs if s.num_computed == 0), key=lambda s: len(s.tokens))
    groups: list[list[Sequence]] = []
    group: list[Sequence] = []
    for seq in fresh:
        n = len(seq.tokens)  # the longest so far: the group's padded length if it joins
        real = sum(len(g.tokens) for g in group) + n
        padded = n * (len(group) + 1)
        if group and (padded > PAD_LIMIT * real or padded > PREFILL_GROUP_TOKENS):
            groups.append(group)
            group = []
        group.append(seq)
    if group:
        groups.append(group)
    return groups + [[s] for s in seqs if s.num_computed != 0]


def pack(prefill: list[Group], decode: Group | None) -> list[list[Group]]:
    """The groups in forwards of at most PREFILL_GROUP_TOKENS prompt tokens (padded) each,
    the decode batch in the last: the activations stay as small as a prefill group's, so
    does the allocator's high-water mark."""
    forwards: list[list[Group]] = []
    current: list[Group] = []
    tokens = 0
    for g in prefill:
        n = g.ids.numel()
        if current and tokens + n > PREFILL_GROUP_TOKENS:
            forwards.append(current)
            current, tokens = [], 0
        current.append(g)
        tokens += n
    current += [decode] if decode is not None else []
    return [*forwards, current] if current else forwards


class Runner:
    """Builds groups over the paged cache and runs forwards; it samples nothing."""

    def __init__(self, model: SortedModel, cache: KVCacheManager) -> None:
        self.model, self.cache = model, cache

    def prefill_group(self, seqs: list[Sequence]) -> Group:
        """Each sequence's uncomputed tokens, rows padded to the longest (more than one row
        only when all start at 0)."""
        dev = self.model.device
        seqs = sorted(seqs, key=lambda s: -s.depth)  # deepest first: active rows are a prefix
        starts = [s.num_computed for s in seqs]  # 0 unless a prefix stayed cached
        lengths = [len(s.tokens) - st for s, st in zip(seqs, starts, strict=True)]
        t, batched = max(lengths), len(seqs) > 1
        if batched:  # padded lengths in whole blocks: few distinct shapes, so kernel caches
            bs = self.cache.cfg.block_size  # and the allocator stay bounded
            t = -(-t // bs) * bs
        ids = torch.tensor(
            [s.tokens[st:] + [0] * (t - n) for s, st, n in zip(seqs, starts, lengths, strict=True)],
            device=dev,
        )
        positions = torch.tensor(starts, device=dev)[:, None] + torch.arange(t, device=dev)
        depths = [s.depth for s in seqs]
        kv = PagedAttention(self.cache, seqs, depths, starts, t, lengths if batched else None)
        return Group(seqs, ids, positions, depths, kv, lengths, prefill=True)

    def decode_group(self, seqs: list[Sequence]) -> Group:
        """Each sequence's last token."""
        dev = self.model.device
        seqs = sorted(seqs, key=lambda s: -s.depth)  # deepest first: active rows are a prefix
        depths = [s.depth for s in seqs]
        starts = [len(s.tokens) - 1 for s in seqs]
        ids = torch.tensor([[s.tokens[-1]] for s in seqs], device=dev)  # (B, 1)
        positions = torch.tensor(starts, device=dev)[:, None]
        kv = PagedAttention(self.cache, seqs, depths, starts, 1)
        return Group(seqs, ids, positions, depths, kv, [1] * len(seqs), prefill=False)

    def forward(self, groups: list[Group]) -> list[GroupOutput]:
        """One forward over every group and one head call over each row's last token (a
        decode batch alone: its layers and head in one kernel call, where they run)."""
        model = self.model
        if len(groups) == 1 and not groups[0].prefill:
            g = groups[0]
            logits = model.decode_logits(g.ids, g.positions, g.depths, g.kv)
            if logits is not None:
                return [GroupOutput(g, logits, [None] * len(g.seqs))]
        hs = model.hidden_groups(
            [(model.embed_ids(g.ids), g.positions, g.depths, g.kv) for g in groups]
        )
        # each row's last real token (a decode row's only one)
        last = [h[:, -1] if all(n == h.shape[1] for n in g.lengths) else
                h[torch.arange(len(g.seqs)), torch.tensor(g.lengths) - 1]
                for g, h in zip(groups, hs, strict=True)]  # fmt: skip
        depths = [d for g in groups for d in g.depths]
        rows = last[0] if len(last) == 1 else torch.cat(last)
        logits = model.head(rows[:, None], depths)[:, 0]  # (rows, V)
        out, row = [], 0
        for g, h in zip(groups, hs, strict=True):
            mine = logits[row : row + len(g.seqs)]
            row += len(g.seqs)
            out.append(GroupOutput(g, mine, self._prompt_logprobs(g, h)))
        return out

    def _prompt_logprobs(self, g: Group, h: Tensor) -> list[tuple[TokenLogprob | None, ...] | None]:
        """Per row of a prefill group: its prompt's logprobs, when asked for, on its first
        prefill only (h: the group's final hidden states, (B, T, H))."""
        out: list[tuple[TokenLogprob | None, ...] | None] = []
        for r, seq in enumerate(g.seqs):
            top = seq.request.params.prompt_logprobs
            if not g.prefill or top is None or not seq.before_first_token:
                out.append(None)
                continue
            full = self.model.head(h[r : r + 1, : g.lengths[r]], [seq.depth])[0]  # (T, V)
            out.append(prompt_logprobs(full, seq.tokens, top))
        return out
