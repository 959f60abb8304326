"""KV-cache manager: fixed-size blocks, held only in the layers a sequence runs.

One pool of blocks serves every layer: a block is `block_size` token slots of keys and
values for one layer. A sequence at depth d holds, for each layer in [0, d), a block table
with ceil(tokens / block_size) blocks — so its bytes are d/L of a full-depth sequence, and
the same memory admits more shallow sequences. Lowering a sequence's depth frees the
dropped layers' blocks at once; depth never goes up.

`allocate` answers False when there is no room (the scheduler then queues or preempts);
it never evicts anything by itself and never touches another sequence's blocks.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class KVCacheConfig:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    num_blocks: int
    block_size: int = (
        16  # tokens per block: small enough to waste little, big enough to gather fast
    )
    dtype: torch.dtype = torch.float32
    device: str | torch.device = "cpu"

    @property
    def block_bytes(self) -> int:
        """Bytes of one block (keys + values) in one layer."""
        elem = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.block_size * self.num_kv_heads * self.head_dim * elem

    @classmethod
    def for_memory(
        cls,
        memory_bytes: int,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        block_size: int = 16,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
    ) -> KVCacheConfig:
        probe = cls(num_layers, num_kv_heads, head_dim, 1, block_size, dtype, device)
        num_blocks = max(1, memory_bytes // probe.block_bytes)
        return cls(num_layers, num_kv_heads, head_dim, num_blocks, block_size, dtype, device)


class KVCacheManager:
    """Owns the block pool and every sequence's per-layer block tables."""

    def __init__(self, cfg: KVCacheConfig) -> None:
        self.cfg = cfg
        # one block more than the pool: block `num_blocks` is never handed out; padding
        # tokens of a batched prefill write there, so they touch no sequence's blocks
        shape = (cfg.num_blocks + 1, cfg.block_size, cfg.num_kv_heads, cfg.head_dim)
        self.trash = cfg.num_blocks
        self.k = torch.zeros(shape, dtype=cfg.dtype, device=cfg.device)  # (N+1, bs, Hkv, D)
        self.v = torch.zeros(shape, dtype=cfg.dtype, device=cfg.device)
        self._free: list[int] = list(range(cfg.num_blocks - 1, -1, -1))  # pop() -> low ids first
        self._tables: dict[Hashable, list[list[int]]] = {}  # seq -> per layer [block ids]
        self._layer_blocks = [0] * cfg.num_layers  # blocks held in each layer

    # -- allocation ------------------------------------------------------------------------
    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.cfg.block_size)

    def _missing(self, seq: Hashable, depth: int, num_tokens: int) -> int:
        tables = self._tables.get(seq)
        have = len(tables[0]) if tables else 0
        return depth * max(0, self.blocks_for(num_tokens) - have)

    def allocate(self, seq: Hashable, depth: int, num_tokens: int) -> bool:
        """Make room for `num_tokens` tokens of `seq` in layers [0, depth).

        Args:
            seq: the sequence's key.
            depth: layers the sequence runs; must equal its current depth if it holds blocks.
            num_tokens: total tokens (cached + about to be written) it must hold.
        Returns:
            True when the blocks are there; False (nothing changed) when the pool is short.
        """
        tables = self._tables.get(seq)
        assert tables is None or len(tables) == depth, "allocate at the sequence's own depth"
        if self._missing(seq, depth, num_tokens) > len(self._free):
            return False
        if tables is None:
            tables = self._tables[seq] = [[] for _ in range(depth)]
        extra = self.blocks_for(num_tokens) - len(tables[0])
        for layer, table in enumerate(tables):
            for _ in range(extra):
                table.append(self._free.pop())
            self._layer_blocks[layer] += max(0, extra)
        return True

    def free(self, seq: Hashable) -> None:
        """Return every block of `seq` (finished, cancelled or preempted). Idempotent."""
        tables = self._tables.pop(seq, None)
        if tables is None:
            return
        for layer, table in enumerate(tables):
            self._layer_blocks[layer] -= len(table)
            self._free.extend(reversed(table))

    def shrink(self, seq: Hashable, num_tokens: int) -> None:
        """Free blocks beyond what `num_tokens` tokens need (speculative rollback)."""
        tables = self._tables.get(seq)
        if tables is None:
            return
        keep = self.blocks_for(num_tokens)
        for layer, table in enumerate(tables):
            extra = table[keep:]
            if extra:
                del table[keep:]
                self._layer_blocks[layer] -= len(extra)
                self._free.extend(reversed(extra))

    def lower_depth(self, seq: Hashable, depth: int) -> None:
        """Drop layers [depth, old depth) of `seq`, freeing their blocks now."""
        tables = self._tables.get(seq)
        if tables is None or depth >= len(tables):
            return
        assert depth >= 1, "a sequence keeps at least one layer"
        for layer in range(depth, len(tables)):
            self._layer_blocks[layer] -= len(tables[layer])
            self._free.extend(reversed(tables[layer]))
        del tables[depth:]

    def tables(self, seq: Hashable) -> list[list[int]]:
        return self._tables[seq]

    # -- accounting --------------------------------------------------------------------------
    @property
    def num_used(self) -> int:
        return self.cfg.num_blocks - len(self._free)

    def bytes_per_layer(self) -> tuple[int, ...]:
        return tuple(n * self.cfg.block_bytes for n in self._layer_blocks)

    def seq_bytes(self, seq: Hashable) -> int:
        tables = self._tables.get(seq) or []
        return sum(len(t) for t in tables) * self.cfg.block_bytes

    # -- a step's view -----------------------------------------------------------------------
    def step_view(
        self,
        seqs: Sequence[Hashable],
        depths: Sequence[int],
        starts: Sequence[int],
        num_new: int,
        lengths: Sequence[int] | None = None,
    ) -> PagedAttention:
        """Attention through the cache for one forward over rows `seqs` (deepest first), each
        writing `num_new` tokens at positions [start, start + num_new) — or only its first
        `lengths[r]` of them, the rest being padding (a batched prefill: starts all 0)."""
        return PagedAttention(self, seqs, depths, starts, num_new, lengths)


class PagedAttention:
    """The runner's `KVStore` for one step: writes this step's keys/values into the rows'
    blocks and attends over each row's cached tokens, at the layers the row runs."""

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
