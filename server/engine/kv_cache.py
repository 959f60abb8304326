"""KV-cache manager: fixed-size blocks, held only in the layers a sequence runs.

One pool of blocks serves every layer: a block is `block_size` token slots of keys and
values for one layer. A sequence at depth d holds, for each layer in [0, d), a block table
with ceil(tokens / block_size) blocks — so its bytes are d/L of a full-depth sequence, and
the same memory admits more shallow sequences. Lowering a sequence's depth frees the
dropped layers' blocks at once; depth never goes up. Attention over these blocks is
server/engine/attention.py.

`allocate` answers False when there is no room (the scheduler then queues or preempts);
it never evicts anything by itself and never touches another sequence's blocks.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass

import torch


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
