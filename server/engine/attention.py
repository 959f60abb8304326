"""Paged attention: one forward's view of the KV cache. Each row writes this step's keys
and values into its own blocks (server/engine/kv_cache.py) and attends over its cached
tokens, at the layers the row runs; padding tokens of a batched prefill write to the
cache's trash block."""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from server.engine.kv_cache import KVCacheManager


class PagedAttention:
    """The runner's `KVStore` for one forward over rows `seqs` (deepest first), each writing
    `num_new` tokens at positions [start, start + num_new) — or only its first `lengths[r]`
    of them, the rest being padding (a batched prefill: starts all 0)."""

    def __init__(
        self,
        cache: KVCacheManager,
        seqs: Sequence[Hashable],
        depths: Sequence[int],
        starts: Sequence[int],
        num_new: int,
        lengths: Sequence[int] | None = None,
    ) -> None:
        bs = cache.cfg.block_size
        device = cache.k.device
        self.cache = cache
        self.num_new = num_new
        self.fresh = num_new > 1 and all(s == 0 for s in starts)  # plain prefill: no gather
        assert lengths is None or self.fresh, "padded rows only in a prefill from position 0"
        ends = [s + n for s, n in zip(starts, lengths or [num_new] * len(starts), strict=True)]
        n_blocks = max(cache.blocks_for(e) for e in ends)
        max_depth = depths[0]
        # (L', B, MB) block ids per layer and row; rows that stop before a layer are padded
        rows: list[list[list[int]]] = []
        for i in range(max_depth):
            layer_rows = []
            for seq, d in zip(seqs, depths, strict=True):
                t = cache.tables(seq)[i] if i < d else []
                layer_rows.append(t[:n_blocks] + [0] * (n_blocks - len(t[:n_blocks])))
            rows.append(layer_rows)
        self.table = torch.tensor(rows, dtype=torch.long, device=device)
        pos = torch.tensor(starts, device=device)[:, None] + torch.arange(num_new, device=device)
        # (padding may run past every row's blocks: clamped here, sent to the trash below)
        blocks = (pos // bs).clamp_max(n_blocks - 1)
        self.write_blocks = self.table.gather(2, blocks[None].expand(max_depth, -1, -1))
        if lengths is not None:  # padding tokens write to the trash block
            real = torch.tensor(lengths, device=device)[:, None]
            pad = torch.arange(num_new, device=device)[None] >= real  # (B, T)
            self.write_blocks = self.write_blocks.masked_fill(pad[None], cache.trash)
        self.write_offsets = pos % bs  # (B, T)
        if not self.fresh:
            span = torch.arange(n_blocks * bs, device=device)  # (S,)
            # key s is visible to the new token at position p when s <= p
            self.visible = span[None, None, :] <= pos[:, :, None]  # (B, T, S)

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        n, t, hq, d = q.shape
        hkv = k.shape[2]
        blocks = self.write_blocks[layer, :n]  # (n, T)
        offsets = self.write_offsets[:n]
        self.cache.k[blocks, offsets] = k
        self.cache.v[blocks, offsets] = v
        scale = d**-0.5
        if self.fresh:  # new sequences: attend within this step's tokens only
            rep = hq // hkv
            kk = k.repeat_interleave(rep, dim=2) if rep > 1 else k
            vv = v.repeat_interleave(rep, dim=2) if rep > 1 else v
            out = F.scaled_dot_product_attention(
                q.transpose(1, 2), kk.transpose(1, 2), vv.transpose(1, 2), is_causal=True
            )
            return out.transpose(1, 2)
        table = self.table[layer, :n]  # (n, MB)
        flat = table.reshape(-1)
        keys = self.cache.k.index_select(0, flat).view(n, -1, hkv, d)  # (n, S, Hkv, D)
        vals = self.cache.v.index_select(0, flat).view(n, -1, hkv, d)
        # grouped-query attention without repeating keys: a kv head's queries (rep heads x
        # T tokens) are rows of one fused attention call: (n, Hkv, rep*T, D)
        rep = hq // hkv
        qg = q.view(n, t, hkv, rep, d).permute(0, 2, 3, 1, 4).reshape(n, hkv, rep * t, d)
        mask = self.visible[:n, None, None].expand(n, 1, rep, t, -1).reshape(n, 1, rep * t, -1)
        out = F.scaled_dot_product_attention(
            qg, keys.transpose(1, 2), vals.transpose(1, 2), attn_mask=mask, scale=scale
        )  # (n, Hkv, rep*T, D)
        return out.view(n, hkv, rep, t, d).permute(0, 3, 1, 2, 4).reshape(n, t, hq, d)
