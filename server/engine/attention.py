"""Paged attention: one forward's view of the KV cache. Each row writes this step's keys
and values into its own blocks (server/engine/kv_cache.py) and attends over its cached
tokens, at the cache layers the row runs (decoder layers [0, d), and d's own exit layer
for balcony checkpoints); padding tokens of a batched prefill, and layers whose KV a
forward only reads, write to the cache's trash block."""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from models import kernels
from server.engine.kv_cache import KVCacheManager


class PagedAttention:
    """The runner's `KVStore` for one forward over rows `seqs` (deepest first), each writing
    `num_new` tokens at positions [start, start + num_new) — or only its first `lengths[r]`
    of them, the rest being padding (a batched prefill: starts all 0). Cache layers below
    `read_only_below` only read: their KV for these positions is cached already (the
    speculator recomputing a draft exit layer's KV from the base's)."""

    def __init__(
        self,
        cache: KVCacheManager,
        seqs: Sequence[Hashable],
        depths: Sequence[int],
        starts: Sequence[int],
        num_new: int,
        lengths: Sequence[int] | None = None,
        read_only_below: int = 0,
    ) -> None:
        bs = cache.cfg.block_size
        device = cache.k.device
        self.cache = cache
        self.num_new = num_new
        self.fresh = num_new > 1 and all(s == 0 for s in starts)  # plain prefill: no gather
        assert lengths is None or self.fresh, "padded rows only in a prefill from position 0"
        ends = [s + n for s, n in zip(starts, lengths or [num_new] * len(starts), strict=True)]
        n_blocks = max(cache.blocks_for(e) for e in ends)
        runs = [cache.layers(d) for d in depths]
        n_layers = max(max(r) for r in runs) + 1
        # (L', B, MB) block ids per cache layer and row; rows that do not run a layer are
        # padded (the runner never attends for them there). Built in numpy: a decode step
        # builds one, and torch's small ops cost ~10x numpy's here
        table = np.zeros((n_layers, len(seqs), n_blocks), dtype=np.int64)
        for r, (seq, layers) in enumerate(zip(seqs, runs, strict=True)):
            tables = cache.tables(seq)
            table[list(layers), r] = [tables[i][:n_blocks] + [0] * (n_blocks - len(tables[i]))
                                      for i in layers]  # fmt: skip
        pos = np.asarray(starts, dtype=np.int64)[:, None] + np.arange(num_new)  # (B, T)
        # (padding may run past every row's blocks: clamped here, sent to the trash below)
        blocks = np.minimum(pos // bs, n_blocks - 1)
        write = np.take_along_axis(table, np.broadcast_to(blocks, (n_layers, *blocks.shape)), 2)
        if lengths is not None:  # padding tokens write to the trash block
            pad = np.arange(num_new)[None] >= np.asarray(lengths)[:, None]  # (B, T)
            write[:, pad] = cache.trash
        if read_only_below:
            write[:read_only_below] = cache.trash
        self.table = torch.from_numpy(table).to(device)
        self.write_blocks = torch.from_numpy(write).to(device)  # (L', B, T)
        self.write_offsets = torch.from_numpy(pos % bs).to(device)  # (B, T)
        # tokens each row attends over after this step
        self.lengths = torch.from_numpy(pos[:, -1] + 1).to(device)
        self._pos, self._span = torch.from_numpy(pos).to(device), n_blocks * bs
        self._visible: Tensor | None = None

    @property
    def visible(self) -> Tensor:
        """(B, T, S) whether key s is visible to the new token at position p (s <= p): the
        mask of the torch path over the gathered cache (made on first use: the fused
        decode kernel does not need it)."""
        if self._visible is None:
            span = torch.arange(self._span, device=self._pos.device)  # (S,)
            self._visible = span[None, None, :] <= self._pos[:, :, None]
        return self._visible

    def paged(self, layer: int) -> kernels.PagedKV | None:
        """This forward's cache at `layer` for soft-serve's fused decode layer
        (models.kernels): rows that each add one token to an fp32 or fp16 cache; None
        otherwise."""
        if self.num_new != 1 or self.fresh or not kernels.available():
            return None
        if self.cache.k.dtype not in kernels.KV_DTYPES or not self.cache.k.is_cpu:
            return None
        return kernels.PagedKV(self.cache.k, self.cache.v, self.table[layer],
                               self.write_blocks[layer, :, 0], self.write_offsets[:, 0],
                               self.lengths, self.cache.k.shape[-1] ** -0.5,
                               (self.table.stride(0), self.write_blocks.stride(0)))  # fmt: skip

    def rows(self, start: int, end: int) -> PagedRows:
        """This forward's view for rows [start, end) (an exit layer runs on those)."""
        return PagedRows(self, start, end)

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return self.attend_rows(layer, q, k, v, 0)

    def attend_rows(self, layer: int, q: Tensor, k: Tensor, v: Tensor, first: int) -> Tensor:
        """`attend` for rows [first, first + n) of the forward (n = q's rows)."""
        n, t, hq, d = q.shape
        hkv = k.shape[2]
        rows = slice(first, first + n)
        blocks = self.write_blocks[layer, rows]  # (n, T)
        offsets = self.write_offsets[rows]
        if t == 1 and not self.fresh and kernels.attends(q, self.cache.k):  # decode: one call
            return kernels.attend_decode(q, k, v, self.cache.k, self.cache.v,
                                         self.table[layer, rows], blocks, offsets,
                                         self.lengths[rows], d**-0.5)  # fmt: skip
        self.cache.k[blocks, offsets] = k.to(self.cache.k.dtype)  # a no-op unless the cache
        self.cache.v[blocks, offsets] = v.to(self.cache.v.dtype)  # is narrower (fp16)
        scale = d**-0.5
        if self.fresh:  # new sequences: attend within this step's tokens only
            rep = hq // hkv
            kk = k.repeat_interleave(rep, dim=2) if rep > 1 else k
            vv = v.repeat_interleave(rep, dim=2) if rep > 1 else v
            out = F.scaled_dot_product_attention(
                q.transpose(1, 2), kk.transpose(1, 2), vv.transpose(1, 2), is_causal=True
            )
            return out.transpose(1, 2)
        table = self.table[layer, rows]  # (n, MB)
        flat = table.reshape(-1)
        keys = self.cache.k.index_select(0, flat).view(n, -1, hkv, d).to(q.dtype)  # (n, S, Hkv, D)
        vals = self.cache.v.index_select(0, flat).view(n, -1, hkv, d).to(q.dtype)
        # grouped-query attention without repeating keys: a kv head's queries (rep heads x
        # T tokens) are rows of one fused attention call: (n, Hkv, rep*T, D)
        rep = hq // hkv
        qg = q.view(n, t, hkv, rep, d).permute(0, 2, 3, 1, 4).reshape(n, hkv, rep * t, d)
        visible = self.visible[rows]
        mask = visible[:, None, None].expand(n, 1, rep, t, -1).reshape(n, 1, rep * t, -1)
        out = F.scaled_dot_product_attention(
            qg, keys.transpose(1, 2), vals.transpose(1, 2), attn_mask=mask, scale=scale
        )  # (n, Hkv, rep*T, D)
        return out.view(n, hkv, rep, t, d).permute(0, 3, 1, 2, 4).reshape(n, t, hq, d)


class PagedRows:
    """Rows [start, end) of a PagedAttention: the rows of one exit, which run its layer."""

    def __init__(self, parent: PagedAttention, start: int, end: int) -> None:
        self.parent, self.start, self.end = parent, start, end

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        assert q.shape[0] <= self.end - self.start, "more rows than the view holds"
        return self.parent.attend_rows(layer, q, k, v, self.start)
